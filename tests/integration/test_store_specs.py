"""Admitted spec writes against a real etcd (controller/store/specs.py): per-network guards, a
review that reads only what it judges, one transaction per apply where etcd allows it."""

from __future__ import annotations

import pytest
from store_objects import network, wide_network, workload

from controller.admission import Item, review
from controller.models.resources import Node, WorkloadStatus
from controller.sim.etcd import EmbeddedEtcd
from controller.store import specs
from controller.store.client import EtcdStore, StaleView, TooLarge

pytestmark = pytest.mark.etcd


class Recorder:
    """Wraps a store's txn and range to record every key read and every transaction written."""

    def __init__(self, store: EtcdStore):
        self.store, self.reads, self.writes = store, [], []
        self._txn, self._range = store.txn, store.range
        store.txn, store.range = self.txn, self.range

    async def txn(self, compare, success, failure=()):
        kinds = {type(op).__name__ for op in success}
        if kinds == {"Get"}:
            self.reads += [op.key for op in success]
        else:
            self.writes.append(list(success))
        return await self._txn(compare, success, failure)

    async def range(self, key, **kw):
        self.reads.append(key + ("*" if kw.get("prefix") else ""))
        return await self._range(key, **kw)


async def admit(store, *objs):
    items = [Item(o) for o in objs]
    snap = await specs.read_snapshot(store, items)
    assert [str(p) for p in review(items, snap)] == []
    return items, snap


async def register(store, *nodes: str) -> None:
    for n in nodes:
        await store.put(store.layout.node_registration(n), Node.model_validate({"metadata": {"name": n}, "spec": {}}).model_dump_json())


async def keys(store, prefix) -> list[str]:
    return [e.key for e in (await store.list_prefix(prefix))[0]]


async def test_a_write_reviewed_before_another_write_of_its_network_is_refused_and_writes_nothing(store):
    await store.apply(network("blue"))
    items, snap = await admit(store, workload("late", net="blue"))
    await store.apply(workload("first", net="blue"))  # another writer of blue wins the race
    with pytest.raises(StaleView):
        await specs.write_items(store, items, snap)
    assert await store.get_object("Workload", "late") is None
    # Reviewed again on fresh data it goes through.
    items, snap = await admit(store, workload("late", net="blue"))
    await specs.write_items(store, items, snap)
    assert (await store.get_object("Workload", "late")).spec.network == "blue"


async def test_writes_to_other_networks_do_not_disturb_a_review(store):
    await store.apply(network("blue"))
    await store.apply(network("red"))
    items, snap = await admit(store, workload("w", net="blue"))
    guard_red = (await store.get(store.layout.network_guard("red"))).mod_revision
    await store.apply(workload("r1", net="red"))  # touches red's guard only
    assert (await store.get(store.layout.network_guard("red"))).mod_revision > guard_red
    await specs.write_items(store, items, snap)  # no StaleView: blue's guard did not move
    assert await store.get_object("Workload", "w") is not None


async def test_a_deleted_network_makes_a_review_against_it_stale(store):
    await store.apply(network("blue"))
    items, snap = await admit(store, workload("w", net="blue"))
    await specs.delete_specs(store, [("Network", "blue")])
    with pytest.raises(StaleView):
        await specs.write_items(store, items, snap)
    assert await keys(store, store.layout.root) == []  # spec, index entries and guard are gone


async def test_a_workload_review_reads_its_network_and_its_node_not_every_spec(store):
    for i in range(5):
        await store.apply(network(f"net{i}", nodes=("node-a", "node-b")))
        for j in range(4):
            await store.apply(workload(f"w{i}-{j}", node="node-b", net=f"net{i}"))
    await store.apply(workload("mine", node="node-a", net="net1"))
    rec = Recorder(store)
    snap = await specs.read_snapshot(store, [Item(workload("new", node="node-a", net="net1"))])
    lay = store.layout
    assert sorted(rec.reads) == sorted([
        lay.network_guard("net1"), lay.network("net1"), lay.workload("new"),  # one transaction
        lay.index_workload("node-a", "") + "*",  # the node's workloads, keys only
        lay.workload("mine"), lay.workload_status("node-a", "mine"),
    ])
    assert list(snap.workloads_on["node-a"]) == ["mine"]


async def test_published_addresses_are_in_the_snapshot(store):
    await store.apply(network("blue"))
    await store.apply(workload("running", net="blue"))
    await store.put_status(WorkloadStatus(workload="running", node="node-a", ip="10.1.1.2"))
    items = [Item(workload("late", net="blue", ip="10.1.1.2"), "m.yaml")]
    snap = await specs.read_snapshot(store, items)
    assert [str(p) for p in review(items, snap)] == [
        "m.yaml Workload/late: spec.ip: ip 10.1.1.2 is already used by workload 'running' (allocated by node node-a)"]


async def test_a_multi_object_apply_is_one_transaction(store):
    await register(store, "node-a", "node-b")
    objs = [network("blue"), workload("a", net="blue"), workload("b", net="blue", node="node-b")]
    items, snap = await admit(store, *objs)
    rec = Recorder(store)
    landed = []
    await specs.write_items(store, items, snap, lambda it, rev: landed.append((it.obj.name, rev)))
    assert len(rec.writes) == 1
    assert [name for name, _ in landed] == ["blue", "a", "b"] and len({rev for _, rev in landed}) == 1
    assert sorted(await keys(store, store.layout.index_root())) == sorted([
        store.layout.index_network("node-a", "blue"), store.layout.index_network("node-b", "blue"),
        store.layout.index_workload("node-a", "a"), store.layout.index_workload("node-b", "b")])


async def test_beyond_etcds_transaction_limit_an_apply_is_written_object_by_object():
    with EmbeddedEtcd(extra_args=("--max-txn-ops=8",)) as etcd:
        async with EtcdStore(etcd.endpoints, timeout=3.0) as store:
            await register(store, "node-a", "node-b", *(f"n{i}" for i in range(10)))
            objs = [network("blue")] + [workload(f"w{i}", net="blue") for i in range(4)]
            items, snap = await admit(store, *objs)
            rec = Recorder(store)
            landed = []
            await specs.write_items(store, items, snap, lambda it, rev: landed.append(it.obj.name))
            assert landed == ["blue", "w0", "w1", "w2", "w3"]
            assert len(rec.writes) == 1 + 5  # the refused whole, then one per object
            assert len((await store.list_objects("Workload"))[0]) == 4
            # One object that alone is too large is a clear error, and nothing of it is written.
            items, snap = await admit(store, wide_network("wide", 10))
            with pytest.raises(TooLarge, match="max-txn-ops"):
                await specs.write_items(store, items, snap)
            assert await store.get_object("Network", "wide") is None


async def test_deleting_several_objects_is_one_transaction(store):
    await store.apply(network("blue"))
    await store.apply(workload("a", net="blue"))
    rec = Recorder(store)
    deleted = []
    await specs.delete_specs(store, [("Workload", "a"), ("Workload", "missing"), ("Network", "blue")],
                             on_deleted=deleted.append)
    assert deleted == [("Workload", "a"), ("Network", "blue")]
    assert len(rec.writes) == 1
    assert await keys(store, store.layout.root) == []
