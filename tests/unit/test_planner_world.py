"""Whole-world check of the peer rules: plan every node of a network, then follow a packet from
each NR to each other NR through the plans the way WireGuard would (longest AllowedIPs prefix
out, source address checked against the sender's AllowedIPs in, someone must know an endpoint).
Every pair must be reachable except pairs of public nodes with no common address family."""

import itertools
from ipaddress import IPv4Network

import pytest
from planner_world import SUBNETS, network, plan

from controller.planner.aggregator import FAILING, FORWARDING
from controller.planner.plan import NO_COMMON_FAMILY

NODES = tuple(SUBNETS)


def gateway(node):
    return IPv4Network(SUBNETS[node])[1]


def deliver(plans, src, dst):
    """The nodes a packet from src's gateway to dst's gateway visits, or the reason it is lost."""
    key_of = {n: p.public_key for n, p in plans.items()}
    node_of = {k: n for n, k in key_of.items()}
    source, target = gateway(src), gateway(dst)
    path, here = [src], src
    while target not in IPv4Network(SUBNETS[here]):
        if len(path) > 4:
            return "loop"
        routes = [(prefix, peer) for peer in plans[here].peers for prefix in peer.allowed_ips
                  if target in prefix]
        if not routes:
            return f"no route at {here}"
        _, peer = max(routes, key=lambda r: r[0].prefixlen)
        there = node_of[peer.public_key]
        back = next((p for p in plans[there].peers if p.public_key == key_of[here]), None)
        if back is None or not any(source in prefix for prefix in back.allowed_ips):
            return f"{there} drops packets from {here}"
        if peer.endpoint is None and back.endpoint is None:
            return f"neither {here} nor {there} knows the other's endpoint"
        path.append(there)
        here = there
    return path


def plan_world(alive=None, published=None, net=None):
    return {n: plan(n, net=net, alive=alive, published=published) for n in NODES}


NO_COMMON = {("p2", "p6"), ("p6", "p2")}
HIDDEN_VIA_P2_FROM_P6 = {("p6", "h1"), ("h1", "p6"), ("p6", "h2"), ("h2", "p6")}


@pytest.mark.parametrize("alive, via, unreachable", [
    (None, "p1", NO_COMMON),
    # p2 (IPv4 only) cannot reach p6 (IPv6 only), so p6 loses the hidden nodes p2 relays for.
    ({"p2", "p6", "h1", "h2"}, "p2", NO_COMMON | HIDDEN_VIA_P2_FROM_P6),
], ids=["first-aggregator", "aggregator-moved"])
def test_every_nr_reaches_every_other_nr(alive, via, unreachable):
    plans = plan_world(alive=alive)
    for src in NODES:
        for dst in NODES:
            if src == dst:
                continue
            path = deliver(plans, src, dst)
            if (src, dst) in unreachable:
                assert isinstance(path, str), f"{src}->{dst} should be unreachable"
                continue
            assert isinstance(path, list), f"{src}->{dst}: {path}"
            hidden_ends = {src, dst} & {"h1", "h2"}
            if hidden_ends and via not in (src, dst):
                assert path == [src, via, dst], "hidden traffic goes through the aggregator"
            else:
                assert path == [src, dst], "public NRs talk directly"


def test_unreachable_aggregator_report_names_the_hidden_subnets_lost():
    p6 = plan("p6", alive={"p2", "p6", "h1", "h2"})
    issue = next(i for i in p6.issues if i.reason == NO_COMMON_FAMILY)
    assert issue.subject == "p2"
    assert "10.1.11.0/24, 10.1.12.0/24" in issue.message


def test_unreachable_pairs_are_exactly_the_ones_reported():
    plans = plan_world()
    reported = {(n, i.subject) for n, p in plans.items() for i in p.issues if i.reason == NO_COMMON_FAMILY}
    assert reported == NO_COMMON


def test_all_nodes_agree_on_the_aggregator():
    for alive in (None, {"p2", "p6", "h1", "h2"}, {"p6", "h1", "h2"}):
        assert len({p.aggregator for p in plan_world(alive=alive).values()}) == 1


def test_hidden_to_hidden_goes_through_the_aggregator():
    assert deliver(plan_world(), "h1", "h2") == ["h1", "p1", "h2"]


def test_ipv6_only_aggregator_still_relays_for_hidden_nodes():
    plans = plan_world(net=network(aggregators=("p6",)))
    assert deliver(plans, "h1", "h2") == ["h1", "p6", "h2"]
    assert deliver(plans, "h1", "p1") == ["h1", "p6", "p1"]
    assert isinstance(deliver(plans, "h1", "p2"), str)  # p2 cannot reach p6 at all


# --- mixed views: nodes that learn of a failed aggregator at different moments -----------------

HIDDEN = ("h1", "h2")
DEAD_P1 = dict(alive={"p2", "p6", "h1", "h2"})  # p1's lease expired
BLAMED_P1 = dict(verdicts={"p2": {"p1": FAILING}, "p6": {"p1": FAILING}, "h1": {"p1": FAILING},
                           "h2": {"p1": FAILING}, "p1": {"p2": FAILING, "p6": FAILING}})
EXCLUDED = NO_COMMON | HIDDEN_VIA_P2_FROM_P6  # pairs that p2 as aggregator cannot serve at all


@pytest.mark.parametrize("news, learners", [
    (DEAD_P1, ("p2", "p6", "h1", "h2")),  # a dead agent learns nothing
    (BLAMED_P1, NODES),  # a blackholed aggregator reads etcd like everyone
], ids=["lease-expired", "verdicts-blame-it"])
def test_nodes_learning_in_any_order_each_follow_their_view_and_converge(news, learners):
    final = {n: plan(n, **news) for n in NODES}
    for k in range(len(learners) + 1):
        for learned in itertools.combinations(learners, k):
            plans = {n: final[n] if n in learned else plan(n) for n in NODES}
            # A node's choice is a function of what it has read, nothing else.
            assert all(plans[n].aggregator == ("p2" if n in learned else "p1") for n in NODES)
            for src, dst in itertools.permutations(NODES, 2):
                if not {src, dst} & set(HIDDEN):
                    continue
                relay = "p2" if src in learned and dst in learned else "p1"
                path = deliver(plans, src, dst)
                if {src, dst, relay} <= (set(learned) if relay == "p2" else set(NODES) - set(learned)) \
                        and (src, dst) not in EXCLUDED:
                    # Where both ends and the relay read the same, hidden traffic already flows.
                    assert path == [src, dst] if relay in (src, dst) else path == [src, relay, dst], \
                        f"learned={learned} {src}->{dst}: {path}"
    # Once everyone has read the news, every node has the same plan as if it had read it first.
    assert {n: plan(n, **news) for n in NODES} == final
    assert len({p.aggregator for p in final.values()}) == 1


def test_verdicts_flipping_one_by_one_move_every_node_at_the_same_verdict():
    """The probers' verdicts on a blackholed p1 arrive one after another; at each step every
    node (reading the same verdicts) makes the same choice, and p1 is blamed only once most of
    its tunnels are reported failing."""
    verdicts = {"p2": {"p1": FORWARDING}, "p6": {"p1": FORWARDING}, "h1": {"p1": FORWARDING},
                "h2": {"p1": FORWARDING}, "p1": {"p2": FORWARDING, "p6": FORWARDING}}
    seen = []
    for prober, target in [("p2", "p1"), ("p1", "p2"), ("h1", "p1"), ("p6", "p1"), ("p1", "p6"),
                           ("h2", "p1")]:
        verdicts[prober][target] = FAILING
        choices = {plan(n, verdicts=verdicts).aggregator for n in NODES}
        assert len(choices) == 1
        seen.append(choices.pop())
    assert seen == ["p1", "p1", "p1", "p2", "p2", "p2"]
