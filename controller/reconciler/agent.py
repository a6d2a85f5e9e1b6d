"""The node agent (`zmesh agent`, `zmeshd`): wires the store, the node-scoped watch, the work
queue, the reconciler and the HTTP surface, and runs them until SIGTERM/SIGINT.

On exit it leaves the dataplane up (the NRs and their wireguard-go processes keep forwarding)
and keeps its liveness lease until it expires, so a quick restart is invisible to other nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from importlib.metadata import PackageNotFoundError, version

from controller.dataplane.links import Links
from controller.dataplane.nftables import Nftables
from controller.dataplane.wireguard import select_backend
from controller.dataplane.wireguard.base import KeyStore
from controller.http.metrics import AgentMetrics
from controller.http.server import HttpServer, Readiness
from controller.http.snapshot import Snapshot
from controller.models.resources import Metadata, Node, NodeSpec
from controller.planner import names
from controller.planner.plan import NodeContext
from controller.store.client import StoreError
from controller.store.events import EventRecorder
from controller.store.indexer import Indexer

from .config import AgentConfig
from .ndmz import NDMZ_KEY, NdmzReconciler
from .meshview import MeshView
from .observer import Observer
from .probing import Prober
from .queue import WorkQueue
from .reconcile import Reconciler
from .scope import NodeScope
from .state import LocalState, StateDirInUse
from .telemetry import Telemetry

log = logging.getLogger("zmesh.agent")

LEASE_TTL = 10  # seconds a node stays "alive" after its agent stops refreshing


def package_version() -> str:
    try:
        return version("zero-mesh")
    except PackageNotFoundError:
        return "0+unknown"


class Agent:
    def __init__(self, config: AgentConfig):
        self.config = config
        names.check_prefix(config.name_prefix)
        self.reconciler: Reconciler | None = None  # made in run(), once the underlay is known
        self.readiness = Readiness(["registered", "etcd", "reconciled", "ndmz"])
        self.queue: WorkQueue[str] = WorkQueue(name=f"agent-{config.node_id}")
        self.store = config.etcd_access.open_store(config.prefix, timeout=config.etcd_timeout)
        self.scope = NodeScope(self.store, config.node_id, self.queue.add)
        self.state = LocalState(config.state_dir)
        self.links = Links()
        self.nftables = Nftables()
        self.ndmz: NdmzReconciler | None = None  # made in run(), with the reconciler
        self.wireguard = select_backend(str(config.state_dir), config.host_netns, self.links)
        # Observability: what the agent saw (snapshot), what it exports (metrics), what it tells
        # the operator in etcd (events); docs/observability.md.
        self.snapshot = Snapshot(config.node_id, stale_after=config.peer_stale_after,
                                 observe_interval=config.observe_interval)
        self.metrics = AgentMetrics(config.node_id, package_version(), snapshot=self.snapshot,
                                    peer_series_limit=config.metrics_peer_limit,
                                    wireguard_backend=self.wireguard.kind)
        self.events = EventRecorder(
            self.store, config.node_id,
            on_recorded=lambda e: self.metrics.events.labels(type=e.type, reason=e.reason).inc(),
            on_dropped=self.metrics.events_dropped.inc)
        self.telemetry = Telemetry(self.snapshot, self.events, requeue=self.queue.add)
        self.store.on_connection = self.telemetry.etcd_connection
        self._started = False  # told telemetry the agent is up (once, when first ready)
        self.observer = Observer(self.snapshot, self.wireguard, on_transition=self.telemetry.peer_transition,
                                 on_error=lambda _network, _error: self.metrics.observe_errors.inc(),
                                 nftables=self.nftables,
                                 ndmz_tables=lambda: self.ndmz.counted_tables() if self.ndmz else [])
        self._reconciled_revision: dict[str, int] = {}  # network -> scope revision its last reconcile read
        self._first_revision = 0  # the node's view of etcd when first listed
        self.metrics.observe_queue(self.queue)
        self.metrics.observe_etcd(self.store, self.scope.watch_totals, self.revision_lag)
        self.metrics.observe_managed(self.managed)
        self.metrics.observe_writes(self.kernel_writes)
        self.http = HttpServer(self.metrics.registry, self.readiness, config.metrics_host, config.metrics_port,
                               status=self.status_view,
                               mesh=MeshView(config.node_id, self.scope, self.snapshot, self.store,
                                             hidden=config.hidden, node_events=self.events.recent))
        # Without etcd auth every agent campaigns; the one leader keeps the node index right for
        # specs written by hand with etcdctl (the CLI writes index and spec in one transaction
        # itself). With auth a node may not write the index: `zmesh indexer` does it as admin.
        self.indexer = Indexer(self.store, identity=config.node_id) if config.runs_indexer else None
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def underlay_mtu(self) -> int:
        """The MTU of the host namespace's uplink: the link holding our public address, else the
        one carrying the default route, else 1500."""
        st = await self.links.observe(self.config.host_netns or "/proc/self/ns/net", sysctls=False)
        if st is None:
            return 1500
        endpoints = {str(a) for a in self.config.public_endpoints}
        for link in st.links.values():
            if any(str(a.ip) in endpoints for a in link.addresses):
                return link.mtu
        for route in st.routes:
            if route.dst.prefixlen == 0 and route.oif is not None:
                for link in st.links.values():
                    if link.index == route.oif:
                        return link.mtu
        return 1500

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self.state.claim_prefix(cfg.name_prefix)  # before anything is touched
        port = await self.http.start()
        log.info("node %s: metrics on %s:%d, WireGuard backend %s, host netns %s",
                 cfg.node_id, cfg.metrics_host, port, self.wireguard.kind, cfg.host_netns or "(own)")
        ctx = NodeContext(node_id=cfg.node_id, name_prefix=cfg.name_prefix,
                          endpoints=tuple(cfg.public_endpoints), underlay_mtu=await self.underlay_mtu())
        self.ndmz = NdmzReconciler(
            ctx=ctx, uplink=cfg.uplink, links=self.links, nftables=self.nftables, state=self.state,
            host_netns=cfg.host_netns, on_change=self._enqueue_networks, telemetry=self.telemetry)
        self.prober = Prober(node_id=cfg.node_id, wireguard=self.wireguard,
                             publish=self._publish_verdicts, published=self.scope.own_verdicts,
                             alive=self.scope.peer_alive, interval=cfg.probe_interval,
                             hold_down=cfg.probe_hold_down, metrics=self.metrics)
        self.reconciler = Reconciler(
            ctx=ctx, store=self.store, scope=self.scope, links=self.links, wireguard=self.wireguard,
            keys=KeyStore(str(cfg.state_dir)), state=self.state, port_range=cfg.listen_port_range,
            metrics=self.metrics, nftables=self.nftables, ndmz=self.ndmz, host_netns=cfg.host_netns,
            telemetry=self.telemetry, prober=self.prober)
        self.registration = None
        try:
            await self.scope.start()
            if self.indexer is not None:
                await self.indexer.start()
            await self.events.start()
            self._spawn(self.observer.run(), "observer")
            # Networks reconcile in parallel, a bounded number at a time; the queue never runs
            # two reconciles of one network at once.
            self._spawn(self.queue.run(self._work, cfg.reconcile_workers), "workqueue")
            # The node-level state from the start, without waiting for etcd: NRs' legs attach to it.
            self._spawn(self._ndmz_resync_loop(), "ndmz-resync")
            self._spawn(self._resync_loop(), "resync")
            self._spawn(self.prober.run(), "prober")
            self._spawn(self._readiness_loop(), "readiness")
            self._spawn(self._register(), "register")
            await self._stopping.wait()
        finally:
            log.info("node %s: stopping (dataplane stays up)", cfg.node_id)
            self.queue.shutdown()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await self.events.flush(timeout=1.0)  # the last events, if etcd answers at once
            await self.events.stop()
            if self.indexer is not None:
                await self.indexer.stop()
            if self.registration is not None:
                await self.registration.stop(revoke=False)
            await self.scope.stop()
            await self.store.close()
            await self.wireguard.close()
            self.links.close()
            await self.http.stop()

    async def _register(self):
        """Register the node; retried until etcd answers (the agent is useful before that:
        its existing NRs keep forwarding and are repaired from the last known state)."""
        cfg = self.config
        node = Node(metadata=Metadata(name=cfg.node_id), spec=NodeSpec(
            endpoints=list(cfg.public_endpoints), listenPortRange=cfg.listen_port_range,
            version=package_version(), capabilities=[f"wireguard-{self.wireguard.kind}"]))
        delay = 0.2
        while True:
            try:
                self.registration = await self.store.register_node(
                    node, ttl=LEASE_TTL, on_regranted=self.telemetry.lease_regranted)
                return
            except Exception as e:  # StoreUnavailable and friends: keep trying
                log.warning("cannot register node %s yet: %s", cfg.node_id, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _spawn(self, coro, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)

        def done(t: asyncio.Task) -> None:
            if not t.cancelled() and t.exception() is not None:
                log.error("task %s crashed: %r; stopping the agent", name, t.exception(),
                          exc_info=t.exception())
                self.stop()

        task.add_done_callback(done)
        self._tasks.append(task)

    async def _publish_verdicts(self, verdicts) -> None:
        try:
            await self.reconciler.publish_verdicts(verdicts)
        except StoreError as e:  # etcd away: the dataplane stays; the next round tries again
            log.warning("network %s: cannot publish probe verdicts: %s", verdicts.network, e)

    async def _work(self, network: str) -> float | None:
        if network == NDMZ_KEY:
            return await self.ndmz.reconcile()
        revision = self.scope.changed.get(network, 0)
        try:
            requeue = await self.reconciler.reconcile(network)
        finally:
            self.observer.poke(network)  # the numbers right after a change, not a period later
        if network not in self._all_networks():  # gone for good: nothing left to lag behind
            self._reconciled_revision.pop(network, None)
            self.scope.changed.pop(network, None)
        elif not self.queue.queued(network):
            # Watches deliver independently: a change at an older revision than `revision` may
            # have arrived during this reconcile. The run it queued acts on it; only once no run
            # is queued has everything up to `revision` been acted on.
            self._reconciled_revision[network] = revision
        return requeue

    # --- read at scrape time (memory only) -------------------------------------------------------

    def revision_lag(self) -> int:
        """Revisions between the newest change concerning one of our networks and the view its
        last successful reconcile read; 0 when every change has been reconciled."""
        current = self._all_networks()
        behind = [self._reconciled_revision.get(n, self._first_revision)
                  for n, rev in self.scope.changed.items()
                  if n in current and rev > self._reconciled_revision.get(n, 0)]
        if not behind or not self._first_revision:
            return 0
        return max(0, max(self.scope.changed.values()) - min(behind))

    def managed(self) -> dict[str, float]:
        return {"zmesh_networks": len(self.scope.network_names()),
                "zmesh_network_resources": len(self.state.networks),
                "zmesh_workloads": sum(len(r.workloads) for r in self.state.networks.values())}

    def kernel_writes(self) -> dict[str, int]:
        return {**self.links.writes_by_kind,
                "wireguard": self.reconciler.wg_writes if self.reconciler else 0,
                "nftables": self.nftables.writes}

    def status_view(self) -> dict:
        """/status: the node, its readiness and etcd connection, and everything it observed."""
        ready, reason = self.readiness()
        return {
            **self.snapshot.view(),
            "version": package_version(),
            "ready": ready,
            "readiness": reason,
            "wireguardBackend": self.wireguard.kind,
            "etcd": {"connected": self.store.connected, "endpoint": str(self.store.endpoint),
                     "revision": self.store.revision, "revisionLag": self.revision_lag(),
                     # Per network, the etcd revision of the view its last finished reconcile
                     # read: every change up to it has been acted on.
                     "reconciledRevisions": dict(sorted(self._reconciled_revision.items()))},
            "events": [e.model_dump(mode="json", exclude_none=True) for e in self.events.recent(None)],
        }

    def _all_networks(self) -> set[str]:
        """Networks the index names plus those we still have NRs for (to remove them)."""
        return self.scope.network_names() | set(self.state.networks)

    async def _resync_loop(self) -> None:
        """Level-triggered safety net: look at every network again every resync interval, and
        delete what the node published for objects that are gone (whatever order they went in,
        also while the agent was down)."""
        await self._wait_synced()
        while True:
            self._enqueue_networks()
            if self.scope.synced():
                try:
                    swept = await self.reconciler.sweep(self._all_networks())
                    if swept:
                        log.info("removed %d key(s) this node had published for deleted objects", swept)
                except StoreError as e:  # etcd away: next time
                    log.debug("sweep skipped: %s", e)
            await asyncio.sleep(self.config.resync_interval)

    def _enqueue_networks(self) -> None:
        for network in sorted(self._all_networks()):
            self.queue.add(network)

    async def _ndmz_resync_loop(self) -> None:
        """The same for the ndmz, which needs nothing from etcd: from the start, etcd or not."""
        while True:
            self.queue.add(NDMZ_KEY)
            await asyncio.sleep(self.config.resync_interval)

    async def _wait_synced(self) -> None:
        while not self.scope.index_synced:
            await asyncio.sleep(0.05)

    async def _readiness_loop(self) -> None:
        """Ready while the node is registered, every cache of its view of etcd has listed (the
        gate closes again while one re-lists) and every network it knows of has been reconciled
        at least once (a network that only waited for its caches does not count)."""
        while True:
            gates = {
                "registered": self.registration is not None,
                "etcd": self.scope.synced(),
                "reconciled": self.scope.index_synced
                and self._all_networks() <= self.reconciler.reconciled,
                "ndmz": self.ndmz.passes > 0,  # built once: NRs can reach the Internet
            }
            for gate, is_open in gates.items():
                (self.readiness.open if is_open else self.readiness.close)(gate)
            if not self._started and all(gates.values()):
                self._started = True
                self.telemetry.started(package_version(), self.wireguard.kind, len(self.state.networks))
            if self.scope.index_synced and not self._first_revision:
                self._first_revision = self.scope.index.revision
            await asyncio.sleep(0.2)


async def run_agent_async(config: AgentConfig) -> int:
    agent = Agent(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, agent.stop)
    try:
        await agent.run()
    except StateDirInUse as e:
        log.error("%s", e)
        return 1
    return 0


def run_agent(config: AgentConfig) -> int:
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(run_agent_async(config))
