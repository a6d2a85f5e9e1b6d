"""One bad object, or one hung helper, delays only itself: a workload's netns that is not a
network namespace is refused before anything opens it, and a SIGSTOPped wireguard-go of one
network is detected, restarted and reported while another network on the node goes on."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from meshlib import network_manifest, wait_until, workload_manifest
from test_mesh import two_node_mesh

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.etcd]

GREEN = {"n1": "10.2.1.0/24", "n2": "10.2.2.0/24"}
GREEN_IPS = {"g1": "10.2.1.10", "g2": "10.2.2.10"}


def green(mesh) -> str:
    manifest = network_manifest("green", GREEN, ip_range="10.2.0.0/16")
    for w, node in (("g1", "n1"), ("g2", "n2")):
        manifest += workload_manifest(w, "green", node, mesh.add_workload_ns(w), GREEN_IPS[w])
    return manifest


def workload_status(mesh, node: str, name: str) -> dict | None:
    raw = mesh.etcdctl("get", "--print-value-only", f"/zmesh/v1/nodes/{node}/status/workloads/{name}").stdout
    return json.loads(raw) if raw.strip() else None


def ready_condition(status: dict | None) -> dict:
    return next((c for c in (status or {}).get("conditions", []) if c["type"] == "Ready"), {})


async def test_a_netns_that_is_no_network_namespace_is_refused_and_other_networks_converge(mesh, tmp_path):
    two = two_node_mesh(mesh)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "file").write_text("")
    (tmp_path / "dir").mkdir()
    agent_pid = mesh.world.nodes["n1"].agent.pid
    cases = {  # workload: (netns, what the refusal says)
        "bad-fifo": (str(tmp_path / "fifo"), "is a FIFO"),
        "bad-file": (str(tmp_path / "file"), "is a regular file"),
        "bad-dir": (str(tmp_path / "dir"), "is a directory"),
        "bad-missing": (str(tmp_path / "missing"), "does not exist"),
        "bad-agent": (f"/proc/{agent_pid}/ns/net", "this node's own"),  # another process's: the node's
        "bad-wg": (f"/proc/{mesh.wg_pid('n1', 'blue')}/ns/net", "this node's own"),  # its host namespace
        "bad-mnt": (f"/proc/{agent_pid}/ns/mnt", "not a network namespace"),
    }
    mesh.apply("".join(f"---\napiVersion: zmesh.io/v1\nkind: Workload\nmetadata: {{name: {w}}}\n"
                       f"spec: {{network: blue, node: n1, netns: '{ns}'}}\n" for w, (ns, _) in cases.items()))

    def refused():
        conds = {w: ready_condition(workload_status(mesh, "n1", w)) for w in cases}
        return all(c.get("status") == "False" and cases[w][1] in c.get("message", "") for w, c in conds.items())
    wait_until(refused, 20, what="every bad netns refused in its workload's status")

    # A network applied afterwards on the same node converges within seconds.
    started = time.monotonic()
    mesh.apply(green(mesh))
    mesh.wait_mesh(GREEN_IPS, timeout=20)
    print(f"green converged {time.monotonic() - started:.1f}s after apply, next to 7 refused workloads")
    assert all(mesh.matrix(two).values())
    assert (tmp_path / "fifo").exists() and os.listdir(tmp_path / "dir") == []
    assert "Traceback" not in mesh.world.agent_log("n1")


async def test_a_stopped_wireguard_go_delays_only_its_network_and_is_restarted(mesh):
    two = two_node_mesh(mesh)
    mesh.apply(green(mesh))
    mesh.wait_mesh(GREEN_IPS)
    stuck = mesh.wg_pid("n1", "blue")
    restarts = mesh.metric_sum("n1", "zmesh_wireguard_restarts_total")
    os.kill(stuck, signal.SIGSTOP)
    try:
        # A change to green on the same node: a third workload that must be attached.
        g3 = mesh.add_workload_ns("g3")
        started = time.monotonic()
        mesh.apply(workload_manifest("g3", "green", "n1", g3, "10.2.1.11"))
        # ... while blue is being looked at (a resync runs every RESYNC seconds).
        mesh.wait_mesh({"g3": "10.2.1.11", "g2": GREEN_IPS["g2"]}, timeout=20)
        print(f"green changed {time.monotonic() - started:.1f}s after apply, with blue's wireguard-go stopped")
        # Blue's stuck process is detected (UAPI timeout), replaced and reported.
        wait_until(lambda: mesh.wg_pid("n1", "blue") not in (None, stuck), 30, what="blue's wireguard-go replaced")
    finally:
        try:
            os.kill(stuck, signal.SIGCONT)  # if the test failed before the agent replaced it
        except ProcessLookupError:
            pass
    wait_until(lambda: mesh.metric_sum("n1", "zmesh_wireguard_restarts_total") > restarts, 10,
               what="the restart counted")
    assert "stopped answering its UAPI socket" in mesh.world.agent_log("n1")
    mesh.wait_mesh(two, timeout=30)


async def test_readyz_waits_until_every_known_network_was_reconciled(mesh):
    two_node_mesh(mesh)
    mesh.apply(green(mesh))
    mesh.wait_mesh(GREEN_IPS)
    mesh.world.stop_agent("n1")
    for key in ("blue", "green"):  # what a first reconcile writes again
        mesh.etcdctl("del", f"/zmesh/v1/nodes/n1/status/networks/{key}")
    mesh.world.start_agent("n1")
    wait_until(lambda: mesh.ready("n1"), 30, interval=0.02, what="n1 ready again")
    # The first 200 comes only after both networks were reconciled (their status is back).
    for key in ("blue", "green"):
        assert mesh.etcdctl("get", "--print-value-only", f"/zmesh/v1/nodes/n1/status/networks/{key}").stdout.strip()
