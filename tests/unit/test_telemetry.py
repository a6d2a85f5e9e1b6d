"""Telemetry: which of the reconciler's and the observer's findings become events (a condition
turning unhealthy or healthy again, a failover, a drift repair, a stale peer) and which do not
(a healthy condition appearing, the first aggregator chosen, nothing changing)."""

from agent_metrics import plan

from controller.http.snapshot import Snapshot, Transition
from controller.models.resources import Condition
from controller.reconciler.telemetry import Telemetry


class Recorder:
    def __init__(self):
        self.events = []

    def record(self, network, type_, reason, message):
        self.events.append((network, type_, reason, message))


def telemetry():
    rec, requeued = Recorder(), []
    return Telemetry(Snapshot("n1", stale_after=20, observe_interval=1), rec, requeued.append), rec, requeued


def cond(type_, status, reason, message=""):
    return Condition(type=type_, status=status, reason=reason, message=message)


def test_condition_transitions_are_events_and_a_healthy_start_is_not():
    t, rec, _ = telemetry()
    ready = cond("Ready", "True", "Converged", "network resource is up")
    pending = cond("Degraded", "True", "PeerPending", "waiting for the facts of 1 node(s): n2")
    t.published("blue", 3, [], [ready, pending])
    assert rec.events == [("blue", "Warning", "PeerPending", "Degraded is True: waiting for the facts of 1 node(s): n2")]
    t.published("blue", 3, [ready, pending], [ready, pending])  # unchanged: nothing
    fine = cond("Degraded", "False", "AsDesired")
    t.published("blue", 3, [ready, pending], [ready, fine])
    failed = cond("Ready", "False", "ApplyFailed", "wireguard-go not found")
    t.published("blue", 4, [ready, fine], [failed, fine])
    assert rec.events[1:] == [("blue", "Normal", "AsDesired", "Degraded is False"),
                              ("blue", "Warning", "ApplyFailed", "Ready is False: wireguard-go not found")]
    assert t.snapshot.networks["blue"].observed_generation == 4


def test_the_peers_condition_is_left_to_the_per_peer_events():
    t, rec, _ = telemetry()
    t.published("blue", 1, [cond("PeersReachable", "True", "NoStalePeers")],
                [cond("PeersReachable", "False", "HandshakeStale", "1 stale peer(s): n3 (...)")])
    assert rec.events == []


def test_failovers_are_events_the_first_aggregator_is_not():
    t, rec, _ = telemetry()
    for aggregator in (None, "p1", "p2", None, "p1"):
        t.planned(plan("blue", ["p1", "p2"], aggregator=aggregator))
    assert rec.events == [("blue", "Normal", "AggregatorChanged", "aggregator is now p2 (was p1)"),
                          ("blue", "Warning", "AggregatorChanged", "aggregator is now none (was p2)"),
                          ("blue", "Normal", "AggregatorChosen", "aggregator is p1")]


def test_a_drift_repair_is_an_event():
    t, rec, _ = telemetry()
    t.planned(plan("blue", ["n2"]))
    t.reconciled("blue", ok=True, kernel_writes=5)  # built: no event
    t.planned(plan("blue", ["n2"]))
    t.reconciled("blue", ok=True, kernel_writes=1)
    assert [e[2] for e in rec.events] == ["DriftRepaired"]


def test_a_stale_peer_is_an_event_and_a_reconcile_that_writes_the_condition():
    t, rec, requeued = telemetry()
    t.peer_transition(Transition("blue", "n3", True, "peer n3: no reply for more than 20 s while sending to it"))
    t.peer_transition(Transition("blue", "n3", False, "peer n3: heard from again"))
    assert [(e[1], e[2]) for e in rec.events] == [("Warning", "PeerStale"), ("Normal", "PeerRecovered")]
    assert requeued == ["blue", "blue"]
