"""What a converged resync costs the agent per NR, against the command-line tools only *looking*
at the same state (ip link/addr/route + wg show per NR), measured in the same run.

A real etcd, a one-node simulated world, one agent, N networks with a workload each. After they
converge, the agent's own histogram (zmesh_reconcile_duration_seconds) over several resyncs gives
the time of a converged reconcile (observe + plan + diff, zero writes); the baseline forks the
four commands a shell-script reconciler would need just to read one NR.

    sudo .venv/bin/python bench/bench_resync.py [N]
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
import urllib.request

from controller.planner import names
from controller.sim.etcd import EmbeddedEtcd
from controller.sim.world import World

RESYNC = 1.0


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def reconcile_totals(m: dict[str, float]) -> tuple[float, float]:
    seconds = sum(v for k, v in m.items() if k.startswith("zmesh_reconcile_duration_seconds_sum"))
    count = sum(v for k, v in m.items() if k.startswith("zmesh_reconcile_duration_seconds_count"))
    return seconds, count


async def main(n: int) -> None:
    with EmbeddedEtcd() as etcd:
        async with World(etcd.endpoints, resync_interval=RESYNC) as world:
            node = world.add_node("n1")
            world.start_agent("n1")
            docs = []
            for i in range(n):
                ns = world.add_workload_netns(f"w{i}")
                docs.append(f"apiVersion: zmesh.io/v1\nkind: Network\nmetadata: {{name: net{i}}}\n"
                            f"spec: {{ipRange: 10.{i // 250}.0.0/16, resources: [{{node: n1, subnet: 10.{i // 250}.{i % 250}.0/24}}]}}\n"
                            f"---\napiVersion: zmesh.io/v1\nkind: Workload\nmetadata: {{name: w{i}}}\n"
                            f"spec: {{network: net{i}, node: n1, netns: {ns}}}\n")
            time.sleep(1.5)
            subprocess.run([sys.executable, "-m", "controller.cli.main", "--etcd", etcd.endpoints[0],
                            "apply", "-f", "-"], input="---\n".join(docs), text=True, check=True,
                           capture_output=True)
            started = time.monotonic()
            nrs = [names.nr_netns(node.name_prefix, f"net{i}") for i in range(n)]
            while True:
                m = metrics(node.metrics_port)
                ready = sum(v for k, v in m.items() if k.startswith("zmesh_reconcile_total") and 'result="converged"' in k)
                if ready >= n:
                    break
                if time.monotonic() - started > 300:
                    raise SystemExit("did not converge in 300 s")
                time.sleep(0.2)
            print(f"{n} NRs converged in {time.monotonic() - started:.1f} s after apply")
            time.sleep(RESYNC * 2)
            s0, c0 = reconcile_totals(metrics(node.metrics_port))
            writes0 = sum(v for k, v in metrics(node.metrics_port).items() if k.startswith("zmesh_dataplane_writes_total"))
            time.sleep(RESYNC * 5)
            m = metrics(node.metrics_port)
            s1, c1 = reconcile_totals(m)
            writes1 = sum(v for k, v in m.items() if k.startswith("zmesh_dataplane_writes_total"))
            ours = (s1 - s0) / (c1 - c0)

            samples = []
            for ns in nrs:
                ifname = names.wg_ifname(node.name_prefix, ns.split("zmnr-", 1)[1])
                t = time.perf_counter()
                for cmd in (["ip", "-n", ns, "-j", "link", "show"], ["ip", "-n", ns, "-j", "addr", "show"],
                            ["ip", "-n", ns, "-j", "route", "show"], ["wg", "show", ifname, "dump"]):
                    subprocess.run(cmd, capture_output=True, check=True)
                samples.append(time.perf_counter() - t)
            baseline = statistics.median(samples)
            print(f"converged reconcile (agent, observe+plan+diff, {int(c1 - c0)} samples): {ours * 1e3:.2f} ms per NR")
            print(f"baseline: ip link/addr/route + wg show per NR (median of {n}): {baseline * 1e3:.2f} ms")
            print(f"ratio baseline/agent: {baseline / ours:.2f}x; dataplane writes during the resyncs: {writes1 - writes0:.0f}")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20))
