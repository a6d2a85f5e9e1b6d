"""The indexer repairs the node index of specs written by hand; only the leader works."""

from __future__ import annotations

import asyncio

import pytest

from store_objects import network, workload

from controller.models.manifest import to_json
from controller.store.client import EtcdStore
from controller.store.indexer import Indexer, repair_index

pytestmark = pytest.mark.etcd


async def index(store) -> list[str]:
    return [e.key for e in (await store.list_prefix(store.layout.index_root()))[0]]


async def wait_index(store, expected: list[str], timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while (got := await index(store)) != sorted(expected):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"index is {got}, expected {sorted(expected)}")
        await asyncio.sleep(0.05)


async def test_one_pass_repairs_hand_written_specs(store):
    lay = store.layout
    # As etcdctl would: specs without index entries, a stale entry, an orphan, a garbage spec.
    await store.put(lay.network("n1"), to_json(network("n1", nodes=("a", "b"))))
    await store.put(lay.workload("w1"), to_json(workload("w1", node="a")))
    await store.put(lay.index_network("gone", "n1"), "")
    await store.put(lay.index_network("a", "deleted-net"), "")
    await store.put(lay.network("junk"), "{not json")
    await store.put(lay.index_network("c", "junk"), "")  # unreadable spec: left alone
    assert await repair_index(store) == 3
    expected = [
        lay.index_network("a", "n1"), lay.index_workload("a", "w1"),
        lay.index_network("b", "n1"), lay.index_network("c", "junk"),
    ]
    assert await index(store) == sorted(expected)
    assert await repair_index(store) == 0  # converged: nothing more to do


async def test_leader_repairs_and_hands_over(store):
    lay = store.layout
    a = Indexer(store, "agent-a", ttl=2, debounce=0.01)
    b = Indexer(store, "agent-b", ttl=2, debounce=0.01)
    async with a, b:
        await asyncio.wait_for(_until(lambda: a.leading.is_set() or b.leading.is_set()), 10)
        leader, other = (a, b) if a.leading.is_set() else (b, a)
        assert not other.leading.is_set()
        assert (await store.get(lay.leader("indexer"))).value.decode() == leader.identity

        await store.put(lay.network("n1"), to_json(network("n1", nodes=("a", "b"))))
        await wait_index(store, [lay.index_network("a", "n1"), lay.index_network("b", "n1")])
        await store.put(lay.network("n1"), to_json(network("n1", nodes=("b", "c"))))
        await wait_index(store, [lay.index_network("b", "n1"), lay.index_network("c", "n1")])
        await store.delete(lay.network("n1"))
        await wait_index(store, [])
        # A spec applied properly needs no repair.
        before = leader.repairs
        await store.apply(network("n2", nodes=("a",)))
        await asyncio.sleep(0.3)
        assert leader.repairs == before

        await leader.stop()  # steps down (revokes its lease): the other takes over
        await asyncio.wait_for(other.leading.wait(), 10)
        await store.put(lay.workload("w1"), to_json(workload("w1", node="d")))
        await wait_index(store, [lay.index_network("a", "n2"), lay.index_workload("d", "w1")])
    assert await store.get(lay.leader("indexer")) is None


async def test_leader_cut_off_from_etcd_is_replaced(etcd, etcd_proxy, store):
    lay = store.layout
    async with EtcdStore([etcd_proxy.endpoint], timeout=1.0) as cut_off_store:
        a = Indexer(cut_off_store, "agent-a", ttl=2, debounce=0.01)
        async with a:
            await asyncio.wait_for(a.leading.wait(), 10)
            b = Indexer(store, "agent-b", ttl=2, debounce=0.01)
            async with b:
                await asyncio.sleep(0.5)
                assert not b.leading.is_set()
                await etcd_proxy.cut()  # a can no longer keep its lease: it expires
                await asyncio.wait_for(b.leading.wait(), 10)
                await asyncio.wait_for(_until(lambda: not a.leading.is_set()), 10)  # a steps down
                await store.put(lay.network("n1"), to_json(network("n1", nodes=("x",))))
                await wait_index(store, [lay.index_network("x", "n1")])


async def _until(cond) -> None:
    while not cond():
        await asyncio.sleep(0.02)
