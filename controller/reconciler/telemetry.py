"""What the reconciler and the observer tell observability, in one place: the Snapshot (served
as /metrics, /status and the mesh page) and the node's event history in etcd.

The reconciler calls it at a few points of a reconcile (the plan, the outcome, the conditions
it published, a repair); it only records, never decides anything the reconcile depends on, and
never waits (events are queued, see store/events.py). Events about a network go to that
network's history; what concerns the node itself (the agent starting, its ndmz, its connection
to etcd and its liveness lease, a network it cannot even name) goes to the node's.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from controller.dataplane.links import NRState
from controller.http.snapshot import PEERS_CONDITION, Snapshot, Transition
from controller.models.resources import Condition
from controller.planner.plan import DesiredNR
from controller.store.events import EventRecorder

NORMAL, WARNING = "Normal", "Warning"
# The status each condition has when all is well; the other one is worth a warning.
HEALTHY = {"Ready": "True", "Degraded": "False", PEERS_CONDITION: "True"}


class Telemetry:
    def __init__(self, snapshot: Snapshot, events: EventRecorder | None = None,
                 requeue: Callable[[str], None] = lambda network: None,
                 clock: Callable[[], float] = time.monotonic):
        self.snapshot = snapshot
        self.events = events
        self.requeue = requeue
        self.clock = clock
        self._lost: set[str] = set()  # networks whose aggregator went and none is usable yet
        self._created = 0  # NRs created since the agent started
        self._etcd_lost_at: float | None = None  # when etcd stopped answering (None: it answers)
        self._refused: dict[str, str] = {}  # network names that cannot be reconciled -> why

    def _event(self, network: str | None, type_: str, reason: str, message: str) -> None:
        if self.events is not None:
            self.events.record(network, type_, reason, message)

    # --- from the reconciler -------------------------------------------------------------

    def planned(self, desired: DesiredNR) -> None:
        before = self.snapshot.networks.get(desired.network)
        previous = before.desired.aggregator if before and before.desired else None
        if self.snapshot.planned(desired):
            # Why, as the choice says it (FailedOver: n2, because n1 is not forwarding ...).
            why = f": {desired.choice.reason}: {desired.choice.message}" if desired.choice else ""
            self._event(desired.network, WARNING if desired.aggregator is None else NORMAL,
                        "AggregatorChanged",
                        f"aggregator is now {desired.aggregator or 'none'} (was {previous}){why}")
            if desired.aggregator is None:
                self._lost.add(desired.network)
        elif desired.aggregator is not None and desired.network in self._lost:
            # One is usable again after the last one was lost (a new NR chooses its first quietly).
            self._lost.discard(desired.network)
            self._event(desired.network, NORMAL, "AggregatorChosen", f"aggregator is {desired.aggregator}")

    def observed_links(self, network: str, state: NRState | None) -> None:
        self.snapshot.observed_links(network, state)

    def peers_condition(self, network: str) -> tuple[str, str, str, str]:
        return self.snapshot.peers_condition(network)

    def reconciled(self, network: str, *, ok: bool, kernel_writes: int = 0) -> None:
        if self.snapshot.reconciled(network, ok=ok, kernel_writes=kernel_writes):
            self._event(network, WARNING, "DriftRepaired",
                        f"{kernel_writes} kernel change(s) written back: the NR had been changed "
                        "outside the agent")

    def published(self, network: str, generation: int, before: list[Condition],
                  after: list[Condition]) -> None:
        """The NR's conditions as just published: a transition of one is an event (a healthy
        condition appearing for the first time is not news; stale peers have their own)."""
        self.snapshot.status(network, generation, after)
        old = {c.type: c for c in before}
        for c in after:
            was = old.get(c.type)
            healthy = HEALTHY.get(c.type) in (None, c.status)
            if c.type == PEERS_CONDITION or (was is None and healthy):
                continue
            if was is None or (was.status, was.reason) != (c.status, c.reason):
                text = f"{c.type} is {c.status}" + (f": {c.message}" if c.message else "")
                self._event(network, NORMAL if healthy else WARNING, c.reason or c.type, text)

    def created(self, network: str, netns: str) -> None:
        self._created += 1
        self._event(network, NORMAL, "Created", f"network resource {netns} created")

    def removed(self, network: str) -> None:
        self._lost.discard(network)
        self._event(network, NORMAL, "Removed", "network resource removed")

    def wireguard_restarted(self, network: str, ifname: str) -> None:
        self._event(network, WARNING, "WireGuardRestarted", f"WireGuard device {ifname} was gone; restarted it")

    # --- from the observer ---------------------------------------------------------------

    def peer_transition(self, t: Transition) -> None:
        """A peer became stale or was heard again: an event, and a reconcile so the NR's
        PeersReachable condition says so."""
        if t.stale:
            self._event(t.network, WARNING, "PeerStale", t.message)
        else:
            self._event(t.network, NORMAL, "PeerRecovered", t.message)
        self.requeue(t.network)

    # --- about the node itself (its own history: nodes/<node>/events/node/) -----------------

    def started(self, version: str, backend: str, resources: int) -> None:
        """The agent's first pass is done (it became ready): `resources` NRs, of which those it
        did not create itself were adopted from the last run."""
        adopted = max(0, resources - self._created)
        self._event(None, NORMAL, "AgentStarted",
                    f"agent {version} (WireGuard {backend}) ready: {resources} network resource(s), "
                    f"{adopted} adopted from the last run, {self._created} created")

    def network_refused(self, network: str, why: str) -> None:
        """A network this node cannot reconcile, nor record a network event about (its name is
        not one): a node event, once per reason."""
        if self._refused.get(network) != why:
            self._refused[network] = why
            self._event(None, WARNING, "NetworkRefused", f"network {network!r} refused: {why}")

    def etcd_connection(self, connected: bool, endpoint: str, why: str = "") -> None:
        """The store's connection state changed (a call failed after a success, or the reverse)."""
        now = self.clock()
        if not connected:
            self._etcd_lost_at = now
            self._event(None, WARNING, "EtcdDisconnected", f"etcd at {endpoint} does not answer: {why}")
            return
        lost, self._etcd_lost_at = self._etcd_lost_at, None
        after = f" after {now - lost:.0f} s" if lost is not None else ""
        self._event(None, NORMAL, "EtcdReconnected", f"etcd answers again at {endpoint}{after}")

    def lease_regranted(self) -> None:
        self._event(None, WARNING, "LeaseRegranted", "the node's liveness lease was gone (it expired while "
                    "etcd could not be reached, or was revoked); registered again with a new lease")

    def ndmz_passed(self, netns: str, *, created: bool, writes: int, baseline: bool, rebuilt: bool,
                    failed: str | None) -> None:
        """An ndmz pass converged. `baseline`: the pass before converged too, so writes now mean
        the ndmz was changed outside the agent (counted, and an event; a namespace made again is
        such a repair too); `failed`: why the pass before failed, if it did."""
        if created:
            self._event(None, NORMAL, "NdmzCreated", f"ndmz {netns} created")
        if self.snapshot.ndmz_passed(writes=writes, baseline=baseline):
            legs = "; its bridge was gone: every NR's public leg is made again" if rebuilt else ""
            self._event(None, WARNING, "NdmzDriftRepaired", f"ndmz {netns}: {writes} kernel change(s) "
                        f"written back: it had been changed outside the agent{legs}")
        if failed is not None:
            self._event(None, NORMAL, "NdmzRecovered", f"ndmz {netns} works again")

    def ndmz_failed(self, netns: str, problem: str, failed: str | None) -> None:
        """An ndmz pass failed (`failed`: why the one before did, None if it converged): an event
        when the problem is new, not on every retry."""
        if problem != failed:
            self._event(None, WARNING, "NdmzFailed", f"ndmz {netns}: {problem} (NRs have no Internet access)")
