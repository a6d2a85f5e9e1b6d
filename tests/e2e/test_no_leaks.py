"""Nothing outlives its object, whatever the order of deletion: workloads first, the network
first, both in one `delete -f`, or while an agent is down. Afterwards no key under the prefix
remains but the nodes' own registrations and liveness (and the indexer's leased leader key, the
specs guard, which belong to no object, and the nodes' leased events, which expire by
themselves), and each state dir holds only the node's own files."""

from __future__ import annotations

import base64
import json
import os

import pytest
from meshlib import network_manifest, wait_until, workload_manifest

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.etcd]

SUBNETS = {"n1": "10.1.1.0/24", "n2": "10.1.2.0/24"}
NODE_KEYS = ("registration", "mesh/alive")


def manifests(mesh, round_: int) -> tuple[str, str]:
    """(network, workloads): one attached workload per node and, on n1, one whose namespace
    never appears (its status exists, it never gets attached)."""
    net = network_manifest("blue", SUBNETS)
    wls = ""
    for w, node in ((f"a{round_}", "n1"), (f"b{round_}", "n2")):
        wls += workload_manifest(w, "blue", node, mesh.add_workload_ns(w))
    wls += workload_manifest(f"c{round_}", "blue", "n1", f"/run/netns/{mesh.world.id}-never-{round_}")
    return net, wls


def leftovers(mesh) -> list[str]:
    kvs = json.loads(mesh.etcdctl("get", "--prefix", "--keys-only", "-w", "json", "/zmesh/").stdout).get("kvs", [])
    own = [f"/zmesh/v1/nodes/{n}/{k}" for n in SUBNETS for k in NODE_KEYS]
    # Events stay to tell what happened (the removals too) and expire with their lease.
    events = [f"/zmesh/v1/nodes/{n}/events/" for n in SUBNETS]
    left = []
    for kv in kvs:
        k = base64.b64decode(kv["key"]).decode()
        if k in own or k.startswith(("/zmesh/v1/leader/", "/zmesh/v1/guard")):
            continue
        if k.startswith(tuple(events)) and int(kv.get("lease", 0)):
            continue
        left.append(k)
    return left


def state_files(mesh, node: str) -> list[str]:
    root = mesh.world.nodes[node].state_dir
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def converged(mesh, round_: int) -> bool:
    for node, w in (("n1", f"a{round_}"), ("n2", f"b{round_}")):
        raw = mesh.etcdctl("get", "--print-value-only", f"/zmesh/v1/nodes/{node}/status/workloads/{w}").stdout
        if '"Attached"' not in raw:
            return False
    raw = mesh.etcdctl("get", "--print-value-only", f"/zmesh/v1/nodes/n1/status/workloads/c{round_}").stdout
    return "does not exist" in raw


@pytest.mark.parametrize("order", ["workloads-first", "network-first", "one-delete-f", "agent-down"])
async def test_deleting_in_any_order_leaves_nothing_behind(mesh, order, tmp_path):
    mesh.start("n1", "n2")
    baseline = {n: state_files(mesh, n) for n in SUBNETS}
    net, wls = manifests(mesh, 1)
    mesh.apply(net + wls)
    wait_until(lambda: converged(mesh, 1), 30, what="blue and its workloads converged")
    assert leftovers(mesh) and any("keys/" in f for f in state_files(mesh, "n1"))

    names = ["a1", "b1", "c1"]
    if order == "workloads-first":
        mesh.zmesh("delete", "workload", *names)
        mesh.zmesh("delete", "network", "blue")
    elif order == "network-first":
        mesh.zmesh("delete", "network", "blue")
        mesh.zmesh("delete", "workload", *names)
    elif order == "one-delete-f":
        (tmp_path / "all.yaml").write_text(net + wls)
        mesh.zmesh("delete", "-f", str(tmp_path / "all.yaml"))
    else:  # n1's agent is down while everything goes; it cleans up when it comes back
        mesh.world.stop_agent("n1")
        mesh.zmesh("delete", "network", "blue")
        mesh.zmesh("delete", "workload", *names)
        mesh.world.start_agent("n1")

    wait_until(lambda: not leftovers(mesh), 30, what=f"no key left ({order}): {leftovers(mesh)}")
    for node in SUBNETS:
        wait_until(lambda node=node: state_files(mesh, node) == baseline[node], 20,
                   what=f"{node}'s state dir back to its own files: {state_files(mesh, node)}")
        record = json.loads((mesh.world.nodes[node].state_dir / "state.json").read_text())
        assert record["networks"] == {}
        assert not os.path.exists(f"/var/run/netns/{mesh.nr_netns(node, 'blue')}")
