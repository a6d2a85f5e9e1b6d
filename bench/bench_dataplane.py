"""Dataplane benchmarks: our code against the obvious tool-based baseline, in the same run.

  sudo .venv/bin/python bench/bench_dataplane.py [--peers 1000] [--nrs 50]

1. WireGuard peers on one wireguard-go: a full N-peer configuration through our UAPI client (one
   `set=1`) vs `wg setconf`; then one peer's AllowedIPs changed: `configure()` (diff, one op)
   vs `wg set` (one fork per change).
2. N NRs (namespace, ip_forward, bridge with gateway, one workload veth with address and default
   route): `Links` vs one `ip -batch` doing the same (minus the sysctl, which -batch cannot set).
   A second pass of `Links` on the converged NRs shows the cost of a no-op resync.

Prints medians and ratios (baseline / ours: > 1 means ours is faster). Not part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from ipaddress import IPv4Address, IPv4Interface, ip_network

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from controller.dataplane.links import Links, VethAttachment  # noqa: E402
from controller.dataplane.netns import create_netns, delete_netns, list_netns  # noqa: E402
from controller.dataplane.wireguard.base import (  # noqa: E402
    DesiredPeer,
    DeviceOps,
    KeyStore,
    PeerOp,
    generate_private_key,
    public_key,
)
from controller.dataplane.wireguard.userspace import UserspaceBackend  # noqa: E402


def row(name: str, ours: float, base: float) -> None:
    print(f"  {name:<46} ours {ours * 1e3:9.2f} ms   baseline {base * 1e3:9.2f} ms   ratio {base / ours:6.1f}x")


def ip_batch(netns: str | None, lines: list[str]) -> None:
    argv = ["ip"] + (["-n", netns] if netns else []) + ["-batch", "-"]
    subprocess.run(argv, input="\n".join(lines).encode(), check=True)


def peers(n: int) -> list[DesiredPeer]:
    return [
        DesiredPeer.make(
            public_key(generate_private_key()),
            [f"10.{i // 250}.{i % 250}.0/24"],
            f"198.51.100.{i % 250 + 1}:{51820 + i % 1000}",
        )
        for i in range(n)
    ]


async def bench_wireguard(n_peers: int, tmp: str, sfx: str) -> None:
    print(f"WireGuard, {n_peers} peers on one wireguard-go")
    ns = f"zbw-{sfx}"
    links = Links()
    backend = UserspaceBackend(os.path.join(tmp, "wg"), host_netns=ns, links=links)
    ifname = f"zbw{sfx}"
    try:
        await create_netns(ns)
        await backend.ensure_device(ifname, ns)
        priv, _ = KeyStore(backend.state_dir).load_or_create(ifname)
        want = peers(n_peers)
        conf = os.path.join(tmp, "wg.conf")
        with open(conf, "w") as f:
            f.write(f"[Interface]\nPrivateKey = {priv}\nListenPort = 51820\n")
            for p in want:
                ips = ", ".join(str(a) for a in p.allowed_ips)
                f.write(f"\n[Peer]\nPublicKey = {p.public_key}\nAllowedIPs = {ips}\nEndpoint = {p.endpoint}\n")
        ours, base = [], []
        for _ in range(3):
            await backend.configure(ifname, ns, priv, 51820, [])  # empty it
            t = time.perf_counter()
            await backend.configure(ifname, ns, priv, 51820, want)
            ours.append(time.perf_counter() - t)
            await backend.configure(ifname, ns, priv, 51820, [])
            t = time.perf_counter()
            subprocess.run(["wg", "setconf", ifname, conf], check=True)
            base.append(time.perf_counter() - t)
        row(f"full config ({n_peers} peers)", statistics.median(ours), statistics.median(base))
        await backend.configure(ifname, ns, priv, 51820, want)
        ours, base = [], []
        for i in range(20):
            p = want[i]
            moved = [*want[:i], DesiredPeer.make(p.public_key, [*p.allowed_ips, f"172.16.{i}.0/24"], p.endpoint), *want[i + 1 :]]
            t = time.perf_counter()
            ops = await backend.configure(ifname, ns, priv, 51820, moved)
            ours.append(time.perf_counter() - t)
            assert len(ops.peers) == 1
            t = time.perf_counter()
            subprocess.run(
                ["wg", "set", ifname, "peer", p.public_key, "allowed-ips", ",".join(str(a) for a in p.allowed_ips)],
                check=True,
            )
            base.append(time.perf_counter() - t)
        row("one peer changed (observe+diff+set vs wg set)", statistics.median(ours), statistics.median(base))
        ours = []
        for i in range(20):
            p = want[i]
            op = DeviceOps(peers=(PeerOp(p.public_key, allowed_ips=p.allowed_ips | {ip_network(f"172.17.{i}.0/24")}),))
            t = time.perf_counter()
            await backend.apply(ifname, ns, op)
            ours.append(time.perf_counter() - t)
        row("one peer changed (UAPI set only vs wg set)", statistics.median(ours), statistics.median(base))
        t = time.perf_counter()
        ops = await backend.configure(ifname, ns, priv, 51820, want)
        noop = []
        for _ in range(5):
            t = time.perf_counter()
            assert not await backend.configure(ifname, ns, priv, 51820, want)
            noop.append(time.perf_counter() - t)
        print(f"  converged resync (get + diff, no write): {statistics.median(noop) * 1e3:.2f} ms")
    finally:
        await backend.delete_device(ifname, ns)
        links.close()
        await delete_netns(ns)


async def bench_nrs(n: int, sfx: str) -> None:
    print(f"NRs: {n} x (netns, bridge + gateway, workload veth + address + default route)")
    links = Links()
    names = [f"zbn{i}-{sfx}" for i in range(n)]
    wls = [f"zbx{i}-{sfx}" for i in range(n)]
    async def converge(nr: str, w: str) -> None:
        st = await links.observe(nr)  # what the reconciler does: observe once, pass it on
        await links.ensure_nr(nr, st)
        await links.ensure_bridge(nr, "zmbr", IPv4Interface("10.1.1.1/24"), 1420, st)
        await links.ensure_workload(
            nr, "zmbr",
            VethAttachment("zmv0", w, "eth0", IPv4Interface("10.1.1.5/24"), IPv4Address("10.1.1.1"), 1420),
            st,
        )

    try:
        for w in wls:
            await create_netns(w)
        t = time.perf_counter()
        for nr, w in zip(names, wls):
            await converge(nr, w)
        ours = time.perf_counter() - t
        writes = links.writes
        t = time.perf_counter()
        for nr, w in zip(names, wls):
            await converge(nr, w)
        resync = time.perf_counter() - t
        assert links.writes == writes, "a converged resync must not write"
        for nr in names:
            await links.delete_nr(nr)
        for w in wls:
            await delete_netns(w)
            await create_netns(w)
        # ip -batch lines cannot switch namespace: one batch in the root namespace for the
        # namespaces, then one per NR and one per workload namespace (2N+1 forks)
        t = time.perf_counter()
        ip_batch(None, [f"netns add {nr}" for nr in names])
        for nr, w in zip(names, wls):
            ip_batch(nr, [
                "link set lo up",
                "link add zmbr mtu 1420 type bridge",
                "addr add 10.1.1.1/24 dev zmbr",
                "link set zmbr up",
                f"link add zmv0 mtu 1420 master zmbr type veth peer name eth0 mtu 1420 netns {w}",
                "link set zmv0 up",
            ])
            ip_batch(w, [
                "addr add 10.1.1.5/24 dev eth0",
                "link set eth0 up",
                "route replace default via 10.1.1.1 dev eth0",
            ])
        base = time.perf_counter() - t
        row(f"{n} NRs built (per NR)", ours / n, base / n)
        print(f"  converged resync of the same NRs: {resync / n * 1e3:.2f} ms per NR, 0 writes")
    finally:
        links.close()
        for ns in names + wls:
            if ns in list_netns():
                await delete_netns(ns)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", type=int, default=1000)
    ap.add_argument("--nrs", type=int, default=50)
    args = ap.parse_args()
    if os.geteuid() != 0 or not shutil.which("wireguard-go") or not shutil.which("wg"):
        sys.exit("needs root, wireguard-go and wg")
    sfx = secrets.token_hex(2)
    tmp = tempfile.mkdtemp(prefix="zmbench-")
    try:
        await bench_wireguard(args.peers, tmp, sfx)
        await bench_nrs(args.nrs, sfx)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
