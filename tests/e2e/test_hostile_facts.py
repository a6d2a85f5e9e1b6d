"""Hostile facts: values written with plain etcdctl into another node's facts key (what a
compromised node, or any client of an etcd without auth, could publish). The victim's WireGuard
device, read with `wg show`, changes by at most dropping that one peer; every bad value is
reported in the victim's NR status; the agent stays healthy and the other peers stay up."""

from __future__ import annotations

import json
import subprocess

import pytest
from meshlib import wait_until
from test_mesh import IPS, three_node_network

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.etcd]

FACTS = "/zmesh/v1/nodes/n2/mesh/facts/blue"
STATUS = "/zmesh/v1/nodes/n1/status/networks/blue"


def wg_peers(mesh, node: str) -> dict[str, tuple]:
    """public key -> (endpoint, allowed ips) of the device, as `wg show IFNAME dump` prints it."""
    out = subprocess.run(["wg", "show", mesh.wg_ifname(node, "blue"), "dump"], capture_output=True,
                         text=True, check=True, timeout=10).stdout.splitlines()
    return {f[0]: (f[2], f[3]) for f in (line.split("\t") for line in out[1:])}


def corpus(good: dict, n3: dict) -> dict[str, str]:
    def facts(**change):
        return json.dumps({**good, **change})
    return {
        "zone with a newline": facts(endpoints=["fe80::1%x\nremove=true"]),
        "newline in an address": facts(endpoints=["198.51.100.12\nendpoint=203.0.113.10:1"]),
        "link-local": facts(endpoints=["fe80::1"]),
        "loopback": facts(endpoints=["127.0.0.1"]),
        "port too high": facts(listenPort=99999),
        "port zero": facts(listenPort=0),
        "port as text": facts(listenPort="51820\nlisten_port=1"),
        "key too short": facts(publicKey="AAAA"),
        "key not base64": facts(publicKey="!" * 43 + "="),
        "key with a newline": facts(publicKey=good["publicKey"][:20] + "\nremove=true"),
        "huge endpoint list": facts(endpoints=["198.51.100.12"] * 10_000),
        "endpoints not a list": facts(endpoints="198.51.100.12"),
        "unknown field": facts(privateKey="AAAA"),
        "another node's name": facts(node="n3"),
        "another node's public key": facts(publicKey=n3["publicKey"]),
        "a JSON list": json.dumps([good]),
        "not JSON": "{{{ not json",
        "null": "null",
        "a megabyte": json.dumps({**good, "network": "b" * 1_000_000}),
    }


async def test_hostile_facts_drop_at_most_that_peer_and_are_each_reported(mesh):
    mesh.start("n1", "n2", "n3")
    mesh.apply(three_node_network(mesh))
    mesh.wait_mesh(IPS)
    good_raw = mesh.etcdctl("get", "--print-value-only", FACTS).stdout.strip()
    good = json.loads(good_raw)
    n3 = json.loads(mesh.etcdctl("get", "--print-value-only", "/zmesh/v1/nodes/n3/mesh/facts/blue").stdout)
    mesh.world.stop_agent("n2")  # n2 would publish its true facts again: the forger owns the key now
    before = wg_peers(mesh, "n1")
    n2_key = next(k for k, (_ep, ips) in before.items() if "10.1.2.0/24" in ips)
    assert len(before) == 2

    def status_message() -> str:
        raw = mesh.etcdctl("get", "--print-value-only", STATUS).stdout
        return " ".join(c["message"] for c in json.loads(raw)["conditions"] if c["type"] == "Degraded")

    for case, value in corpus(good, n3).items():
        mesh.etcdctl("put", FACTS, "--", value) if len(value) < 100_000 else \
            mesh.etcdctl("put", FACTS, input=value)
        wait_until(lambda: "node 'n2' published invalid facts" in status_message(), 15,
                   what=f"the bad facts ({case}) reported in n1's status")
        after = wg_peers(mesh, "n1")
        # n3's peer exactly as it was; n2's either as it was or gone; nothing else.
        assert {k: v for k, v in after.items() if k != n2_key} == \
               {k: v for k, v in before.items() if k != n2_key}, case
        assert after.get(n2_key, before[n2_key]) == before[n2_key], case
        # Good facts again: the report goes (so the next case is reported on its own).
        mesh.etcdctl("put", FACTS, "--", good_raw)
        wait_until(lambda: "invalid facts" not in status_message(), 15, what=f"n2 peered again after {case}")
        assert wg_peers(mesh, "n1") == before, case

    assert mesh.ready("n1") and "Traceback" not in mesh.world.agent_log("n1")
    assert mesh.ping(mesh.workload_ns("w1"), IPS["w3"])


def degraded(mesh, node: str) -> dict:
    status = mesh.nr_status(node, "blue") or {}
    return next((c for c in status.get("conditions", []) if c["type"] == "Degraded"), {})


async def test_a_peer_publishing_another_subnet_is_awaited_and_everyone_stays_peered(mesh):
    """As during a subnet change before n2 has applied it (or from a wrong n2): its peers say
    whom they wait for, keep the spec's subnet for AllowedIPs (no way in for n3's subnet), stay
    converged with each other and with n2, and the report goes by itself once n2 catches up."""
    mesh.start("n1", "n2", "n3")
    mesh.apply(three_node_network(mesh))
    mesh.wait_mesh(IPS)
    good_raw = mesh.etcdctl("get", "--print-value-only", FACTS).stdout.strip()
    good = json.loads(good_raw)
    mesh.world.stop_agent("n2")  # n2 would publish its true facts again: the forger owns the key now
    before = {n: wg_peers(mesh, n) for n in ("n1", "n3")}
    waiting = "waiting for node 'n2' to apply subnet 10.1.2.0/24 (it publishes 10.1.3.0/24)"

    mesh.etcdctl("put", FACTS, "--", json.dumps({**good, "subnet": "10.1.3.0/24"}))  # n3's subnet
    for node in ("n1", "n3"):
        wait_until(lambda node=node: waiting in degraded(mesh, node).get("message", ""), 15,
                   what=f"{node} says it waits for n2's subnet")
        condition = degraded(mesh, node)
        assert (condition["status"], condition["reason"]) == ("True", "PeerSubnetPending")
        assert wg_peers(mesh, node) == before[node]  # AllowedIPs from the spec, never from facts
    assert all(mesh.matrix(IPS).values())  # n2's dataplane outlives its agent: still peered
    assert mesh.ready("n1") and mesh.ready("n3")

    mesh.etcdctl("put", FACTS, "--", good_raw)  # n2 caught up
    for node in ("n1", "n3"):
        wait_until(lambda node=node: degraded(mesh, node).get("status") == "False", 15,
                   what=f"{node} no longer waits for n2")
        assert degraded(mesh, node)["reason"] == "AsDesired"
        assert wg_peers(mesh, node) == before[node]
    assert all(mesh.matrix(IPS).values())
