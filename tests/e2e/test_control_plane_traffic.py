"""What the agents write to etcd and what wakes them: facts apart from conditions.

- A condition changing on one node reaches no other node: peers watch facts and liveness
  (`nodes/<peer>/mesh/`), never conditions (`nodes/<peer>/status/`).
- The cold start of a large network writes status bytes linear in its size: a condition names a
  few awaited nodes and counts the rest, instead of listing all of them on every change.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest
from meshlib import Mesh, network_manifest, wait_until, workload_manifest

from controller.models.resources import Network, NetworkResourceFacts, Node
from controller.sim.etcd import EmbeddedEtcd
from controller.sim.world import World
from controller.store.client import EtcdStore

pytestmark = [pytest.mark.root, pytest.mark.etcd, pytest.mark.e2e]

KEY = "A" * 43 + "="


def _reconciles(mesh, node: str, network: str) -> float:
    return mesh.metric_sum(node, "zmesh_reconcile_total", network=network)


def _status(mesh, node: str, network: str) -> dict:
    raw = mesh.etcdctl("get", "--print-value-only", f"/zmesh/v1/nodes/{node}/status/networks/{network}").stdout
    return json.loads(raw) if raw.strip() else {}


def _degraded(status: dict) -> dict:
    return next((c for c in status.get("conditions", []) if c["type"] == "Degraded"), {})


async def test_a_condition_change_on_one_node_causes_no_reconcile_on_the_others(etcd):
    # No periodic resync during the test: every reconcile counted is one an event caused.
    async with World(etcd.endpoints, resync_interval=3600) as world:
        mesh = Mesh(world, etcd)
        mesh.start("n1", "n2")
        subnets = {"n1": "10.1.1.0/24", "n2": "10.1.2.0/24"}
        mesh.apply(network_manifest("blue", subnets)
                   + workload_manifest("w1", "blue", "n1", mesh.add_workload_ns("w1"), "10.1.1.10")
                   + workload_manifest("w2", "blue", "n2", mesh.add_workload_ns("w2"), "10.1.2.10"))
        mesh.wait_mesh({"w1": "10.1.1.10", "w2": "10.1.2.10"})
        wait_until(lambda: _degraded(_status(mesh, "n1", "blue")).get("status") == "False", 15,
                   what="n1 converged")
        # Each node's first probe verdict on the other (with `aggregators` empty both are
        # candidate aggregators) wakes both once: count only after both are published and each
        # node has finished the reconcile that read them (and every other mesh key of both).
        wait_until(lambda: all(mesh.etcd_json(f"/zmesh/v1/nodes/{n}/mesh/verdicts/blue") for n in ("n1", "n2")),
                   15, what="both nodes' probe verdicts published")
        mesh_keys = ("/zmesh/v1/nodes/n1/mesh/", "/zmesh/v1/nodes/n2/mesh/")
        settled = mesh.newest_revision(*mesh_keys)
        mesh.wait_reconciled("blue", ("n1", "n2"), settled)
        before_n2 = _reconciles(mesh, "n2", "blue")
        before_n1 = _reconciles(mesh, "n1", "blue")

        # A workload on n1 whose namespace does not exist: n1's conditions change, its facts
        # do not.
        mesh.apply(workload_manifest("ghost", "blue", "n1", f"{world.id}-no-such-ns"))
        wait_until(lambda: "ghost" in _degraded(_status(mesh, "n1", "blue")).get("message", ""), 15,
                   what="n1 reporting the missing namespace")
        # n1 keeps looking for the namespace (every 2 s): wait for two more of its reconciles,
        # which each re-published its status, before looking at n2.
        wait_until(lambda: _reconciles(mesh, "n1", "blue") >= before_n1 + 3, 15,
                   what="n1 reconciling again")
        after_n2 = _reconciles(mesh, "n2", "blue")
        # On failure, what else n2 may have reacted to: mesh keys written since, and its events.
        assert after_n2 == before_n2, (
            f"n2 reconciled blue {after_n2 - before_n2:g} more time(s); mesh keys newer than {settled}: "
            f"{mesh.newest_revision(*mesh_keys)}; n2's events: "
            f"{[(e['reason'], e['message']) for e in mesh.get_json('n2', '/status')['events']]}")
        assert all(mesh.matrix({"w1": "10.1.1.10", "w2": "10.1.2.10"}).values())


# --- cold start of a large network ------------------------------------------------------------


@pytest.fixture
def roomy_etcd():
    """An etcd taking the index of a 200-node network in one transaction."""
    with EmbeddedEtcd(extra_args=("--max-txn-ops=1024",)) as server:
        yield server


PENDING = re.compile(r"waiting for the facts of (\d+) node")


async def _cold_start(store: EtcdStore, real: str, network: str, size: int) -> tuple[int, int, int]:
    """A network of `size` nodes: `real` and size-1 fake ones that publish their facts one after
    another, each once the real agent has taken the previous one into account. Returns (bytes,
    writes, largest value) of the real agent's status of that network during the cold start."""
    lay = store.layout
    fakes = [f"{network}-f{i:03d}" for i in range(1, size)]
    subnets = {real: "10.0.0.0/24"} | {f: f"10.0.{i}.0/24" for i, f in enumerate(fakes, 1)}
    for f in fakes:
        node = Node.model_validate({"metadata": {"name": f}, "spec": {"endpoints": ["198.51.100.200"]}})
        await store.put(lay.node_registration(f), node.model_dump_json())
    spec = Network.model_validate({"metadata": {"name": network}, "spec": {
        "ipRange": "10.0.0.0/16", "resources": [{"node": n, "subnet": s} for n, s in subnets.items()]}})
    await store.apply(spec)
    status_key = lay.nr_status(real, network)

    async def pending() -> int | None:
        entry = await store.get(status_key)
        if entry is None:
            return None
        for c in json.loads(entry.value)["conditions"]:
            if c["type"] == "Degraded":
                m = PENDING.search(c["message"])
                return int(m.group(1)) if m else (0 if c["status"] == "False" else None)
        return None

    async def until_pending(n: int) -> None:
        deadline = time.monotonic() + 60
        while await pending() != n:
            assert time.monotonic() < deadline, f"{network}: the agent never reported {n} pending"
            await asyncio.sleep(0.01)

    await until_pending(size - 1)
    sizes: list[int] = []
    start = (await store.get(status_key)).mod_revision

    async def count():
        async for ev in store.watch(status_key, start_revision=start + 1):
            sizes.append(len(ev.value))

    counter = asyncio.ensure_future(count())
    try:
        for i, f in enumerate(fakes, 1):
            facts = NetworkResourceFacts(network=network, node=f, publicKey=f"{i:043d}=",
                                         listenPort=51820, endpoints=["198.51.100.200"],
                                         subnet=subnets[f])
            await store.put(lay.facts(f, network), facts.model_dump_json())
            await until_pending(size - 1 - i)
        await asyncio.sleep(0.2)  # the last events on their way to the counter
    finally:
        counter.cancel()
        await asyncio.gather(counter, return_exceptions=True)
    await store.delete_object("Network", network)
    return sum(sizes), len(sizes), max(sizes)


async def test_the_cold_start_of_a_200_node_network_writes_status_bytes_linear_in_its_size(roomy_etcd):
    async with World(roomy_etcd.endpoints, resync_interval=3600) as world:
        mesh = Mesh(world, roomy_etcd)
        mesh.start("real")
        async with EtcdStore(roomy_etcd.endpoints, timeout=10) as store:
            small = await _cold_start(store, "real", "cold-a", 50)
            large = await _cold_start(store, "real", "cold-b", 200)
    print(f"status bytes written during a cold start: 50 nodes {small[0]} B in {small[1]} writes, "
          f"200 nodes {large[0]} B in {large[1]} writes (largest value {large[2]} B)")
    # One status write per peer coming up at most, each of bounded size: 4x the nodes, about 4x
    # the bytes (listing every pending node would make it about 16x).
    assert large[1] <= 200 and large[2] < 2048
    assert large[0] / small[0] < 6, (small, large)
