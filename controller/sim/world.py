"""A simulated multi-node world on one Linux machine, for the tests and `zmesh demo`.

Network namespaces stand in for hosts (design.md section 4):

    <id>-inet   "the Internet": bridge br0 holding 198.51.100.1/24 and 2001:db8:100::1/64 (the
                public nodes' uplink LAN) and routing to 203.0.113.0/24, where the Internet host
                lives.
    <id>-ihost  an Internet host, 203.0.113.10: answers ICMP, and an HTTP service on port 80
                that answers and records the source address of every request
                (controller.sim.internet_host; `World.http_get`, `World.internet_host_seen`).
    <id>-nK     public node K: uplink veth `up0` on br0 with 198.51.100.(10+K) and/or
                2001:db8:100::(10+K); default routes via the Internet namespace. A dual-NIC
                node has a second NIC `up1` on br0, left unconfigured in the node: its agent
                moves it into the ndmz with 198.51.100.(110+K) (`--ndmz-nic`).
    <id>-rR     home router R: `wan0` on br0 with 198.51.100.(200+R), a LAN bridge `lan0` with
                192.168.R.1/24, masquerading the LAN onto wan0; its forward policy drops
                whatever the LAN did not ask for (like any NAT box), so nothing on the
                Internet can open a connection to a node behind it.
    <id>-nK     hidden node K behind router R: `up0` on the router's LAN with 192.168.R.(10+K),
                default route via the router, no public address (its agent runs without
                --public-endpoint). Several hidden nodes may share a router.

Every node runs its own agent process (`zmesh agent`) against one shared etcd; the agent process
stays in the machine's namespace (so it reaches etcd on loopback) and is told its host namespace
with `--host-netns`. Everything the world creates is named with a random world id, so worlds
never collide with each other or with the host, and is removed on exit, failure or Ctrl-C.
The topology is built with `ip -batch`: this is test scaffolding standing in for real hosts, not
the product's dataplane.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import re
import secrets
import shutil
import signal
import string
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

PUBLIC_V4 = ipaddress.IPv4Network("198.51.100.0/24")
PUBLIC_V6 = ipaddress.IPv6Network("2001:db8:100::/64")
INTERNET_HOST_NET = ipaddress.IPv4Network("203.0.113.0/24")
INTERNET_HOST = ipaddress.IPv4Address("203.0.113.10")
ROUTER_WAN_BASE = 200  # router R's public address is 198.51.100.(200+R)

# A home router: masquerade the LAN behind the WAN address, forward only what the LAN started.
ROUTER_NFT = """
table ip zmsim-nat {
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan0" masquerade
  }
  chain forward {
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname "lan0" oifname "wan0" accept
  }
  chain input {
    type filter hook input priority filter; policy drop;
    ct state established,related accept
    iifname { "lo", "lan0" } accept
  }
}
"""
NDMZ_NIC = "up1"  # a dual-NIC node's second NIC


def new_world_id() -> str:
    """Three characters: short enough to fit interface names, random enough not to collide."""
    return "z" + secrets.choice(string.ascii_lowercase + string.digits) + secrets.choice(string.ascii_lowercase)


def free_world_id(attempts: int = 50) -> str:
    """A random world id no world on this machine uses now (others' tests run worlds too)."""
    for _ in range(attempts):
        candidate = new_world_id()
        if world_id_problem(candidate) is None:
            return candidate
    raise RuntimeError(f"no free world id after {attempts} tries")


# A world's names are "<id>-..." (namespaces) and "<id><node index>-..." (what its agents make):
# an id that starts and ends with a letter can never be read as another world's.
_WORLD_ID_RE = re.compile(r"^[a-z]([a-z0-9]?[a-z])?$")


def world_id_problem(world_id: str) -> str | None:
    """Why `world_id` cannot name a new world (None: it can)."""
    if not _WORLD_ID_RE.match(world_id):
        return (f"{world_id!r} must be 1-3 lower-case letters or digits, starting and ending "
                "with a letter (it prefixes every name the world makes)")
    taken = [n for n in _netns_names() if n.startswith(f"{world_id}-")]
    if taken:
        return f"a world named {world_id!r} exists already (namespace {taken[0]})"
    return None


def owns_name(world_id: str, name: str) -> bool:
    """Whether a namespace, link or socket name was made by world `world_id` or its agents."""
    return name.startswith(f"{world_id}-") or re.match(rf"^{re.escape(world_id)}[0-9]+-", name) is not None


def _netns_names() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@dataclasses.dataclass
class SimNode:
    node_id: str
    index: int
    netns: str
    name_prefix: str
    state_dir: Path
    ipv4: ipaddress.IPv4Address | None
    ipv6: ipaddress.IPv6Address | None
    metrics_port: int | None = None
    agent: subprocess.Popen | None = None
    log_path: Path | None = None
    router: "SimRouter | None" = None  # set for a hidden node: the NAT box it sits behind
    # The far end of the node's uplink veth: on the Internet bridge for a public node, on its
    # router's LAN for a hidden one. Taking it down cuts the node off while its own namespace
    # stays untouched, like pulling a cable (World.set_uplink).
    uplink_netns: str = ""
    uplink_ifname: str = ""
    # Flags for this node's agent only (e.g. its own etcd credentials), after the world's.
    agent_args: list[str] = dataclasses.field(default_factory=list)
    # Dual NIC: the NIC its agent moves into the ndmz and that NIC's address (None: single NIC).
    ndmz_nic: str | None = None
    ndmz_address: ipaddress.IPv4Interface | None = None

    @property
    def hidden(self) -> bool:
        return self.router is not None

    @property
    def endpoints(self) -> list[str]:
        """The public addresses its agent announces: none for a hidden node (its ipv4 is a
        private LAN address that nobody outside the router can reach)."""
        if self.hidden:
            return []
        return [str(a) for a in (self.ipv4, self.ipv6) if a is not None]


@dataclasses.dataclass
class SimRouter:
    name: str
    index: int
    netns: str
    wan: ipaddress.IPv4Address
    lan: ipaddress.IPv4Network

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.lan.network_address + 1


def run_ip_batch(netns: str | None, commands: list[str]) -> subprocess.CompletedProcess:
    """Run `ip [-n NETNS] -batch -`: one fork for many commands in one namespace."""
    args = ["ip"] + (["-n", netns] if netns else []) + ["-batch", "-"]
    res = subprocess.run(args, input="\n".join(commands) + "\n", text=True, capture_output=True)
    if res.returncode != 0:
        raise RuntimeError(f"ip -batch failed: {res.stderr.strip()}")
    return res


def netns_exec(netns: str, *cmd: str, timeout: float = 30, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", netns, *cmd], capture_output=True, text=True,
                          timeout=timeout, check=check)


def scrape_metrics(port: int) -> str:
    """The Prometheus text an agent serves on /metrics (loopback)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        return r.read().decode()


def metric_total(text: str, sample: str, **labels: str) -> float:
    """The sum of every `sample` series in `text` whose labels include `labels` (0 if none)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


def free_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class World:
    """Build with `async with World(etcd_endpoints, ...) as world:`; `add_node` for each node."""

    def __init__(self, etcd_endpoints: list[str], *, world_id: str | None = None,
                 workdir: Path | None = None, agent_args: list[str] | None = None,
                 resync_interval: float = 5.0, python: str | None = None):
        self.id = world_id or free_world_id()
        self.etcd_endpoints = etcd_endpoints
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"zmesh-world-{self.id}-"))
        self.inet = f"{self.id}-inet"
        self.ihost = f"{self.id}-ihost"
        self.nodes: dict[str, SimNode] = {}
        self.routers: dict[str, SimRouter] = {}
        self.workload_netns: list[str] = []
        self.agent_args = agent_args or []
        self.resync_interval = resync_interval
        self.python = python or sys.executable
        self._namespaces: list[str] = []
        self.internet_host_log = self.workdir / "internet-host.log"
        self._internet_host: subprocess.Popen | None = None

    # --- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> "World":
        try:
            await asyncio.to_thread(self._build_internet)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _add_netns(self, name: str) -> None:
        run_ip_batch(None, [f"netns add {name}"])  # fails if it exists: never ours to delete then
        self._namespaces.append(name)

    def _build_internet(self) -> None:
        self._add_netns(self.inet)
        self._add_netns(self.ihost)
        gw4 = PUBLIC_V4.network_address + 1
        gw6 = PUBLIC_V6.network_address + 1
        run_ip_batch(self.inet, [
            "link set lo up",
            "link add br0 type bridge",
            "link set br0 up",
            f"addr add {gw4}/{PUBLIC_V4.prefixlen} dev br0",
            f"addr add {gw6}/{PUBLIC_V6.prefixlen} dev br0 nodad",
            # The Internet host hangs off the Internet namespace on its own /24.
            f"link add ihost type veth peer name up0 netns {self.ihost}",
            "link set ihost up",
            f"addr add {INTERNET_HOST_NET.network_address + 1}/24 dev ihost",
        ])
        run_ip_batch(self.ihost, [
            "link set lo up",
            "link set up0 up",
            f"addr add {INTERNET_HOST}/24 dev up0",
            f"route add default via {INTERNET_HOST_NET.network_address + 1}",
        ])
        for key in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"):
            netns_exec(self.inet, "sysctl", "-qw", key, check=True)
        self._start_internet_host()

    def _start_internet_host(self) -> None:
        self.internet_host_log.touch()
        self._internet_host = subprocess.Popen(
            ["ip", "netns", "exec", self.ihost, self.python, "-m", "controller.sim.internet_host",
             "serve", "--port", "80", "--log", str(self.internet_host_log)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            text=True, start_new_session=True)
        if self._internet_host.stdout.readline().strip() != "ready":  # listening now
            raise RuntimeError("the Internet host's HTTP service did not start")

    def internet_host_seen(self) -> list[str]:
        """Source addresses of every HTTP request the Internet host answered, in order."""
        return self.internet_host_log.read_text().split()

    def http_get(self, netns: str, host: str = str(INTERNET_HOST), *, timeout: float = 3,
                 source: str | None = None) -> str | None:
        """GET http://HOST/ from inside `netns` (a fresh process there, optionally from the
        address `source`): the answer ("seen ADDR" from the Internet host), or None."""
        cmd = [self.python, "-m", "controller.sim.internet_host", "get", host, "--timeout", str(timeout)]
        res = netns_exec(netns, *cmd, *(["--source", source] if source else []), timeout=timeout + 15)
        return res.stdout if res.returncode == 0 else None

    def add_node(self, node_id: str, *, ipv4: bool = True, ipv6: bool = True,
                 behind: str | None = None, dual_nic: bool = False) -> SimNode:
        """A public node on the Internet LAN (IPv4 and/or IPv6 endpoints), or with `behind` a
        hidden node on the LAN of that home router (made with add_router; IPv4 only).
        `dual_nic`: a public node with a second NIC on the LAN for its NRs' Internet traffic."""
        index = len(self.nodes) + 1
        netns = f"{self.id}-n{index}"
        if behind is not None:
            return self._add_hidden_node(node_id, index, netns, self.routers[behind])
        node = SimNode(
            node_id=node_id, index=index, netns=netns,
            name_prefix=f"{self.id}{index}-",
            state_dir=self.workdir / node_id,
            ipv4=(PUBLIC_V4.network_address + 10 + index) if ipv4 else None,
            # Written so that node K reads as ...::1K, like its IPv4 address 198.51.100.1K.
            ipv6=ipaddress.IPv6Address(f"2001:db8:100::{10 + index}") if ipv6 else None,
            uplink_netns=self.inet, uplink_ifname=f"{self.id}p{index}",
        )
        self._add_netns(netns)
        run_ip_batch(self.inet, [
            f"link add {self.id}p{index} type veth peer name up0 netns {netns}",
            f"link set {self.id}p{index} master br0 up",
        ])
        cmds = ["link set lo up", "link set up0 up"]
        if node.ipv4:
            cmds += [f"addr add {node.ipv4}/{PUBLIC_V4.prefixlen} dev up0",
                     f"route add default via {PUBLIC_V4.network_address + 1}"]
        if node.ipv6:
            cmds += [f"addr add {node.ipv6}/{PUBLIC_V6.prefixlen} dev up0 nodad",
                     f"route add default via {PUBLIC_V6.network_address + 1}"]
        run_ip_batch(netns, cmds)
        if dual_nic:
            node.ndmz_nic = NDMZ_NIC
            node.ndmz_address = ipaddress.IPv4Interface(
                f"{PUBLIC_V4.network_address + 110 + index}/{PUBLIC_V4.prefixlen}")
            run_ip_batch(self.inet, [
                f"link add {self.id}q{index} type veth peer name {NDMZ_NIC} netns {netns}",
                f"link set {self.id}q{index} master br0 up",
            ])
        node.state_dir.mkdir(parents=True, exist_ok=True)
        self.nodes[node_id] = node
        return node

    def add_router(self, name: str) -> SimRouter:
        """A home router on the Internet LAN that masquerades its own LAN (see ROUTER_NFT)."""
        index = len(self.routers) + 1
        if index > 50:
            raise ValueError("at most 50 routers per world")
        router = SimRouter(name=name, index=index, netns=f"{self.id}-r{index}",
                           wan=PUBLIC_V4.network_address + ROUTER_WAN_BASE + index,
                           lan=ipaddress.IPv4Network(f"192.168.{index}.0/24"))
        self._add_netns(router.netns)
        run_ip_batch(self.inet, [
            f"link add {self.id}r{index} type veth peer name wan0 netns {router.netns}",
            f"link set {self.id}r{index} master br0 up",
        ])
        run_ip_batch(router.netns, [
            "link set lo up",
            "link set wan0 up",
            f"addr add {router.wan}/{PUBLIC_V4.prefixlen} dev wan0",
            f"route add default via {PUBLIC_V4.network_address + 1}",
            "link add lan0 type bridge",
            "link set lan0 up",
            f"addr add {router.gateway}/{router.lan.prefixlen} dev lan0",
        ])
        netns_exec(router.netns, "sysctl", "-qw", "net.ipv4.ip_forward=1", check=True)
        res = subprocess.run(["ip", "netns", "exec", router.netns, "nft", "-f", "-"], input=ROUTER_NFT,
                             text=True, capture_output=True)
        if res.returncode != 0:
            raise RuntimeError(f"router {name}: nft failed: {res.stderr.strip()}")
        self.routers[name] = router
        return router

    def _add_hidden_node(self, node_id: str, index: int, netns: str, router: SimRouter) -> SimNode:
        lan_port = f"{self.id}l{index}"
        node = SimNode(
            node_id=node_id, index=index, netns=netns, name_prefix=f"{self.id}{index}-",
            state_dir=self.workdir / node_id, ipv4=router.lan.network_address + 10 + index,
            ipv6=None, router=router, uplink_netns=router.netns, uplink_ifname=lan_port,
        )
        self._add_netns(netns)
        run_ip_batch(router.netns, [
            f"link add {lan_port} type veth peer name up0 netns {netns}",
            f"link set {lan_port} master lan0 up",
        ])
        run_ip_batch(netns, [
            "link set lo up", "link set up0 up",
            f"addr add {node.ipv4}/{router.lan.prefixlen} dev up0",
            f"route add default via {router.gateway}",
        ])
        node.state_dir.mkdir(parents=True, exist_ok=True)
        self.nodes[node_id] = node
        return node

    def set_uplink(self, node_id: str, up: bool) -> None:
        """Plug (up) or pull (down) the cable of a node's uplink, at the far end."""
        node = self.nodes[node_id]
        run_ip_batch(node.uplink_netns, [f"link set {node.uplink_ifname} {'up' if up else 'down'}"])

    def add_workload_netns(self, name: str) -> str:
        """A bare namespace standing in for a container's network namespace."""
        netns = f"{self.id}-{name}"
        self._add_netns(netns)
        run_ip_batch(netns, ["link set lo up"])
        self.workload_netns.append(netns)
        return netns

    # --- agents ----------------------------------------------------------------------------

    def agent_command(self, node: SimNode) -> list[str]:
        cmd = [self.python, "-m", "controller.cli.main", "agent",
               "--node-id", node.node_id,
               "--etcd", ",".join(self.etcd_endpoints),
               "--host-netns", node.netns,
               "--name-prefix", node.name_prefix,
               "--state-dir", str(node.state_dir),
               "--resync-interval", str(self.resync_interval),
               "--metrics-addr", f"127.0.0.1:{node.metrics_port}"]
        for ep in node.endpoints:
            cmd += ["--public-endpoint", ep]
        if node.ndmz_nic:
            cmd += ["--ndmz-nic", node.ndmz_nic, "--ndmz-address", str(node.ndmz_address),
                    "--ndmz-gateway", str(PUBLIC_V4.network_address + 1)]
        return cmd + self.agent_args + node.agent_args

    def start_agent(self, node_id: str) -> SimNode:
        node = self.nodes[node_id]
        if node.agent is not None and node.agent.poll() is None:
            raise RuntimeError(f"agent of {node_id} is already running")
        if node.metrics_port is None:
            node.metrics_port = free_tcp_port()
        node.log_path = self.workdir / f"{node_id}.log"
        logf = open(node.log_path, "ab")
        # Own process group: Ctrl-C in a terminal reaches the demo, which stops agents in order.
        node.agent = subprocess.Popen(self.agent_command(node), stdout=logf, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        logf.close()
        return node

    def stop_agent(self, node_id: str, *, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        node = self.nodes[node_id]
        proc = node.agent
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        node.agent = None
        return proc.returncode

    def agent_log(self, node_id: str) -> str:
        path = self.nodes[node_id].log_path
        return path.read_text(errors="replace") if path and path.exists() else ""

    # --- probes ----------------------------------------------------------------------------

    @staticmethod
    def ping(netns: str, address: str, *, count: int = 1, timeout: float = 1, size: int | None = None,
             dont_fragment: bool = False) -> bool:
        cmd = ["ping", "-n", "-q", "-c", str(count), "-W", str(timeout)]
        if count > 1:
            cmd += ["-i", "0.2"]
        if size is not None:
            cmd += ["-s", str(size)]
        if dont_fragment:
            cmd += ["-M", "do"]
        return netns_exec(netns, *cmd, address, timeout=timeout * count + 10).returncode == 0

    # --- teardown --------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop agents, purge what they made, delete the world's namespaces and files.
        Each step runs even if an earlier one fails."""
        for node_id in list(self.nodes):
            try:
                self.stop_agent(node_id)
            except Exception:
                log.exception("stopping agent of %s", node_id)
        for node in self.nodes.values():
            try:
                await purge_node_dataplane(node.state_dir, node.name_prefix)
            except Exception:
                log.exception("purging dataplane of %s", node.node_id)
        if self._internet_host is not None:
            self._internet_host.kill()  # by the PID we started (ip netns exec execs python)
            self._internet_host.wait()
            self._internet_host.stdout.close()
            self._internet_host = None
        for ns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._namespaces.clear()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


async def purge_node_dataplane(state_dir: Path, name_prefix: str) -> None:
    """Remove every NR, wireguard-go process and key an agent with this state dir made."""
    from controller.reconciler.purge import purge_node

    await purge_node(state_dir=state_dir, name_prefix=name_prefix)


def in_process_group_guard() -> None:
    """Make SIGTERM behave like Ctrl-C so the same cleanup path runs."""
    def _raise(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _raise)


__all__ = ["World", "SimNode", "SimRouter", "new_world_id", "world_id_problem", "owns_name", "netns_exec",
           "run_ip_batch", "INTERNET_HOST",
           "free_tcp_port", "in_process_group_guard", "scrape_metrics", "metric_total"]
