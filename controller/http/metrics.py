"""The agent's Prometheus metrics, in a registry of its own (never the process-global default),
so several agents in one test process or one demo do not clash.

Conventions: `zmesh_` prefix, base units (seconds, bytes), counters end in `_total`, durations
are histograms. Per-network series are removed when the network goes (`forget_network`), so a
long-running agent does not keep series for networks it no longer serves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

# From a no-op resync (~1 ms) to a cold NR with many peers on a busy 2-core machine (seconds).
RECONCILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _WireGuardTraffic(Collector):
    """Byte counters read from WireGuard, exposed as counters. They are summed per network rather
    than per peer: thousands of peers would mean thousands of series per node. WireGuard's own
    counters restart at zero when an interface is recreated; Prometheus' rate() handles that."""

    def __init__(self):
        self.bytes: dict[str, tuple[int, int]] = {}  # network -> (received, sent)

    def collect(self) -> Iterable[CounterMetricFamily]:
        rx = CounterMetricFamily("zmesh_wireguard_received_bytes",
                                 "Bytes received from all peers of the network's WireGuard interface",
                                 labels=["network"])
        tx = CounterMetricFamily("zmesh_wireguard_sent_bytes",
                                 "Bytes sent to all peers of the network's WireGuard interface",
                                 labels=["network"])
        for network, (received, sent) in sorted(self.bytes.items()):
            rx.add_metric([network], received)
            tx.add_metric([network], sent)
        yield rx
        yield tx


class AgentMetrics:
    """Every metric one node agent exports; `registry` is what /metrics serves."""

    def __init__(self, node: str, version: str):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.node_info = Gauge("zmesh_node_info", "The node this agent runs, and its version (always 1)",
                               ["node", "version"], registry=r)
        self.node_info.labels(node=node, version=version).set(1)
        self.reconcile = Counter("zmesh_reconcile_total", "Reconciles of a network by result "
                                 "(converged, changed, pending, error, invalid)",
                                 ["network", "result"], registry=r)
        self.reconcile_duration = Histogram("zmesh_reconcile_duration_seconds",
                                            "Time one reconcile of a network took",
                                            ["network"], buckets=RECONCILE_BUCKETS, registry=r)
        self.reconcile_errors = Counter("zmesh_reconcile_errors_total",
                                        "Reconciles that failed and were requeued with backoff",
                                        ["network"], registry=r)
        self.dataplane_writes = Counter("zmesh_dataplane_writes_total",
                                        "Changes written to the kernel, by kind "
                                        "(netns, link, address, route, wireguard, nftables)",
                                        ["kind"], registry=r)
        self.network_resources = Gauge("zmesh_network_resources",
                                       "Network resources (NR namespaces) on this node", registry=r)
        self.wireguard_peers = Gauge("zmesh_wireguard_peers", "WireGuard peers configured per network",
                                     ["network"], registry=r)
        self.wireguard_restarts = Counter("zmesh_wireguard_restarts_total",
                                          "Userspace WireGuard processes restarted after they died",
                                          registry=r)
        self.etcd_watch_restarts = Counter("zmesh_etcd_watch_restarts_total",
                                           "etcd watches re-established (compaction or lost connection)",
                                           registry=r)
        self.workqueue_depth = Gauge("zmesh_workqueue_depth", "Keys waiting in the reconcile queue",
                                     registry=r)
        self._traffic = _WireGuardTraffic()
        r.register(self._traffic)

    def observe_queue(self, depth: Callable[[], int]) -> None:
        """Read the queue depth at scrape time (e.g. `metrics.observe_queue(lambda: len(queue))`)."""
        self.workqueue_depth.set_function(depth)

    def set_wireguard_traffic(self, network: str, received_bytes: int, sent_bytes: int) -> None:
        """Record the byte counters just read from the network's WireGuard interface."""
        self._traffic.bytes[network] = (received_bytes, sent_bytes)

    def forget_network(self, network: str) -> None:
        """Drop every series of a network this node no longer serves."""
        self._traffic.bytes.pop(network, None)
        for metric in (self.reconcile_duration, self.reconcile_errors, self.wireguard_peers):
            _remove(metric, network)
        for labels in [k for k in _label_sets(self.reconcile) if k[0] == network]:
            self.reconcile.remove(*labels)

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
