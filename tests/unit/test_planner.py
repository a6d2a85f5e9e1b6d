"""plan_network(): peers, AllowedIPs, endpoints, routes and attachments of one node's NR,
in the world of planner_world.py (p1, p2 public IPv4; p1, p6 public IPv6; h1, h2 hidden)."""

from ipaddress import IPv4Address, IPv4Interface, IPv4Network as N, ip_address

import pytest
from planner_world import SUBNETS, all_facts, facts, key, network, plan

from controller.models.resources import Workload
from controller.planner import names
from controller.planner.aggregator import FAILED_OVER, FAILING, PREFERRED, rendezvous_order
from controller.planner.plan import (
    HIDDEN_KEEPALIVE, INVALID_FACTS, NO_AGGREGATOR, NO_COMMON_FAMILY, PEER_PENDING, SUBNET_PENDING,
    WORKLOAD_PENDING, DesiredPeer, NodeContext, choose_endpoint,
)


def peers_by_node(nr):
    return {p.node: p for p in nr.peers}


# --- the NR itself --------------------------------------------------------------------------

def test_nr_carries_names_port_gateway_and_mtu():
    nr = plan("p1")
    assert nr.netns == names.nr_netns("n-", "blue") == "n-zmnr-blue"
    assert nr.wg_ifname == names.wg_ifname("n-", "blue")
    assert nr.bridge == "zmbr"
    assert nr.listen_port == 51821 and nr.public_key == key("p1")
    assert nr.gateway == IPv4Interface("10.1.1.1/24")
    assert nr.mtu == 1420  # 1500 - 80: IPv6 outer header worst case


def test_node_outside_the_network_gets_no_nr():
    assert plan("p6", net=network(nodes=("p1", "p2"))) is None


def test_underlay_mtu_below_ipv6_minimum_is_rejected():
    with pytest.raises(ValueError, match="underlay MTU"):
        NodeContext("p1", "", (), 1200)


def test_node_context_takes_endpoints_as_strings_and_stays_hashable():
    c = NodeContext("p1", "n1-", ["198.51.100.1", "2001:db8::1"])
    assert c.endpoints == (ip_address("198.51.100.1"), ip_address("2001:db8::1"))
    assert hash(c) == hash(NodeContext("p1", "n1-", (ip_address("198.51.100.1"), ip_address("2001:db8::1"))))
    assert not c.hidden and NodeContext("h1").hidden


def test_node_context_rejects_a_bad_prefix():
    with pytest.raises(ValueError, match="name prefix"):
        NodeContext("p1", "n1")


def test_equal_inputs_give_equal_hashable_plans():
    assert plan("p1") == plan("p1")
    assert hash(plan("p1")) == hash(plan("p1"))


def test_status_order_does_not_change_the_plan():
    published = all_facts()
    reversed_statuses = dict(reversed(list(published.items())))
    assert plan("p1", published=published) == plan("p1", published=reversed_statuses)


# --- public nodes -----------------------------------------------------------------------------

def test_public_nr_peers_with_every_other_public_nr_by_its_subnet():
    peers = peers_by_node(plan("p6", net=network(aggregators=("p1",))))
    assert set(peers) == {"p1"}  # p6 is IPv6-only and p2 IPv4-only; hidden go via p1
    assert peers["p1"].allowed_ips == (N("10.1.1.0/24"), N("10.1.11.0/24"), N("10.1.12.0/24"))


def test_a_candidate_not_in_effect_holds_the_hidden_nrs_as_standby_peers_without_subnets():
    nr = plan("p2")  # aggregators p1, p2: p2 is the second candidate
    peers = peers_by_node(nr)
    assert set(peers) == {"p1", "h1", "h2"}
    assert peers["h1"].allowed_ips == () and peers["h1"].endpoint is None
    assert peers["p1"].allowed_ips == (N("10.1.1.0/24"), N("10.1.11.0/24"), N("10.1.12.0/24"))
    assert nr.routes == (N("10.1.1.0/24"), N("10.1.11.0/24"), N("10.1.12.0/24")), "no route to a standby"
    assert set(peers_by_node(plan("p6"))) == {"p1"}, "p6 is no candidate: no standby peers"


def test_public_endpoint_prefers_ipv4_when_both_sides_have_it():
    assert peers_by_node(plan("p2"))["p1"].endpoint == "198.51.100.1:51821"


def test_public_endpoint_uses_ipv6_when_that_is_the_common_family():
    peers = peers_by_node(plan("p6"))
    assert peers["p1"].endpoint == "[2001:db8::1]:51821"
    assert peers["p1"].persistent_keepalive is None


def test_public_peer_without_common_family_is_reported_unreachable():
    nr = plan("p6")
    assert "p2" not in peers_by_node(nr)
    issue = next(i for i in nr.issues if i.reason == NO_COMMON_FAMILY)
    assert issue.subject == "p2"
    assert "IPv4" in issue.message and "IPv6" in issue.message


def test_aggregator_peers_with_each_hidden_nr_without_endpoint_or_keepalive():
    peers = peers_by_node(plan("p1"))
    assert peers["h1"] == DesiredPeer(key("h1"), None, (N("10.1.11.0/24"),), None)
    assert peers["h2"].allowed_ips == (N("10.1.12.0/24"),) and peers["h2"].endpoint is None
    assert peers["p2"].allowed_ips == (N("10.1.2.0/24"),)
    assert peers["p6"].allowed_ips == (N("10.1.6.0/24"),)


def test_other_public_nrs_route_hidden_subnets_through_the_aggregator_peer():
    peers = peers_by_node(plan("p6"))
    assert peers["p1"].allowed_ips == (N("10.1.1.0/24"), N("10.1.11.0/24"), N("10.1.12.0/24"))
    assert "h1" not in peers and "h2" not in peers


def test_routes_are_every_allowed_prefix_via_wireguard():
    nr = plan("p1")
    assert nr.routes == tuple(sorted(N(SUBNETS[n]) for n in ("p2", "p6", "h1", "h2")))


def test_own_facts_are_ignored():
    published = all_facts()
    published["p1"] = facts("p1", publicKey=key("stale"), listenPort=1)
    nr = plan("p1", published=published)
    assert nr.public_key == key("p1") and nr.listen_port == 51821
    assert "p1" not in peers_by_node(nr)


def test_facts_of_nodes_outside_the_network_are_ignored():
    published = all_facts()
    nr = plan("p1", net=network(nodes=("p1", "p2")), published=published)
    assert set(peers_by_node(nr)) == {"p2"}
    assert nr.issues == ()


def test_facts_published_for_another_network_or_node_do_not_count():
    published = all_facts()
    published["p2"] = facts("p2", network="red")
    published["p6"] = facts("p2").model_copy(update={"subnet": N(SUBNETS["p6"])})
    nr = plan("p1", published=published)
    assert "p2" not in peers_by_node(nr) and "p6" not in peers_by_node(nr)
    assert nr.pending == ("p2", "p6")


def test_invalid_facts_are_reported_and_that_peer_alone_is_not_peered():
    published = all_facts("p2")
    nr = plan("p1", published=published, bad={"p2": "listenPort: must be 1-65535"})
    assert set(peers_by_node(nr)) == {"p6", "h1", "h2"}
    [issue] = nr.issues
    assert (issue.reason, issue.subject) == (INVALID_FACTS, "p2")
    assert "listenPort: must be 1-65535" in issue.message


def test_a_peer_publishing_another_subnet_is_awaited_and_peered_by_the_specs_subnet():
    # p2's subnet changed in the spec (10.1.2.0/24) before p2 reconciled: it still publishes the old.
    published = all_facts()
    published["p2"] = facts("p2", subnet="10.1.9.0/24")
    nr = plan("p1", published=published)
    [issue] = nr.issues
    assert (issue.reason, issue.subject) == (SUBNET_PENDING, "p2")
    assert issue.message == "waiting for node 'p2' to apply subnet 10.1.2.0/24 (it publishes 10.1.9.0/24)"
    # The spec decides AllowedIPs and routes; p2 and everyone else stay peered as before.
    assert nr.peers == plan("p1").peers and nr.routes == plan("p1").routes
    assert N("10.1.9.0/24") not in nr.routes
    # Once p2 publishes the spec's subnet, nothing is left to report.
    assert plan("p1", published=all_facts()).issues == ()


def test_a_key_published_twice_peers_only_the_first_node_by_name():
    published = all_facts()
    published["p6"] = facts("p6", publicKey=key("p2"))
    nr = plan("p1", published=published)
    assert peers_by_node(nr)["p2"].public_key == key("p2")
    assert "p6" not in peers_by_node(nr)
    issue = next(i for i in nr.issues if i.reason == INVALID_FACTS)
    assert issue.subject == "p6" and "same public key as node 'p2'" in issue.message


def test_a_peer_publishing_our_own_key_is_not_peered():
    published = all_facts()
    published["p2"] = facts("p2", publicKey=key("p1"))
    assert "p2" not in peers_by_node(plan("p1", published=published))


def test_peer_without_published_facts_is_pending_not_peered():
    published = all_facts("p2", "p6")
    nr = plan("p1", published=published)
    assert set(peers_by_node(nr)) == {"h1", "h2"}
    assert nr.pending == ("p2", "p6")
    assert all(i.reason == PEER_PENDING for i in nr.issues)


def test_hidden_subnet_not_published_is_not_routed_anywhere():
    nr = plan("p2", published=all_facts("h2"))
    assert peers_by_node(nr)["p1"].allowed_ips == (N("10.1.1.0/24"), N("10.1.11.0/24"))
    assert nr.pending == ("h2",)


def test_dead_peers_stay_peered_the_dataplane_outlives_the_control_plane():
    nr = plan("p1", alive={"p1", "p2"})
    assert set(peers_by_node(nr)) == {"p2", "p6", "h1", "h2"}


# --- hidden nodes and the aggregator ----------------------------------------------------------

def test_hidden_nr_peers_only_with_the_aggregator_for_the_whole_range():
    nr = plan("h1")
    assert nr.peers == (DesiredPeer(key("p1"), "198.51.100.1:51821", (N("10.1.0.0/16"),),
                                    HIDDEN_KEEPALIVE),)
    assert nr.routes == (N("10.1.0.0/16"),)
    assert nr.aggregator == "p1" and nr.hidden
    assert HIDDEN_KEEPALIVE == 25


def test_hidden_nr_reaches_an_ipv6_only_aggregator_over_ipv6():
    nr = plan("h1", net=network(aggregators=("p6",)))
    assert nr.peers[0].endpoint == "[2001:db8::6]:51826"


def test_dead_first_aggregator_falls_back_to_the_next_live_one():
    alive = {"p2", "p6", "h1", "h2"}
    h1 = plan("h1", alive=alive)
    assert h1.aggregator == "p2"
    assert h1.peers[0].endpoint == "203.0.113.2:51822"
    p2 = peers_by_node(plan("p2", alive=alive))
    assert set(p2) == {"p1", "h1", "h2"}  # p1 stays peered by its own subnet only
    assert p2["p1"].allowed_ips == (N("10.1.1.0/24"),)
    assert p2["h1"].endpoint is None


def test_unpublished_aggregator_is_skipped():
    assert plan("h1", published=all_facts("p1")).aggregator == "p2"


def test_hidden_node_listed_as_aggregator_is_skipped():
    assert plan("h2", net=network(aggregators=("h1", "p2"))).aggregator == "p2"


def test_aggregator_judges_itself_by_what_it_published_and_its_lease_like_everyone_else():
    assert plan("p1").aggregator == "p1"
    # Before p1's own facts are published the others cannot pick it, so neither does p1.
    assert plan("p1", published=all_facts("p1")).aggregator == "p2"
    assert plan("p1", alive={"p2"}).aggregator == "p2"


def test_liveness_unknown_counts_every_node_as_alive():
    assert plan("h1", alive=None).aggregator == "p1"


def test_hidden_nr_without_aggregator_gets_no_peers_and_a_clear_condition():
    nr = plan("h1", alive={"h1"})
    assert nr.peers == () and nr.routes == () and nr.aggregator is None
    issue = next(i for i in nr.issues if i.reason == NO_AGGREGATOR)
    assert "no aggregator is usable" in issue.message and "p1, p2" in issue.message


def test_public_nr_reports_hidden_subnets_unreachable_without_aggregator():
    nr = plan("p1", alive={"p1", "h1", "h2"}, net=network(aggregators=("p2", "p6")))
    assert set(peers_by_node(nr)) == {"p2", "p6"}
    issue = next(i for i in nr.issues if i.reason == NO_AGGREGATOR)
    assert "10.1.11.0/24" in issue.message and "p2 is not alive" in issue.message


def test_empty_aggregators_means_a_public_node_ranked_by_the_network_name():
    ranked = rendezvous_order("blue", ["p1", "p2", "p6"])
    plans = {n: plan(n, net=network(aggregators=())) for n in SUBNETS}
    assert {p.aggregator for p in plans.values()} == {ranked[0]}
    assert plans["h1"].peers[0].public_key == key(ranked[0])
    assert plans["h1"].choice.reason == PREFERRED and "aggregators empty" in plans["h1"].choice.message


def test_a_blamed_aggregator_is_failed_over_on_every_node():
    verdicts = {"p2": {"p1": FAILING}, "p6": {"p1": FAILING}, "h1": {"p1": FAILING},
                "h2": {"p1": FAILING}, "p1": {"p2": FAILING, "p6": FAILING}}
    plans = {n: plan(n, verdicts=verdicts) for n in SUBNETS}
    assert {p.aggregator for p in plans.values()} == {"p2"}
    assert plans["h1"].choice.reason == FAILED_OVER
    assert "p1 is not forwarding (tunnels from h1, h2, p2, p6 fail)" in plans["h1"].choice.message
    # p1 is still peered: only the hidden subnets moved away from it
    assert peers_by_node(plans["p6"])["p1"].allowed_ips == (N("10.1.1.0/24"),)


def test_probes_are_the_candidates_a_public_nr_peers_with_and_a_hidden_nrs_aggregator():
    def targets(nr):
        return [(t.node, str(t.address)) for t in nr.probes]
    assert targets(plan("p6")) == [("p1", "10.1.1.1")]  # p2 shares no address family with p6
    assert targets(plan("p1")) == [("p2", "10.1.2.1")]
    assert targets(plan("h1")) == [("p1", "10.1.1.1")]
    assert targets(plan("h1", alive={"p2", "h1", "h2"})) == [("p2", "10.1.2.1")]
    assert plan("p6").probes[0].public_key == key("p1")
    assert targets(plan("h1", alive={"h1"})) == []


def test_no_aggregator_condition_only_when_there_are_hidden_nrs():
    nr = plan("p1", net=network(nodes=("p1", "p2"), aggregators=()))
    assert nr.issues == ()


# --- endpoint family choice -------------------------------------------------------------------

def test_choose_endpoint_rules():
    v4, v6 = ip_address("198.51.100.9"), ip_address("2001:db8::9")
    assert choose_endpoint([v4, v6], [v6, v4]) == v4
    assert choose_endpoint([v6], [v4, v6]) == v6
    assert choose_endpoint([v4], [v6]) is None
    assert choose_endpoint([], [v6, v4]) == v4  # hidden: IPv4 first
    assert choose_endpoint([], [v6]) == v6


# --- workloads --------------------------------------------------------------------------------

def workload(name, node="p1", net="blue"):
    return Workload.model_validate({"metadata": {"name": name},
                                    "spec": {"network": net, "node": node, "netns": f"ns-{name}"}})


def test_workloads_of_this_node_and_network_are_attached_with_their_address():
    wls = [workload("web"), workload("db"), workload("elsewhere", node="p2"), workload("other", net="red")]
    ips = {"web": IPv4Address("10.1.1.5"), "db": IPv4Address("10.1.1.2")}
    nr = plan("p1", workloads=wls, ips=ips)
    assert [a.workload for a in nr.workloads] == ["db", "web"]
    web = nr.workloads[1]
    assert web.veth == names.workload_veth("n-", "web")
    assert (web.netns, web.interface) == ("ns-web", "eth0")
    assert web.address == IPv4Interface("10.1.1.5/24")
    assert web.gateway == IPv4Address("10.1.1.1")
    assert web.mtu == nr.mtu


def test_workload_without_address_is_reported_pending():
    nr = plan("p1", workloads=[workload("web")], ips={})
    assert nr.workloads == ()
    assert [(i.reason, i.subject) for i in nr.issues] == [(WORKLOAD_PENDING, "web")]


# --- purity -----------------------------------------------------------------------------------

def test_planner_imports_only_models_and_pure_stdlib():
    import ast
    import pathlib

    allowed_stdlib = {"__future__", "base64", "binascii", "collections", "dataclasses", "hashlib", "ipaddress", "re", "typing"}
    package = pathlib.Path(names.__file__).parent
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [] if node.level else [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                assert module.startswith("controller.models") or top in allowed_stdlib, \
                    f"{source.name} imports {module}"


# --- MTU: the overhead of the families the tunnels use ----------------------------------------

def test_ipv4_only_tunnels_leave_1440_bytes_on_a_1500_underlay():
    nr = plan("p2")  # p2 is IPv4-only: every tunnel runs over IPv4
    assert nr.peers and all(p.endpoint is None or not p.endpoint.startswith("[") for p in nr.peers)
    assert nr.mtu == 1440


def test_one_ipv6_tunnel_lowers_the_mtu_to_1420():
    nr = plan("p1")  # p1 reaches the IPv6-only p6 over IPv6
    assert any(p.endpoint and p.endpoint.startswith("[") for p in nr.peers)
    assert nr.mtu == 1420


def test_hidden_nr_uses_the_family_of_its_aggregator_tunnel():
    nr = plan("h1")
    assert len(nr.peers) == 1 and not nr.peers[0].endpoint.startswith("[")
    assert nr.mtu == 1440
