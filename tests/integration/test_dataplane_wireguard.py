"""wireguard-go between two simulated nodes: traffic, idempotence, repair, adoption, errors."""

from __future__ import annotations

import asyncio
import os
import signal
from ipaddress import ip_network

import pytest
from dataplane_world import world  # noqa: F401 (fixture)
from dataplane_world import needs_root, ping

from controller.dataplane.wireguard import select_backend, uapi
from controller.dataplane.wireguard.base import DeviceOps, PeerOp, WireGuardError, generate_private_key, public_key
from controller.dataplane.wireguard.kernel import kernel_available
from controller.dataplane.wireguard.userspace import UserspaceBackend

pytestmark = [pytest.mark.root, needs_root]


async def test_ping_across_and_counters(world):
    a, b, wa, wb = await world.two_nodes()
    assert await ping(wa.netns, wb.address.ip)
    assert await ping(wb.netns, wa.address.ip)
    sa = await a.backend.get(a.wg, a.nr_ns)
    peer = sa.peers[b.keys[1]]
    assert peer.rx_bytes > 0 and peer.tx_bytes > 0 and peer.last_handshake > 0
    assert sa.public_key == a.keys[1] and sa.listen_port == a.port
    before = peer.rx_bytes
    assert await ping(wa.netns, wb.address.ip, count=2)
    assert (await a.backend.get(a.wg, a.nr_ns)).peers[b.keys[1]].rx_bytes > before
    # the MTU of wireguard-go's TUN is set like any link's, and traffic keeps flowing
    assert await world.links.ensure_link(a.nr_ns, a.wg, mtu=1380) == 1
    assert (await world.links.observe(a.nr_ns)).link(a.wg).mtu == 1380
    assert await ping(wa.netns, wb.address.ip, count=1)


async def test_second_converge_writes_nothing(world):
    a, b, wa, wb = await world.two_nodes()
    snap = {n.nr_ns: await world.links.observe(n.nr_ns) for n in (a, b)}
    pids = {n.wg: n.backend.pid(n.wg) for n in (a, b)}
    for n in (a, b):
        assert await world.converge(n) == 0
        assert await world.links.ensure_workload(n.nr_ns, "zmbr", wa if n is a else wb) == 0
    for n in (a, b):
        after = await world.links.observe(n.nr_ns)
        before = snap[n.nr_ns]
        assert {k: v.index for k, v in after.links.items()} == {k: v.index for k, v in before.links.items()}
        assert set(after.routes) == set(before.routes)
        assert n.backend.pid(n.wg) == pids[n.wg]
    assert await ping(wa.netns, wb.address.ip)


async def test_killed_wireguard_go_is_restarted_by_one_converge(world):
    a, b, wa, wb = await world.two_nodes()
    old = a.backend.pid(a.wg)
    os.kill(old, signal.SIGKILL)
    for _ in range(200):  # the TUN link goes when the process dies
        if not await a.backend.device_alive(a.wg, a.nr_ns):
            break
        await asyncio.sleep(0.01)
    assert not await a.backend.device_alive(a.wg, a.nr_ns)
    assert await world.converge(a) > 0
    new = a.backend.pid(a.wg)
    assert new and new != old
    assert await a.backend.device_alive(a.wg, a.nr_ns)
    assert await ping(wa.netns, wb.address.ip)


async def test_adoption_after_agent_restart_keeps_the_process(world):
    a, b, wa, wb = await world.two_nodes()
    pid = a.backend.pid(a.wg)
    await a.backend.close()  # the "agent" exits; wireguard-go stays
    fresh = UserspaceBackend(a.state_dir, host_netns=a.node_ns, links=world.links)
    a.backend = fresh
    assert fresh.owned_devices() == [a.wg]
    assert fresh.pid(a.wg) == pid
    assert await world.converge(a) == 0
    assert fresh.starts == 0 and fresh.pid(a.wg) == pid
    assert await ping(wa.netns, wb.address.ip)


async def test_stale_pidfile_of_another_process_is_not_adopted_or_killed(world):
    a, b, wa, wb = await world.two_nodes()
    real = a.backend.pid(a.wg)
    # point the record at a process that is not wireguard-go (ourselves)
    with open(a.backend._pidfile(a.wg), "w") as f:
        f.write(f"{os.getpid()} 1\n")
    assert a.backend.pid(a.wg) is None
    world.pids.add(real)
    os.kill(real, signal.SIGKILL)  # our real process: by the PID we started
    await asyncio.sleep(0.05)
    assert await world.converge(a) > 0
    assert a.backend.pid(a.wg) not in (None, real, os.getpid())


async def test_peer_update_is_minimal_and_moves_allowed_ips(world):
    a, b, wa, wb = await world.two_nodes()
    extra = "10.1.3.0/24"
    desired = world.desired_peers(a)
    moved = [type(p).make(p.public_key, [*p.allowed_ips, extra], p.endpoint) for p in desired]
    ops = await a.backend.configure(a.wg, a.nr_ns, a.keys[0], a.port, moved)
    assert ops.private_key is None and ops.listen_port is None
    assert len(ops.peers) == 1 and ops.peers[0].endpoint is None
    assert ops.peers[0].allowed_ips is None, "a gained prefix is inserted, the others untouched"
    assert {str(n) for n in ops.peers[0].add_allowed_ips} == {extra}
    st = await a.backend.get(a.wg, a.nr_ns)
    assert {str(n) for n in st.peers[b.keys[1]].allowed_ips} == {"10.1.2.0/24", extra}
    assert not await a.backend.configure(a.wg, a.nr_ns, a.keys[0], a.port, moved)
    # back again: replace_allowed_ips removes the extra prefix (no allowed_ip=- on this version)
    await a.backend.configure(a.wg, a.nr_ns, a.keys[0], a.port, desired)
    st = await a.backend.get(a.wg, a.nr_ns)
    assert {str(n) for n in st.peers[b.keys[1]].allowed_ips} == {"10.1.2.0/24"}


async def test_inserting_a_prefix_another_peer_holds_moves_it_in_one_step(world):
    """What peer_ops' ordering relies on: wireguard-go keeps one owner per prefix, and an
    inserted prefix changes owner without ever being absent."""
    a, b, wa, wb = await world.two_nodes()
    old = public_key(generate_private_key())
    hidden = ip_network("10.1.9.0/24")
    await a.backend.apply(a.wg, a.nr_ns, DeviceOps(peers=(PeerOp(old, add_allowed_ips=frozenset({hidden})),)))
    assert (await a.backend.get(a.wg, a.nr_ns)).peers[old].allowed_ips == {hidden}
    await a.backend.apply(a.wg, a.nr_ns, DeviceOps(peers=(PeerOp(b.keys[1], add_allowed_ips=frozenset({hidden})),)))
    st = await a.backend.get(a.wg, a.nr_ns)
    assert st.peers[old].allowed_ips == frozenset()
    assert {str(n) for n in st.peers[b.keys[1]].allowed_ips} == {"10.1.2.0/24", str(hidden)}
    assert await ping(wa.netns, wb.address.ip), "the peer's own prefix was never touched"


async def test_uapi_errors_are_clear(world):
    a_ns, _ = await world.build_underlay()
    a = await world.node(a_ns, "a", "198.51.100.1/24", "10.1.1.0/24")
    await world.links.ensure_nr(a.nr_ns)
    await a.backend.ensure_device(a.wg, a.nr_ns)
    with pytest.raises(uapi.UAPIError) as e:
        await uapi.request(a.wg, "set=1\nlisten_port=notaport\n")
    assert e.value.errno > 0 and a.wg in str(e.value)
    with pytest.raises(uapi.UAPIError):
        await uapi.request(a.wg, "set=1\npublic_key=zz\n")
    with pytest.raises(WireGuardError, match="not available"):
        await uapi.get(f"zwnone{world.sfx}")
    # a peer removal of an unknown key is accepted (idempotent remove)
    await a.backend.apply(a.wg, a.nr_ns, DeviceOps(peers=(PeerOp(a.keys[1], remove=True),)))


async def test_same_ifname_twice_fails_clearly(world):
    a_ns, b_ns = await world.build_underlay()
    a = await world.node(a_ns, "a", "198.51.100.1/24", "10.1.1.0/24")
    await world.links.ensure_nr(a.nr_ns)
    await a.backend.ensure_device(a.wg, a.nr_ns)
    world.pids.add(a.backend.pid(a.wg))
    other = UserspaceBackend(os.path.join(world.tmp, "other"), host_netns=b_ns, links=world.links)
    with pytest.raises(WireGuardError, match="in use by another process"):
        await other.ensure_device(a.wg, a.nr_ns)
    assert other.starts == 0 and other.owned_devices() == []
    assert await a.backend.device_alive(a.wg, a.nr_ns)


async def test_delete_device_stops_process_and_removes_socket(world):
    a_ns, _ = await world.build_underlay()
    a = await world.node(a_ns, "a", "198.51.100.1/24", "10.1.1.0/24")
    await world.links.ensure_nr(a.nr_ns)
    await a.backend.ensure_device(a.wg, a.nr_ns)
    pid = a.backend.pid(a.wg)
    world.pids.add(pid)
    assert await a.backend.delete_device(a.wg, a.nr_ns)
    assert not os.path.exists(uapi.socket_path(a.wg))
    assert a.backend.pid(a.wg) is None and a.backend.owned_devices() == []
    st = await world.links.observe(a.nr_ns)
    assert st.link(a.wg) is None
    assert not await a.backend.delete_device(a.wg, a.nr_ns)


def test_select_backend_falls_back_to_userspace(tmp_path):
    assert not kernel_available()  # this machine has no wireguard module
    assert isinstance(select_backend(str(tmp_path)), UserspaceBackend)
    assert isinstance(select_backend(str(tmp_path), prefer="userspace"), UserspaceBackend)
    with pytest.raises(RuntimeError, match="not available"):
        select_backend(str(tmp_path), prefer="kernel")


@pytest.mark.etcd
async def test_dataplane_work_beside_a_live_etcd_watch(world, store):
    """Nothing here forks beside aetcd's gRPC threads (design 5b): the watch keeps delivering."""
    seen = []

    async def watch():
        async for ev in store.watch("/zmesh/dptest/", prefix=True):
            seen.append(ev.key)
            if len(seen) == 2:
                return

    task = asyncio.create_task(watch())
    try:
        await asyncio.sleep(0.2)
        await store.put("/zmesh/dptest/before", b"1")
        a, b, wa, wb = await world.two_nodes()
        assert await ping(wa.netns, wb.address.ip)
        await store.put("/zmesh/dptest/after", b"2")
        await asyncio.wait_for(task, 10)
        assert seen == ["/zmesh/dptest/before", "/zmesh/dptest/after"]
    finally:
        task.cancel()


async def test_deleting_the_nr_ends_its_wireguard_go(world):
    a_ns, _ = await world.build_underlay()
    a = await world.node(a_ns, "a", "198.51.100.1/24", "10.1.1.0/24")
    await world.links.ensure_nr(a.nr_ns)
    await a.backend.ensure_device(a.wg, a.nr_ns)
    pid = a.backend.pid(a.wg)
    world.pids.add(pid)
    await world.links.delete_nr(a.nr_ns)  # the TUN dies with the namespace; wireguard-go exits
    for _ in range(300):
        if a.backend.pid(a.wg) is None:
            break
        await asyncio.sleep(0.01)
    assert a.backend.pid(a.wg) is None
    await a.backend.delete_device(a.wg, a.nr_ns)  # forgets the record
    assert a.backend.owned_devices() == [] and not os.path.exists(uapi.socket_path(a.wg))
