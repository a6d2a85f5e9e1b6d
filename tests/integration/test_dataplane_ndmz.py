"""The ndmz on real namespaces, without an agent: NR public legs on the ndmz bridge (isolated
ports), the single-NIC veth to the host, a pass of the ndmz reconciler in both uplink modes with
the real nft, and `zmesh purge` undoing all of it (a dual NIC goes back to the host)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from ipaddress import IPv4Address, IPv4Interface, ip_address

import pytest
from dataplane_world import world  # noqa: F401 (fixture)
from dataplane_world import needs_root, sh

from controller.dataplane.links import DEFAULT_ROUTE
from controller.dataplane.netns import netns_exists, sysctl_get, sysctl_set
from controller.dataplane.nftables import Nftables
from controller.planner.ndmz import UplinkConfig
from controller.planner.plan import NodeContext
from controller.reconciler.ndmz import NdmzReconciler
from controller.reconciler.purge import purge_node
from controller.reconciler.state import LocalState

pytestmark = [pytest.mark.root, needs_root]

LEG = IPv4Interface("100.64.0.2/16")


async def ndmz_with_bridge(world) -> str:
    ns = await world.netns("dmz")
    await world.links.ensure_nr(ns)
    await world.links.ensure_bridge(ns, "tonrs", IPv4Interface("100.64.0.1/16"))
    return ns


def ip(netns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", netns, *args], capture_output=True, text=True, check=True).stdout


async def test_a_public_leg_is_an_isolated_bridge_port_and_is_repaired(world):
    ndmz = await ndmz_with_bridge(world)
    nr = await world.netns("nr")
    await world.links.ensure_nr(nr)
    links = world.links
    assert await links.ensure_public_leg(ndmz, "tonrs", "zpleg", nr, "public", LEG) > 0
    st, dmz = await links.observe(nr), await links.observe(ndmz)
    leg, port = st.link("public"), dmz.link("zpleg")
    assert leg.kind == "veth" and leg.up and leg.addresses == {LEG} and leg.peer_index == port.index
    assert port.master == dmz.link("tonrs").index and port.isolated is True and port.up
    assert await links.ensure_public_leg(ndmz, "tonrs", "zpleg", nr, "public", LEG, nr_observed=st) == 0

    sh("ip", "-n", ndmz, "link", "set", "zpleg", "type", "bridge_slave", "isolated", "off")
    sh("ip", "-n", nr, "addr", "flush", "dev", "public")
    assert await links.ensure_public_leg(ndmz, "tonrs", "zpleg", nr, "public", LEG) == 2
    assert "isolated on" in ip(ndmz, "-d", "link", "show", "zpleg")
    assert (await links.observe(nr)).link("public").addresses == {LEG}
    # Our end gone (both ends go): made again; a stray "public" in the NR (ours) is replaced.
    sh("ip", "-n", ndmz, "link", "del", "zpleg")
    sh("ip", "-n", nr, "link", "add", "public", "type", "bridge")
    assert await links.ensure_public_leg(ndmz, "tonrs", "zpleg", nr, "public", LEG) > 0
    st = await links.observe(nr)
    assert st.link("public").kind == "veth" and st.link("public").addresses == {LEG}
    # Routes through a gateway: the default via the ndmz gateway, exactly once.
    gw = IPv4Address("100.64.0.1")
    assert await links.ensure_routes(nr, "public", [DEFAULT_ROUTE], via=gw) == 1
    assert await links.ensure_routes(nr, "public", [DEFAULT_ROUTE], via=gw) == 0
    assert "default via 100.64.0.1 dev public" in ip(nr, "route")
    assert await links.ensure_routes(nr, "public", [], via=gw) == 1
    assert "default" not in ip(nr, "route")


async def test_the_uplink_veth_never_takes_over_a_foreign_link_in_the_host(world):
    ndmz, host = await ndmz_with_bridge(world), await world.netns("host")
    a, h = IPv4Interface("100.127.255.254/30"), IPv4Interface("100.127.255.253/30")
    links = world.links
    assert await links.ensure_uplink_veth(ndmz, "public", a, host, "zt-up", h) > 0
    assert await links.ensure_uplink_veth(ndmz, "public", a, host, "zt-up", h) == 0
    assert (await links.observe(host)).link("zt-up").addresses == {h}
    sh("ip", "-n", host, "addr", "flush", "dev", "zt-up")
    assert await links.ensure_uplink_veth(ndmz, "public", a, host, "zt-up", h) == 1
    # A link of the same name that is not our peer belongs to someone else: refused, untouched.
    sh("ip", "-n", host, "link", "add", "zt-other", "type", "bridge")
    before = ip(host, "-j", "link", "show", "zt-other")
    with pytest.raises(RuntimeError, match="not attached"):
        await links.ensure_uplink_veth(ndmz, "uplink2", a, host, "zt-other", h)
    assert ip(host, "-j", "link", "show", "zt-other") == before


def agent_parts(world, tmp, uplink=UplinkConfig(), host=None):
    prefix = f"t{world.sfx[:3]}-"
    ctx = NodeContext("n1", prefix, (ip_address("198.51.100.11"),))
    state = LocalState(tmp)
    changes = []
    rec = NdmzReconciler(ctx=ctx, uplink=uplink, links=world.links, nftables=Nftables(), state=state,
                         host_netns=host,
                         on_change=lambda: changes.append(1))
    world.namespaces.append(rec.netns)  # removed by the world even if the test fails
    return rec, changes, prefix


def nft_tables(netns: str) -> set[str]:
    out = subprocess.run(["ip", "netns", "exec", netns, "nft", "-j", "list", "tables"], capture_output=True,
                         text=True, check=True).stdout
    return {o["table"]["name"] for o in json.loads(out)["nftables"] if "table" in o}


async def test_single_nic_ndmz_is_built_converged_and_purged_with_the_hosts_forwarding_restored(world, tmp_path):
    host = await world.netns("host")
    rec, changes, prefix = agent_parts(world, tmp_path, host=host)
    await sysctl_set(host, "net.ipv4.ip_forward", "0")  # (a new namespace inherits the machine's)
    await rec.reconcile()
    assert rec.problem is None and changes == [1]  # a new bridge: NRs must attach again
    st = await world.links.observe(rec.netns)
    assert st.link("tonrs").addresses == {IPv4Interface("100.64.0.1/16")}
    assert st.link("public").addresses == {IPv4Interface("100.127.255.254/30")}
    assert "default via 100.127.255.253 dev public" in ip(rec.netns, "route")
    assert await sysctl_get(host, "net.ipv4.ip_forward") == "1"
    assert nft_tables(rec.netns) == {"zmesh"} and nft_tables(host) == {f"zmesh-{prefix[:-1]}"}
    writes = (world.links.writes, rec.nft.writes)
    await rec.reconcile()
    assert (world.links.writes, rec.nft.writes) == writes and changes == [1]

    world.links.pool.forget(rec.netns)  # the agent is stopped before a purge: no socket pins it
    removed = await purge_node(state_dir=tmp_path, name_prefix=prefix)
    assert f"netns {rec.netns}" in removed and not netns_exists(rec.netns)
    assert nft_tables(host) == set()
    # The kernel tears a deleted namespace down in the background: its veth goes a moment later.
    deadline = time.monotonic() + 10
    while f"{prefix}zmndmz" in ip(host, "link"):
        assert time.monotonic() < deadline, "the host end of the ndmz veth is still there"
        await asyncio.sleep(0.05)
    assert await sysctl_get(host, "net.ipv4.ip_forward") == "0"  # as it was before
    assert LocalState(tmp_path).ndmz is None


async def test_dual_nic_ndmz_takes_the_nic_and_purge_gives_it_back(world, tmp_path):
    host = await world.netns("host")
    sh("ip", "-n", host, "link", "add", "zt-nic", "type", "veth", "peer", "name", "zt-wire")  # the NIC's cable
    uplink = UplinkConfig("zt-nic", IPv4Interface("198.51.100.111/24"), IPv4Address("198.51.100.1"))
    rec, _, prefix = agent_parts(world, tmp_path, uplink=uplink, host=host)
    await sysctl_set(host, "net.ipv4.ip_forward", "0")
    await rec.reconcile()
    st = await world.links.observe(rec.netns)
    assert st.link("zt-nic").addresses == {IPv4Interface("198.51.100.111/24")} and st.link("zt-nic").up
    assert "default via 198.51.100.1 dev zt-nic" in ip(rec.netns, "route")
    assert "zt-nic" not in ip(host, "link") and nft_tables(host) == set()
    assert await sysctl_get(host, "net.ipv4.ip_forward") == "0"  # the host is not involved
    writes = (world.links.writes, rec.nft.writes)
    await rec.reconcile()
    assert (world.links.writes, rec.nft.writes) == writes

    world.links.pool.forget(rec.netns)
    removed = await purge_node(state_dir=tmp_path, name_prefix=prefix)
    assert any("NIC zt-nic moved back" in r for r in removed)
    assert "zt-nic" in ip(host, "link") and not netns_exists(rec.netns)


async def test_a_missing_dedicated_nic_is_a_clear_problem_and_the_bridge_still_stands(world, tmp_path):
    host = await world.netns("host")
    uplink = UplinkConfig("zt-none", IPv4Interface("198.51.100.111/24"), IPv4Address("198.51.100.1"))
    rec, changes, _ = agent_parts(world, tmp_path, uplink=uplink, host=host)
    with pytest.raises(FileNotFoundError):
        await rec.reconcile()
    assert "--ndmz-nic zt-none: no such interface" in rec.problem and changes == [1]
    assert (await world.links.observe(rec.netns)).link("tonrs") is not None  # NRs can attach meanwhile
