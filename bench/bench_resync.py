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

from controller.planner import names
from controller.sim.etcd import EmbeddedEtcd
from controller.sim.world import World, metric_total, scrape_metrics

RESYNC = 1.0


def totals(port: int) -> tuple[float, float, float, float]:
    """(reconcile seconds, reconciles, converged reconciles, dataplane writes) so far."""
    text = scrape_metrics(port)
    return (metric_total(text, "zmesh_reconcile_duration_seconds_sum"),
            metric_total(text, "zmesh_reconcile_duration_seconds_count"),
            metric_total(text, "zmesh_reconcile_total", result="converged"),
            metric_total(text, "zmesh_dataplane_writes_total"))


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
                if totals(node.metrics_port)[2] >= n:
                    break
                if time.monotonic() - started > 300:
                    raise SystemExit("did not converge in 300 s")
                time.sleep(0.2)
            print(f"{n} NRs converged in {time.monotonic() - started:.1f} s after apply")
            time.sleep(RESYNC * 2)
            s0, c0, _, writes0 = totals(node.metrics_port)
            time.sleep(RESYNC * 5)
            s1, c1, _, writes1 = totals(node.metrics_port)
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
