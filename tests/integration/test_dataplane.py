"""Namespaces, links, routes and workload veths on real namespaces (no WireGuard here)."""

from __future__ import annotations

import asyncio
import os
from ipaddress import IPv4Interface, IPv4Network

import pytest
from dataplane_world import world  # noqa: F401 (fixture)
from dataplane_world import MTU, World, needs_root, ping, sh

from controller.dataplane.links import Links
from controller.dataplane.netns import (
    NetlinkPool,
    create_netns,
    delete_netns,
    list_netns,
    netns_exists,
    sysctl_get,
    sysctl_set,
)

pytestmark = [pytest.mark.root, needs_root]

GW = IPv4Interface("10.1.1.1/24")


async def nr(w: World) -> str:
    ns = await w.netns("nr")
    await w.links.ensure_nr(ns)
    await w.links.ensure_bridge(ns, "zmbr", GW, MTU)
    return ns


class _Node:  # the bits of NodeNR that World.workload needs
    def __init__(self, nr_ns):
        self.nr_ns, self.subnet, self.gateway = nr_ns, GW.network, GW


async def test_nr_is_built_then_converged_with_zero_writes(world):
    ns = await nr(world)
    st = await world.links.observe(ns)
    assert st.ip_forward is True
    br = st.link("zmbr")
    assert br.kind == "bridge" and br.up and br.mtu == MTU and br.addresses == {GW}
    wl = await world.workload(_Node(ns), "1", 5)
    assert await ping(wl.netns, GW.ip, count=1)
    before = world.links.writes
    assert await world.links.ensure_nr(ns) == 0
    assert await world.links.ensure_bridge(ns, "zmbr", GW, MTU) == 0
    assert await world.links.ensure_workload(ns, "zmbr", wl) == 0
    assert world.links.writes == before
    after = await world.links.observe(ns)
    assert {k: v.index for k, v in after.links.items()} == {k: v.index for k, v in st.links.items()} | {
        wl.host_ifname: after.link(wl.host_ifname).index
    }


async def test_workload_side_is_addressed_routed_and_enslaved(world):
    ns = await nr(world)
    wl = await world.workload(_Node(ns), "1", 7)
    st = await world.links.observe(ns)
    host = st.link(wl.host_ifname)
    assert host.kind == "veth" and host.master == st.link("zmbr").index and host.up
    inner = await world.links.observe_workload(wl.netns)
    eth = inner.link("eth0")
    assert eth.addresses == {IPv4Interface("10.1.1.7/24")} and eth.up and eth.mtu == MTU
    dflt = inner.route(IPv4Network("0.0.0.0/0"))
    assert dflt.gateway == GW.ip and dflt.oif == eth.index
    # a drifted address and a lost default route are repaired, and only those
    sh("ip", "-n", wl.netns, "addr", "flush", "dev", "eth0")
    assert await world.links.ensure_workload(ns, "zmbr", wl) == 2
    assert await world.links.ensure_workload(ns, "zmbr", wl) == 0


async def test_workload_by_absolute_netns_path(world):
    ns = await nr(world)
    wns = await world.netns("wp")
    wl = await world.workload(_Node(ns), "x", 9)  # by name
    from controller.dataplane.links import VethAttachment

    by_path = VethAttachment(f"zv{world.sfx}p", f"/var/run/netns/{wns}", "eth0",
                             IPv4Interface("10.1.1.10/24"), GW.ip, MTU)
    assert await world.links.ensure_workload(ns, "zmbr", by_path) > 0
    assert await world.links.ensure_workload(ns, "zmbr", by_path) == 0
    assert await ping(wns, wl.address.ip, count=1)


async def test_remove_veth_removes_only_that_veth(world):
    ns = await nr(world)
    w1 = await world.workload(_Node(ns), "1", 5)
    w2 = await world.workload(_Node(ns), "2", 6)
    before = await world.links.observe(ns)
    assert await world.links.remove_veth(ns, w1.host_ifname)
    after = await world.links.observe(ns)
    assert set(before.links) - set(after.links) == {w1.host_ifname}
    assert {k: v.index for k, v in after.links.items()} == {
        k: v.index for k, v in before.links.items() if k != w1.host_ifname
    }
    assert (await world.links.observe_workload(w1.netns)).link("eth0") is None
    assert netns_exists(w1.netns)  # the workload's namespace is not ours to delete
    assert await ping(w2.netns, GW.ip, count=1)
    assert not await world.links.remove_veth(ns, w1.host_ifname)  # idempotent


async def test_routes_are_exactly_the_wanted_set(world):
    ns = await nr(world)
    sh("ip", "-n", ns, "link", "add", "zdum", "type", "veth", "peer", "name", "zdum2")  # no dummy module here
    sh("ip", "-n", ns, "link", "set", "zdum2", "up")
    sh("ip", "-n", ns, "link", "set", "zdum", "up")
    a, b, c = (IPv4Network(f"10.1.{i}.0/24") for i in (2, 3, 4))
    assert await world.links.ensure_routes(ns, "zdum", [a, b]) == 2
    assert await world.links.ensure_routes(ns, "zdum", [a, b]) == 0
    assert await world.links.ensure_routes(ns, "zdum", [b, c]) == 2  # drop a, add c
    st = await world.links.observe(ns)
    assert set(st.routes_via("zdum")) == {b, c}
    # a wanted destination that points elsewhere is taken over
    sh("ip", "-n", ns, "route", "replace", "10.1.2.0/24", "dev", "zmbr")
    assert await world.links.ensure_routes(ns, "zdum", [a, b, c]) == 1
    st = await world.links.observe(ns)
    assert set(st.routes_via("zdum")) == {a, b, c}
    assert st.route(a).oif == st.link("zdum").index
    assert await world.links.ensure_routes(ns, "zdum", []) == 3


async def test_delete_nr_takes_the_veths_and_closes_the_socket(world):
    ns = await nr(world)
    wl = await world.workload(_Node(ns), "1", 5)
    assert await world.links.delete_nr(ns)
    assert not netns_exists(ns) and ns not in list_netns()
    # the workload end dies with the NR (the kernel cleans namespaces up asynchronously),
    # which it only does if no socket of ours keeps the namespace alive
    for _ in range(300):
        if (await world.links.observe_workload(wl.netns)).link("eth0") is None:
            break
        await asyncio.sleep(0.01)
    assert (await world.links.observe_workload(wl.netns)).link("eth0") is None
    assert not await world.links.delete_nr(ns)


async def test_pool_reopens_a_recreated_namespace_and_never_forks(world):
    forks = []
    os.register_at_fork(before=lambda: forks.append(1))
    ns = await world.netns("re")
    pool = NetlinkPool()
    try:
        first = await pool.get(ns)
        assert await pool.get(ns) is first
        await delete_netns(ns)
        await create_netns(ns)
        second = await pool.get(ns)
        assert second is not first
        assert await second.link("dump")
        assert forks == []  # ip netns add/del use vfork+exec, not os.fork
    finally:
        pool.close()


async def test_sysctl_is_per_namespace(world):
    ns = await world.netns("sy")
    root_before = await sysctl_get(None, "net.ipv4.ip_forward")
    assert await sysctl_get(ns, "net.ipv4.ip_forward") == "0"
    assert await sysctl_set(ns, "net.ipv4.ip_forward", "1")
    assert not await sysctl_set(ns, "net.ipv4.ip_forward", "1")
    assert await sysctl_get(ns, "net.ipv4.ip_forward") == "1"
    assert await sysctl_get(None, "net.ipv4.ip_forward") == root_before
    with pytest.raises(ValueError):
        await sysctl_get(ns, "kernel.hostname")


async def test_links_on_missing_namespace(world):
    links = Links()
    try:
        assert await links.observe(world.name("none")) is None
        assert not await links.remove_veth(world.name("none"), "x")
        with pytest.raises(FileNotFoundError):
            await links.ensure_link(await nr(world), "nosuchlink", 1420)
    finally:
        links.close()


async def test_dead_workload_namespace_is_not_pinned(world):
    ns = await nr(world)
    wl = await world.workload(_Node(ns), "1", 5)
    await world.links.observe_workload(wl.netns)
    await delete_netns(wl.netns)  # the container died
    for _ in range(300):
        if (await world.links.observe(ns)).link(wl.host_ifname) is None:
            break
        await asyncio.sleep(0.01)
    assert (await world.links.observe(ns)).link(wl.host_ifname) is None
    with pytest.raises(FileNotFoundError):
        await world.links.ensure_workload(ns, "zmbr", wl)


async def test_concurrent_requests_share_a_socket(world):
    """The kernel runs one dump per socket at a time (EBUSY otherwise): requests are serialized."""
    ns = await nr(world)
    states = await asyncio.gather(*[world.links.observe(ns) for _ in range(20)])
    assert all(set(st.links) == {"lo", "zmbr"} for st in states)
    sh("ip", "-n", ns, "link", "add", "zdum", "type", "veth", "peer", "name", "zdum2")
    sh("ip", "-n", ns, "link", "set", "zdum", "up")
    results = await asyncio.gather(
        world.links.ensure_routes(ns, "zdum", [IPv4Network("10.9.0.0/16")]),
        *[world.links.observe(ns) for _ in range(10)],
    )
    assert results[0] == 1
