"""Aggregator death to restored hidden connectivity, against re-pointing by hand in the same run.

A real etcd and a simulated world: public nodes n1, n2, n3 on the Internet, hidden nodes h1 and h2
behind two home routers (NAT), a network with aggregators [n1, n2, n3] and a workload on every
node, one real agent per node. Pings run every 20 ms from h1's workload to n3's (hidden to public)
and to h2's (hidden to hidden), both through the aggregator. Each run breaks the aggregator n1 and
measures, from that moment, when both paths answer again for good (the end of the last loss):

- dead: n1's agent SIGKILLed and its uplink pulled (target: lease TTL 10 s + 2 s);
- blackhole: a foreign nft table in n1's host namespace drops its WireGuard UDP while its agent
  and etcd connection stay up (target: 10 s);
- baseline, by hand: `zmesh apply` of the network with aggregators [n2, n1, n3] (the seed's
  static mesh: a human re-applies), timed from the apply to the end of the last loss; n1 stays
  up, so the move itself should lose nothing.

After each run n1 is repaired and the bench waits for the choice to move back to it (the agents
run with a short --probe-hold-down so that this takes seconds). Median and worst of the runs.

    sudo .venv/bin/python bench/bench_failover.py [RUNS]
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import statistics
import subprocess
import sys
import threading
import time

from controller.sim.etcd import EmbeddedEtcd
from controller.sim.world import World, netns_exec

HOLD_DOWN = 4  # s: only the move back waits for it; detection does not
LEASE_TTL = 10  # the agent's
INTERVAL = 0.02  # s between pings
SUBNETS = {"n1": "10.1.1.0/24", "n2": "10.1.2.0/24", "n3": "10.1.3.0/24",
           "h1": "10.1.11.0/24", "h2": "10.1.12.0/24"}
ZMESH = [sys.executable, "-m", "controller.cli.main"]


def ip_of(node: str) -> str:
    return SUBNETS[node].replace(".0/24", ".10")


def manifest(world: World, aggregators) -> str:
    resources = "".join(f"  - {{node: {n}, subnet: {s}}}\n" for n, s in SUBNETS.items())
    docs = [f"apiVersion: zmesh.io/v1\nkind: Network\nmetadata: {{name: blue}}\nspec:\n"
            f"  ipRange: 10.1.0.0/16\n  aggregators: {json.dumps(list(aggregators))}\n  resources:\n{resources}"]
    for n in SUBNETS:
        docs.append(f"apiVersion: zmesh.io/v1\nkind: Workload\nmetadata: {{name: w-{n}}}\n"
                    f"spec: {{network: blue, node: {n}, netns: {world.id}-w-{n}, ip: {ip_of(n)}}}\n")
    return "---\n".join(docs)


class Pinger:
    """`ping -D` from a namespace, every INTERVAL s, keeping (seq, reply time) of every answer."""

    LINE = re.compile(r"^\[(\d+\.\d+)\].*icmp_seq=(\d+)")

    def __init__(self, netns: str, address: str):
        self.replies: list[tuple[int, float]] = []
        self.proc = subprocess.Popen(["ip", "netns", "exec", netns, "ping", "-D", "-n", "-i", str(INTERVAL),
                                      "-W", "1", address], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        self.started = time.time()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            m = self.LINE.match(line)
            if m:
                self.replies.append((int(m.group(2)), float(m.group(1))))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.thread.join(5)

    def answered_since(self, t: float) -> bool:
        return any(ts > t for _, ts in self.replies[-5:])

    def restored(self, broken_at: float) -> tuple[float, int]:
        """(seconds from `broken_at` to the first answer after the last loss, packets lost);
        (0, 0) when nothing was lost."""
        seqs = dict(self.replies)
        sent = [s for s, ts in self.replies if ts >= broken_at - 1]
        if not sent:
            raise RuntimeError("no answer at all")
        first, last = min(sent), max(seqs)
        lost = [s for s in range(first, last + 1) if s not in seqs]
        if not lost:
            return 0.0, 0
        after = min((s for s in seqs if s > max(lost)), default=None)
        if after is None:
            raise RuntimeError("never answered again")
        return max(0.0, seqs[after] - broken_at), len(lost)


def wait(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Bench:
    def __init__(self, world: World, etcd):
        self.world, self.etcd = world, etcd

    def zmesh(self, *args: str, input: str | None = None, quiet: bool = False) -> bool:
        res = subprocess.run(ZMESH + ["--etcd", self.etcd.endpoints[0], *args], input=input, text=True,
                             capture_output=True)
        if res.returncode != 0 and not quiet:
            print(f"zmesh {' '.join(args)}: {res.stderr.strip()}", file=sys.stderr)
        return res.returncode == 0

    def aggregator_of(self, node: str) -> str | None:
        out = subprocess.run(["etcdctl", "--endpoints", self.etcd.endpoints[0], "get", "--print-value-only",
                              f"/zmesh/v1/nodes/{node}/status/networks/blue"], capture_output=True,
                             text=True, env={"ETCDCTL_API": "3"}).stdout.strip()
        return (json.loads(out).get("aggregator") or {}).get("node") if out else None

    def everyone_chose(self, aggregator: str, nodes=tuple(SUBNETS)) -> bool:
        return all(self.aggregator_of(n) == aggregator for n in nodes)

    def hidden_paths_work(self) -> bool:
        ns = f"{self.world.id}-w-h1"
        return all(netns_exec(ns, "ping", "-c", "1", "-W", "1", ip_of(n)).returncode == 0 for n in ("n3", "h2"))

    def settle_on_n1(self) -> None:
        wait(lambda: self.everyone_chose("n1"), 60 + HOLD_DOWN, "every node choosing n1")
        wait(self.hidden_paths_work, 30, "hidden paths through n1")

    def measure(self, break_it, survivors) -> tuple[float, int]:
        """Break n1 with `break_it()`; seconds until both hidden paths answer for good."""
        ns = f"{self.world.id}-w-h1"
        pingers = [Pinger(ns, ip_of("n3")), Pinger(ns, ip_of("h2"))]
        try:
            wait(lambda: all(p.answered_since(p.started) for p in pingers), 10, "pings answering")
            broken_at = time.time()
            break_it()
            wait(lambda: self.everyone_chose("n2", survivors), 60, "every survivor choosing n2")
            wait(lambda: all(p.answered_since(time.time() - 0.1) for p in pingers), 60, "answers again")
            time.sleep(1.0)  # a second of steady answers after the last loss
        finally:
            for p in pingers:
                p.stop()
        results = [p.restored(broken_at) for p in pingers]
        return max(r[0] for r in results), sum(r[1] for r in results)

    def dead(self) -> tuple[float, int]:
        def kill():
            self.world.stop_agent("n1", sig=signal.SIGKILL)
            self.world.set_uplink("n1", False)
        result = self.measure(kill, [n for n in SUBNETS if n != "n1"])
        self.world.set_uplink("n1", True)
        self.world.start_agent("n1")
        self.settle_on_n1()
        return result

    def blackhole(self) -> tuple[float, int]:
        ns = self.world.nodes["n1"].netns
        port = json.loads(subprocess.run(
            ["etcdctl", "--endpoints", self.etcd.endpoints[0], "get", "--print-value-only",
             "/zmesh/v1/nodes/n1/mesh/facts/blue"], capture_output=True, text=True,
            env={"ETCDCTL_API": "3"}, check=True).stdout)["listenPort"]
        rules = (f"table inet zmbench-blackhole {{\n"
                 f"  chain i {{ type filter hook input priority -10; udp dport {port} drop; }}\n"
                 f"  chain o {{ type filter hook output priority -10; udp sport {port} drop; }}\n}}\n")
        result = self.measure(lambda: subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules,
                                                     text=True, check=True), tuple(SUBNETS))
        subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "zmbench-blackhole"],
                       check=True)
        self.settle_on_n1()
        return result

    def by_hand(self) -> tuple[float, int]:
        result = self.measure(lambda: self.zmesh("apply", "-f", "-", input=manifest(self.world, ["n2", "n1", "n3"])),
                              tuple(SUBNETS))
        self.zmesh("apply", "-f", "-", input=manifest(self.world, ["n1", "n2", "n3"]))
        self.settle_on_n1()
        return result


def summary(name: str, samples: list[tuple[float, int]], target: float | None) -> str:
    times = [t for t, _ in samples]
    lost = [n for _, n in samples]
    goal = f"; target < {target:.0f} s: {'met' if max(times) < target else 'MISSED'}" if target else ""
    return (f"{name:<34} median {statistics.median(times):5.2f} s, worst {max(times):5.2f} s "
            f"(runs: {', '.join(f'{t:.2f}' for t in times)}); packets lost per run: "
            f"median {statistics.median(lost):.0f}, worst {max(lost)} at {INTERVAL * 1000:.0f} ms{goal}")


async def main(runs: int) -> None:
    with EmbeddedEtcd() as etcd:
        async with World(etcd.endpoints, resync_interval=5.0,
                         agent_args=["--probe-hold-down", str(HOLD_DOWN)]) as world:
            for n in ("n1", "n2", "n3"):
                world.add_node(n)
            world.add_router("r1")
            world.add_router("r2")
            world.add_node("h1", behind="r1")
            world.add_node("h2", behind="r2")
            for n in SUBNETS:
                world.add_workload_netns(f"w-{n}")
                world.start_agent(n)
            bench = Bench(world, etcd)
            # Applied once every agent has registered its node (the CLI checks the nodes exist).
            wait(lambda: bench.zmesh("apply", "-f", "-", input=manifest(world, ["n1", "n2", "n3"]), quiet=True),
                 30, "the first apply (every node registered)", interval=1.0)
            bench.settle_on_n1()
            print(f"world {world.id}: n1 n2 n3 public, h1 h2 hidden behind two NAT routers; "
                  f"{runs} runs per case, pings every {INTERVAL * 1000:.0f} ms")
            results = {"dead": [], "blackhole": [], "by hand": []}
            for i in range(runs):
                for name, fn in (("dead", bench.dead), ("blackhole", bench.blackhole), ("by hand", bench.by_hand)):
                    results[name].append(fn())
                    print(f"  run {i + 1} {name}: {results[name][-1][0]:.2f} s, {results[name][-1][1]} lost",
                          flush=True)
            print(summary("aggregator dead (kill + uplink)", results["dead"], LEASE_TTL + 2))
            print(summary("aggregator blackholed (nft drop)", results["blackhole"], 10))
            print(summary("baseline: re-applied by hand", results["by hand"], None))
            hand = statistics.median(t for t, _ in results["by hand"])
            for name in ("dead", "blackhole"):
                auto = statistics.median(t for t, _ in results[name])
                print(f"ratio {name} / by hand (medians): {auto / hand:.1f}x" if hand > 0 else
                      f"by hand lost nothing; {name}: {auto:.2f} s of detection and re-pointing")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 5))
