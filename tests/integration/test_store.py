"""EtcdStore against a real etcd: raw KV, pagination, failover, typed objects and the index."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging

import pytest
import yaml
from store_objects import network, wide_network, workload

from controller.models.manifest import ManifestError, to_json
from controller.models.resources import NetworkResourceFacts, Node, ResourceStatus, WorkloadStatus
from controller.sim.etcd import free_port
from controller.store.client import (
    Connection,
    EtcdStore,
    Get,
    Put,
    StoreError,
    StoreUnavailable,
    absent,
    mod_revision_is,
)

pytestmark = pytest.mark.etcd


async def etcdctl(etcd, *args: str) -> str:
    """The real etcdctl, exec'd (no bare fork beside gRPC threads, design.md 5b)."""
    proc = await asyncio.create_subprocess_exec(
        "etcdctl", f"--endpoints={etcd.client_url}", *args, env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out
    return out.decode()


async def keys(store, prefix) -> list[str]:
    return [e.key for e in (await store.list_prefix(prefix))[0]]


async def test_raw_ops(store):
    rev = await store.put("/raw/a", b"1")
    e = await store.get("/raw/a")
    assert (e.value, e.mod_revision, e.version) == (b"1", rev, 1)
    assert await store.get("/raw/missing") is None
    # A transaction guarded by mod_revision: the first wins, the stale one fails.
    ok = await store.txn([mod_revision_is("/raw/a", rev)], [Put("/raw/a", "2"), Get("/raw/", prefix=True)])
    assert ok.succeeded and [x.value for x in ok.results[1]] == [b"2"]
    stale = await store.txn([mod_revision_is("/raw/a", rev)], [Put("/raw/a", "3")], [Get("/raw/a")])
    assert not stale.succeeded and stale.results[0][0].value == b"2"
    assert (await store.txn([absent("/raw/b")], [Put("/raw/b", "x")])).succeeded
    assert not (await store.txn([absent("/raw/b")], [Put("/raw/b", "y")])).succeeded
    assert await store.delete("/raw/", prefix=True) == 2
    assert await keys(store, "/raw/") == []


async def test_list_prefix_paginates_at_one_revision(store):
    # 300 x 1 KB in pages of 7: many round trips, one consistent revision.
    written = {}
    for i in range(300):
        written[f"/pg/{i:04}"] = await store.put(f"/pg/{i:04}", b"x" * 1024)
    await store.put("/pg0", "outside the prefix")
    listing = asyncio.create_task(store.list_prefix("/pg/", page_size=7))
    # Writes racing the listing: it must show exactly the keys that existed at its revision.
    for i in range(300, 320):
        written[f"/pg/{i:04}"] = await store.put(f"/pg/{i:04}", b"late")
        await asyncio.sleep(0)
    entries, rev = await listing
    assert [e.key for e in entries] == sorted(k for k, r in written.items() if r <= rev)
    assert len(entries) < 320  # the listing really overlapped the writes
    # An explicit older revision reads the past.
    old, _ = await store.list_prefix("/pg/", page_size=7, revision=written["/pg/0299"])
    assert len(old) == 300
    assert len((await store.list_prefix("/pg/", page_size=1000))[0]) == 320
    keys_only, _ = await store.list_prefix("/pg/", page_size=50, keys_only=True)
    assert len(keys_only) == 320 and keys_only[0].value == b""


async def test_large_listing_beyond_grpc_default_message_size(etcd, store):
    # 5,000 x 1 KB = 5 MB, above gRPC's 4 MiB default. Read through a client with gRPC's default
    # limits (via the connection-factory seam): works only because the listing is paginated.
    value = b"v" * 1024
    for start in range(0, 5000, 100):
        await store.txn([], [Put(f"/big/{i:05}", value) for i in range(start, start + 100)])

    def default_limits(endpoint, settings):
        return Connection(endpoint, dataclasses.replace(settings, options={}))

    async with EtcdStore(etcd.endpoints, client_factory=default_limits) as plain:
        entries, _ = await plain.list_prefix("/big/")
        assert len(entries) == 5000
        with pytest.raises(StoreError, match="(?i)message larger than max|resource"):
            await plain.list_prefix("/big/", page_size=10_000)


async def test_failover_dead_endpoint_first(etcd):
    dead = f"127.0.0.1:{free_port()}"
    async with EtcdStore([dead, f"http://{etcd.endpoint}"], timeout=2.0) as s:
        await s.put("/fo/a", "1")
        assert (await s.get("/fo/a")).value == b"1"
        assert s.endpoint.port == etcd.client_port
        events = s.watch("/fo/", prefix=True, start_revision=1)
        assert (await anext(events)).key == "/fo/a"
        await events.aclose()


async def test_all_endpoints_dead_is_a_clear_error():
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    async with EtcdStore(dead, timeout=1.0) as s:
        with pytest.raises(StoreUnavailable, match="etcd unreachable at .*127.0.0.1"):
            await s.get("/x")


async def test_an_outage_is_logged_once_and_the_recovery_once(etcd, caplog):
    async with EtcdStore([etcd.endpoint], timeout=0.5) as s:
        await s.put("/out/a", "1")
        etcd.stop()
        try:
            with caplog.at_level(logging.DEBUG, logger="controller.store.client"):
                for _ in range(3):
                    with pytest.raises(StoreUnavailable):
                        await s.get("/out/a")
        finally:
            etcd.start()
        with caplog.at_level(logging.DEBUG, logger="controller.store.client"):
            assert (await s.get("/out/a")).value == b"1"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len([m for m in warnings if "failed" in m]) == 1, warnings
    assert len([m for m in warnings if "answers again" in m]) == 1, warnings


async def test_store_survives_etcd_restart(etcd, store):
    await store.put("/rs/a", "1")
    await etcd.arestart()
    assert (await store.get("/rs/a")).value == b"1"


async def test_apply_get_list_delete_round_trip(store):
    lay = store.layout
    net = await store.apply(network(aggregators=["node-a"]))
    assert net.metadata.generation > 0
    got = await store.get_object("Network", "net1")
    assert got == net and got.metadata.generation == (await store.get(lay.network("net1"))).mod_revision
    assert await keys(store, lay.index_root()) == [
        lay.index_network("node-a", "net1"), lay.index_network("node-b", "net1"),
    ]
    w = await store.apply(workload())
    assert (await store.get_object("Workload", "w1")) == w
    assert lay.index_workload("node-a", "w1") in await keys(store, lay.index_root())

    # node-b leaves, node-c joins: the stale entry goes in the same transaction.
    net2 = await store.apply(network(nodes=("node-a", "node-c")))
    assert net2.metadata.generation > net.metadata.generation
    assert await keys(store, lay.index_root()) == [
        lay.index_network("node-a", "net1"), lay.index_workload("node-a", "w1"),
        lay.index_network("node-c", "net1"),
    ]
    objs, errors = await store.list_objects("Network")
    assert objs == [net2] and errors == []

    assert await store.delete_object("Network", "net1") is True
    assert await store.delete_object("Network", "net1") is False
    assert await store.get_object("Network", "net1") is None
    assert await keys(store, lay.index_root()) == [lay.index_workload("node-a", "w1")]
    assert await store.delete_object("Workload", "w1")
    assert await keys(store, lay.root) == []  # the network's guard went with it: nothing outlives them


async def test_value_written_by_hand_reads_like_the_cli(store):
    lay = store.layout
    cli = await store.apply(network("by-cli"))
    data = json.loads(to_json(network("by-hand")))
    # As `etcdctl put /zmesh/v1/networks/by-hand "$(cat net.json)"` would: pretty JSON ...
    rev = await store.put(lay.network("by-hand"), json.dumps(data, indent=2))
    # ... and YAML is accepted too.
    rev_yaml = await store.put(lay.network("by-yaml"), yaml.safe_dump(json.loads(to_json(network("by-yaml")))))
    hand = await store.get_object("Network", "by-hand")
    assert hand.metadata.generation == rev
    assert hand.spec == cli.spec
    assert to_json(hand) == to_json(network("by-hand"))
    assert (await store.get_object("Network", "by-yaml")).metadata.generation == rev_yaml
    objs, errors = await store.list_objects("Network")
    assert [o.name for o in objs] == ["by-cli", "by-hand", "by-yaml"] and errors == []


async def test_malformed_values_are_reported_not_raised(store):
    lay = store.layout
    await store.apply(network("good"))
    await store.put(lay.network("bad-json"), '{"apiVersion": "zmesh.io/v1", "kind": ')
    bad = json.loads(to_json(network("bad-subnet")))
    bad["spec"]["resources"][0]["subnet"] = "100.64.1.0/24"
    await store.put(lay.network("bad-subnet"), json.dumps(bad))
    await store.put(lay.network("wrong-name"), to_json(network("other")))
    await store.put(lay.network("wrong-kind"), to_json(workload("wrong-kind")))
    await store.put(lay.network("binary"), b"\xff\xfe")
    objs, errors = await store.list_objects("Network")
    assert [o.name for o in objs] == ["good"]
    by_key = {e.key.rsplit("/", 1)[-1]: e.message for e in errors}
    assert set(by_key) == {"bad-json", "bad-subnet", "wrong-name", "wrong-kind", "binary"}
    assert "neither JSON nor YAML" in by_key["bad-json"] or "not valid" in by_key["bad-json"]
    assert "100.64.0.0/10" in by_key["bad-subnet"]
    assert "does not match" in by_key["wrong-name"]
    assert "kind: 'Workload' is not one of Network" in by_key["wrong-kind"]
    assert "UTF-8" in by_key["binary"]
    with pytest.raises(ManifestError):
        await store.get_object("Network", "bad-subnet")
    # Applying a good spec over a bad one works and indexes it.
    await store.apply(network("bad-subnet"))
    assert len((await store.list_objects("Network"))[0]) == 2


async def test_apply_over_hand_written_spec_removes_its_stale_index(store):
    lay = store.layout
    await store.put(lay.network("n"), to_json(network("n", nodes=("old-1", "keep"))))
    await store.put(lay.index_network("old-1", "n"), "")
    await store.apply(network("n", nodes=("keep", "new-1")))
    assert await keys(store, lay.index_root()) == [
        lay.index_network("keep", "n"), lay.index_network("new-1", "n"),
    ]


async def test_concurrent_read_modify_write_loses_no_update(store):
    await store.apply(network("shared", nodes=()))
    n = 20

    def add_label(i):
        def mutate(cur):
            cur.metadata.labels[f"k{i}"] = str(i)
            return cur
        return mutate

    await asyncio.gather(*(store.update("Network", "shared", add_label(i)) for i in range(n)))
    final = await store.get_object("Network", "shared")
    assert final.metadata.labels == {f"k{i}": str(i) for i in range(n)}


async def test_concurrent_apply_keeps_index_consistent(store):
    lay = store.layout
    variants = [network("race", nodes=(f"n{i}", f"n{i + 1}")) for i in range(10)]
    await asyncio.gather(*(store.apply(v) for v in variants))
    final = await store.get_object("Network", "race")
    assert await keys(store, lay.index_root()) == sorted(lay.index_network(n, "race") for n in final.spec.nodes)


async def test_nodes_and_statuses(store):
    node = Node.model_validate({"metadata": {"name": "node-a"}, "spec": {"endpoints": ["198.51.100.7"]}})
    reg = await store.register_node(node, ttl=5)
    try:
        assert await store.list_nodes() == [node]
        assert await store.alive_nodes() == {"node-a"}
        st = ResourceStatus(network="net1", node="node-a", observedGeneration=3)
        facts = NetworkResourceFacts(network="net1", node="node-a", publicKey="A" * 43 + "=",
                                     listenPort=51820, endpoints=["198.51.100.7"], subnet="10.1.1.0/24")
        await store.put_status(st)
        await store.put_facts(facts)
        await store.put_status(WorkloadStatus(workload="w1", node="node-a", ip="10.1.1.2"))
        await store.put(store.layout.nr_status("node-z", "net1"), "garbage")
        # a value under another node's key is not that node's, whatever it says
        await store.put(store.layout.nr_status("node-y", "net1"), st.model_dump_json())
        assert await store.get_statuses("net1", ["node-a", "node-y", "node-z"]) == {"node-a": st}
        assert await store.get_facts("net1", ["node-a", "node-y"]) == {"node-a": facts}
        assert (await store.get_workload_status("node-a", "w1")).ip.compressed == "10.1.1.2"
        assert store.layout.facts("node-a", "net1").startswith(store.layout.node_root("node-a"))
    finally:
        await reg.stop()
    assert await store.alive_nodes() == set()
    assert [n.name for n in await store.list_nodes()] == ["node-a"]  # the record persists


async def test_many_index_entries_fit_in_one_transaction(store):
    # etcd's default --max-txn-ops is 128: a network on 100 nodes still applies atomically.
    await store.apply(wide_network("wide", 100))
    assert len(await keys(store, store.layout.index_root())) == 100


async def test_too_many_nodes_for_one_transaction_is_a_clear_error(store):
    with pytest.raises(Exception, match="max-txn-ops"):
        await store.apply(wide_network("huge", 200))
    assert await store.get_object("Network", "huge") is None  # nothing half-written


async def test_etcdctl_put_is_read_like_the_cli(etcd, store, tmp_path):
    # The documented hand-written path, with the real etcdctl (exec'd: safe beside gRPC threads).
    manifest = tmp_path / "net.yaml"
    manifest.write_text(yaml.safe_dump(json.loads(to_json(network("from-etcdctl")))))
    key = store.layout.network("from-etcdctl")
    await etcdctl(etcd, "put", key, manifest.read_text())
    got = await store.get_object("Network", "from-etcdctl")
    assert to_json(got) == to_json(network("from-etcdctl"))
    assert got.metadata.generation == (await store.get(key)).mod_revision


async def test_failover_when_the_endpoint_in_use_dies(etcd, etcd_proxy):
    # First endpoint: a proxy we can cut while connected; second: etcd itself.
    async with EtcdStore([etcd_proxy.endpoint, etcd.endpoint], timeout=2.0) as s:
        await s.put("/mid/a", "1")
        assert s.endpoint.port == etcd_proxy.port
        await etcd_proxy.cut()
        await s.put("/mid/a", "2")
        assert s.endpoint.port == etcd.client_port
        assert (await s.get("/mid/a")).value == b"2"


async def test_username_and_password_are_passed_through(etcd):
    await etcdctl(etcd, "user", "add", "root:s3cret")
    await etcdctl(etcd, "auth", "enable")
    async with EtcdStore(etcd.endpoints, username="root", password="s3cret", timeout=2.0) as s:
        await s.put("/auth/a", "1")
        assert (await s.get("/auth/a")).value == b"1"
    async with EtcdStore(etcd.endpoints, timeout=2.0) as s:
        with pytest.raises(StoreError, match="user name is empty|permission denied|auth"):
            await s.get("/auth/a")
    async with EtcdStore(etcd.endpoints, username="root", password="wrong", timeout=2.0) as s:
        with pytest.raises(StoreError) as e:
            await s.get("/auth/a")
        assert "wrong" not in str(e.value)  # never echo a password
