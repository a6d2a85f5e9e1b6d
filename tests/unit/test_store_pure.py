"""The store's pure parts: endpoint parsing, key parsing, lenient node extraction, index repair
planning. No etcd needed."""

from __future__ import annotations

import json

import pytest

from controller.models.manifest import to_json
from controller.models.resources import Network, Workload
from controller.store.client import KV, EtcdStore, lenient_nodes, parse_endpoint
from controller.store.indexer import Repair, plan_repairs
from controller.store.layout import Layout


def test_parse_endpoint():
    assert str(parse_endpoint("127.0.0.1:2379")) == "http://127.0.0.1:2379"
    assert str(parse_endpoint("http://10.0.0.1:2380")) == "http://10.0.0.1:2380"
    assert parse_endpoint("etcd.example").port == 2379
    assert parse_endpoint("[::1]:23").host == "::1"
    assert str(parse_endpoint("http://user:pw@h:1")) == "http://h:1"  # credentials never kept
    for bad in ("ftp://x:1", "", "h:notaport"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)


def test_store_arguments_are_checked_without_connecting():
    assert [str(e) for e in EtcdStore("a:1,b:2").endpoints] == ["http://a:1", "http://b:2"]
    with pytest.raises(ValueError, match="go together"):
        EtcdStore(["a:1"], username="root")
    with pytest.raises(ValueError):
        EtcdStore([])


def test_layout_key_parsing():
    lay = Layout("/x/")
    assert lay.parse_index_key(lay.index_network("n1", "blue")) == ("n1", "Network", "blue")
    assert lay.parse_index_key(lay.index_workload("n1", "w")) == ("n1", "Workload", "w")
    assert lay.parse_index_key(lay.network("blue")) is None
    assert lay.parse_index_key(lay.node_index("n1") + "other/x") is None
    assert lay.parse_spec_key(lay.workload("w")) == ("Workload", "w")
    assert lay.parse_spec_key(lay.networks()) is None
    assert lay.parse_spec_key(lay.node_registration("n1")) is None


def test_everything_a_node_writes_is_under_its_own_prefix():
    lay = Layout("/x/")
    own = lay.node_root("n1")
    keys = [lay.node_registration("n1"), lay.node_alive("n1"), lay.facts("n1", "blue"),
            lay.verdicts("n1", "blue"), lay.nr_status("n1", "blue"), lay.workload_status("n1", "w"),
            lay.node_events("n1") + "e1"]
    assert all(k.startswith(own) for k in keys)
    # what peers watch holds liveness and facts, and never conditions
    assert lay.node_alive("n1").startswith(lay.node_mesh("n1"))
    assert lay.facts("n1", "blue").startswith(lay.node_mesh("n1"))
    assert not lay.nr_status("n1", "blue").startswith(lay.node_mesh("n1"))
    # one node's prefix never contains another's ("n1" vs "n10")
    assert not lay.node_root("n10").startswith(own)
    assert lay.parse_node_key(lay.facts("n1", "blue")) == ("n1", "mesh/facts/blue")
    assert lay.parse_node_key(lay.nodes() + "n1") is None


def test_lenient_nodes():
    net = {"spec": {"resources": [{"node": "a"}, {"node": "b", "subnet": "bad"}, "junk", {"node": 3}]}}
    assert lenient_nodes("Network", json.dumps(net).encode()) == ["a", "b"]
    assert lenient_nodes("Workload", b"spec:\n  node: n1\n") == ["n1"]
    assert lenient_nodes("Network", b'{"spec": {}}') == []
    assert lenient_nodes("Network", b"{not json") is None
    assert lenient_nodes("Network", b"\xff") is None


def _net(name, nodes) -> bytes:
    return to_json(Network.model_validate({
        "metadata": {"name": name},
        "spec": {"ipRange": "10.0.0.0/16",
                 "resources": [{"node": n, "subnet": f"10.0.{i}.0/24"} for i, n in enumerate(nodes)]},
    })).encode()


def test_plan_repairs():
    store = EtcdStore(["127.0.0.1:1"], prefix="/x/")  # never connects
    lay = store.layout
    wl = to_json(Workload.model_validate({
        "metadata": {"name": "w"}, "spec": {"network": "n", "node": "c", "netns": "ns"}})).encode()
    specs = {
        lay.network("ok"): KV(_net("ok", ["a"]), 5),
        lay.network("fix"): KV(_net("fix", ["a", "b"]), 6),
        lay.network("junk"): KV(b"{", 7),
        lay.workload("w"): KV(wl, 8),
    }
    index = [
        lay.index_network("a", "ok"),
        lay.index_network("a", "fix"), lay.index_network("z", "fix"),
        lay.index_network("q", "junk"),
        lay.index_network("a", "gone"),
        lay.node_index("a") + "unrelated",
    ]
    assert plan_repairs(store, specs, index) == [
        Repair(lay.network("fix"), 6, (lay.index_network("b", "fix"),), (lay.index_network("z", "fix"),)),
        Repair(lay.network("gone"), 0, (), (lay.index_network("a", "gone"),)),
        Repair(lay.workload("w"), 8, (lay.index_workload("c", "w"),), ()),
    ]
    assert plan_repairs(store, specs, index, only={lay.network("ok")}) == []


def test_plan_repairs_never_removes_entries_of_an_invalid_value():
    store = EtcdStore(["127.0.0.1:1"], prefix="/x/")
    lay = store.layout
    invalid = json.loads(_net("bad", ["a"]))
    invalid["spec"]["resources"][0]["subnet"] = "100.64.0.0/24"  # reserved: fails validation
    specs = {lay.network("bad"): KV(json.dumps(invalid).encode(), 9)}
    index = [lay.index_network("old", "bad")]
    assert plan_repairs(store, specs, index) == [Repair(lay.network("bad"), 9, (lay.index_network("a", "bad"),), ())]
