"""An AgentMetrics wired to fakes of everything it reads at scrape time (queue, store, counts,
writes) and a Snapshot holding one network with a peer in every state, so every metric family
the agent can export has samples. Root-free: for the HTTP, deploy and promtool tests."""

from __future__ import annotations

import base64
from ipaddress import IPv4Interface, IPv4Network

from controller.dataplane.nftables import RuleCounter, TableCounters
from controller.dataplane.wireguard.base import DeviceState, PeerState
from controller.http.metrics import AgentMetrics
from controller.http.snapshot import Snapshot
from controller.models.resources import Condition
from controller.planner.plan import DesiredNR, DesiredPeer
from controller.planner.rulesets import nr_ruleset
from controller.store.client import Endpoint

T0 = 1_700_000_000.0


def key(node: str) -> str:
    return base64.b64encode(node.encode().ljust(32, b".")).decode()


class FakeQueue:
    adds, retries = 7, 1

    def __len__(self):
        return 2

    def oldest_wait(self):
        return 0.5

    def longest_running(self):
        return 0.25


class FakeStore:
    connected = True
    endpoint = Endpoint("127.0.0.1", 2379)
    failovers = 0
    revision = 42
    on_request = None


class Clock:
    def __init__(self):
        self.t = T0

    def __call__(self):
        return self.t


def plan(network: str, peers: list[str], aggregator: str | None = None) -> DesiredNR:
    return DesiredNR(
        network=network, netns=f"zmnr-{network}", wg_ifname=f"zw-{network}", listen_port=51820,
        public_key=key("n1"), bridge="zmbr", gateway=IPv4Interface("10.1.1.1/24"), mtu=1420,
        hidden=False, aggregator=aggregator,
        peers=tuple(DesiredPeer(key(p), f"198.51.100.{i + 12}:51820", (IPv4Network(f"10.1.{i + 2}.0/24"),),
                                None, p) for i, p in enumerate(peers)),
        routes=(), workloads=(), issues=(), ruleset=nr_ruleset(IPv4Network("10.1.1.0/24")))


def counters(generation: int, **packets: int) -> TableCounters:
    """A table's counted rules as read: `packets` by what they count (bytes: 100 per packet)."""
    return TableCounters((1, generation), tuple(RuleCounter(counts, handle, n, 100 * n)
                                                for handle, (counts, n) in enumerate(packets.items())))


def full_metrics(peer_series_limit: int = 100) -> tuple[AgentMetrics, Snapshot, Clock]:
    """Network blue on n1 with peers n2 (up), n3 (stale), n4 (idle), n5 (pending)."""
    clock = Clock()
    snap = Snapshot("n1", stale_after=20, observe_interval=1, clock=clock)
    m = AgentMetrics("n1", "0.1.0", snapshot=snap, peer_series_limit=peer_series_limit,
                     wireguard_backend="userspace")
    m.observe_queue(FakeQueue())
    m.observe_etcd(FakeStore(), lambda: (12, 1), lambda: 0)
    m.observe_managed(lambda: {"zmesh_networks": 1, "zmesh_network_resources": 1, "zmesh_workloads": 2})
    m.observe_writes(lambda: {"link": 3, "route": 2})
    snap.planned(plan("blue", ["n2", "n3", "n4", "n5"], aggregator="n2"))
    snap.status("blue", 5, [Condition(type="Ready", status="True", reason="Converged"),
                            Condition(type="Degraded", status="False", reason="AsDesired")])

    def device(n2, n3, n4):
        return DeviceState(51820, key("n1"), True, {
            key("n2"): PeerState(None, frozenset(), 0, *n2),
            key("n3"): PeerState(None, frozenset(), 0, *n3),
            key("n4"): PeerState(None, frozenset(), 0, *n4)})

    snap.observed_device("blue", device((0, 0, T0), (0, 0, T0), (0, 0, 0)))
    for step in range(1, 40):
        clock.t = T0 + step
        snap.observed_device("blue", device((100 * step, 100 * step, clock.t), (0, 100 * step, T0), (0, 0, 0)))
    snap.refreshed_at = clock.t
    # Internet access: every counted rule read twice (counting starts at the first reading).
    zero = dict(connections=0, sent=0, received=0, inbound=0, spoofed=0, to_node=0)
    snap.observed_firewall("blue", counters(1, **zero))
    snap.observed_firewall("blue", counters(1, connections=3, sent=40, received=50, inbound=7, spoofed=2,
                                            to_node=1))
    node_zero = dict(connections=0, inbound=0, spoofed=0, to_node=0, between_networks=0)
    snap.observed_ndmz({"ndmz": counters(1, **node_zero), "host": counters(1, inbound=0, to_node=0)})
    snap.observed_ndmz({"ndmz": counters(1, **{**node_zero, "connections": 3, "inbound": 1}),
                        "host": counters(1, inbound=5, to_node=0)})
    snap.ndmz_passed(writes=1, baseline=True)  # a rule of its table deleted by hand, written back
    m.reconcile.labels(network="blue", result="converged").inc()
    m.reconcile_duration.labels(network="blue").observe(0.003)
    m.reconcile_failed("blue", TimeoutError())
    m.wireguard_restarts.inc()
    m.etcd_request("range", 0.002, True)
    m.etcd_request("put", 5.0, False)
    m.events.labels(type="Warning", reason="PeerStale").inc()
    m.events_dropped.inc(0)
    m.observe_errors.inc(0)
    m.probes.labels(network="blue", outcome="ok").inc(30)
    m.probes.labels(network="blue", outcome="failed").inc(3)
    return m, snap, clock
