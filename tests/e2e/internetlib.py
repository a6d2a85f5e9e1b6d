"""Helpers of the Internet-access end-to-end tests (test_internet.py, test_internet_metrics.py):
probes that try to open connections, our tables' drop counters as nft lists them, and the names
of a node's ndmz, its legs and its host table. A module of its own: test files never import
each other or a conftest."""

from __future__ import annotations

import json
import subprocess

from controller.planner import names
from controller.sim.world import netns_exec

PORT = 7777


def public_address(mesh, node_id: str) -> str:
    return str(mesh.world.nodes[node_id].ipv4)


def seen_from(mesh, workload: str) -> str | None:
    """The source address the Internet host saw for one HTTP request from `workload`."""
    answer = mesh.world.http_get(mesh.workload_ns(workload))
    return answer.split()[1] if answer else None


PROBE = r"""
import socket, sys, threading
port, hosts = int(sys.argv[1]), sys.argv[2:]
def syn(host):
    s = socket.socket(); s.settimeout(1.5)
    try:
        s.connect((host, port)); print("tcp-open", host, flush=True)
    except OSError:
        pass
threads = [threading.Thread(target=syn, args=(h,)) for h in hosts]
for t in threads: t.start()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(3):
    for h in hosts:
        u.sendto(b"probe", (h, port))
for t in threads: t.join()
"""

def answered(src_ns: str, addresses: list[str], python: str) -> set[str]:
    """TCP SYN, UDP (to PORT) and ICMP from `src_ns` to every address at once: the
    "tcp ADDR"/"icmp ADDR" that got an answer (UDP has none: the listeners record it)."""
    pings = {a: subprocess.Popen(["ip", "netns", "exec", src_ns, "ping", "-n", "-q", "-c", "2", "-i", "0.2",
                                  "-W", "1", a], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for a in addresses}
    res = subprocess.run(["ip", "netns", "exec", src_ns, python, "-c", PROBE, str(PORT), *addresses],
                         capture_output=True, text=True, timeout=30)
    found = {f"tcp {line.split()[1]}" for line in res.stdout.splitlines() if line.startswith("tcp-open")}
    return found | {f"icmp {a}" for a, p in pings.items() if p.wait(30) == 0}


def drops(netns: str, table: str = "zmesh", comment: str = "") -> int:
    """Packets counted by the drop rules of our table in `netns` whose comment contains `comment`."""
    out = netns_exec(netns, "nft", "-j", "list", "table", "inet", table, check=True).stdout
    total = 0
    for item in json.loads(out)["nftables"]:
        rule = item.get("rule")
        if rule and comment in rule.get("comment", "") and {"drop": None} in rule["expr"]:
            total += sum(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
    return total


def ndmz_ns(mesh, node_id: str) -> str:
    return names.ndmz_netns(mesh.world.nodes[node_id].name_prefix)


def leg_address(mesh, node_id: str, network: str) -> str:
    out = netns_exec(mesh.nr_netns(node_id, network), "ip", "-j", "-4", "addr", "show", "dev", "public",
                     check=True).stdout
    return json.loads(out)[0]["addr_info"][0]["local"]


def host_table(mesh, node_id: str) -> str:
    return names.host_nft_table(mesh.world.nodes[node_id].name_prefix)


def ping_from(netns: str, source: str, target: str) -> bool:
    return netns_exec(netns, "ping", "-n", "-q", "-c", "1", "-W", "1", "-I", source, target).returncode == 0
