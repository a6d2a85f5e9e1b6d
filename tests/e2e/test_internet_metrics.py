"""Internet access in the agent's metrics and /status, end to end: the NAT and firewall counters
of the NR's, the ndmz's and the host's nftables tables, read back by the observer, move with real
traffic (a request to the Internet host, a SYN from it, a spoofed packet) and only ever grow,
also when the agent replaces a table whose kernel counters then start again at zero. Real
agents, namespaces, nftables, wireguard-go and etcd (tests/e2e/conftest.py)."""

from __future__ import annotations

import json

import pytest
from internetlib import answered, drops, leg_address, ndmz_ns, ping_from, public_address, seen_from
from meshlib import OBSERVE_FAST, RESYNC, network_manifest, running_mesh, wait_until, workload_manifest

from controller.sim.world import INTERNET_HOST, metric_total, netns_exec, run_ip_batch

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.etcd]

IPS = {"w1": "10.1.1.10", "w2": "10.1.2.10"}
NETWORK = [("zmesh_internet_connections_total", {}), ("zmesh_internet_sent_bytes_total", {}),
           ("zmesh_internet_received_bytes_total", {})] + [
    ("zmesh_firewall_dropped_packets_total", {"reason": r}) for r in ("inbound", "spoofed", "to_node")]
NODE = [("zmesh_ndmz_connections_total", {})] + [
    ("zmesh_ndmz_dropped_packets_total", {"reason": r}) for r in ("inbound", "spoofed", "to_node", "between_networks")]


class Counters:
    """n1's Internet counters, scraped; every scrape is kept, to check that none ever fell."""

    def __init__(self, mesh):
        self.mesh, self.history = mesh, []

    def read(self) -> dict[str, float]:
        text = self.mesh.metrics_text("n1")
        now = {name + json.dumps(labels): metric_total(text, name, network="blue", **labels)
               for name, labels in NETWORK}
        now |= {name + json.dumps(labels): metric_total(text, name, **labels) for name, labels in NODE}
        self.history.append(now)
        return now

    def grows(self, before: dict[str, float], *keys: str, what: str) -> dict[str, float]:
        """Wait until each of `keys` is above `before`; the reading that shows it."""
        return wait_until(lambda: (now := self.read()) and all(now[k] > before[k] for k in keys) and now,
                          30, interval=0.3, what=what)

    def never_fell(self) -> list[str]:
        return [f"{k}: {a[k]} -> {b[k]}" for a, b in zip(self.history, self.history[1:]) for k in a
                if b[k] < a[k]]


CONNECTIONS, SENT, RECEIVED = (n + json.dumps(labels) for n, labels in NETWORK[:3])
INBOUND, SPOOFED, TO_NODE = (n + json.dumps(labels) for n, labels in NETWORK[3:])
NDMZ_CONNECTIONS, NDMZ_INBOUND = (n + json.dumps(labels) for n, labels in NODE[:2])


def nr_table(netns: str) -> dict:
    return json.loads(netns_exec(netns, "nft", "-j", "list", "table", "inet", "zmesh", check=True).stdout)


def table_handle(netns: str) -> int:
    return next(o["table"]["handle"] for o in nr_table(netns)["nftables"] if "table" in o)


async def test_nat_and_firewall_counters_follow_real_traffic_and_survive_a_replaced_table(etcd):
    async with running_mesh(etcd, agent_args=OBSERVE_FAST) as mesh:
        mesh.start("n1", "n2")
        manifest = network_manifest("blue", {"n1": "10.1.1.0/24", "n2": "10.1.2.0/24"})
        for w, node in (("w1", "n1"), ("w2", "n2")):
            manifest += workload_manifest(w, "blue", node, mesh.add_workload_ns(w), IPS[w])
        mesh.apply(manifest)
        mesh.wait_mesh(IPS)
        world, n1 = mesh.world, mesh.world.nodes["n1"]
        wl, nr, ndmz = mesh.workload_ns("w1"), mesh.nr_netns("n1", "blue"), ndmz_ns(mesh, "n1")
        counters = Counters(mesh)
        wait_until(lambda: mesh.get_json("n1", "/status")["ndmz"], 20, what="n1's ndmz tables read")
        # Bounded: the series per network and per node the docs promise, no more.
        text = mesh.metrics_text("n1")
        series = [line for line in text.splitlines() if line.startswith(("zmesh_internet_", "zmesh_firewall_",
                                                                         "zmesh_ndmz_"))]
        assert len(series) == 6 + 5 + 1, series  # and zmesh_ndmz_drift_repairs_total

        # A workload's request to the Internet host: masqueraded in the NR and in the ndmz.
        before = counters.read()
        assert seen_from(mesh, "w1") == public_address(mesh, "n1")
        counters.grows(before, CONNECTIONS, SENT, RECEIVED, NDMZ_CONNECTIONS, what="the request counted")

        # From the Internet host, with a route to the CGNAT range through n1: the host's diode
        # drops what would enter the ndmz and what is aimed at the host's end of its link.
        run_ip_batch(world.inet, [f"route add 100.64.0.0/10 via {n1.ipv4}"])
        before = counters.read()
        assert answered(world.ihost, ["100.127.255.254", "100.127.255.253"], world.python) == set()
        counters.grows(before, NDMZ_INBOUND, what="the SYNs from the Internet dropped at n1")
        # From the ndmz (as if the host let it through) to the NR's public leg: the NR's diode.
        assert answered(ndmz, [leg_address(mesh, "n1", "blue")], world.python) == set()
        counters.grows(before, INBOUND, what="the NR's diode counted")
        # A workload toward the ndmz, and from an address that is not its own.
        assert answered(wl, ["100.64.0.1"], world.python) == set()
        run_ip_batch(wl, ["addr add 192.0.2.99/32 dev lo"])
        for _ in range(5):
            assert not ping_from(wl, "192.0.2.99", str(INTERNET_HOST))
        spoofed = counters.grows(before, TO_NODE, SPOOFED, what="the NR's spoofing and to-node drops")
        assert spoofed[SPOOFED] >= 5

        # /status holds the same counts.
        status = mesh.get_json("n1", "/status")
        internet = next(n for n in status["networks"] if n["name"] == "blue")["internet"]
        now = counters.read()
        assert internet["droppedPackets"]["spoofed"] == now[SPOOFED]
        assert internet["connections"] == now[CONNECTIONS] and internet["observeError"] is None
        assert status["ndmz"]["connections"] == now[NDMZ_CONNECTIONS]

        # A rule deleted by hand: the agent replaces the whole table, whose kernel counters start
        # again at zero; the exported counters carry on from where they were.
        old_handle = table_handle(nr)
        rule = next(o["rule"]["handle"] for o in nr_table(nr)["nftables"]
                    if o.get("rule", {}).get("comment", "").startswith("anti-spoofing"))
        netns_exec(nr, "nft", "delete", "rule", "inet", "zmesh", "prerouting", "handle", str(rule), check=True)
        wait_until(lambda: table_handle(nr) != old_handle and drops(nr, comment="anti-spoofing") == 0,
                   RESYNC + 20, interval=0.2, what="the NR's table re-applied by the agent")
        reapplied = counters.read()
        assert not ping_from(wl, "192.0.2.99", str(INTERNET_HOST))
        assert 1 <= drops(nr, comment="anti-spoofing") < reapplied[SPOOFED]  # the kernel counts from zero
        counters.grows(reapplied, SPOOFED, what="a spoofed packet after the re-apply counted on top")
        assert seen_from(mesh, "w1") == public_address(mesh, "n1")
        counters.grows(reapplied, CONNECTIONS, SENT, RECEIVED, what="traffic after the re-apply counted on top")
        assert not counters.never_fell()
        assert mesh.metric_sum("n1", "zmesh_drift_repairs_total", network="blue") >= 1
