"""plan_ndmz(): the desired state of the node's ndmz, the namespace that gives every NR of the
node Internet access (pure: no I/O).

The ndmz is per node, not per network, so it is planned (and reconciled) on its own, beside the
NRs: a bridge on the carrier-grade NAT range holding the gateway every NR's `public` leg routes
through, and the node's uplink for NR traffic:

- single NIC (default): a veth to the node's host namespace on a /30 of its own; the host
  forwards the ndmz's traffic and masquerades it out of its uplink (Zero-Mesh's chains there);
- dual NIC: a NIC of its own, moved from the host into the ndmz, with its own address and
  gateway, so NR traffic never shares the node's own uplink.

Addresses (all inside 100.64.0.0/10, which no network may use):
  100.64.0.0/16          the ndmz bridge: gateway 100.64.0.1, NR public legs from 100.64.0.2
  100.127.255.252/30     single NIC: host end .253, ndmz end .254
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from controller.models.nftables import Table

from . import names
from .rulesets import host_ruleset, ndmz_ruleset

if TYPE_CHECKING:  # plan.py imports this module's addresses
    from .plan import NodeContext

NDMZ_RANGE = ipaddress.IPv4Network("100.64.0.0/16")
NDMZ_GATEWAY = NDMZ_RANGE.network_address + 1
NDMZ_GATEWAY_INTERFACE = ipaddress.IPv4Interface(f"{NDMZ_GATEWAY}/{NDMZ_RANGE.prefixlen}")
HOST_LINK = ipaddress.IPv4Network("100.127.255.252/30")
HOST_LINK_HOST = ipaddress.IPv4Interface(f"{HOST_LINK.network_address + 1}/{HOST_LINK.prefixlen}")
HOST_LINK_NDMZ = ipaddress.IPv4Interface(f"{HOST_LINK.network_address + 2}/{HOST_LINK.prefixlen}")

SINGLE_NIC, DUAL_NIC = "single-nic", "dual-nic"
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


@dataclass(frozen=True)
class UplinkConfig:
    """How the ndmz reaches the Internet (agent flags). No NIC: single NIC, through the host.
    A NIC: dual NIC, that NIC (in the host namespace at first) with `address` and `gateway`."""

    nic: str | None = None
    address: ipaddress.IPv4Interface | None = None
    gateway: ipaddress.IPv4Address | None = None

    def __post_init__(self):
        if self.nic is None:
            if self.address is not None or self.gateway is not None:
                raise ValueError("an ndmz address or gateway needs --ndmz-nic")
            return
        if self.address is None or self.gateway is None:
            raise ValueError(f"--ndmz-nic {self.nic} needs --ndmz-address and --ndmz-gateway")
        if self.gateway not in self.address.network or self.gateway == self.address.ip:
            raise ValueError(f"ndmz gateway {self.gateway} is not another address of {self.address.network}")
        if self.address.network.overlaps(NDMZ_RANGE) or self.address.network.overlaps(HOST_LINK):
            raise ValueError(f"ndmz address {self.address} overlaps the ndmz's own ranges "
                             f"({NDMZ_RANGE}, {HOST_LINK})")
        if not _IFNAME.match(self.nic) or self.nic in (".", ".."):
            raise ValueError(f"--ndmz-nic {self.nic!r} is not a valid interface name")
        if self.nic in (names.NDMZ_BRIDGE, "lo"):
            raise ValueError(f"--ndmz-nic {self.nic}: not a NIC that can be moved into the ndmz")

    @property
    def mode(self) -> str:
        return SINGLE_NIC if self.nic is None else DUAL_NIC


@dataclass(frozen=True)
class DesiredUplink:
    mode: str  # SINGLE_NIC | DUAL_NIC
    ifname: str  # inside the ndmz
    address: ipaddress.IPv4Interface  # inside the ndmz
    gateway: ipaddress.IPv4Address  # the ndmz's default route
    host_ifname: str | None = None  # single NIC: the host end of the veth (None: dual NIC)
    host_address: ipaddress.IPv4Interface | None = None


@dataclass(frozen=True)
class DesiredNdmz:
    netns: str
    bridge: str
    gateway: ipaddress.IPv4Interface  # on the bridge: 100.64.0.1/16
    uplink: DesiredUplink
    ruleset: Table  # inside the ndmz
    host_table: str  # the name of our table in the host namespace
    host_ruleset: Table | None  # single NIC: our chains in the host; dual NIC: none (removed)


def plan_ndmz(ctx: NodeContext, uplink: UplinkConfig) -> DesiredNdmz:
    host_table = names.host_nft_table(ctx.name_prefix)
    if uplink.nic is None:
        host_ifname = names.ndmz_host_ifname(ctx.name_prefix)
        up = DesiredUplink(SINGLE_NIC, names.NDMZ_UPLINK_IFNAME, HOST_LINK_NDMZ, HOST_LINK_HOST.ip,
                           host_ifname, HOST_LINK_HOST)
        host = host_ruleset(host_table, host_ifname, HOST_LINK, HOST_LINK_HOST.ip)
        blocked = [HOST_LINK_HOST.ip]
    else:
        up = DesiredUplink(DUAL_NIC, uplink.nic, uplink.address, uplink.gateway)
        host = None
        blocked = []
    # The node's own addresses: NRs get the node's Internet access, not its services.
    blocked += [a for a in ctx.endpoints if a.version == 4 and a != up.address.ip]
    return DesiredNdmz(
        netns=names.ndmz_netns(ctx.name_prefix),
        bridge=names.NDMZ_BRIDGE,
        gateway=NDMZ_GATEWAY_INTERFACE,
        uplink=up,
        ruleset=ndmz_ruleset(up.ifname, NDMZ_GATEWAY, NDMZ_RANGE, blocked),
        host_table=host_table,
        host_ruleset=host,
    )
