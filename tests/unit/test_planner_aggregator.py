"""The effective aggregator: candidates, blame from probe verdicts, the choice, and the damping
of the verdicts that feed it (controller/planner/aggregator.py, health.py)."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from controller.models.resources import NetworkResourceVerdicts
from controller.planner.aggregator import (
    DEGRADED,
    FAILED_OVER,
    FAILING,
    FORWARDING,
    IMPLICIT_CANDIDATES,
    NONE_USABLE,
    PREFERRED,
    RECOVERING,
    blamed_nodes,
    choose_aggregator,
    rendezvous_order,
)
from controller.planner.health import FIRST_HANDSHAKE_WINDOW, REDIAL_INTERVAL, FirstDial, TunnelHealth

PUBLIC = ("a", "b", "c")
HIDDEN = ("h1", "h2")
MEMBERS = PUBLIC + HIDDEN


def choose(aggregators=("a", "b", "c"), alive=None, verdicts=None, public=PUBLIC, published=MEMBERS,
           members=MEMBERS, network="blue"):
    return choose_aggregator(network, list(aggregators), members, public, published, alive, verdicts or {})


def mesh_verdicts(aggregator="a", broken=(), public=PUBLIC, hidden=HIDDEN, candidates=PUBLIC):
    """What every NR would report: public NRs probe every other candidate, hidden NRs their
    aggregator; a tunnel touching a node in `broken` fails."""
    out = {}
    for p in public:
        out[p] = {t: FAILING if {p, t} & set(broken) else FORWARDING for t in candidates if t != p}
    for h in hidden:
        out[h] = {aggregator: FAILING if {h, aggregator} & set(broken) else FORWARDING}
    return out


# --- candidates -----------------------------------------------------------------------------------

def test_the_first_listed_candidate_is_preferred():
    choice = choose(verdicts=mesh_verdicts())
    assert (choice.node, choice.reason) == ("a", PREFERRED)
    assert "aggregators: a, b, c" in choice.message
    assert [c.node for c in choice.candidates] == ["a", "b", "c"] and all(c.usable for c in choice.candidates)


@pytest.mark.parametrize("setup, why", [
    (dict(published=("b", "c", "h1", "h2")), "has not published its facts"),
    (dict(public=("b", "c")), "is hidden"),
    (dict(alive={"b", "c", "h1", "h2"}), "is not alive"),
])
def test_an_unusable_first_candidate_fails_over_to_the_next(setup, why):
    choice = choose(**setup)
    assert (choice.node, choice.reason) == ("b", FAILED_OVER)
    assert choice.candidates[0].why.startswith(why) and why in choice.message


def test_liveness_unknown_counts_every_member_as_alive():
    assert choose(alive=None).node == "a"


def test_no_usable_candidate_means_no_aggregator_and_says_why():
    choice = choose(alive={"h1", "h2"})
    assert (choice.node, choice.reason) == (None, NONE_USABLE)
    assert "a is not alive" in choice.message and "c is not alive" in choice.message


def test_when_every_candidate_is_blamed_the_first_alive_one_relays_anyway():
    verdicts = {"h1": {"a": FAILING}, "h2": {"a": FAILING}}
    choice = choose(aggregators=("a",), verdicts=verdicts)
    assert (choice.node, choice.reason) == ("a", DEGRADED)
    assert "no candidate is forwarding" in choice.message


def test_rendezvous_ranking_is_deterministic_and_spreads_networks_over_public_nodes():
    nodes = [f"p{i}" for i in range(5)]
    firsts = Counter(rendezvous_order(f"net-{i}", nodes)[0] for i in range(500))
    assert set(firsts) == set(nodes) and min(firsts.values()) > 60  # 100 each on average
    assert rendezvous_order("blue", nodes) == rendezvous_order("blue", list(reversed(nodes)))


def test_a_node_leaving_moves_only_the_networks_it_ranked_first_for():
    nodes = [f"p{i}" for i in range(5)]
    for i in range(200):
        before = rendezvous_order(f"net-{i}", nodes)
        after = rendezvous_order(f"net-{i}", [n for n in nodes if n != "p3"])
        if before[0] != "p3":
            assert after[0] == before[0]


def test_empty_aggregators_means_the_top_ranked_live_public_nodes():
    public = tuple(f"p{i}" for i in range(6))
    members = public + HIDDEN
    ranked = rendezvous_order("blue", public)
    choice = choose(aggregators=(), public=public, published=members, members=members)
    assert [c.node for c in choice.candidates] == list(ranked[:IMPLICIT_CANDIDATES])
    assert (choice.node, choice.reason) == (ranked[0], PREFERRED) and "aggregators empty" in choice.message
    # A dead top node is replaced by the next live one, not merely skipped.
    alive = set(members) - {ranked[0]}
    choice = choose(aggregators=(), public=public, published=members, members=members, alive=alive)
    assert [c.node for c in choice.candidates] == list(ranked[1:IMPLICIT_CANDIDATES + 1])
    # Hidden and unpublished nodes are never candidates.
    choice = choose(aggregators=(), public=public[:1], published=("p0", "h1"), members=members)
    assert [c.node for c in choice.candidates] == ["p0"]


# --- blame from verdicts --------------------------------------------------------------------------

def test_a_blackholed_aggregator_is_blamed_and_its_victims_are_not():
    verdicts = mesh_verdicts(broken=("a",))
    assert blamed_nodes(verdicts) == {"a"}
    choice = choose(verdicts=verdicts)
    assert (choice.node, choice.reason) == ("b", FAILED_OVER)
    assert choice.candidates[0].why == "is not forwarding (tunnels from b, c, h1, h2 fail)"


def test_with_two_public_nodes_the_hidden_nodes_verdicts_decide_who_is_broken():
    public = ("a", "b")
    verdicts = mesh_verdicts(broken=("a",), public=public, candidates=public)
    assert blamed_nodes(verdicts) == {"a"}
    # After the failover the hidden NRs probe b, and b still sees a fail: a stays blamed.
    after = mesh_verdicts(aggregator="b", broken=("a",), public=public, candidates=public)
    assert blamed_nodes(after) == {"a"}
    assert choose(aggregators=public, public=public, verdicts=after).node == "b"


def test_a_hidden_node_cut_off_itself_blames_only_itself():
    verdicts = mesh_verdicts(broken=("h1",))
    assert blamed_nodes(verdicts) == {"h1"}
    assert choose(verdicts=verdicts).node == "a"


def test_a_public_prober_cut_off_itself_does_not_move_the_aggregator():
    verdicts = mesh_verdicts(broken=("c",))
    assert blamed_nodes(verdicts) == {"c"}
    assert choose(verdicts=verdicts).reason == PREFERRED


def test_a_single_flaky_tunnel_between_working_nodes_blames_nobody():
    verdicts = mesh_verdicts()
    verdicts["b"]["a"] = FAILING
    assert blamed_nodes(verdicts) == set()


def test_verdicts_of_dead_probers_and_about_non_members_are_ignored():
    stale = {"c": {"a": FAILING, "b": FAILING}, "h1": {"a": FAILING}, "h2": {"a": FAILING}}
    assert choose(verdicts=stale, alive={"a", "b"}).node == "a"
    strangers = {"x": {"a": FAILING}, "y": {"a": FAILING}, "h1": {"zz": FAILING}}
    assert choose(verdicts=strangers).reason == PREFERRED


def test_a_recovering_tunnel_blames_like_a_failing_one():
    verdicts = {p: {t: (RECOVERING if s == FAILING else s) for t, s in v.items()}
                for p, v in mesh_verdicts(broken=("a",)).items()}
    choice = choose(verdicts=verdicts)
    assert choice.node == "b" and choice.candidates[0].why.startswith("is recovering (held down by b, c")


def test_blame_does_not_depend_on_the_order_verdicts_are_read_in():
    verdicts = mesh_verdicts(broken=("a",))
    verdicts["c"]["b"] = FAILING
    expected = blamed_nodes(verdicts)
    for order in itertools.permutations(verdicts):
        assert blamed_nodes({p: dict(reversed(list(verdicts[p].items()))) for p in order}) == expected


# --- damping: verdicts over time ------------------------------------------------------------------

def feed(health, results, start=0.0, step=1.0):
    changes = []
    for i, ok in enumerate(results):
        if health.observe(ok, start + i * step):
            changes.append((start + i * step, health.state))
    return changes


def test_one_lost_probe_changes_nothing_three_in_a_row_make_it_failing():
    h = TunnelHealth()
    assert feed(h, [True, False, False, True]) == [(0.0, FORWARDING)]
    assert feed(h, [False, False, False], start=10) == [(12.0, FAILING)]


def test_a_tunnel_that_never_worked_fails_only_after_the_grace_period():
    h = TunnelHealth(grace=10)
    assert feed(h, [False] * 12) == [(10.0, FAILING)]
    quick = TunnelHealth(grace=10)
    assert feed(quick, [False] * 5 + [True]) == [(5.0, FORWARDING)], "peers still configuring"


def test_a_recovered_tunnel_counts_again_only_after_the_hold_down():
    h = TunnelHealth(hold_down=30, grace=0)
    feed(h, [False] * 3)
    changes = feed(h, [True] * 40, start=10)
    assert changes == [(10.0, RECOVERING), (40.0, FORWARDING)]


def test_any_failure_while_recovering_restarts_the_hold_down():
    h = TunnelHealth(hold_down=10, grace=0)
    feed(h, [False] * 3)
    feed(h, [True] * 8, start=10)
    feed(h, [False], start=18)
    assert h.state == RECOVERING
    assert feed(h, [True] * 12, start=19) == [(29.0, FORWARDING)]


def test_a_lease_coming_back_holds_the_tunnel_down_like_a_failure():
    h = TunnelHealth(hold_down=10)
    feed(h, [True])
    assert h.target_returned(5.0) and h.state == RECOVERING
    assert feed(h, [True] * 11, start=6) == [(15.0, FORWARDING)]


def test_a_restarted_prober_keeps_what_it_published():
    failing = TunnelHealth.restored(FAILING, since=100.0, now=200.0)
    assert failing.observe(True, 201.0) and failing.state == RECOVERING
    recovering = TunnelHealth.restored(RECOVERING, since=100.0, now=200.0, hold_down=30)
    assert feed(recovering, [True] * 31, start=201) == [(230.0, FORWARDING)]


def test_a_flapping_aggregator_is_failed_over_once_and_never_moved_back_while_it_flaps():
    """Every NR probes once a second; a's link goes down 3 s, up 3 s, for two minutes, then
    stays up. The choice, derived at every second from the verdicts, switches once to b, and
    back to a only a hold-down after the flapping ends."""
    probers = {"b": ("a", "c"), "c": ("a", "b"), "h1": None, "h2": None}
    health = {(p, t): TunnelHealth(hold_down=30) for p, ts in probers.items() for t in (ts or ("a", "b"))}
    choices = []
    aggregator = "a"
    for second in range(200):
        a_up = second >= 120 or (second // 3) % 2 == 0
        verdicts = {}
        for p, targets in probers.items():
            # hidden NRs probe only the aggregator in effect
            for t in (targets or (aggregator,)):
                health[(p, t)].observe(a_up or "a" not in (p, t), float(second))
                if health[(p, t)].state:
                    verdicts.setdefault(p, {})[t] = health[(p, t)].state
        aggregator = choose(verdicts=verdicts).node
        choices.append(aggregator)
    switches = [(i, b) for i, (a, b) in enumerate(zip(choices, choices[1:]), 1) if a != b]
    assert [b for _, b in switches] == ["b", "a"], switches
    assert switches[1][0] >= 120 + 30, "moved back only a hold-down after the link settled"


# --- the verdicts as published (models.resources.NetworkResourceVerdicts) -----------------------

def verdicts_doc(items, **over):
    return {"network": "blue", "node": "b", "verdicts": items, **over}


ONE = {"node": "a", "state": "Failing", "since": "2026-01-01T00:00:00Z"}


def test_published_verdicts_parse_to_states():
    v = NetworkResourceVerdicts.model_validate(verdicts_doc([ONE, {**ONE, "node": "c", "state": "Forwarding"}]))
    assert v.states() == {"a": FAILING, "c": FORWARDING}


@pytest.mark.parametrize("items, over, problem", [
    ([{**ONE, "node": "b"}], {}, "cannot judge its own tunnel"),
    ([ONE, ONE], {}, "more than once"),
    ([{**ONE, "state": "Dead"}], {}, "state"),
    ([{"node": "a", "state": "Failing"}], {}, "since"),
    ([{**ONE, "node": "A/../x"}], {}, "not a valid name"),
    ([{**ONE, "node": f"x{i}"} for i in range(65)], {}, "at most 64"),
    ([ONE], {"blame": "a"}, "Extra inputs"),
])
def test_published_verdicts_are_validated_strictly(items, over, problem):
    with pytest.raises(ValueError, match=problem):
        NetworkResourceVerdicts.model_validate(verdicts_doc(items, **over))


def test_one_node_lying_about_every_tunnel_cannot_move_the_aggregator():
    verdicts = mesh_verdicts()
    verdicts["b"] = {"a": FAILING, "c": FAILING}
    assert blamed_nodes(verdicts) == {"b"}
    assert choose(verdicts=verdicts).reason == PREFERRED


# --- the first handshake of a dialled peer --------------------------------------------------

def test_an_unanswered_first_dial_is_repeated_every_interval_within_the_window():
    dial = FirstDial(configured_at=100.0, dialled_at=100.0)
    assert not dial.due(100.0 + REDIAL_INTERVAL / 2)  # WireGuard's own first initiation is fresh
    assert dial.due(100.0 + REDIAL_INTERVAL)
    dial.dialled_at = 100.0 + REDIAL_INTERVAL
    assert not dial.due(100.0 + REDIAL_INTERVAL * 1.5)
    assert dial.due(100.0 + REDIAL_INTERVAL * 2)


def test_past_the_window_wireguards_own_retries_take_over():
    dial = FirstDial(configured_at=100.0, dialled_at=100.0)
    assert dial.waiting(100.0 + FIRST_HANDSHAKE_WINDOW - 0.01)
    assert not dial.waiting(100.0 + FIRST_HANDSHAKE_WINDOW)
    assert not dial.due(100.0 + FIRST_HANDSHAKE_WINDOW + REDIAL_INTERVAL)

