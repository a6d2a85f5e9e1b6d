"""`zmesh demo`: the mesh working end to end on one machine, then gone without a trace.

A private etcd (or a unique prefix on the etcd given with --etcd), a simulated world of public
nodes in network namespaces (controller.sim.world), one real `zmesh agent` per node, a sample
network applied through the store code the CLI uses, the workload-to-workload connectivity matrix
with each workload's Internet access beside it (and the source address the Internet host saw),
proof that the traffic crossed WireGuard, an egress NR taking every workload's Internet traffic,
and the aggregator's failover. Everything is removed at the end, also on Ctrl-C and SIGTERM.

The demo is a list of steps (`Demo.steps`); each is an async method that returns the line to
print when it is done; a new scenario is a new step there.

Interruption is cooperative: the signal handlers only set an event, and every wait checks it
(`Demo.sleep`, `Demo.check`). Nothing is cancelled half-way, so a namespace being created in a
thread can never escape the clean-up that follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from controller.models.manifest import ManifestError, parse_object, split_documents
from controller.models.resources import Network, Workload
from controller.planner import names
from controller.sim.etcd import EmbeddedEtcd, EtcdStartError
from controller.sim.world import INTERNET_HOST, World, metric_total, owns_name, scrape_metrics
from controller.store.client import EtcdStore

NETWORK = "demo"
IP_RANGE = "10.10.0.0/16"
# (node, IPv4 endpoint, IPv6 endpoint): n3 is IPv6-only, so the mesh shows tunnels of both families.
NODES = (("n1", True, True), ("n2", True, True), ("n3", False, True))
# (node, home router): a hidden node behind NAT; it reaches the mesh through the aggregator.
HIDDEN_NODES = (("h4", "home"),)
AGGREGATORS = ("n1", "n2")
# (workload, node): one per node, address .10 of the node's subnet.
WORKLOADS = (("web-1", "n1"), ("web-2", "n2"), ("db-3", "n3"), ("app-4", "h4"))

CONVERGE_TIMEOUT = 25.0  # seconds from apply until every pair must answer
FAILOVER_TIMEOUT = 30.0  # seconds from killing the aggregator until the hidden node must recover
AGENT_START_TIMEOUT = 15.0
RESYNC_INTERVAL = 2.0  # the agents refresh their WireGuard byte counters on every resync
# The node a step makes the network's sole Internet exit (not the aggregator killed at the end).
EGRESS = "n2"

EXIT_OK, EXIT_FAILED, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 130, 143


class Interrupted(Exception):
    pass


class DemoFailed(Exception):
    """One line for the user; the demo cleans up and exits non-zero."""


class NotDone(str):
    """A step's result that is shown as not achieved while the demo goes on (the next step
    shows the details and decides the outcome)."""


# --- output -----------------------------------------------------------------------------------


def _can_encode(stream, text: str) -> bool:
    try:
        text.encode(getattr(stream, "encoding", None) or "ascii")
        return True
    except (UnicodeEncodeError, LookupError):
        return False


class Progress:
    """Steps as lines. On a terminal a spinner with the elapsed time (and the step's live detail)
    runs until the step ends; elsewhere (logs, pipes, tests) only the final line is printed."""

    SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def __init__(self, out=None, tty: bool | None = None):
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        fancy = _can_encode(self.out, "✓✗—" + self.SPINNER)
        self.ok, self.bad, self.dash = ("✓", "✗", "—") if fancy else ("ok", "FAIL", "-")
        self.spinner = self.SPINNER if fancy else "|/-\\"
        self.detail = ""

    def line(self, text: str = "") -> None:
        # On a terminal, first wipe a spinner line that may be showing.
        self.out.write(("\r\x1b[K" if self.tty else "") + text + "\n")
        self.out.flush()

    @contextlib.asynccontextmanager
    async def step(self, title: str):
        self.detail = ""
        start = time.monotonic()
        spin = asyncio.get_running_loop().create_task(self._spin(title, start)) if self.tty else None
        mark, text = self.bad, f"{title}: failed"  # the error itself is the command's last line
        result: list[str] = []  # the step appends its result line here
        try:
            yield result
            text = result[0] if result else title
            mark = self.bad if isinstance(text, NotDone) else self.ok
        except Interrupted:
            text = f"{title}: interrupted"
            raise
        except DemoFailed as e:
            text = f"{title}: {e}"
            raise
        finally:
            if spin is not None:
                spin.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await spin
            self.line(f"{mark} {text} ({time.monotonic() - start:.1f} s)")

    async def _spin(self, title: str, start: float) -> None:
        i = 0
        while True:
            detail = f" — {self.detail}" if self.detail else ""
            self.out.write(f"\r\x1b[K{self.spinner[i % len(self.spinner)]} {title}{detail} "
                           f"({time.monotonic() - start:.1f} s)")
            self.out.flush()
            i += 1
            await asyncio.sleep(0.1)


def table(header: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return [fmt(header), *(fmt(r) for r in rows)]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# --- probes -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Probe:
    ok: bool
    rtt_ms: float | None = None


@dataclasses.dataclass(frozen=True)
class Internet:
    """A workload's Internet access: its ping to the Internet host, and the source address the
    host saw for its HTTP request (None: no answer)."""

    ping: Probe
    seen: str | None


_RTT = re.compile(r"= [\d.]+/([\d.]+)/")


async def ping(netns: str, address: str, count: int = 1) -> Probe:
    """ping from inside a namespace (exec'd, never forked from this gRPC-using process)."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", netns, "ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "1",
        address, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    out, _ = await proc.communicate()
    m = _RTT.search(out.decode(errors="replace"))
    return Probe(proc.returncode == 0, float(m.group(1)) if m else None)


async def scrape(port: int) -> str:
    """An agent's /metrics (urllib in a thread: one request, no session to manage)."""
    return await asyncio.to_thread(scrape_metrics, port)


async def http_ok(port: int, path: str) -> bool:
    import urllib.error
    import urllib.request

    def get() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False
    return await asyncio.to_thread(get)


# --- the demo ---------------------------------------------------------------------------------


class Demo:
    def __init__(self, args, progress: Progress | None = None):
        self.args = args
        self.p = progress or Progress()
        self.stop = asyncio.Event()
        self.signal: int | None = None
        self.etcd: EmbeddedEtcd | None = None
        self.endpoints: list[str] = list(getattr(args, "etcd", None) or [])
        # A unique prefix on a user's etcd so the demo never reads or writes their data.
        self.prefix = "/zmesh/" if not self.endpoints else f"/zmesh-demo-{secrets.token_hex(4)}/"
        self.world: World | None = None
        self.store: EtcdStore | None = None
        self.workload_ns: dict[str, str] = {}  # workload -> netns
        self.workload_ip: dict[str, str] = {}
        self.public_keys: dict[str, str] = {}  # base64 key -> node
        self.matrix: dict[tuple[str, str], Probe] = {}
        self.internet: dict[str, Internet] = {}
        self.report: list[str] = []  # lines a step shows below its own line
        self.kept = False

    # --- interruption -------------------------------------------------------------------------

    def on_signal(self, signum: int) -> None:
        if self.signal is None:
            self.signal = signum
            self.stop.set()
            self.p.line(f"\n{signal.Signals(signum).name}: stopping, cleaning up")
        else:
            self.p.line("still cleaning up, please wait")

    def check(self) -> None:
        if self.stop.is_set():
            raise Interrupted()

    async def sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)
        self.check()

    # --- steps --------------------------------------------------------------------------------

    @property
    def steps(self) -> list[tuple[str, Callable[[], Awaitable[str]]]]:
        return [
            ("Starting etcd", self.start_etcd),
            ("Building the simulated Internet and nodes", self.build_world),
            ("Starting one agent per node", self.start_agents),
            (f"Applying network {NETWORK!r} with one workload per node", self.apply_network),
            ("Waiting for the mesh to converge", self.converge),
            ("Measuring workload-to-workload connectivity and Internet access", self.measure_matrix),
            ("Reading WireGuard counters", self.wireguard_report),
            (f"Making {EGRESS} the network's egress: every workload leaves through it", self.egress),
            (f"Killing the aggregator {AGGREGATORS[0]} (agent SIGKILLed, uplink pulled)", self.kill_aggregator),
        ]

    async def run(self) -> int:
        nodes = ", ".join(f"{n} ({'+'.join(f for f, on in (('IPv4', v4), ('IPv6', v6)) if on)})"
                          for n, v4, v6 in NODES)
        self.p.line("zmesh demo — an encrypted WireGuard mesh on simulated nodes "
                    "(network namespaces on this machine)")
        hidden = ", ".join(f"{n} (hidden behind NAT router {r!r})" for n, r in HIDDEN_NODES)
        self.p.line(f"  nodes: {nodes}, {hidden}, one `zmesh agent` process each; "
                    f"workloads: {', '.join(f'{w} on {n}' for w, n in WORKLOADS)}")
        self.p.line(f"  shown: every workload pinging every other across the mesh (the hidden node "
                    f"through the aggregator, {' then '.join(AGGREGATORS)}) and reaching the Internet "
                    f"host {INTERNET_HOST} through its node's ndmz, the WireGuard traffic per node, "
                    f"{EGRESS} as the network's egress, the aggregator killed and the hidden node "
                    "failing over; then everything is removed (also on Ctrl-C)")
        self.p.line()
        failure: str | None = None
        started = time.monotonic()
        try:
            for title, fn in self.steps:
                self.check()
                try:
                    async with self.p.step(title) as result:
                        result.append(await fn())
                finally:  # a step's tables go below its line, also when it failed
                    for line in self.report:
                        self.p.line(line)
                    self.report.clear()
            if getattr(self.args, "keep", False):
                await self.keep()
        except Interrupted:
            pass
        except DemoFailed as e:
            failure = str(e)
            self.show_agent_problems()
        finally:
            try:
                await self.cleanup()
            except DemoFailed as e:
                failure = failure or f"clean-up incomplete: {e}"
        if self.signal is not None:
            # Also after --keep, where a signal is the expected end: the contract is 130 (143).
            what = "stopped" if self.kept else "interrupted"
            self.p.line(f"zmesh: demo {what} by {signal.Signals(self.signal).name}; "
                        "everything it made was removed")
            return EXIT_SIGTERM if self.signal == signal.SIGTERM else EXIT_SIGINT
        if failure:
            print(f"zmesh: demo failed: {failure}", file=sys.stderr)
            return EXIT_FAILED
        self.p.line(f"{self.p.ok} demo passed in {time.monotonic() - started:.1f} s")
        return EXIT_OK

    async def start_etcd(self) -> str:
        if self.endpoints:
            self.store = EtcdStore(self.endpoints, self.prefix, timeout=5.0)
            await self.store.get(self.prefix)  # fails early and clearly if etcd is not there
            return f"Using etcd at {','.join(self.endpoints)} under the private prefix {self.prefix}"
        # Synchronous on purpose (about a second): a signal arriving meanwhile is handled right
        # after, so an etcd can never be started behind the clean-up's back.
        try:
            self.etcd = EmbeddedEtcd()
            self.etcd.start()
        except EtcdStartError as e:
            raise DemoFailed(str(e).splitlines()[0]) from None
        self.endpoints = self.etcd.endpoints
        self.store = EtcdStore(self.endpoints, self.prefix, timeout=5.0)
        return f"Private etcd running at {self.etcd.endpoint} (pid {self.etcd.pid}, data in {self.etcd.base_dir})"

    async def build_world(self) -> str:
        self.world = World(self.endpoints, agent_args=["--prefix", self.prefix],
                           world_id=getattr(self.args, "world_prefix", None),
                           resync_interval=RESYNC_INTERVAL)
        await self.world.__aenter__()
        w = self.world
        for node_id, v4, v6 in NODES:
            w.add_node(node_id, ipv4=v4, ipv6=v6)
            self.check()
        for node_id, router in HIDDEN_NODES:
            if router not in w.routers:
                w.add_router(router)
            w.add_node(node_id, behind=router)
            self.check()
        for workload, node_id in WORKLOADS:
            self.workload_ns[workload] = w.add_workload_netns(workload)
            index = w.nodes[node_id].index
            self.workload_ip[workload] = str(ipaddress.ip_network(IP_RANGE)[index * 256 + 10])
        addrs = ", ".join(f"{n.node_id} {' '.join(n.endpoints)}" if not n.hidden else
                          f"{n.node_id} {n.ipv4} behind {n.router.name} ({n.router.wan})"
                          for n in w.nodes.values())
        return f"World {w.id}: Internet namespace {w.inet}, nodes {addrs}"

    async def start_agents(self) -> str:
        w = self.world
        for node_id in w.nodes:
            w.start_agent(node_id)
        deadline = time.monotonic() + AGENT_START_TIMEOUT
        pending = set(w.nodes)
        while pending:
            for node_id in sorted(pending):
                node = w.nodes[node_id]
                if node.agent.poll() is not None:
                    raise DemoFailed(f"the agent of {node_id} exited with status {node.agent.returncode}: "
                                     f"{self.last_log_line(node_id)}")
                if await http_ok(node.metrics_port, "/readyz"):
                    pending.discard(node_id)
            self.p.detail = f"{len(w.nodes) - len(pending)}/{len(w.nodes)} ready"
            if not pending:
                break
            if time.monotonic() > deadline:
                raise DemoFailed(f"agents not ready after {AGENT_START_TIMEOUT:.0f} s: {', '.join(sorted(pending))}")
            await self.sleep(0.1)
        pids = ", ".join(f"{n.node_id} pid {n.agent.pid}" for n in w.nodes.values())
        return f"{len(w.nodes)} agents running and ready ({pids})"

    def network_manifest(self, egress: str | None = None) -> str:
        return (f"apiVersion: zmesh.io/v1\nkind: Network\nmetadata: {{name: {NETWORK}}}\nspec:\n"
                f"  ipRange: {IP_RANGE}\n  aggregators: [{', '.join(AGGREGATORS)}]\n"
                + (f"  egress: {egress}\n" if egress else "") + "  resources:\n"
                + "".join(f"  - {{node: {n.node_id}, subnet: 10.10.{n.index}.0/24}}\n"
                          for n in self.world.nodes.values()))

    def manifests(self) -> str:
        docs = [self.network_manifest()]
        for workload, node_id in WORKLOADS:
            docs.append(f"apiVersion: zmesh.io/v1\nkind: Workload\nmetadata: {{name: {workload}}}\n"
                        f"spec: {{network: {NETWORK}, node: {node_id}, netns: {self.workload_ns[workload]}, "
                        f"ip: {self.workload_ip[workload]}}}\n")
        return "---\n".join(docs)

    async def apply_network(self) -> str:
        try:
            objects = [parse_object(d.data, d.where, ("Network", "Workload"))
                       for d in split_documents(self.manifests(), "demo manifest")]
        except ManifestError as e:  # a bug in the demo, not the user's input
            raise DemoFailed(f"sample manifest invalid: {e}") from None
        for obj in objects:  # the network first, as in the manifest
            await self.store.apply(obj)
        n = sum(isinstance(o, Network) for o in objects)
        wl = sum(isinstance(o, Workload) for o in objects)
        return f"Applied {n} network and {wl} workloads to etcd ({IP_RANGE}, a /24 per node)"

    def pairs(self) -> list[tuple[str, str]]:
        return [(a, b) for a, _ in WORKLOADS for b, _ in WORKLOADS if a != b]

    async def probe_all(self, count: int = 1) -> dict[tuple[str, str], Probe]:
        pairs = self.pairs()
        probes = await asyncio.gather(*(ping(self.workload_ns[a], self.workload_ip[b], count) for a, b in pairs))
        return dict(zip(pairs, probes))

    async def converge(self) -> str:
        """Level by level: the NRs and workloads report Ready in etcd, then every pair answers a
        ping (the real test: the status says what the agent did, the ping what the kernel does)."""
        w = self.world
        network = await self.store.get_object("Network", NETWORK)
        generation = network.metadata.generation
        start = time.monotonic()
        deadline = start + CONVERGE_TIMEOUT
        while True:
            self.check_agents()
            statuses = await self.store.get_statuses(NETWORK, w.nodes)
            ready_nrs = [n for n, s in statuses.items()
                         if s.observedGeneration >= generation and _ready(s.conditions)]
            ready_wl = []
            for workload, node in WORKLOADS:
                st = await self.store.get_workload_status(node, workload)
                if st is not None and _ready(st.conditions):
                    ready_wl.append(workload)
            self.p.detail = f"NRs ready {len(ready_nrs)}/{len(w.nodes)}, workloads {len(ready_wl)}/{len(WORKLOADS)}"
            if len(ready_nrs) == len(w.nodes) and len(ready_wl) == len(WORKLOADS):
                facts = await self.store.get_facts(NETWORK, w.nodes)
                self.public_keys = {f.publicKey: n for n, f in facts.items()}
                probes = await self.probe_all()
                reachable = sum(p.ok for p in probes.values())
                self.p.detail += f", pairs answering {reachable}/{len(probes)}"
                if reachable == len(probes):
                    return (f"Converged in {time.monotonic() - start:.1f} s after apply: "
                            f"{len(ready_nrs)} NRs and {len(ready_wl)} workloads Ready, every pair answers")
            if time.monotonic() > deadline:
                # Not fatal here: the matrix that follows shows exactly what is missing.
                return NotDone(f"Not converged after {CONVERGE_TIMEOUT:.0f} s ({self.p.detail})")
            await self.sleep(0.2)

    def check_agents(self) -> None:
        for node_id, node in self.world.nodes.items():
            if node.agent is None or node.agent.poll() is not None:
                code = node.agent.returncode if node.agent else None
                raise DemoFailed(f"the agent of {node_id} exited (status {code}): {self.last_log_line(node_id)}")

    async def measure_matrix(self) -> str:
        self.matrix = await self.probe_all(count=3)
        self.internet = await self.probe_internet()
        self.check()
        names_ = [w for w, _ in WORKLOADS]
        rows = []
        for a in names_:
            row = [f"{a} ({self.workload_ip[a]})"]
            for b in names_:
                if a == b:
                    row.append(self.p.dash)
                    continue
                row.append(self.cell(self.matrix[(a, b)]))
            rows.append(row + [self.internet_cell(a)])
        self.report.append("  Connectivity matrix: ping (3 packets) from the row's workload to the column's;")
        self.report.append("  average round-trip time through the WireGuard mesh. Internet: ping and an HTTP")
        self.report.append(f"  request to the Internet host {INTERNET_HOST}, and the source address it saw.")
        self.report += table(["from \\ to", *names_, f"Internet ({INTERNET_HOST})"], rows)
        failed = [f"{a}->{b}" for (a, b), p in self.matrix.items() if not p.ok]
        if failed:
            raise DemoFailed(f"{len(failed)} of {len(self.matrix)} workload pairs cannot reach each other "
                             f"({', '.join(failed)})")
        wrong = [w for w, node in WORKLOADS if self.internet[w].seen != self.own_exit(node)]
        if wrong:
            raise DemoFailed("unexpected Internet access for " + ", ".join(
                f"{w} (seen as {self.internet[w].seen or 'nothing'}, expected "
                f"{self.own_exit(dict(WORKLOADS)[w]) or 'no access'})" for w in wrong))
        online = sum(1 for w, _ in WORKLOADS if self.internet[w].seen)
        return (f"All {len(self.matrix)} workload pairs reach each other; {online} of {len(WORKLOADS)} "
                "workloads reach the Internet as their node (an IPv6-only node has no IPv4 uplink)")

    def cell(self, probe: Probe) -> str:
        rtt = f" {probe.rtt_ms:.2f} ms" if probe.ok and probe.rtt_ms is not None else ""
        return f"{self.p.ok if probe.ok else self.p.bad}{rtt}"

    def internet_cell(self, workload: str) -> str:
        got = self.internet[workload]
        if got.seen:
            return f"{self.cell(got.ping)}, HTTP seen as {got.seen}"
        node = self.world.nodes[dict(WORKLOADS)[workload]]
        why = "" if node.ipv4 else f" ({node.node_id} has no IPv4 uplink)"
        return f"{self.cell(got.ping)}{why}"

    def own_exit(self, node_id: str) -> str | None:
        """The address the Internet host should see for a workload of `node_id` leaving through
        its own node's ndmz: the node's, its home router's for a hidden node (None: the node
        has no IPv4 uplink, so no IPv4 Internet)."""
        node = self.world.nodes[node_id]
        address = node.router.wan if node.hidden else node.ipv4
        return str(address) if address else None

    async def probe_internet(self) -> dict[str, "Internet"]:
        async def one(workload: str) -> Internet:
            netns = self.workload_ns[workload]
            probe, answer = await asyncio.gather(ping(netns, str(INTERNET_HOST), 3),
                                                 asyncio.to_thread(self.world.http_get, netns, timeout=2))
            return Internet(probe, answer.split()[1] if answer else None)
        found = await asyncio.gather(*(one(w) for w, _ in WORKLOADS))
        return dict(zip((w for w, _ in WORKLOADS), found))

    async def egress(self) -> str:
        """Re-apply the network with an egress NR: every workload's Internet traffic crosses the
        mesh to it (the hidden node's through the aggregator, and the IPv6-only node's, which
        had none) and leaves as that node."""
        network = parse_object(split_documents(self.network_manifest(EGRESS), "demo manifest")[0].data,
                               "demo manifest", ("Network",))
        await self.store.apply(network)
        exit_address = self.own_exit(EGRESS)
        start = time.monotonic()
        deadline = start + CONVERGE_TIMEOUT
        while True:
            self.internet = await self.probe_internet()
            done = [w for w, _ in WORKLOADS if self.internet[w].seen == exit_address]
            self.p.detail = f"{len(done)}/{len(WORKLOADS)} workloads seen as {exit_address}"
            if len(done) == len(WORKLOADS) or time.monotonic() > deadline:
                break
            await self.sleep(0.3)
        rows = [[f"{w} on {node}", self.internet_cell(w)] for w, node in WORKLOADS]
        self.report.append(f"  Internet access with egress {EGRESS}: ping and HTTP to {INTERNET_HOST}, "
                           "source address seen there.")
        self.report += table(["workload", f"Internet ({INTERNET_HOST})"], rows)
        if len(done) != len(WORKLOADS):
            raise DemoFailed(f"not every workload leaves through {EGRESS} after {CONVERGE_TIMEOUT:.0f} s "
                             f"({self.p.detail})")
        return (f"Every workload reaches the Internet as {EGRESS} ({exit_address}) "
                f"{time.monotonic() - start:.1f} s after the change")

    async def wireguard_report(self) -> str:
        """Per-peer facts straight from each node's WireGuard device (the endpoint shows the
        address family of the tunnel), and the byte totals the agents export on /metrics."""
        from controller.dataplane.wireguard import uapi

        w = self.world
        peer_rows, standby = [], []
        for node in w.nodes.values():
            ifname = names.wg_ifname(node.name_prefix, NETWORK)
            try:
                dev = await uapi.get(ifname)
            except Exception as e:
                raise DemoFailed(f"cannot read WireGuard device {ifname} of {node.node_id}: {e}") from None
            now = time.time()
            for key, peer in sorted(dev.peers.items(), key=lambda kv: self.public_keys.get(kv[0], kv[0])):
                if not peer.allowed_ips:  # a standby peer of a candidate aggregator: unused
                    standby.append(f"{node.node_id}->{self.public_keys.get(key, key[:8] + '…')}")
                    continue
                hs = f"{now - peer.last_handshake:.0f} s ago" if peer.last_handshake else "never"
                peer_rows.append([node.node_id, ifname, self.public_keys.get(key, key[:8] + "…"),
                             peer.endpoint or "(peer calls in)", hs,
                             human_bytes(peer.rx_bytes), human_bytes(peer.tx_bytes)])
        self.report.append("  WireGuard peers, read from each node's device (wireguard-go UAPI); a hidden "
                           "node's only peer is the aggregator, which learned its NAT address:")
        self.report += table(["node", "interface", "peer", "endpoint", "handshake", "received", "sent"],
                             peer_rows)
        if standby:
            self.report.append(f"  Standby peers of the next candidate aggregator (no AllowedIPs until a "
                               f"failover): {', '.join(standby)}")

        # The agents refresh the counters on each reconcile; wait one resync at most for values.
        totals: dict[str, tuple[float, float]] = {}
        deadline = time.monotonic() + RESYNC_INTERVAL * 2 + 1
        while True:
            for node in w.nodes.values():
                text = await scrape(node.metrics_port)
                rx = metric_total(text, "zmesh_wireguard_received_bytes_total", network=NETWORK)
                tx = metric_total(text, "zmesh_wireguard_sent_bytes_total", network=NETWORK)
                totals[node.node_id] = (rx or 0, tx or 0)
            if all(rx > 0 and tx > 0 for rx, tx in totals.values()) or time.monotonic() > deadline:
                break
            await self.sleep(0.3)
        self.report.append("  Per node, as exported on each agent's /metrics "
                    "(zmesh_wireguard_{received,sent}_bytes_total):")
        rows = [[n, human_bytes(rx), human_bytes(tx)] for n, (rx, tx) in totals.items()]
        self.report += table(["node", "received", "sent"], rows)
        no_handshake = [f"{r[0]}->{r[2]}" for r in peer_rows if r[4] == "never"]
        if no_handshake:
            raise DemoFailed(f"no WireGuard handshake yet on {', '.join(no_handshake)}")
        quiet = [n for n, (rx, tx) in totals.items() if not (rx > 0 and tx > 0)]
        if quiet:
            raise DemoFailed(f"no WireGuard traffic counted on {', '.join(quiet)}")
        return (f"Traffic crossed WireGuard: {len(peer_rows)} tunnels with a handshake, "
                "bytes counted on every node")

    async def kill_aggregator(self) -> str:
        """Kill the aggregator's agent and pull its uplink; wait until every surviving node has
        moved to the next aggregator and the hidden workloads reach every surviving workload."""
        w = self.world
        dead, successor = AGGREGATORS
        survivors = [n for n in w.nodes if n != dead]
        hidden = [wl for wl, node in WORKLOADS if w.nodes[node].hidden]
        targets = [(a, b) for a in hidden for b, node in WORKLOADS if b != a and node != dead]
        started = time.monotonic()
        w.stop_agent(dead, sig=signal.SIGKILL)
        w.set_uplink(dead, False)
        deadline = started + FAILOVER_TIMEOUT
        while True:
            statuses = await self.store.get_statuses(NETWORK, survivors)
            moved = [n for n in survivors if statuses.get(n) and statuses[n].aggregator
                     and statuses[n].aggregator.node == successor]
            probes = await asyncio.gather(*(ping(self.workload_ns[a], self.workload_ip[b]) for a, b in targets))
            answering = sum(p.ok for p in probes)
            self.p.detail = (f"{len(moved)}/{len(survivors)} nodes on {successor}, "
                             f"{answering}/{len(targets)} hidden pairs answering")
            if len(moved) == len(survivors) and answering == len(targets):
                took = time.monotonic() - started
                lease_left = await self.store.get(self.store.layout.node_alive(dead)) is not None
                break
            if time.monotonic() > deadline:
                raise DemoFailed(f"no failover after {FAILOVER_TIMEOUT:.0f} s ({self.p.detail})")
            await self.sleep(0.1)
        aggregator = statuses[survivors[0]].aggregator
        self.report.append(f"  Every node moved to {successor}: {aggregator.reason}: {aggregator.message}")
        self.report.append(f"  {', '.join(hidden)} reach{'es' if len(hidden) == 1 else ''} "
                           + ", ".join(b for _, b in targets) + f" again through {successor}; "
                           f"last switch {aggregator.lastSwitchTime.isoformat()} in every node's status")
        why = (f"the probes through the tunnels noticed before {dead}'s liveness lease expired"
               if lease_left else f"{dead}'s liveness lease expired")
        return f"Failed over to {successor} in {took:.1f} s, with no human and no leader ({why})"

    async def keep(self) -> None:
        w = self.world
        first = WORKLOADS[0][0]
        other = WORKLOADS[1][0]
        etcd_opt = f"--etcd {','.join(self.endpoints)}" + (f" --prefix {self.prefix}" if self.prefix != "/zmesh/" else "")
        self.p.line()
        self.p.line(f"The world is kept running (--keep). Namespaces: {', '.join(sorted(w._namespaces))}")
        self.p.line(f"  try: ip netns exec {self.workload_ns[first]} ping {self.workload_ip[other]}")
        # As the user started us (`.venv/bin/zmesh` when it is not on PATH), so it can be pasted.
        prog = sys.argv[0] if os.path.basename(sys.argv[0]) == "zmesh" else "zmesh"
        self.p.line(f"       {prog} {etcd_opt} describe network {NETWORK}")
        self.p.line(f"       curl -s 127.0.0.1:{next(iter(w.nodes.values())).metrics_port}/metrics")
        self.p.line("Press Ctrl-C to clean up.")
        await self.stop.wait()
        self.kept = True  # Ctrl-C is how a kept demo ends: not a failure (but still 130)

    # --- failure details and clean-up -----------------------------------------------------------

    def last_log_line(self, node_id: str) -> str:
        lines = [l for l in self.world.agent_log(node_id).splitlines() if l.strip()]
        return lines[-1] if lines else "(no log output)"

    def show_agent_problems(self) -> None:
        """The agents' logs go with the temp dir: show their last warnings before that."""
        if self.world is None:
            return
        for node_id in self.world.nodes:
            bad = [l for l in self.world.agent_log(node_id).splitlines()
                   if " WARNING " in l or " ERROR " in l or "Traceback" in l]
            for line in bad[-3:]:
                print(f"  agent {node_id}: {line}", file=sys.stderr)

    async def cleanup(self) -> None:
        """Every part runs even if another fails; repeated signals do not interrupt it."""
        async with self.p.step("Cleaning up") as result:
            done, errors = [], []
            if self.world is not None:
                try:
                    await self.world.close()
                    done.append(f"agents stopped, namespaces and wireguard-go processes of world "
                                f"{self.world.id} removed")
                except Exception as e:
                    errors.append(f"removing world {self.world.id}: {e}")
            if self.store is not None:
                # A user's etcd: remove our private prefix, nothing else (and only once agents
                # or the apply may have written there).
                if self.etcd is None and self.world is not None:
                    try:
                        await asyncio.wait_for(self.store.delete(self.prefix, prefix=True), 10)
                        done.append(f"prefix {self.prefix} deleted")
                    except Exception as e:
                        errors.append(f"deleting prefix {self.prefix}: {e}")
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.store.close(), 5)
            if self.etcd is not None:
                try:
                    self.etcd.close()
                    done.append("etcd stopped and its data removed")
                except Exception as e:
                    errors.append(f"stopping etcd pid {self.etcd.pid}: {e}")
            errors += [f"left behind {x}" for x in self.leftovers()]
            if errors:
                raise DemoFailed("; ".join(errors))
            result.append("Cleaned up: " + "; ".join(done or ["nothing was started"]))

    def leftovers(self) -> list[str]:
        if self.world is None:
            return []
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        ours = [line.split()[0] for line in out.splitlines() if line.strip()
                and owns_name(self.world.id, line.split()[0])]
        # Every wireguard-go of the world listens on a UAPI socket named after its interface.
        sockets = sorted(p.name for p in Path("/var/run/wireguard").glob("*.sock") if owns_name(self.world.id, p.name))
        return [f"netns {n}" for n in ours] + [f"wireguard-go socket {s}" for s in sockets]


def _ready(conditions) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def preflight() -> str | None:
    if os.geteuid() != 0:
        return "needs root (it creates network namespaces): run it with sudo"
    for tool in ("ip", "ping"):
        if shutil.which(tool) is None:
            return f"{tool} not found: install iproute2 and iputils-ping"
    return None


async def run_demo(args) -> int:
    problem = preflight()
    if problem:
        print(f"zmesh: demo {problem}", file=sys.stderr)
        return EXIT_FAILED
    # The demo's own lines are its output; library warnings (e.g. the store retrying an
    # endpoint) would drown them. Errors still show, one line each.
    if not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("zmesh: %(name)s: %(message)s"))
        handler.setLevel(logging.ERROR)
        logging.getLogger().addHandler(handler)
    demo = Demo(args)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, demo.on_signal, sig)
    try:
        return await demo.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


__all__ = ["run_demo", "Demo", "Progress", "table"]
