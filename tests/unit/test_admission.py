"""Admission, pure: the rules between objects over a snapshot of etcd, what a review reads, and
messages that name the document, the field and the owner of what is in the way."""

from __future__ import annotations

import ipaddress

from controller.admission import Item, Snapshot, Stored, first_reads, further_reads, guarded_networks, review
from controller.models.manifest import parse_object

from test_models import network_doc, workload_doc

NODES = {"n1", "n2", "n3"}


def item(doc, where="m.yaml#1") -> Item:
    return Item(parse_object(doc), where)


def stored(doc, revision=5) -> Stored:
    return Stored(revision, parse_object(doc))


def snapshot(*docs, registered=NODES, in_use=None) -> Snapshot:
    """A snapshot holding `docs` as etcd's specs, the workloads indexed on their nodes."""
    snap = Snapshot(registered=set(registered), in_use=in_use or {})
    for d in docs:
        obj = parse_object(d)
        snap.specs[(obj.kind, obj.name)] = Stored(5, obj)
        if obj.kind == "Workload":
            snap.workloads_on.setdefault(obj.spec.node, {})[obj.name] = obj
    return snap


def lines(items, snap, broken=()) -> list[str]:
    return [str(p) for p in review(items, snap, broken)]


# --- networks ---------------------------------------------------------------------------------


def test_a_network_and_its_workloads_in_one_input_are_valid():
    assert lines([item(network_doc()), item(workload_doc(ip="10.1.1.10"), "m.yaml#2")], snapshot()) == []


def test_a_network_with_an_unregistered_node_is_rejected_at_that_node():
    assert lines([item(network_doc())], snapshot(registered={"n1", "n2"})) == [
        "m.yaml#1 Network/blue: spec.resources[2].node: node 'n3' is not a registered node"]


def test_only_the_nodes_a_change_adds_must_be_registered():
    old = network_doc(resources=[{"node": "gone", "subnet": "10.1.9.0/24"}])
    new = network_doc(resources=[{"node": "gone", "subnet": "10.1.9.0/24"}, {"node": "n1", "subnet": "10.1.1.0/24"}])
    assert lines([item(new)], snapshot(old, registered={"n1"})) == []


def test_a_network_change_that_would_orphan_a_workload_is_refused():
    shrunk = network_doc(resources=[{"node": "n1", "subnet": "10.1.1.0/24"}])
    snap = snapshot(network_doc(), workload_doc(node="n3", ip="10.1.3.10"))
    assert lines([item(shrunk)], snap) == [
        "m.yaml#1 Network/blue: spec.resources: existing workload 'web' would become invalid: "
        "node 'n3' is not part of network 'blue'"]


def test_a_subnet_change_that_would_renumber_a_running_workload_is_refused():
    moved = network_doc(resources=[{"node": "n1", "subnet": "10.1.100.0/24"}])
    snap = snapshot(network_doc(resources=[{"node": "n1", "subnet": "10.1.1.0/24"}]), workload_doc(name="dyn"),
                    in_use={"n1": {"dyn": ipaddress.IPv4Address("10.1.1.2")}})
    assert lines([item(moved)], snap) == [
        "m.yaml#1 Network/blue: spec.resources[0].subnet: existing workload 'dyn' would be renumbered: "
        "its address 10.1.1.2 (allocated by node n1) is not a host of the new subnet 10.1.100.0/24"]


def test_workloads_on_unchanged_nodes_are_not_judged_again():
    grown = network_doc(resources=[{"node": "n1", "subnet": "10.1.1.0/24"}, {"node": "n2", "subnet": "10.1.2.0/24"}])
    snap = snapshot(network_doc(resources=[{"node": "n1", "subnet": "10.1.1.0/24"}]), workload_doc())
    assert lines([item(grown)], snap) == []
    assert further_reads([item(grown)], snap.specs).workload_nodes == frozenset()


# --- workloads --------------------------------------------------------------------------------


def test_a_workload_is_checked_against_its_network_in_etcd():
    snap = snapshot(network_doc())
    assert lines([item(workload_doc(ip="10.1.1.10"))], snap) == []
    assert lines([item(workload_doc(ip="10.1.2.10"))], snap) == [
        "m.yaml#1 Workload/web: spec.ip: ip 10.1.2.10 is outside the node's subnet 10.1.1.0/24"]


def test_a_workload_of_a_network_that_exists_nowhere_is_rejected():
    assert lines([item(workload_doc())], snapshot()) == [
        "m.yaml#1 Workload/web: spec.network: network 'blue' does not exist"]


def test_a_workload_of_an_invalid_network_in_etcd_says_so():
    snap = snapshot()
    snap.specs[("Network", "blue")] = Stored(3, error="spec.ipRange: required field is missing")
    assert lines([item(workload_doc())], snap) == [
        "m.yaml#1 Workload/web: spec.network: network 'blue' in etcd is invalid "
        "(spec.ipRange: required field is missing)"]


def test_a_workload_on_a_node_outside_its_network_is_rejected():
    assert lines([item(workload_doc(node="n9"))], snapshot(network_doc())) == [
        "m.yaml#1 Workload/web: spec.node: node 'n9' is not part of network 'blue'"]


def test_a_workload_ip_pinned_by_a_workload_in_etcd_is_refused_naming_it():
    snap = snapshot(network_doc(), workload_doc(name="old", ip="10.1.1.10"))
    assert lines([item(workload_doc(ip="10.1.1.10"))], snap) == [
        "m.yaml#1 Workload/web: spec.ip: ip 10.1.1.10 is already used by workload 'old'"]


def test_an_address_a_node_allocated_to_a_running_workload_cannot_be_pinned_by_another():
    snap = snapshot(network_doc(), workload_doc(name="running"),
                    in_use={"n1": {"running": ipaddress.IPv4Address("10.1.1.2")}})
    assert lines([item(workload_doc(name="late", ip="10.1.1.2"))], snap) == [
        "m.yaml#1 Workload/late: spec.ip: ip 10.1.1.2 is already used by workload 'running' (allocated by node n1)"]


def test_an_allocated_address_is_free_once_its_holder_pins_another_in_the_same_input():
    # The agent's allocation agrees: a workload's pin releases what it was allocated before.
    snap = snapshot(network_doc(), workload_doc(name="running"),
                    in_use={"n1": {"running": ipaddress.IPv4Address("10.1.1.2")}})
    items = [item(workload_doc(name="running", ip="10.1.1.50")), item(workload_doc(name="late", ip="10.1.1.2"), "m.yaml#2")]
    assert lines(items, snap) == []


def test_the_same_ip_in_another_network_or_on_another_node_is_fine():
    snap = snapshot(network_doc(), network_doc(name="red"), workload_doc(name="other", network="red", ip="10.1.1.10"))
    assert lines([item(workload_doc(ip="10.1.1.10"))], snap) == []


def test_two_new_workloads_pinning_one_ip_are_reported_once_on_the_later():
    items = [item(workload_doc(name="a", ip="10.1.1.10")), item(workload_doc(name="b", ip="10.1.1.10"), "m.yaml#2")]
    assert lines(items, snapshot(network_doc())) == [
        "m.yaml#2 Workload/b: spec.ip: ip 10.1.1.10 is already used by workload 'a'"]


def test_an_unchanged_workload_in_the_input_still_holds_its_address():
    existing = workload_doc(name="a", ip="10.1.1.10")
    items = [item(workload_doc(name="b", ip="10.1.1.10")), item(existing, "m.yaml#2")]
    assert lines(items, snapshot(network_doc(), existing)) == [
        "m.yaml#1 Workload/b: spec.ip: ip 10.1.1.10 is already used by workload 'a'"]


def test_reapplying_what_etcd_holds_is_not_judged_again():
    w = workload_doc(ip="10.1.1.10")
    assert lines([item(w)], snapshot(network_doc(), w)) == []
    assert further_reads([item(w)], snapshot(network_doc(), w).specs).workload_nodes == frozenset()


def test_workloads_of_an_invalid_network_document_are_not_judged_again():
    # The network's own problems are reported; "network does not exist" would only confuse.
    assert lines([item(workload_doc())], snapshot(), broken={("Network", "blue")}) == []


def test_the_same_object_twice_in_one_input_is_rejected():
    assert lines([item(network_doc(), "a.yaml"), item(network_doc(), "b.yaml#2")], snapshot()) == [
        "b.yaml#2 Network/blue: defined more than once in the input (also at a.yaml)"]


def test_two_networks_with_the_same_ranges_are_fine():
    assert lines([item(network_doc(name="blue")), item(network_doc(name="red"))], snapshot()) == []


# --- what a review reads ------------------------------------------------------------------------


def test_a_workload_apply_reads_its_network_its_guard_and_its_node():
    w = item(workload_doc(node="n2"))
    first = first_reads([w])
    assert first.specs == {("Workload", "web"), ("Network", "blue")}
    assert first.guards == {"blue"}
    assert further_reads([w], {}).workload_nodes == {"n2"} and further_reads([w], {}).nodes == frozenset()


def test_a_network_apply_reads_registrations_only_of_nodes_it_adds():
    new = item(network_doc())
    assert further_reads([new], {}).nodes == NODES
    assert further_reads([new], {("Network", "blue"): stored(network_doc(resources=[
        {"node": "n1", "subnet": "10.1.1.0/24"}]))}).nodes == {"n2", "n3"}


def test_a_write_is_guarded_by_the_network_it_was_judged_with():
    assert guarded_networks(parse_object(network_doc(name="red"))) == {"red"}
    assert guarded_networks(parse_object(workload_doc(network="red"))) == {"red"}
