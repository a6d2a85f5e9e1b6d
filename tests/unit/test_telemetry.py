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


# --- the node's own events ---------------------------------------------------------------------

def node_events(rec):
    return [(e[1], e[2]) for e in rec.events if e[0] is None]


def test_the_agent_starting_says_how_many_resources_it_adopted_and_created():
    t, rec, _ = telemetry()
    t.created("blue", "zmnr-blue")
    t.started("0.1.0", "userspace", resources=3)
    assert rec.events[-1] == (None, "Normal", "AgentStarted", "agent 0.1.0 (WireGuard userspace) ready: "
                              "3 network resource(s), 2 adopted from the last run, 1 created")


def test_etcd_going_away_and_coming_back_are_node_events_with_the_outage_length():
    now = [100.0]
    rec = Recorder()
    t = Telemetry(Snapshot("n1", stale_after=20, observe_interval=1), rec, clock=lambda: now[0])
    t.etcd_connection(False, "http://127.0.0.1:2379", "UNAVAILABLE: connection refused")
    now[0] += 42.4
    t.etcd_connection(True, "http://127.0.0.1:2379")
    assert rec.events == [
        (None, "Warning", "EtcdDisconnected", "etcd at http://127.0.0.1:2379 does not answer: UNAVAILABLE: connection refused"),
        (None, "Normal", "EtcdReconnected", "etcd answers again at http://127.0.0.1:2379 after 42 s")]


def test_the_ndmz_made_repaired_failing_and_recovered_are_node_events():
    t, rec, _ = telemetry()
    t.ndmz_passed("zmndmz", created=True, writes=9, baseline=False, rebuilt=True, failed=None)
    t.ndmz_passed("zmndmz", created=False, writes=0, baseline=True, rebuilt=False, failed=None)  # converged
    t.ndmz_passed("zmndmz", created=False, writes=2, baseline=True, rebuilt=True, failed=None)
    assert node_events(rec) == [("Normal", "NdmzCreated"), ("Warning", "NdmzDriftRepaired")]
    assert "its bridge was gone" in rec.events[-1][3]
    t.ndmz_failed("zmndmz", "--ndmz-nic eth9: no such interface", failed=None)
    t.ndmz_failed("zmndmz", "--ndmz-nic eth9: no such interface", failed="--ndmz-nic eth9: no such interface")
    # The pass after a failure writes what the failed one could not: not drift, a recovery.
    t.ndmz_passed("zmndmz", created=False, writes=3, baseline=False, rebuilt=False,
                  failed="--ndmz-nic eth9: no such interface")
    assert node_events(rec)[2:] == [("Warning", "NdmzFailed"), ("Normal", "NdmzRecovered")]


def test_writes_in_the_first_pass_over_an_ndmz_found_at_start_are_not_drift():
    t, rec, _ = telemetry()
    t.ndmz_passed("zmndmz", created=False, writes=1, baseline=False, rebuilt=False, failed=None)
    assert rec.events == [] and t.snapshot.ndmz_drift_repairs == 0


def test_ndmz_drift_repairs_are_counted_once_each_with_their_event():
    t, rec, _ = telemetry()
    t.ndmz_passed("zmndmz", created=True, writes=9, baseline=False, rebuilt=True, failed=None)  # built
    t.ndmz_passed("zmndmz", created=False, writes=0, baseline=True, rebuilt=False, failed=None)  # converged
    assert t.snapshot.ndmz_drift_repairs == 0
    t.ndmz_passed("zmndmz", created=False, writes=1, baseline=True, rebuilt=False, failed=None)  # a rule
    assert t.snapshot.ndmz_drift_repairs == 1
    # Its namespace deleted by hand and made again: a repair too, besides being created.
    t.ndmz_passed("zmndmz", created=True, writes=9, baseline=True, rebuilt=True, failed=None)
    assert t.snapshot.ndmz_drift_repairs == 2
    assert node_events(rec) == [("Normal", "NdmzCreated"), ("Warning", "NdmzDriftRepaired"),
                                ("Normal", "NdmzCreated"), ("Warning", "NdmzDriftRepaired")]
    # What a pass after a failure writes is the recovery, not drift.
    t.ndmz_failed("zmndmz", "nft: table busy", failed=None)
    t.ndmz_passed("zmndmz", created=False, writes=3, baseline=False, rebuilt=False, failed="nft: table busy")
    assert t.snapshot.ndmz_drift_repairs == 2


def test_a_network_that_cannot_be_named_is_refused_once_as_a_node_event():
    t, rec, _ = telemetry()
    for _ in range(3):  # every resync looks at it again
        t.network_refused("Bad_Name", "'Bad_Name' is not a valid name")
    assert rec.events == [(None, "Warning", "NetworkRefused",
                           "network 'Bad_Name' refused: 'Bad_Name' is not a valid name")]


def test_a_regranted_lease_is_a_node_event():
    t, rec, _ = telemetry()
    t.lease_regranted()
    assert node_events(rec) == [("Warning", "LeaseRegranted")]


def test_a_failover_event_says_why():
    from dataclasses import replace

    from controller.planner.aggregator import AggregatorChoice

    t, rec, _ = telemetry()
    t.planned(plan("blue", ["p1", "p2"], aggregator="p1"))
    choice = AggregatorChoice("p2", "FailedOver", "p2, because p1 is not alive (its lease expired)", ())
    t.planned(replace(plan("blue", ["p1", "p2"], aggregator="p2"), choice=choice))
    assert rec.events == [("blue", "Normal", "AggregatorChanged", "aggregator is now p2 (was p1): "
                           "FailedOver: p2, because p1 is not alive (its lease expired)")]
