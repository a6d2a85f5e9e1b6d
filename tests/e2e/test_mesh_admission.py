"""Admission end to end: an address a running workload holds is never taken from it. A later
workload pinning that address is refused by the CLI (naming the owner) and, written with
etcdctl past the CLI, reported by the agent on the later workload, while the running one keeps
its address and its pings never stop."""

from __future__ import annotations

import json
import re
import signal
import subprocess

import pytest
import yaml
from meshlib import network_manifest, wait_until, workload_manifest

from controller.sim.world import netns_exec

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.etcd]

SUBNETS = {"n1": "10.77.1.0/24", "n2": "10.77.2.0/24"}


def workload_status(mesh, node: str, name: str) -> dict | None:
    raw = mesh.etcdctl("get", "--print-value-only", f"/zmesh/v1/nodes/{node}/status/workloads/{name}").stdout
    return json.loads(raw) if raw.strip() else None


def addresses(netns: str) -> set[str]:
    """The IPv4 addresses of the workload's eth0 (none when the agent attached nothing)."""
    out = netns_exec(netns, "ip", "-j", "-4", "addr", "show", check=True).stdout
    return {a["local"] for link in json.loads(out) if link["ifname"] == "eth0" for a in link["addr_info"]}


async def test_a_later_pin_never_renumbers_a_running_workload(mesh):
    mesh.start("n1", "n2")
    manifest = network_manifest("shop", SUBNETS, ip_range="10.77.0.0/16")
    manifest += workload_manifest("running", "shop", "n2", mesh.add_workload_ns("running"))  # allocated by n2
    manifest += workload_manifest("client", "shop", "n1", mesh.add_workload_ns("client"), "10.77.1.10")
    mesh.apply(manifest)
    held = wait_until(lambda: (workload_status(mesh, "n2", "running") or {}).get("ip"), 30,
                      what="the address n2 allocated to 'running'")
    mesh.wait_mesh({"running": held, "client": "10.77.1.10"})

    # Pings from the client to the running workload, every 0.2 s, across everything below.
    ping = subprocess.Popen(["ip", "netns", "exec", mesh.workload_ns("client"), "ping", "-n",
                             "-i", "0.2", "-W", "1", "-w", "300", held],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        late_ns = mesh.add_workload_ns("late")
        late = workload_manifest("late", "shop", "n2", late_ns, held)

        # 1. The CLI refuses it, naming the owner, and writes nothing.
        refused = mesh.zmesh("apply", "-f", "-", input=late, check=False)
        assert refused.returncode == 1 and refused.stdout == ""
        assert (f"<stdin> Workload/late: spec.ip: ip {held} is already used by workload 'running' "
                "(allocated by node n2)") in refused.stderr, refused.stderr
        assert mesh.etcdctl("get", "/zmesh/v1/workloads/late").stdout == ""

        # 2. Past the CLI, with etcdctl: the agent keeps the address where it is and says why
        #    on the later workload.
        mesh.etcdctl("put", "/zmesh/v1/workloads/late", json.dumps(yaml.safe_load(late)))

        def reported():
            st = workload_status(mesh, "n2", "late")
            ready = next((c for c in (st or {}).get("conditions", []) if c["type"] == "Ready"), None)
            return ready if ready and ready["reason"] == "AddressUnavailable" else None
        ready = wait_until(reported, 30, what="late's AddressUnavailable condition")
        assert ready["status"] == "False"
        assert ready["message"] == f"ip {held} is already used by workload 'running'"
        assert ping.poll() is None, "the pings ended before the conflict was reported"

        row = next(line.split() for line in mesh.zmesh("get", "workloads").stdout.splitlines()
                   if line.startswith("late "))
        assert row[-2:] == ["False", "AddressUnavailable"]
        # Two more reconciles of the network later nothing moved: the running workload keeps its address.
        seen = mesh.metric_sum("n2", "zmesh_reconcile_total", network="shop")
        wait_until(lambda: mesh.metric_sum("n2", "zmesh_reconcile_total", network="shop") >= seen + 2, 30,
                   what="two more reconciles of shop on n2")
        assert (workload_status(mesh, "n2", "running") or {}).get("ip") == held
        assert addresses(mesh.workload_ns("running")) == {held}
        assert addresses(late_ns) == set()  # the later one got nothing: no eth0 at all
    finally:
        ping.send_signal(signal.SIGINT)
        out, _ = ping.communicate(timeout=60)
    replies = sorted(int(n) for n in re.findall(r"bytes from .* icmp_seq=(\d+)", out))
    # Every ping answered (a gap would be a lost one), but perhaps the one in flight at the end.
    assert len(replies) >= 10 and replies == list(range(1, replies[-1] + 1)), out
    sent = int(re.search(r"(\d+) packets transmitted", out).group(1))
    assert sent - len(replies) <= 1, out
