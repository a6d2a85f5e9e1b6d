"""Internet access in the plan: the NR's public leg into the ndmz, its address allocation, and the
egress NR — followed through the plans of the whole world of planner_world.py (p1, p2 public
IPv4; p1, p6 public IPv6; h1, h2 hidden behind NAT)."""

from ipaddress import IPv4Address as A, IPv4Interface, IPv4Network as N

import pytest
from planner_world import SUBNETS, network, plan

from controller.planner import names
from controller.planner.allocation import PublicAddressesExhausted, allocate_public_ip
from controller.planner.plan import EGRESS_UNREACHABLE, INTERNET
from controller.planner.rulesets import nr_ruleset

NODES = tuple(SUBNETS)
LEG = A("100.64.0.7")


def by_node(nr):
    return {p.node: p for p in nr.peers}


# --- the public leg -----------------------------------------------------------------------------

def test_every_nr_gets_a_public_leg_with_a_default_route_through_the_ndmz():
    nr = plan("p1", public_ip=LEG)
    leg = nr.public
    assert (leg.ifname, leg.address, leg.gateway) == ("public", IPv4Interface("100.64.0.7/16"), A("100.64.0.1"))
    assert leg.ndmz_port == names.ndmz_port("blue") and leg.default_route
    assert nr.internet_via is None
    assert INTERNET not in nr.routes  # the default route is via the public leg, not WireGuard
    assert nr.ruleset == nr_ruleset(N("10.1.1.0/24"))


def test_without_an_allocated_address_no_public_leg_is_planned():
    assert plan("p1").public is None


# --- egress ---------------------------------------------------------------------------------------

def test_the_egress_nr_itself_leaves_locally_and_masquerades_the_whole_network():
    nr = plan("p1", net=network(egress="p1"), public_ip=LEG)
    assert nr.public.default_route and nr.internet_via is None
    assert 'oifname "public" counter masquerade' in nr.ruleset.text()  # every source, the network's too
    assert all(INTERNET not in p.allowed_ips for p in nr.peers)


def test_other_public_nrs_send_internet_traffic_to_the_egress_peer_over_wireguard():
    nr = plan("p2", net=network(egress="p1"), public_ip=LEG)
    assert not nr.public.default_route and nr.internet_via == "p1"
    assert by_node(nr)["p1"].allowed_ips == (N("0.0.0.0/0"), N("10.1.1.0/24"), N("10.1.11.0/24"),
                                             N("10.1.12.0/24"))
    assert INTERNET in nr.routes


def test_a_hidden_nr_reaches_the_egress_through_its_aggregator():
    nr = plan("h1", net=network(egress="p6"), public_ip=LEG)
    assert nr.internet_via == "p1" and not nr.public.default_route
    assert nr.peers[0].allowed_ips == (N("0.0.0.0/0"), N("10.1.0.0/16"))


def test_a_hidden_egress_is_reached_through_the_aggregator_which_peers_with_it():
    net = network(egress="h1")
    assert plan("p2", net=net, public_ip=LEG).internet_via == "p1"
    assert plan("p1", net=net, public_ip=LEG).internet_via == "h1"
    assert by_node(plan("p1", net=net, public_ip=LEG))["h1"].allowed_ips == (N("0.0.0.0/0"), N("10.1.11.0/24"))
    assert plan("h1", net=net, public_ip=LEG).public.default_route


@pytest.mark.parametrize("aggregators", [(), ("p1", "p2")])
def test_an_unreachable_egress_means_no_internet_rather_than_a_local_exit(aggregators):
    # p2 (IPv4 only) and p6 (IPv6 only) have no common family; an aggregator cannot relay for
    # public p2 (p6 only accepts the hidden subnets from it).
    nr = plan("p2", net=network(egress="p6", aggregators=aggregators), public_ip=LEG)
    assert nr.internet_via is None and not nr.public.default_route
    assert INTERNET not in nr.routes
    issue = next(i for i in nr.issues if i.reason == EGRESS_UNREACHABLE)
    assert issue.subject == "p6" and "no Internet access" in issue.message


def test_removing_egress_brings_every_nr_back_to_its_own_exit():
    for node in NODES:
        nr = plan(node, net=network(), public_ip=LEG)
        assert nr.public.default_route and nr.internet_via is None and INTERNET not in nr.routes


def exit_of(plans, src):
    """Follow a packet from src's gateway to the Internet through the plans (longest AllowedIPs
    prefix out, source checked against the sender's AllowedIPs in): the node it leaves from."""
    key_of = {n: p.public_key for n, p in plans.items()}
    node_of = {k: n for n, k in key_of.items()}
    source = N(SUBNETS[src])[1]
    here, hops = src, 0
    while not plans[here].public.default_route:
        hops += 1
        routes = [(prefix, peer) for peer in plans[here].peers for prefix in peer.allowed_ips
                  if A("203.0.113.10") in prefix]
        if not routes or hops > 4:
            return None
        _, peer = max(routes, key=lambda r: r[0].prefixlen)
        there = node_of[peer.public_key]
        back = next((p for p in plans[there].peers if p.public_key == key_of[here]), None)
        if back is None or not any(source in prefix for prefix in back.allowed_ips):
            return None
        here = there
    return here


@pytest.mark.parametrize("egress, exits", [
    (None, {n: n for n in NODES}),
    ("p1", {n: "p1" for n in NODES}),
    # IPv4-only p2 has no path to IPv6-only p6 (relaying works for hidden subnets only);
    # hidden nodes always go through the aggregator p1
    ("p6", {"p1": "p6", "p2": None, "p6": "p6", "h1": "p6", "h2": "p6"}),
    ("h1", {n: "h1" for n in NODES}),
])
def test_every_workloads_internet_traffic_leaves_where_the_spec_says(egress, exits):
    plans = {n: plan(n, net=network(egress=egress), public_ip=LEG) for n in NODES}
    assert {n: exit_of(plans, n) for n in NODES} == exits


# --- allocation of public-leg addresses ----------------------------------------------------------

def test_the_first_nr_gets_the_first_address_after_the_gateway():
    assert allocate_public_ip({}, "blue") == A("100.64.0.2")


def test_an_address_is_kept_and_new_ones_take_the_lowest_free():
    assert allocate_public_ip({"blue": A("100.64.0.9")}, "blue") == A("100.64.0.9")
    assert allocate_public_ip({"a": A("100.64.0.2"), "b": A("100.64.0.4")}, "blue") == A("100.64.0.3")


def test_a_contested_or_invalid_address_is_reallocated():
    assert allocate_public_ip({"blue": A("100.64.0.2"), "red": A("100.64.0.2")}, "blue") == A("100.64.0.2")
    assert allocate_public_ip({"blue": A("100.64.0.2"), "red": A("100.64.0.2")}, "red") == A("100.64.0.3")
    for bad in ("100.64.0.1", "100.64.0.0", "100.64.255.255", "10.1.1.1"):
        assert allocate_public_ip({"blue": A(bad)}, "blue") == A("100.64.0.2")


def test_released_addresses_are_reused():
    assert allocate_public_ip({"b": A("100.64.0.3")}, "blue") == A("100.64.0.2")


def test_exhaustion_is_a_clear_error():
    every = {f"n{i}": ip for i, ip in enumerate(N("100.64.0.0/16").hosts()) if ip != A("100.64.0.1")}
    with pytest.raises(PublicAddressesExhausted, match="100.64.0.0/16"):
        allocate_public_ip(every, "blue")
