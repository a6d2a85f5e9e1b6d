"""The observed Snapshot: byte counters that only grow, and peer states that follow what
WireGuard really does (a handshake only every 2 minutes and only with traffic; any received
data answered within 10 s). A fake clock; devices are plain DeviceState values."""

import dataclasses
from ipaddress import IPv4Interface, IPv4Network

import pytest

from controller.dataplane.nftables import RuleCounter, TableCounters
from controller.dataplane.wireguard.base import DeviceState, PeerState
from controller.http.snapshot import (
    IDLE, PENDING, REJECT_AFTER_TIME, STALE, UP, Snapshot, min_stale_after,
)
from controller.planner.aggregator import AggregatorChoice, Candidate
from controller.planner.plan import HIDDEN_KEEPALIVE, DesiredNR, DesiredPeer
from controller.planner.rulesets import nr_ruleset

STALE_AFTER = 30.0


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def tick(self, seconds: float) -> float:
        self.t += seconds
        return self.t


def key(node: str) -> str:
    import base64

    return base64.b64encode(node.encode().ljust(32, b".")).decode()


def peer(node, endpoint="198.51.100.2:51820", keepalive=None, public_key=None):
    return DesiredPeer(public_key or key(node), endpoint, (IPv4Network("10.1.2.0/24"),), keepalive, node)


def plan(*peers, aggregator=None, hidden=False, network="blue"):
    return DesiredNR(network=network, netns=f"zmnr-{network}", wg_ifname="zw1", listen_port=51820,
                     public_key=key("self"), bridge="zmbr", gateway=IPv4Interface("10.1.1.1/24"), mtu=1420,
                     hidden=hidden, aggregator=aggregator, peers=tuple(peers), routes=(), workloads=(),
                     issues=())


def device(**peers):
    """device(n2=(rx, tx, handshake_time), ...)"""
    return DeviceState(51820, key("self"), True, {
        key(n): PeerState("198.51.100.2:51820", frozenset(), 0, rx, tx, hs) for n, (rx, tx, hs) in peers.items()})


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def snap(clock):
    return Snapshot("n1", stale_after=STALE_AFTER, observe_interval=1.0, clock=clock)


def rec(snap, node, network="blue"):
    return snap.networks[network].peers[node]


# --- counters ---------------------------------------------------------------------------------

def test_counting_starts_at_the_first_look_and_only_grows(snap, clock):
    snap.planned(plan(peer("n2")))
    snap.observed_device("blue", device(n2=(5000, 7000, 0)))  # bytes from before this agent
    assert (rec(snap, "n2").rx_bytes, rec(snap, "n2").tx_bytes) == (0, 0)
    clock.tick(1)
    snap.observed_device("blue", device(n2=(5100, 7300, 0)))
    assert (rec(snap, "n2").rx_bytes, rec(snap, "n2").tx_bytes) == (100, 300)
    nr = snap.networks["blue"]
    assert (nr.rx_bytes, nr.tx_bytes) == (100, 300)


def test_a_restarted_device_does_not_make_the_counters_fall(snap, clock):
    snap.planned(plan(peer("n2")))
    snap.observed_device("blue", device(n2=(1000, 1000, 0)))
    snap.observed_device("blue", device(n2=(1500, 1200, 0)))
    # wireguard-go died and was restarted: its counters begin again at zero.
    snap.observed_device("blue", device(n2=(40, 60, 0)))
    assert (rec(snap, "n2").rx_bytes, rec(snap, "n2").tx_bytes) == (500 + 40, 200 + 60)
    snap.observed_device("blue", device(n2=(50, 80, 0)))
    assert (rec(snap, "n2").rx_bytes, rec(snap, "n2").tx_bytes) == (550, 280)


def test_a_removed_peer_keeps_its_bytes_in_the_network_total(snap):
    snap.planned(plan(peer("n2"), peer("n3")))
    snap.observed_device("blue", device(n2=(0, 0, 0), n3=(0, 0, 0)))
    snap.observed_device("blue", device(n2=(100, 100, 0), n3=(10, 10, 0)))
    snap.planned(plan(peer("n3")))  # n2 left the network
    snap.observed_device("blue", device(n3=(20, 20, 0)))
    nr = snap.networks["blue"]
    assert "n2" not in nr.peers
    assert (nr.rx_bytes, nr.tx_bytes) == (120, 120)


def test_a_peer_added_later_counts_from_zero(snap):
    snap.planned(plan(peer("n2")))
    snap.observed_device("blue", device(n2=(100, 100, 0)))
    snap.planned(plan(peer("n2"), peer("n3")))
    snap.observed_device("blue", device(n2=(100, 100, 0), n3=(64, 32, 0)))
    assert (rec(snap, "n3").rx_bytes, rec(snap, "n3").tx_bytes) == (64, 32)


def test_a_peer_with_a_new_key_continues_its_counters(snap):
    snap.planned(plan(peer("n2")))
    snap.observed_device("blue", device(n2=(0, 0, 0)))
    snap.observed_device("blue", device(n2=(900, 900, 0)))
    snap.planned(plan(peer("n2", public_key=key("n2-new"))))
    new = DeviceState(51820, key("self"), True, {key("n2-new"): PeerState(None, frozenset(), 0, 30, 40, 0)})
    snap.observed_device("blue", new)
    assert (rec(snap, "n2").rx_bytes, rec(snap, "n2").tx_bytes) == (930, 940)


# --- peer states ------------------------------------------------------------------------------

def test_a_planned_peer_missing_on_the_device_is_pending(snap):
    snap.planned(plan(peer("n2")))
    snap.observed_device("blue", device())
    assert snap.peer_states("blue") == {"n2": PENDING}


def test_a_quiet_peer_is_idle_not_stale_however_old_its_handshake(snap, clock):
    snap.planned(plan(peer("n2")))
    snap.observed_device("blue", device(n2=(0, 0, 0)))
    assert snap.peer_states("blue") == {"n2": IDLE}
    clock.tick(1)
    handshake = clock.t - 0.5
    snap.observed_device("blue", device(n2=(92, 148, handshake)))  # a ping and its answer
    assert snap.peer_states("blue") == {"n2": UP}
    for _ in range(3):
        clock.tick(STALE_AFTER * 10)  # nothing to send: WireGuard makes no handshake
        snap.observed_device("blue", device(n2=(92, 148, handshake)))
    assert snap.peer_states("blue") == {"n2": IDLE}
    assert rec(snap, "n2").handshake_age(clock.t) > STALE_AFTER * 29


def test_sending_without_an_answer_makes_a_peer_stale_and_an_answer_heals_it(snap, clock):
    snap.planned(plan(peer("n2")))
    handshake = clock.t
    snap.observed_device("blue", device(n2=(100, 100, handshake)))
    clock.tick(60)
    tx = 100
    seen = []
    for _ in range(int(STALE_AFTER) + 5):  # we keep sending; nothing comes back
        clock.tick(1)
        tx += 148
        seen += snap.observed_device("blue", device(n2=(100, tx, handshake)))
    assert snap.peer_states("blue") == {"n2": STALE}
    assert [(t.peer, t.stale) for t in seen] == [("n2", True)]  # reported once
    assert "no reply for more than 30 s" in seen[0].message
    clock.tick(1)
    healed = snap.observed_device("blue", device(n2=(100 + 92, tx, clock.t)))  # handshake + reply
    assert snap.peer_states("blue") == {"n2": UP}
    assert [(t.peer, t.stale) for t in healed] == [("n2", False)]


def test_the_keepalive_answering_a_peer_is_not_an_unanswered_send(snap, clock):
    snap.planned(plan(peer("n2")))
    snap.observed_device("blue", device(n2=(0, 0, 0)))
    clock.tick(1)
    handshake = clock.t
    snap.observed_device("blue", device(n2=(148, 0, handshake)))  # the peer sent us something
    clock.tick(10.5)
    snap.observed_device("blue", device(n2=(148, 32, handshake)))  # our passive keepalive
    clock.tick(STALE_AFTER * 3)
    snap.observed_device("blue", device(n2=(148, 32, handshake)))
    assert snap.peer_states("blue") == {"n2": IDLE}


def test_a_keepalive_peer_is_judged_by_its_handshake_which_renews_every_few_minutes(snap, clock):
    snap.planned(plan(peer("agg", keepalive=25)))
    handshake = clock.t
    snap.observed_device("blue", device(agg=(0, 0, handshake)))
    window = max(STALE_AFTER, REJECT_AFTER_TIME) + 25
    tx = 0
    for _ in range(int(window) - 2):  # keepalives go out and are never answered: still healthy
        clock.tick(1)
        tx += 32
        snap.observed_device("blue", device(agg=(0, tx, handshake)))
    assert snap.peer_states("blue") == {"agg": UP}
    clock.tick(5)  # but no handshake within 180 s + the keepalive: the session was not renewed
    snap.observed_device("blue", device(agg=(0, tx + 32, handshake)))
    assert snap.peer_states("blue") == {"agg": STALE}
    assert "despite a 25 s keepalive" in rec(snap, "agg").stale_reason(STALE_AFTER)


def test_the_aggregator_expects_keepalives_from_its_hidden_peers(snap, clock):
    snap.planned(plan(peer("h1", endpoint=None), peer("p2"), aggregator="n1"))
    assert rec(snap, "h1").calls_in == HIDDEN_KEEPALIVE and rec(snap, "p2").calls_in == 0
    handshake = clock.t
    snap.observed_device("blue", device(h1=(0, 0, handshake), p2=(0, 0, handshake)))
    clock.tick(REJECT_AFTER_TIME + HIDDEN_KEEPALIVE + 1)
    snap.observed_device("blue", device(h1=(0, 0, handshake), p2=(0, 0, handshake)))
    assert snap.peer_states("blue") == {"h1": STALE, "p2": IDLE}


def test_stale_after_must_leave_a_healthy_peer_time_to_answer():
    assert min_stale_after(5.0) == 20.0
    with pytest.raises(ValueError, match="at least 20 s"):
        Snapshot("n1", stale_after=10, observe_interval=5)


# --- conditions, drift, aggregator -----------------------------------------------------------

def test_the_peers_condition_names_a_few_stale_peers_and_counts_the_rest(snap, clock):
    nodes = [f"n{i}" for i in range(2, 8)]
    snap.planned(plan(*(peer(n) for n in nodes)))
    assert snap.peers_condition("blue")[1:3] == ("True", "NoStalePeers")
    handshake = clock.t
    snap.observed_device("blue", device(**{n: (0, 0, handshake) for n in nodes}))
    clock.tick(20)
    snap.observed_device("blue", device(**{n: (0, 10, handshake) for n in nodes}))
    clock.tick(STALE_AFTER + 1)
    snap.observed_device("blue", device(**{n: (0, 20, handshake) for n in nodes}))
    ctype, status, reason, message = snap.peers_condition("blue")
    assert (ctype, status, reason) == ("PeersReachable", "False", "HandshakeStale")
    assert message.startswith("6 stale peer(s): n2 (no reply for more than 30 s while sending to it), n3")
    assert message.endswith("and 3 more")
    clock.tick(100)  # time passing does not change the message (no status rewrites)
    snap.observed_device("blue", device(**{n: (0, 30, handshake) for n in nodes}))
    assert snap.peers_condition("blue")[3] == message


def test_kernel_writes_for_an_unchanged_plan_are_drift_repairs(snap):
    snap.planned(plan(peer("n2")))
    snap.reconciled("blue", ok=True, kernel_writes=7)  # the first build: not drift
    snap.planned(plan(peer("n2")))
    snap.reconciled("blue", ok=True, kernel_writes=0)
    snap.planned(plan(peer("n2")))
    snap.reconciled("blue", ok=True, kernel_writes=1)  # a route someone deleted, put back
    snap.planned(plan(peer("n2"), peer("n3")))
    snap.reconciled("blue", ok=True, kernel_writes=2)  # a new peer: a change, not drift
    assert snap.networks["blue"].drift_repairs == 1


def test_an_aggregator_replaced_or_lost_is_a_change_the_first_one_chosen_is_not(snap):
    assert [snap.planned(plan(aggregator=a)) for a in (None, "p1", "p1", "p2", None, "p1")] == [
        False, False, False, True, True, False]
    assert snap.networks["blue"].aggregator_changes == 2


def chosen(aggregator, *order):
    """A plan whose choice ranked the candidates `order` and took `aggregator`."""
    choice = AggregatorChoice(aggregator, "FailedOver" if order[0] != aggregator else "Preferred", "",
                              tuple(Candidate(n, True) for n in order))
    return dataclasses.replace(plan(aggregator=aggregator), choice=choice)


def test_a_failover_leaves_for_a_less_preferred_candidate_a_move_back_is_no_failover(snap):
    snap.planned(chosen("p2", "p1", "p2"))  # at start-up p1 had not published its facts yet
    snap.planned(chosen("p1", "p1", "p2"))  # now it has: back to the preferred one
    assert (snap.networks["blue"].aggregator_changes, snap.networks["blue"].aggregator_failovers) == (1, 0)
    snap.planned(chosen("p2", "p1", "p2"))  # p1 died
    snap.planned(chosen("p3", "p3"))        # re-applied with aggregators [p3]: p2 is no candidate
    snap.planned(chosen(None, "p3"))        # and p3 died too
    assert (snap.networks["blue"].aggregator_changes, snap.networks["blue"].aggregator_failovers) == (4, 3)


def test_the_view_has_peers_states_and_no_private_key(snap, clock):
    snap.planned(plan(peer("n2")))
    snap.observed_device("blue", device(n2=(0, 0, clock.t)))
    view = snap.view()
    assert view["node"] == "n1" and view["staleAfterSeconds"] == STALE_AFTER
    (net,) = view["networks"]
    assert net["name"] == "blue" and net["publicKey"] == key("self")
    assert [(p["node"], p["state"], p["handshakeAgeSeconds"]) for p in net["peers"]] == [("n2", UP, 0.0)]
    assert "private" not in repr(view).lower()


# --- nftables counters: monotonic across table replacements ------------------------------------

def table(generation, **packets):
    """A table's counted rules as read: {counts: packets} (bytes 10 per packet), handles 1.. in order."""
    return TableCounters((7, generation), tuple(RuleCounter(counts, handle, n, 10 * n)
                                                for handle, (counts, n) in enumerate(packets.items(), 1)))


def with_ruleset(d):
    return dataclasses.replace(d, ruleset=nr_ruleset(IPv4Network("10.1.1.0/24")))


def test_firewall_counters_start_at_the_first_reading_and_survive_a_replaced_table(snap):
    snap.planned(with_ruleset(plan(peer("n2"))))
    fw = snap.networks["blue"].firewall
    snap.observed_firewall("blue", table(1, connections=50, spoofed=4))  # before this agent: not counted
    assert fw.packets == {"connections": 0, "spoofed": 0}
    snap.observed_firewall("blue", table(1, connections=53, spoofed=4))
    assert fw.packets["connections"] == 3 and fw.bytes["connections"] == 30
    # The agent replaced the table (drift repaired): same rule handles, counters from zero, a
    # new table handle. What it counted since is added, nothing is subtracted.
    snap.observed_firewall("blue", table(2, connections=2, spoofed=1))
    assert fw.packets == {"connections": 5, "spoofed": 1}
    # Even when the new table's counters have passed the old ones before we look.
    snap.observed_firewall("blue", table(3, connections=90, spoofed=1))
    assert fw.packets == {"connections": 95, "spoofed": 2}
    # Reset in place (`nft reset counters`): what it counted since.
    snap.observed_firewall("blue", table(3, connections=1, spoofed=1))
    assert fw.packets == {"connections": 96, "spoofed": 2}


def test_a_table_made_after_the_first_reading_counts_from_zero_and_errors_keep_the_totals(snap):
    snap.planned(with_ruleset(plan(peer("n2"))))
    snap.observed_firewall("blue", None)  # the NR has no table yet
    snap.observed_firewall("blue", table(1, inbound=6))
    fw = snap.networks["blue"].firewall
    assert fw.packets == {"inbound": 6}
    snap.observed_firewall("blue", None, error="nft did not answer")
    assert fw.packets == {"inbound": 6} and fw.error == "nft did not answer"
    snap.observed_firewall("blue", table(1, inbound=8))
    assert fw.packets == {"inbound": 8} and fw.error is None
    view = snap.network_view("blue")["internet"]
    assert view["droppedPackets"] == {"inbound": 8, "spoofed": 0, "to_node": 0}
    assert (view["connections"], view["sentBytes"], view["receivedBytes"]) == (0, 0, 0)


def test_the_ndmz_counts_its_tables_apart_and_an_nr_without_ruleset_has_no_internet_view(snap):
    assert snap.view()["ndmz"] is None
    snap.observed_ndmz({"ndmz": table(1, inbound=1), "host": table(1, inbound=2)})
    snap.observed_ndmz({"ndmz": table(1, inbound=4), "host": table(1, inbound=2)})
    # both tables have handle 1: kept apart by their source
    snap.observed_ndmz({"ndmz": table(1, inbound=5)}, ["host: nft failed"])
    assert snap.ndmz.packets == {"inbound": 4}
    assert snap.view()["ndmz"]["observeError"] == "host: nft failed"
    snap.observed_ndmz({"ndmz": table(1, inbound=5), "host": table(1, inbound=3)})
    assert snap.view()["ndmz"]["droppedPackets"]["inbound"] == 5
    assert snap.view()["ndmz"]["driftRepairs"] == 0
    assert snap.ndmz_passed(writes=2, baseline=True) and not snap.ndmz_passed(writes=0, baseline=True)
    assert not snap.ndmz_passed(writes=4, baseline=False)  # the first pass, or one after a failure
    assert snap.view()["ndmz"]["driftRepairs"] == 1
    snap.planned(plan(peer("n2")))
    assert snap.network_view("blue")["internet"] is None
