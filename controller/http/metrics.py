"""The agent's Prometheus metrics, in a registry of its own (never the process-global default),
so several agents in one test process or one demo do not clash.

Conventions: `zmesh_` prefix, base units (seconds, bytes), counters end in `_total`, durations
are histograms. Two kinds of series:
- updated by the code as things happen (reconciles, errors, etcd requests, events): prometheus
  Counters and Histograms;
- read at scrape time from what the agent already holds (the observed `Snapshot`, the work
  queue, the store's connection state): collectors that only read memory, so a scrape never
  waits for netlink, a UAPI socket or etcd.

Cardinality (docs/observability.md has the table): per network a fixed handful of series; per
WireGuard peer four, for at most `peer_series_limit` peers per node (stale peers first, then by
network and peer name; the per-network aggregates always count every peer). Per-network
series go with the network (`forget_network`).
"""

from __future__ import annotations

import asyncio
import platform
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controller.dataplane.wireguard.base import WireGuardError
from controller.store.client import OPERATIONS, StoreError

from controller.models.nftables import DROP_REASONS

from .snapshot import DEFAULT_PEER_SERIES_LIMIT, NR_DROP_REASONS, STALE, Snapshot

# From a no-op resync (~1 ms) to a cold NR with many peers on a busy 2-core machine (seconds).
RECONCILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# etcd on loopback answers in ~1 ms; a failover round or a slow cluster takes seconds.
ETCD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RECONCILE_RESULTS = ("converged", "changed", "pending", "invalid", "removed", "waiting", "error")
ERROR_REASONS = ("etcd", "wireguard", "kernel", "timeout", "internal")


def error_reason(error: BaseException) -> str:
    """The bounded reason label of a failed reconcile (the message goes to the log and status)."""
    if isinstance(error, StoreError):
        return "etcd"
    if isinstance(error, WireGuardError):
        return "wireguard"
    if isinstance(error, (asyncio.TimeoutError, TimeoutError)) or type(error).__name__ == "ReconcileTimeout":
        return "timeout"
    if isinstance(error, OSError) or type(error).__name__ == "NetlinkError":
        return "kernel"
    return "internal"


class _SnapshotCollector(Collector):
    """Per network and per peer, from the observed Snapshot, evaluated at scrape time."""

    def __init__(self, snapshot: Snapshot, peer_series_limit: int):
        self.snapshot = snapshot
        self.peer_series_limit = peer_series_limit

    def collect(self) -> Iterable[Metric]:
        snap = self.snapshot
        now = snap.clock()
        peers = GaugeMetricFamily("zmesh_wireguard_peers", "WireGuard peers the NR of a network should have",
                                  labels=["network"])
        stale = GaugeMetricFamily("zmesh_wireguard_peers_stale",
                                  "Peers of the network that should be talking and were not heard from "
                                  "(see docs/observability.md, Peer states)", labels=["network"])
        oldest = GaugeMetricFamily("zmesh_wireguard_oldest_handshake_age_seconds",
                                   "The oldest handshake age among the network's configured peers",
                                   labels=["network"])
        rx = CounterMetricFamily("zmesh_wireguard_received_bytes",
                                 "Bytes received from the network's peers (monotonic: survives peer "
                                 "churn and WireGuard restarts)", labels=["network"])
        tx = CounterMetricFamily("zmesh_wireguard_sent_bytes",
                                 "Bytes sent to the network's peers (monotonic: survives peer churn "
                                 "and WireGuard restarts)", labels=["network"])
        cond = GaugeMetricFamily("zmesh_network_resource_condition",
                                 "Conditions of this node's NR of a network: 1 for the current status",
                                 labels=["network", "condition", "status"])
        drift = CounterMetricFamily("zmesh_drift_repairs",
                                    "Reconciles that wrote to the kernel although the plan had not "
                                    "changed: someone or something had changed the NR", labels=["network"])
        agg = GaugeMetricFamily("zmesh_aggregator_info", "The aggregator in effect for a network (always 1)",
                                labels=["network", "aggregator"])
        agg_changes = CounterMetricFamily("zmesh_aggregator_changes",
                                          "Times the aggregator in effect for a network changed",
                                          labels=["network"])
        agg_failovers = CounterMetricFamily("zmesh_aggregator_failovers",
                                            "Aggregator changes that left one for a less preferred "
                                            "candidate or none (not a move back to a preferred one)",
                                            labels=["network"])
        nat = CounterMetricFamily("zmesh_internet_connections",
                                  "Connections of the network masqueraded out of its NR's public leg "
                                  "(counted by the NAT rule, which sees each connection's first packet)",
                                  labels=["network"])
        inet_tx = CounterMetricFamily("zmesh_internet_sent_bytes",
                                      "Bytes the network sent to the Internet through its NR's public leg",
                                      labels=["network"])
        inet_rx = CounterMetricFamily("zmesh_internet_received_bytes",
                                      "Bytes of replies from the Internet through the NR's public leg",
                                      labels=["network"])
        dropped = CounterMetricFamily("zmesh_firewall_dropped_packets",
                                      "Packets the NR's firewall dropped, by reason (" + ", ".join(NR_DROP_REASONS)
                                      + ")", labels=["network", "reason"])
        per_peer = []
        for name, nr in sorted(snap.networks.items()):
            if nr.desired is None:
                continue
            if nr.desired.ruleset is not None:
                fw = nr.firewall
                nat.add_metric([name], fw.packets.get("connections", 0))
                inet_tx.add_metric([name], fw.bytes.get("sent", 0))
                inet_rx.add_metric([name], fw.bytes.get("received", 0))
                for reason in NR_DROP_REASONS:
                    dropped.add_metric([name, reason], fw.packets.get(reason, 0))
            states = {n: rec.state(now, snap.stale_after) for n, rec in nr.peers.items()}
            peers.add_metric([name], len(nr.peers))
            stale.add_metric([name], sum(s == STALE for s in states.values()))
            ages = [rec.handshake_age(now) for rec in nr.peers.values() if rec.configured]
            if ages:
                oldest.add_metric([name], max(ages))
            rx.add_metric([name], nr.rx_bytes)
            tx.add_metric([name], nr.tx_bytes)
            drift.add_metric([name], nr.drift_repairs)
            agg_changes.add_metric([name], nr.aggregator_changes)
            agg_failovers.add_metric([name], nr.aggregator_failovers)
            if nr.desired.aggregator:
                agg.add_metric([name, nr.desired.aggregator], 1)
            per_peer += [(states[n] != STALE, name, n, rec, states[n]) for n, rec in nr.peers.items()]
        for name, nr in sorted(snap.networks.items()):
            for c in nr.conditions:
                for status in ("True", "False", "Unknown"):
                    cond.add_metric([name, c.type, status], 1 if c.status == status else 0)

        per_peer.sort(key=lambda p: p[:3])  # stale peers first, then by network and peer
        shown = per_peer[:max(0, self.peer_series_limit)]
        age = GaugeMetricFamily("zmesh_wireguard_peer_handshake_age_seconds",
                                "Seconds since the last handshake with the peer (for a peer without "
                                "one yet: since it was planned)", labels=["network", "peer"])
        pstale = GaugeMetricFamily("zmesh_wireguard_peer_stale", "1 when the peer is stale",
                                   labels=["network", "peer"])
        prx = CounterMetricFamily("zmesh_wireguard_peer_received_bytes", "Bytes received from the peer",
                                  labels=["network", "peer"])
        ptx = CounterMetricFamily("zmesh_wireguard_peer_sent_bytes", "Bytes sent to the peer",
                                  labels=["network", "peer"])
        for _, name, node, rec, state in shown:
            age.add_metric([name, node], rec.handshake_age(now))
            pstale.add_metric([name, node], 1 if state == STALE else 0)
            prx.add_metric([name, node], rec.rx_bytes)
            ptx.add_metric([name, node], rec.tx_bytes)
        omitted = GaugeMetricFamily("zmesh_wireguard_peer_series_omitted",
                                    "Peers left without per-peer series by the per-node limit "
                                    "(--metrics-peer-limit)")
        omitted.add_metric([], len(per_peer) - len(shown))
        observe_age = GaugeMetricFamily("zmesh_observe_age_seconds",
                                        "Seconds since the observer last finished reading every NR")
        if snap.refreshed_at:
            observe_age.add_metric([], max(0.0, now - snap.refreshed_at))
        # The node's ndmz is built at start: its repairs are counted from 0, so the first one is
        # an increase() in Prometheus (a series that appears at 1 shows none).
        ndmz_drift = CounterMetricFamily("zmesh_ndmz_drift_repairs",
                                         "ndmz passes that wrote to the kernel although the ndmz had been "
                                         "built as planned: someone or something had changed it")
        ndmz_drift.add_metric([], snap.ndmz_drift_repairs)
        yield from (peers, stale, oldest, rx, tx, cond, drift, agg, agg_changes, agg_failovers, nat, inet_tx, inet_rx, dropped,
                    age, pstale, prx, ptx, omitted, observe_age, ndmz_drift)
        if snap.ndmz.read:  # the node's ndmz (and its host chains), once read
            ndmz_nat = CounterMetricFamily("zmesh_ndmz_connections",
                                           "Connections of the node's NRs masqueraded out of the ndmz's uplink")
            ndmz_nat.add_metric([], snap.ndmz.packets.get("connections", 0))
            ndmz_dropped = CounterMetricFamily("zmesh_ndmz_dropped_packets",
                                               "Packets the firewalls of the ndmz and of the host's ndmz link "
                                               "dropped, by reason (" + ", ".join(DROP_REASONS) + ")",
                                               labels=["reason"])
            for reason in DROP_REASONS:
                ndmz_dropped.add_metric([reason], snap.ndmz.packets.get(reason, 0))
            yield from (ndmz_nat, ndmz_dropped)


class _QueueCollector(Collector):
    def __init__(self, queue):
        self.queue = queue  # a reconciler.queue.WorkQueue (duck-typed: http sits below it)

    def collect(self) -> Iterable[Metric]:
        q = self.queue
        depth = GaugeMetricFamily("zmesh_workqueue_depth", "Keys waiting in the reconcile queue")
        depth.add_metric([], len(q))
        oldest = GaugeMetricFamily("zmesh_workqueue_oldest_key_age_seconds",
                                   "How long the longest-waiting queued key has waited")
        oldest.add_metric([], q.oldest_wait())
        running = GaugeMetricFamily("zmesh_workqueue_longest_running_seconds",
                                    "How long the longest-running reconcile has been running")
        running.add_metric([], q.longest_running())
        adds = CounterMetricFamily("zmesh_workqueue_adds", "Keys queued (repeated adds of a waiting key "
                                   "are coalesced and not counted)")
        adds.add_metric([], q.adds)
        retries = CounterMetricFamily("zmesh_workqueue_retries", "Keys requeued with backoff after a failure")
        retries.add_metric([], q.retries)
        yield from (depth, oldest, running, adds, retries)


class _EtcdCollector(Collector):
    def __init__(self, store, watches: Callable[[], tuple[int, int]], revision_lag: Callable[[], int]):
        self.store = store  # an EtcdStore: connected, endpoint, failovers, revision
        self.watches = watches  # -> (watch events, re-lists), both monotonic
        self.revision_lag = revision_lag

    def collect(self) -> Iterable[Metric]:
        s = self.store
        up = GaugeMetricFamily("zmesh_etcd_connected", "1 while etcd answers the agent's calls, 0 from a "
                               "failed call until one succeeds")
        up.add_metric([], 1 if s.connected else 0)
        endpoint = GaugeMetricFamily("zmesh_etcd_endpoint_info", "The etcd endpoint in use (always 1)",
                                     labels=["endpoint"])
        endpoint.add_metric([str(s.endpoint)], 1)
        failovers = CounterMetricFamily("zmesh_etcd_failovers", "Moves to the next etcd endpoint after a "
                                        "connection error")
        failovers.add_metric([], s.failovers)
        events, relists = self.watches()
        ev = CounterMetricFamily("zmesh_etcd_watch_events", "Watch events received from etcd")
        ev.add_metric([], events)
        rl = CounterMetricFamily("zmesh_etcd_relists", "Watches re-listed after a compaction or a lost "
                                 "connection")
        rl.add_metric([], relists)
        revision = GaugeMetricFamily("zmesh_etcd_revision", "The newest etcd revision the agent has seen")
        revision.add_metric([], s.revision)
        lag = GaugeMetricFamily("zmesh_etcd_revision_lag",
                                "Revisions between the newest change concerning one of this node's "
                                "networks and the one its last reconcile read (0: all reconciled)")
        lag.add_metric([], self.revision_lag())
        yield from (up, endpoint, failovers, ev, rl, revision, lag)


class _CallbackGauges(Collector):
    """Gauges whose values come from one callable returning {name: value} at scrape time."""

    def __init__(self, helps: dict[str, str], values: Callable[[], dict[str, float]]):
        self.helps = helps
        self.values = values

    def collect(self) -> Iterable[Metric]:
        values = self.values()
        for name, help_text in self.helps.items():
            g = GaugeMetricFamily(name, help_text)
            g.add_metric([], values.get(name, 0))
            yield g


class _WritesCollector(Collector):
    def __init__(self, writes: Callable[[], Mapping[str, int]]):
        self.writes = writes

    def collect(self) -> Iterable[Metric]:
        c = CounterMetricFamily("zmesh_dataplane_writes", "Changes written to the kernel, by kind "
                                "(" + ", ".join(WRITE_KINDS) + "): flat on a converged node",
                                labels=["kind"])
        totals = self.writes()
        for kind in sorted(set(WRITE_KINDS) | set(totals)):
            c.add_metric([kind], totals.get(kind, 0))
        yield c


WRITE_KINDS = ("netns", "link", "address", "route", "sysctl", "wireguard", "nftables")
MANAGED = {
    "zmesh_networks": "Networks the index names for this node",
    "zmesh_network_resources": "Network resources (NR namespaces) on this node",
    "zmesh_workloads": "Workloads attached to this node's NRs",
}


class AgentMetrics:
    """Every metric one node agent exports; `registry` is what /metrics serves."""

    def __init__(self, node: str, version: str, *, snapshot: Snapshot | None = None,
                 peer_series_limit: int = DEFAULT_PEER_SERIES_LIMIT, wireguard_backend: str = "unknown"):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.snapshot = snapshot if snapshot is not None else Snapshot(node)
        self.node_info = Gauge("zmesh_node_info", "The node this agent runs, and its version (always 1)",
                               ["node", "version"], registry=r)
        self.node_info.labels(node=node, version=version).set(1)
        self.build_info = Gauge("zmesh_build_info", "The agent's build (always 1)",
                                ["version", "python_version", "wireguard_backend"], registry=r)
        self.build_info.labels(version=version, python_version=platform.python_version(),
                               wireguard_backend=wireguard_backend).set(1)
        self.reconcile = Counter("zmesh_reconcile_total", "Reconciles of a network by result "
                                 "(" + ", ".join(RECONCILE_RESULTS) + ")",
                                 ["network", "result"], registry=r)
        self.reconcile_duration = Histogram("zmesh_reconcile_duration_seconds",
                                            "Time one reconcile of a network took",
                                            ["network"], buckets=RECONCILE_BUCKETS, registry=r)
        self.reconcile_errors = Counter("zmesh_reconcile_errors_total",
                                        "Reconciles that failed and were requeued with backoff, by reason "
                                        "(" + ", ".join(ERROR_REASONS) + ")",
                                        ["network", "reason"], registry=r)
        self.wireguard_restarts = Counter("zmesh_wireguard_restarts_total",
                                          "WireGuard devices found dead and restarted", registry=r)
        self.wireguard_redials = Counter("zmesh_wireguard_redials_total",
                                         "Peers dialled afresh because their first handshake was not "
                                         "answered (a hidden NR's aggregator that did not know it yet)",
                                         registry=r)
        self.observe_errors = Counter("zmesh_observe_errors_total",
                                      "WireGuard devices and nftables tables the observer could "
                                      "not read", registry=r)
        self.etcd_requests = Histogram("zmesh_etcd_request_duration_seconds",
                                       "etcd calls by operation, failovers included",
                                       ["operation"], buckets=ETCD_BUCKETS, registry=r)
        self.etcd_request_errors = Counter("zmesh_etcd_request_errors_total",
                                           "etcd calls that failed, by operation", ["operation"], registry=r)
        for operation in OPERATIONS:  # a bounded set: present at 0 from the start
            self.etcd_request_errors.labels(operation=operation)
        self.events = Counter("zmesh_events_total", "Events this agent recorded, by type and reason",
                              ["type", "reason"], registry=r)
        self.events_dropped = Counter("zmesh_events_dropped_total",
                                      "Events not written to etcd (etcd unreachable and the buffer full)",
                                      registry=r)
        self.probes = Counter("zmesh_probes_total", "Probes through the tunnels to candidate "
                              "aggregators, by outcome (ok, failed)", ["network", "outcome"], registry=r)
        r.register(_SnapshotCollector(self.snapshot, peer_series_limit))

    # --- sources read at scrape time ----------------------------------------------------------

    def observe_queue(self, queue) -> None:
        """Queue depth, oldest wait, longest run, adds and retries of a WorkQueue."""
        self.registry.register(_QueueCollector(queue))

    def observe_etcd(self, store, watches: Callable[[], tuple[int, int]],
                     revision_lag: Callable[[], int]) -> None:
        """The store's connection state, watch totals and revision lag; request latencies come
        through `etcd_request`, which this wires as the store's `on_request`."""
        self.registry.register(_EtcdCollector(store, watches, revision_lag))
        store.on_request = self.etcd_request

    def observe_managed(self, counts: Callable[[], dict[str, float]]) -> None:
        """Networks, NRs and workloads managed: `counts()` returns {metric name: value}."""
        self.registry.register(_CallbackGauges(MANAGED, counts))

    def observe_writes(self, writes: Callable[[], Mapping[str, int]]) -> None:
        """Kernel writes so far by kind (`writes()` returns running totals)."""
        self.registry.register(_WritesCollector(writes))

    # --- updated as things happen ---------------------------------------------------------

    def etcd_request(self, operation: str, seconds: float, ok: bool) -> None:
        self.etcd_requests.labels(operation=operation).observe(seconds)
        if not ok:
            self.etcd_request_errors.labels(operation=operation).inc()

    def reconcile_failed(self, network: str, error: BaseException) -> None:
        self.reconcile.labels(network=network, result="error").inc()
        self.reconcile_errors.labels(network=network, reason=error_reason(error)).inc()

    def forget_network(self, network: str) -> None:
        """Drop every series of a network this node no longer serves."""
        self.snapshot.forget(network)
        _remove(self.reconcile_duration, network)
        for metric in (self.reconcile, self.reconcile_errors, self.probes):
            for labels in [k for k in _label_sets(metric) if k[0] == network]:
                metric.remove(*labels)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


def _label_sets(metric) -> list[tuple[str, ...]]:
    # prometheus_client keeps children in a private dict; copying under its lock is its own API
    # for this (used by its `clear()`), there is no public listing.
    with metric._lock:
        return list(metric._metrics)


def _remove(metric, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass  # the network never had this series


