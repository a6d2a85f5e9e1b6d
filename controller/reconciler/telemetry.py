"""What the reconciler and the observer tell observability, in one place: the Snapshot (served
as /metrics, /status and the mesh page) and the node's event history in etcd.

The reconciler calls it at a few points of a reconcile (the plan, the outcome, the conditions
it published, a repair); it only records, never decides anything the reconcile depends on, and
never waits (events are queued, see store/events.py).
"""

from __future__ import annotations

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
                 requeue: Callable[[str], None] = lambda network: None):
        self.snapshot = snapshot
        self.events = events
        self.requeue = requeue
        self._lost: set[str] = set()  # networks whose aggregator went and none is usable yet

    def _event(self, network: str | None, type_: str, reason: str, message: str) -> None:
        if self.events is not None:
            self.events.record(network, type_, reason, message)

    # --- from the reconciler -------------------------------------------------------------

    def planned(self, desired: DesiredNR) -> None:
        before = self.snapshot.networks.get(desired.network)
        previous = before.desired.aggregator if before and before.desired else None
        if self.snapshot.planned(desired):
            self._event(desired.network, WARNING if desired.aggregator is None else NORMAL,
                        "AggregatorChanged", f"aggregator is now {desired.aggregator or 'none'} (was {previous})")
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
