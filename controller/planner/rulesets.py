"""The nftables ruleset of every namespace Zero-Mesh manages, built as data (pure).

Each function returns the whole table of one namespace; the dataplane compares it with what the
kernel has and, only if they differ, replaces the table in one `nft -f` transaction. The rules
are the seed's ("rules NR", "rules ndmz": masquerade out of `public`, from `public` only
established/related traffic enters, the rest is dropped), plus what the seed leaves implicit:

- NR: a workload sends from its own subnet only (anti-spoofing) and never reaches the ndmz range
  (neither the ndmz nor other NRs' public legs, whatever network they belong to);
- ndmz: NRs reach only the gateway of the ndmz, not each other (no hairpin through the gateway;
  bridge port isolation stops them at layer 2) nor the node's own addresses;
- host (single NIC): the ndmz's veth is a diode too, and the host masquerades the ndmz's traffic
  out of whatever uplink its routes choose.

Traffic inside a network (bridge, WireGuard, forwarding between peers) has no rule: every chain's
policy is accept. Drops carry a counter, so an operator (and the tests) can see them work; each
counted rule says what it counts (`counts`), which the agent's observer reads back into its
metrics (docs/observability.md, "Internet access"). The masquerade rules count connections
(a nat chain sees each connection's first packet only); the NR also counts what goes out of and
comes back through `public`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from controller.models.nftables import (
    FILTER,
    SRCNAT,
    Chain,
    Table,
    ct_state,
    daddr,
    iifname,
    oifname,
    rule,
    saddr,
)
from controller.models.resources import RESERVED_RANGE

from . import names

REPLIES = ("established", "related")


def _diode(ifname: str, direction=iifname, into: str = "", *, counts: str = "inbound",
           received: bool = False) -> tuple:
    """Only replies to connections made from inside come back in through `ifname` (`direction`
    oifname: out of it, i.e. into what lies behind it). The drop counts as `counts`; with
    `received` the replies are counted too."""
    replies = ("counter", "accept") if received else ("accept",)
    return (rule(direction(ifname), ct_state(*REPLIES), *replies, counts="received" if received else ""),
            rule(direction(ifname), "counter", "drop", counts=counts,
                 comment=f"diode: nothing new enters {into or 'through ' + ifname}"))


def _filter(hook: str, rules: Sequence) -> Chain:
    return Chain(hook, "filter", hook, FILTER, tuple(rules))


def _masquerade(*exprs, counts: str = "") -> Chain:
    # A nat chain sees only the first packet of a connection: its counter counts connections.
    return Chain("postrouting", "nat", "postrouting", SRCNAT,
                 (rule(*exprs, "counter", "masquerade", counts=counts),))


def nr_ruleset(subnet: ipaddress.IPv4Network) -> Table:
    """The NR of a network on this node, whose workloads live in `subnet`."""
    bridge, public = names.NR_BRIDGE, names.NR_PUBLIC_IFNAME
    return Table("inet", names.NFT_TABLE, (
        _filter("prerouting", (
            rule(iifname(bridge), saddr(subnet, negate=True), "counter", "drop", counts="spoofed",
                 comment="anti-spoofing: workloads send from their subnet only"),
            rule(iifname(bridge), daddr(RESERVED_RANGE), "counter", "drop", counts="to_node",
                 comment="workloads never reach the ndmz range"),
        )),
        _filter("input", _diode(public)),
        _filter("forward", (
            rule(oifname(public), "counter", counts="sent", comment="what the network sends to the Internet"),
            *_diode(public, received=True),
        )),
        _masquerade(oifname(public), counts="connections"),
    ))


def ndmz_ruleset(uplink: str, gateway: ipaddress.IPv4Address, legs: ipaddress.IPv4Network,
                 node_addresses: Sequence[ipaddress.IPv4Address]) -> Table:
    """The node's ndmz: `uplink` towards the Internet, the bridge to the NRs' public legs
    (`legs`, gateway `gateway`), and the node's own addresses that NRs must not reach."""
    bridge = names.NDMZ_BRIDGE
    forward = [*_diode(uplink),
               rule(iifname(bridge), oifname(bridge), "counter", "drop", counts="between_networks",
                    comment="NRs never reach each other through the ndmz"),
               rule(iifname(bridge), saddr(legs, negate=True), "counter", "drop", counts="spoofed",
                    comment="anti-spoofing: only NR public legs")]
    if node_addresses:
        forward.append(rule(iifname(bridge), daddr(node_addresses), "counter", "drop", counts="to_node",
                            comment="NRs never reach the node's own addresses"))
    return Table("inet", names.NFT_TABLE, (
        _filter("input", (
            *_diode(uplink),
            rule(iifname(bridge), daddr(gateway, negate=True), "counter", "drop", counts="to_node",
                 comment="NRs reach only the gateway of the ndmz"),
        )),
        _filter("forward", forward),
        _masquerade(oifname(uplink), counts="connections"),
    ))


def host_ruleset(table: str, link: str, link_net: ipaddress.IPv4Network,
                 host_address: ipaddress.IPv4Address) -> Table:
    """Single NIC: Zero-Mesh's own chains in the node's host namespace. `link` is the host's end
    of the veth to the ndmz (`link_net`, the host holding `host_address`): nothing new enters
    the ndmz or the host through it, nor reaches the host's end of it from elsewhere; the ndmz's
    traffic leaves masqueraded as the node."""
    return Table("inet", table, (
        _filter("input", (
            *_diode(link, counts="to_node"),  # the ndmz opening something in the host
            rule(iifname(link, negate=True), iifname("lo", negate=True), daddr(host_address),
                 "counter", "drop", counts="inbound", comment="the ndmz link is not reachable from outside"),
        )),
        _filter("forward", _diode(link, oifname, into="the ndmz")),
        _masquerade(saddr(link_net), oifname(link, negate=True)),
    ))
