"""Remove everything a node's agent made, from its state dir alone (no etcd needed): every NR
namespace it recorded, every wireguard-go process it started (killed by recorded, verified PID),
their sockets and the private keys, and the ndmz (a dual-NIC NIC moved back to the host first;
the single-NIC veth goes with the namespace) with Zero-Mesh's table in the host namespace.
For decommissioning a node and for test/demo teardown."""

from __future__ import annotations

import logging
from pathlib import Path

from controller.dataplane.links import Links
from controller.dataplane.netns import delete_netns, netns_exists, sysctl_set
from controller.dataplane.nftables import Nftables
from controller.dataplane.wireguard.base import KeyStore
from controller.dataplane.wireguard.userspace import UserspaceBackend
from controller.planner import names

from .state import LocalState

log = logging.getLogger(__name__)


async def purge_node(*, state_dir: Path | str, name_prefix: str) -> list[str]:
    """Returns what was removed (for messages)."""
    state_dir = Path(state_dir)
    removed: list[str] = []
    if not state_dir.exists():
        return removed
    state = LocalState(state_dir)
    links = Links()
    wg = UserspaceBackend(str(state_dir), None, links)
    keys = KeyStore(str(state_dir))
    if state.name_prefix is not None and state.name_prefix != name_prefix:
        # The record knows the names its NRs were made under: remove those, not lookalikes.
        log.warning("state dir %s was used with name prefix %r, not %r: purging what it recorded",
                    state_dir, state.name_prefix, name_prefix)
        name_prefix = state.name_prefix
    try:
        networks = set(state.networks)
        devices = set(wg.owned_devices())
        for network in sorted(networks):
            ifname = names.wg_ifname(name_prefix, network)
            netns = names.nr_netns(name_prefix, network)
            if await wg.delete_device(ifname, netns):
                removed.append(f"wireguard-go {ifname}")
            devices.discard(ifname)
            if netns_exists(netns) and await delete_netns(netns):
                removed.append(f"netns {netns}")
            keys.remove(ifname)
            await state.forget(network)
        for ifname in sorted(devices):  # started but never recorded as an NR (crash in between)
            if await wg.delete_device(ifname, ""):
                removed.append(f"wireguard-go {ifname}")
            keys.remove(ifname)
        if state.ndmz is not None:
            removed += await _purge_ndmz(state, links)
    finally:
        await wg.close()
        links.close()
    for item in removed:
        log.info("purged %s", item)
    return removed


async def _purge_ndmz(state: LocalState, links: Links) -> list[str]:
    ndmz, removed = state.ndmz, []
    if netns_exists(ndmz.netns):
        if ndmz.nic and (await links.observe(ndmz.netns, sysctls=False)).link(ndmz.nic):
            # A real NIC would otherwise fall back to the machine's first namespace.
            await links.move_link(ndmz.netns, ndmz.nic, ndmz.host_netns)
            removed.append(f"NIC {ndmz.nic} moved back to {ndmz.host_netns or 'the host namespace'}")
        links.pool.forget(ndmz.netns)
        if await delete_netns(ndmz.netns):
            removed.append(f"netns {ndmz.netns}")
    if ndmz.host_netns is None or netns_exists(ndmz.host_netns):
        where = ndmz.host_netns or "the host namespace"
        if await Nftables().remove(ndmz.host_netns, "inet", ndmz.host_table):
            removed.append(f"nftables table inet {ndmz.host_table} in {where}")
        if ndmz.host_forwarding == "0" and await sysctl_set(ndmz.host_netns, "net.ipv4.ip_forward", "0"):
            removed.append(f"IPv4 forwarding in {where} (off again, as before)")
    await state.record_ndmz(None)
    return removed
