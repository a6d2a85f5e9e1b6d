"""A two-node world for dataplane tests: real namespaces, real wireguard-go, full cleanup.

node namespaces A and B are joined by a veth on 198.51.100.0/24 (the "Internet"); each node has
one NR (10.1.1.0/24, 10.1.2.0/24) with a wireguard-go interface created in the node namespace
and moved into the NR; workload namespaces hang off each NR's bridge.
Everything made here is recorded and removed in `close()` (namespaces, processes by PID, sockets,
state dirs), also when a test fails.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from controller.dataplane.links import Links, VethAttachment
from controller.dataplane.netns import create_netns, delete_netns
from controller.dataplane.wireguard import uapi
from controller.dataplane.wireguard.base import DesiredPeer, KeyStore
from controller.dataplane.wireguard.userspace import UserspaceBackend

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("wireguard-go") or not shutil.which("ip"),
    reason="needs root, ip and wireguard-go",
)

MTU = 1420


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@dataclass
class NodeNR:
    node_ns: str
    nr_ns: str
    wg: str
    underlay: IPv4Interface
    subnet: IPv4Network
    state_dir: str
    port: int = 51820
    backend: UserspaceBackend | None = None
    keys: tuple[str, str] = ("", "")

    @property
    def gateway(self) -> IPv4Interface:
        return IPv4Interface(f"{self.subnet.network_address + 1}/{self.subnet.prefixlen}")


@dataclass
class World:
    sfx: str = field(default_factory=lambda: secrets.token_hex(3))
    namespaces: list[str] = field(default_factory=list)
    nodes: list[NodeNR] = field(default_factory=list)
    tmp: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="zmdp-"))
    links: Links = field(default_factory=Links)
    pids: set[int] = field(default_factory=set)

    def name(self, base: str) -> str:
        return f"zt{base}-{self.sfx}"

    async def netns(self, base: str) -> str:
        ns = self.name(base)
        self.namespaces.append(ns)
        await create_netns(ns)
        return ns

    async def build_underlay(self) -> tuple[str, str]:
        a, b = await self.netns("na"), await self.netns("nb")
        va, vb = f"zu{self.sfx}a", f"zu{self.sfx}b"
        sh("ip", "-n", a, "link", "add", va, "type", "veth", "peer", "name", vb, "netns", b)
        for ns, dev, addr in ((a, va, "198.51.100.1/24"), (b, vb, "198.51.100.2/24")):
            sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        return a, b

    async def node(self, node_ns: str, tag: str, underlay: str, subnet: str) -> NodeNR:
        n = NodeNR(
            node_ns=node_ns,
            nr_ns=await self.netns(f"nr{tag}"),
            wg=f"zw{self.sfx}{tag}",
            underlay=IPv4Interface(underlay),
            subnet=IPv4Network(subnet),
            state_dir=os.path.join(self.tmp, tag),
        )
        n.backend = UserspaceBackend(n.state_dir, host_netns=node_ns, links=self.links)
        n.keys = KeyStore(n.state_dir).load_or_create(n.wg)
        self.nodes.append(n)
        return n

    def desired_peers(self, n: NodeNR) -> list[DesiredPeer]:
        return [
            DesiredPeer.make(o.keys[1], [o.subnet], f"{o.underlay.ip}:{o.port}", 0)
            for o in self.nodes
            if o is not n
        ]

    async def converge(self, n: NodeNR) -> int:
        """One reconcile of node n's NR, the way the reconciler drives the dataplane.

        Returns the number of writes (links + wireguard ops + process starts).
        """
        before = self.links.writes + n.backend.starts
        await self.links.ensure_nr(n.nr_ns)
        await self.links.ensure_bridge(n.nr_ns, "zmbr", n.gateway, MTU)
        await n.backend.ensure_device(n.wg, n.nr_ns)
        self.pids.add(n.backend.pid(n.wg))
        ops = await n.backend.configure(n.wg, n.nr_ns, n.keys[0], n.port, self.desired_peers(n))
        await self.links.ensure_link(n.nr_ns, n.wg, mtu=MTU)
        await self.links.ensure_routes(n.nr_ns, n.wg, [o.subnet for o in self.nodes if o is not n])
        return self.links.writes + n.backend.starts - before + (1 if ops else 0)

    async def two_nodes(self):
        """Nodes a and b with one NR each, converged, and one workload on each NR."""
        a_ns, b_ns = await self.build_underlay()
        a = await self.node(a_ns, "a", "198.51.100.1/24", "10.1.1.0/24")
        b = await self.node(b_ns, "b", "198.51.100.2/24", "10.1.2.0/24")
        for n in (a, b):
            assert await self.converge(n) > 0
        return a, b, await self.workload(a, "a", 5), await self.workload(b, "b", 5)

    async def workload(self, n: NodeNR, tag: str, host_index: int) -> VethAttachment:
        ns = await self.netns(f"w{tag}")
        wl = VethAttachment(
            host_ifname=f"zv{self.sfx}{tag}",
            netns=ns,
            ifname="eth0",
            address=IPv4Interface(f"{n.subnet.network_address + host_index}/{n.subnet.prefixlen}"),
            gateway=n.gateway.ip,
            mtu=MTU,
        )
        await self.links.ensure_workload(n.nr_ns, "zmbr", wl)
        return wl

    async def close(self) -> None:
        for n in self.nodes:
            if n.backend is not None:
                pid = n.backend.pid(n.wg)
                if pid:
                    self.pids.add(pid)
                try:
                    await n.backend.delete_device(n.wg, n.nr_ns)
                except Exception:
                    pass
        for pid in self.pids:  # belt and braces: only PIDs this world started
            if pid:
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if b"wireguard-go" in f.read():
                            os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        for n in self.nodes:
            try:
                os.unlink(uapi.socket_path(n.wg))
            except FileNotFoundError:
                pass
        self.links.close()
        for ns in reversed(self.namespaces):
            try:
                await delete_netns(ns)
            except Exception:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
async def world():
    """A World whose every namespace, process, socket and temp dir is removed afterwards."""
    w = World()
    try:
        yield w
    finally:
        await w.close()


async def ping(src_ns: str, dst: IPv4Address | str, count: int = 3) -> bool:
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", src_ns, "ping", "-c", str(count), "-i", "0.2", "-W", "2", "-q", str(dst),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    return await proc.wait() == 0
