"""End-to-end helpers: a real etcd, a simulated world of node namespaces, one real agent process
per node, real wireguard-go. Everything is torn down by World.close(), also when a test fails."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request


from controller.dataplane.wireguard import uapi
from controller.dataplane.wireguard.base import public_key
from controller.planner import names
from controller.sim.world import World, metric_total, netns_exec, scrape_metrics

ZMESH = [sys.executable, "-m", "controller.cli.main"]
RESYNC = 1.5  # seconds: short, so "repaired within one resync" is quick to observe
# Observe every second and call a peer stale after 16 s without an answer: the shortest
# stale-after a 1 s interval allows (docs/observability.md), so a broken peer shows in seconds.
OBSERVE_FAST = ["--observe-interval", "1", "--peer-stale-after", "16"]


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@contextlib.asynccontextmanager
async def running_mesh(etcd, **world_options):
    """A Mesh on a fresh World (torn down after, also on failure, printing the agents' logs
    when they hold an error: the first thing anyone wants to read)."""
    async with World(etcd.endpoints, **{"resync_interval": RESYNC, **world_options}) as world:
        m = Mesh(world, etcd)
        try:
            yield m
        finally:
            for node_id in world.nodes:
                log = world.agent_log(node_id)
                if "Traceback" in log or "ERROR" in log:
                    print(f"--- agent {node_id} log (tail) ---\n{log[-4000:]}")


class Mesh:
    """A World plus the operations the tests speak in: apply manifests, ping, look inside."""

    def __init__(self, world: World, etcd, *, cli_args: list[str] = (), etcdctl_args: list[str] = ()):
        self.world = world
        self.etcd = etcd
        self.cli_args = list(cli_args)  # e.g. TLS and an admin's credentials
        self.etcdctl_args = list(etcdctl_args)

    def zmesh(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run(ZMESH + ["--etcd", ",".join(self.etcd.endpoints), *self.cli_args, *args],
                             input=input, capture_output=True, text=True, timeout=60)
        if check and res.returncode != 0:
            raise AssertionError(f"zmesh {' '.join(args)} failed: {res.stderr.strip()}")
        return res

    def apply(self, manifest: str) -> str:
        return self.zmesh("apply", "-f", "-", input=manifest).stdout

    def etcdctl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["etcdctl", "--endpoints", self.etcd.endpoints[0], *self.etcdctl_args, *args],
                              input=input,
                              capture_output=True, text=True, timeout=30,
                              env={**os.environ, "ETCDCTL_API": "3"}, check=True)

    # --- nodes and workloads --------------------------------------------------------------

    def start(self, *node_ids: str, ipv4: bool = True, ipv6: bool = True, agent_args=None) -> None:
        """`agent_args(node_id)`: extra flags for that node's agent (its own credentials)."""
        for node_id in node_ids:
            node = self.world.add_node(node_id, ipv4=ipv4, ipv6=ipv6)
            node.agent_args = list(agent_args(node_id)) if agent_args else []
            self.world.start_agent(node_id)
        for node_id in node_ids:
            wait_until(lambda: self.ready(node_id), 30, what=f"agent {node_id} ready")

    def start_hidden(self, router: str, *node_ids: str) -> None:
        """Hidden nodes on the LAN of home router `router` (created on first use)."""
        if router not in self.world.routers:
            self.world.add_router(router)
        for node_id in node_ids:
            self.world.add_node(node_id, behind=router)
            self.world.start_agent(node_id)
        for node_id in node_ids:
            wait_until(lambda: self.ready(node_id), 30, what=f"agent {node_id} ready")

    def ready(self, node_id: str) -> bool:
        try:
            with urllib.request.urlopen(self.url(node_id, "/readyz"), timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def url(self, node_id: str, path: str) -> str:
        return f"http://127.0.0.1:{self.world.nodes[node_id].metrics_port}{path}"

    def metrics_text(self, node_id: str) -> str:
        return scrape_metrics(self.world.nodes[node_id].metrics_port)

    def metric_sum(self, node_id: str, name: str, **labels: str) -> float:
        """The sum of the agent's `name` series whose labels include `labels`."""
        return metric_total(self.metrics_text(node_id), name, **labels)

    def get_json(self, node_id: str, path: str, timeout: float = 5):
        with urllib.request.urlopen(self.url(node_id, path), timeout=timeout) as r:
            return json.loads(r.read())

    def workload_ns(self, name: str) -> str:
        return f"{self.world.id}-{name}"

    def add_workload_ns(self, name: str) -> str:
        return self.world.add_workload_netns(name)

    # --- what the agents published ---------------------------------------------------------

    def etcd_json(self, key: str) -> dict | None:
        out = self.etcdctl("get", key, "--print-value-only").stdout.strip()
        return json.loads(out) if out else None

    def mod_revision(self, key: str) -> int:
        kvs = json.loads(self.etcdctl("get", key, "-w", "json").stdout).get("kvs") or []
        return kvs[0]["mod_revision"] if kvs else 0

    def newest_revision(self, *prefixes: str) -> int:
        """The newest mod_revision of any key under `prefixes` (0: none)."""
        revisions = [kv["mod_revision"] for p in prefixes
                     for kv in json.loads(self.etcdctl("get", "--prefix", p, "-w", "json").stdout).get("kvs") or []]
        return max(revisions, default=0)

    def wait_reconciled(self, network: str, nodes, revision: int, timeout: float = 20) -> None:
        """Wait until each of `nodes` has finished a reconcile of `network` that read etcd at
        `revision` or later (its /status etcd.reconciledRevisions)."""
        def done(node: str) -> bool:
            return self.get_json(node, "/status")["etcd"]["reconciledRevisions"].get(network, 0) >= revision
        wait_until(lambda: all(done(n) for n in nodes), timeout,
                   what=f"{', '.join(nodes)} reconciled {network} at revision {revision}")

    def nr_status(self, node_id: str, network: str) -> dict | None:
        return self.etcd_json(f"/zmesh/v1/nodes/{node_id}/status/networks/{network}")

    def aggregator_status(self, node_id: str, network: str) -> dict:
        """The aggregator the node derived for the network, as it published it ({} if none yet)."""
        return (self.nr_status(node_id, network) or {}).get("aggregator") or {}

    def aggregator_everywhere(self, network: str, nodes) -> set:
        """The aggregators `nodes` published for `network` (one element once they agree)."""
        return {self.aggregator_status(n, network).get("node") for n in nodes}

    # --- what the agents made -------------------------------------------------------------

    def nr_netns(self, node_id: str, network: str) -> str:
        return names.nr_netns(self.world.nodes[node_id].name_prefix, network)

    def wg_ifname(self, node_id: str, network: str) -> str:
        return names.wg_ifname(self.world.nodes[node_id].name_prefix, network)

    def wg_pid(self, node_id: str, network: str) -> int | None:
        pidfile = self.world.nodes[node_id].state_dir / "wireguard-go" / f"{self.wg_ifname(node_id, network)}.pid"
        try:
            return int(pidfile.read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None

    def public_key(self, node_id: str, network: str) -> str | None:
        """The public key of the node's NR (derived from its key file; None before it exists)."""
        path = self.world.nodes[node_id].state_dir / "keys" / f"{self.wg_ifname(node_id, network)}.key"
        try:
            return public_key(path.read_text().strip())
        except FileNotFoundError:
            return None

    async def wg_device(self, node_id: str, network: str):
        return await uapi.get(self.wg_ifname(node_id, network))

    def wg_listen_port(self, node_id: str, network: str) -> int:
        facts = self.etcd_json(f"/zmesh/v1/nodes/{node_id}/mesh/facts/{network}")
        return facts["listenPort"]

    def routes_via(self, netns: str, dev: str) -> set[str]:
        res = netns_exec(netns, "ip", "-j", "route", "show", "dev", dev)
        return {r["dst"] for r in json.loads(res.stdout or "[]")}

    def netns_inode(self, netns: str) -> int | None:
        try:
            return os.stat(f"/var/run/netns/{netns}").st_ino
        except FileNotFoundError:
            return None

    def links(self, netns: str) -> dict[str, int]:
        """ifname -> ifindex inside a namespace."""
        res = netns_exec(netns, "ip", "-j", "link", "show")
        return {link["ifname"]: link["ifindex"] for link in json.loads(res.stdout or "[]")}

    def ping(self, src_ns: str, address: str, **kw) -> bool:
        return self.world.ping(src_ns, address, **kw)

    def matrix(self, workloads: dict[str, str]) -> dict[tuple[str, str], bool]:
        """(from, to) -> ping ok, for every ordered pair of {workload: ip}."""
        return {(a, b): self.ping(self.workload_ns(a), ip)
                for a in workloads for b, ip in workloads.items() if a != b}

    def wait_mesh(self, workloads: dict[str, str], timeout: float = 30) -> None:
        def all_ok():
            return all(self.matrix(workloads).values())
        wait_until(all_ok, timeout, interval=0.2, what=f"full connectivity between {sorted(workloads)}")


def network_manifest(name: str, subnets: dict[str, str], ip_range: str = "10.1.0.0/16", **spec) -> str:
    resources = "\n".join(f"  - {{node: {n}, subnet: {s}}}" for n, s in subnets.items())
    extra = "".join(f"  {k}: {json.dumps(v)}\n" for k, v in spec.items())
    return (f"apiVersion: zmesh.io/v1\nkind: Network\nmetadata: {{name: {name}}}\nspec:\n"
            f"  ipRange: {ip_range}\n  resources:\n{resources}\n{extra}")


def workload_manifest(name: str, network: str, node: str, netns: str, ip: str | None = None) -> str:
    ip_line = f", ip: {ip}" if ip else ""
    return (f"---\napiVersion: zmesh.io/v1\nkind: Workload\nmetadata: {{name: {name}}}\n"
            f"spec: {{network: {network}, node: {node}, netns: {netns}{ip_line}}}\n")


@contextlib.contextmanager
def wireguard_udp_dropped(mesh, node: str, port: int):
    """An nft table in `node`'s host namespace (made by this test's world) dropping the UDP of
    its WireGuard port both ways, as a broken path would."""
    netns = mesh.world.nodes[node].netns
    rules = f"""table inet zmtest_drop {{
  chain in {{ type filter hook input priority -300; udp dport {port} drop; }}
  chain out {{ type filter hook output priority -300; udp sport {port} drop; }}
}}
"""
    subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=rules, text=True,
                   check=True, capture_output=True)
    try:
        yield
    finally:
        netns_exec(netns, "nft", "delete", "table", "inet", "zmtest_drop")


@contextlib.contextmanager
def pinging(mesh, src_workload: str, address: str):
    """Traffic from a workload to an address until the block ends (the pinger is ours, by PID)."""
    proc = subprocess.Popen(["ip", "netns", "exec", mesh.workload_ns(src_workload), "ping", "-n", "-q",
                             "-i", "0.5", "-W", "1", address],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()
