"""Every validation rule of the resource model, each with a valid and an invalid case.
Pure: no root, no etcd."""

from __future__ import annotations

import copy
import ipaddress
import json

import pytest
from pydantic import ValidationError

from controller.models.manifest import (
    ManifestError,
    parse_json_value,
    parse_object,
    parse_stream,
    split_documents,
    to_json,
)
from controller.models.resources import (
    NAME_MAX,
    Network,
    Node,
    PortRange,
    Workload,
)
from controller.admission.rules import workload_problems
from controller.models.resources import address_problems


def network_doc(name="blue", ip_range="10.1.0.0/16", resources=None, **spec) -> dict:
    if resources is None:
        resources = [
            {"node": "n1", "subnet": "10.1.1.0/24"},
            {"node": "n2", "subnet": "10.1.2.0/24"},
            {"node": "n3", "subnet": "10.1.3.0/24"},
        ]
    return {
        "apiVersion": "zmesh.io/v1",
        "kind": "Network",
        "metadata": {"name": name},
        "spec": {"ipRange": ip_range, "resources": resources, **spec},
    }


def workload_doc(name="web", network="blue", node="n1", ip=None, **spec) -> dict:
    s = {"network": network, "node": node, "netns": "ctr-web", **spec}
    if ip is not None:
        s["ip"] = ip
    return {"apiVersion": "zmesh.io/v1", "kind": "Workload", "metadata": {"name": name}, "spec": s}


def problems_of(doc) -> list[str]:
    """The problem lines for one decoded document ([] when it is valid)."""
    try:
        parse_object(doc, "test")
    except ManifestError as e:
        return e.problems
    return []


def assert_rejected(doc, *fragments: str) -> list[str]:
    problems = problems_of(doc)
    assert problems, "expected the document to be rejected"
    text = "\n".join(problems)
    for f in fragments:
        assert f in text, f"{f!r} not in {text!r}"
    return problems


# --- names --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "blue", "net-1", "0net", "a" * NAME_MAX, "x9-y8"])
def test_dns_label_like_names_are_accepted(name):
    assert problems_of(network_doc(name=name)) == []


@pytest.mark.parametrize("name", [
    "", "Blue", "-blue", "blue-", "blue_net", "blue.net", "blue net", "blue/x", "ä", "a" * (NAME_MAX + 1),
])
def test_other_names_are_rejected(name):
    assert_rejected(network_doc(name=name), "metadata.name")


def test_node_names_follow_the_same_rule():
    doc = network_doc(resources=[{"node": "Node_1", "subnet": "10.1.1.0/24"}])
    assert_rejected(doc, "spec.resources[0].node: ", "not a valid name")


def test_workload_network_and_node_names_follow_the_same_rule():
    assert_rejected(workload_doc(network="Blue"), "spec.network")
    assert_rejected(workload_doc(node="n_1"), "spec.node")


def test_name_is_required():
    doc = network_doc()
    doc["metadata"] = {}
    assert_rejected(doc, "metadata.name: required field is missing")


# --- ranges and subnets -------------------------------------------------------------------


def test_a_network_with_subnets_inside_its_range_is_valid():
    net = parse_object(network_doc(), "t")
    assert isinstance(net, Network)
    assert net.spec.nodes == ["n1", "n2", "n3"]
    assert str(net.spec.resource_for("n2").gateway) == "10.1.2.1"


def test_a_subnet_equal_to_the_range_is_inside_it():
    assert problems_of(network_doc(ip_range="10.1.1.0/24",
                                   resources=[{"node": "n1", "subnet": "10.1.1.0/24"}])) == []


def test_a_subnet_outside_the_range_is_rejected():
    doc = network_doc(resources=[{"node": "n1", "subnet": "10.2.1.0/24"}])
    assert_rejected(doc, "10.2.1.0/24 is outside ipRange 10.1.0.0/16")


def test_a_subnet_larger_than_the_range_is_rejected():
    doc = network_doc(ip_range="10.1.1.0/24", resources=[{"node": "n1", "subnet": "10.1.0.0/16"}])
    assert_rejected(doc, "outside ipRange")


@pytest.mark.parametrize("value", ["10.1.0.1/16", "10.1.0.0/33", "10.1.0.0", "fd00::/64", "nonsense", 167772160, None])
def test_ip_range_must_be_an_ipv4_prefix_with_zero_host_bits(value):
    doc = network_doc()
    doc["spec"]["ipRange"] = value
    assert_rejected(doc, "spec.ipRange")


@pytest.mark.parametrize("subnet", ["10.1.1.1/24", "10.1.1.0/31", "10.1.1.0/32", 5])
def test_subnets_must_be_prefixes_large_enough_for_a_gateway_and_hosts(subnet):
    assert_rejected(network_doc(resources=[{"node": "n1", "subnet": subnet}]), "spec.resources[0].subnet: ")


def test_a_slash_30_subnet_is_the_smallest_accepted():
    assert problems_of(network_doc(resources=[{"node": "n1", "subnet": "10.1.1.0/30"}])) == []


def test_overlapping_subnets_in_one_network_are_rejected():
    doc = network_doc(resources=[
        {"node": "n1", "subnet": "10.1.0.0/20"},
        {"node": "n2", "subnet": "10.1.1.0/24"},
    ])
    assert_rejected(doc, "spec.resources[1].subnet: subnet 10.1.1.0/24 (node n2) overlaps 10.1.0.0/20 (node n1)")


def test_identical_subnets_on_two_nodes_are_rejected():
    doc = network_doc(resources=[
        {"node": "n1", "subnet": "10.1.1.0/24"},
        {"node": "n2", "subnet": "10.1.1.0/24"},
    ])
    assert_rejected(doc, "overlaps")


def test_adjacent_subnets_do_not_overlap():
    doc = network_doc(resources=[
        {"node": "n1", "subnet": "10.1.0.0/25"},
        {"node": "n2", "subnet": "10.1.0.128/25"},
    ])
    assert problems_of(doc) == []


@pytest.mark.parametrize("ip_range", ["100.64.0.0/10", "100.64.0.0/16", "100.127.255.0/24", "100.0.0.0/8", "0.0.0.0/0"])
def test_a_range_in_or_around_the_ndmz_range_is_rejected(ip_range):
    doc = network_doc(ip_range=ip_range, resources=[])
    assert_rejected(doc, "ipRange", "100.64.0.0/10")


@pytest.mark.parametrize("ip_range", ["100.63.0.0/16", "100.128.0.0/16", "10.0.0.0/8", "192.168.0.0/16"])
def test_ranges_next_to_the_ndmz_range_are_fine(ip_range):
    assert problems_of(network_doc(ip_range=ip_range, resources=[])) == []


def test_a_subnet_in_the_ndmz_range_is_rejected_even_if_range_is_too():
    doc = network_doc(ip_range="100.0.0.0/8", resources=[{"node": "n1", "subnet": "100.64.1.0/24"}])
    problems = assert_rejected(doc, "100.64.0.0/10")
    assert any(p.startswith("spec.resources[0].subnet: ") for p in problems)


def test_two_networks_may_use_the_same_ranges():
    a = parse_object(network_doc(name="blue"), "a")
    b = parse_object(network_doc(name="red"), "b")
    assert a.spec.ipRange == b.spec.ipRange
    assert a.spec.resources == b.spec.resources


# --- nodes, aggregators, egress -----------------------------------------------------------


def test_a_node_twice_in_one_network_is_rejected():
    doc = network_doc(resources=[
        {"node": "n1", "subnet": "10.1.1.0/24"},
        {"node": "n1", "subnet": "10.1.2.0/24"},
    ])
    assert_rejected(doc, "spec.resources[1].node: node 'n1' appears more than once")


def test_aggregators_that_are_nodes_of_the_network_are_accepted():
    assert problems_of(network_doc(aggregators=["n2", "n1"], egress="n3")) == []


def test_an_aggregator_that_is_not_a_node_of_the_network_is_rejected():
    assert_rejected(network_doc(aggregators=["n1", "n9"]), "aggregators[1]: 'n9' is not a node of this network")


def test_an_aggregator_listed_twice_is_rejected():
    assert_rejected(network_doc(aggregators=["n1", "n1"]), "listed more than once")


def test_egress_must_be_a_node_of_the_network():
    assert_rejected(network_doc(egress="n9"), "egress: 'n9' is not a node of this network")


def test_every_problem_of_a_network_is_reported_on_its_own_line():
    doc = network_doc(
        resources=[
            {"node": "n1", "subnet": "10.1.1.0/24"},
            {"node": "n1", "subnet": "10.9.0.0/24"},
        ],
        aggregators=["n7"], egress="n8",
    )
    problems = assert_rejected(doc)
    assert len(problems) == 4, problems
    assert all("\n" not in p for p in problems)


# --- workloads ----------------------------------------------------------------------------


@pytest.fixture
def blue() -> Network:
    return parse_object(network_doc(), "blue")


def wl(**kw) -> Workload:
    return parse_object(workload_doc(**kw), "w")


def test_a_workload_without_ip_is_valid(blue):
    w = wl()
    assert w.spec.interface == "eth0"
    assert workload_problems(w, blue) == []


def test_a_workload_with_a_host_ip_of_its_nodes_subnet_is_valid(blue):
    assert workload_problems(wl(ip="10.1.1.10"), blue) == []
    assert workload_problems(wl(node="n3", ip="10.1.3.254"), blue) == []


@pytest.mark.parametrize("ip, why", [
    ("10.1.1.0", "network address"),
    ("10.1.1.1", "gateway"),
    ("10.1.1.255", "broadcast address"),
    ("10.1.2.10", "outside the node's subnet 10.1.1.0/24"),  # another node's subnet
    ("192.168.1.10", "outside the node's subnet"),
])
def test_a_workload_ip_must_be_a_host_address_of_its_nodes_subnet(blue, ip, why):
    problems = workload_problems(wl(ip=ip), blue)
    assert len(problems) == 1 and why in problems[0]


def test_address_problems_of_a_slash_30():
    subnet = ipaddress.IPv4Network("10.0.0.0/30")
    assert address_problems(ipaddress.IPv4Address("10.0.0.2"), subnet) == []
    assert address_problems(ipaddress.IPv4Address("10.0.0.3"), subnet)  # broadcast


def test_a_workload_of_a_missing_network_is_rejected():
    assert workload_problems(wl(), None) == ["network 'blue' does not exist"]


def test_a_workload_on_a_node_outside_its_network_is_rejected(blue):
    assert workload_problems(wl(node="n9"), blue) == ["node 'n9' is not part of network 'blue'"]


@pytest.mark.parametrize("ip", ["10.1.1", "fd00::1", 167837962, "10.1.1.10/24"])
def test_a_workload_ip_must_be_an_ipv4_address(ip):
    assert_rejected(workload_doc(ip=ip), "spec.ip")


@pytest.mark.parametrize("netns, ok", [
    ("ctr-web", True), ("/proc/123/ns/net", True), ("/var/run/netns/x", True),
    ("", False), ("..", False), ("/var/run/../x", False), ("a b", False),
])
def test_workload_netns_is_a_name_or_an_absolute_path(netns, ok):
    assert (problems_of(workload_doc(netns=netns)) == []) is ok


@pytest.mark.parametrize("ifname, ok", [("eth0", True), ("net1", True), ("a" * 15, True),
                                        ("a" * 16, False), ("", False), ("eth 0", False)])
def test_workload_interface_is_a_linux_interface_name(ifname, ok):
    assert (problems_of(workload_doc(interface=ifname)) == []) is ok


# --- nodes --------------------------------------------------------------------------------


def node_doc(**spec) -> dict:
    return {"apiVersion": "zmesh.io/v1", "kind": "Node", "metadata": {"name": "n1"}, "spec": spec}


def test_a_node_without_endpoints_is_hidden():
    node = parse_object(node_doc(), "n")
    assert isinstance(node, Node) and node.spec.hidden
    assert not parse_object(node_doc(endpoints=["198.51.100.1", "2001:db8::1"]), "n").spec.hidden


def test_node_endpoints_must_be_addresses():
    assert_rejected(node_doc(endpoints=["example.org"]), "spec.endpoints[0]")


def test_port_ranges():
    assert PortRange.parse("51820-51830") == PortRange(min=51820, max=51830)
    assert PortRange.parse("51820") == PortRange(min=51820, max=51820)
    for bad in ["51830-51820", "0-10", "a-b", "1-70000"]:
        with pytest.raises(ValueError):
            PortRange.parse(bad)
    assert_rejected(node_doc(listenPortRange={"min": 2, "max": 1}), "empty")


# --- documents: format, apiVersion, kind, unknown fields ----------------------------------


def test_unknown_fields_are_rejected_everywhere():
    for path in [(), ("metadata",), ("spec",)]:
        doc = network_doc()
        target = doc
        for p in path:
            target = target[p]
        target["colour"] = "blue"
        assert_rejected(doc, "colour: unknown field")
    doc = network_doc()
    doc["spec"]["resources"][0]["subnett"] = "10.1.9.0/24"
    assert_rejected(doc, "spec.resources[0].subnett: unknown field (did you mean subnet?)")
    assert_rejected(workload_doc(ipp="10.1.1.10"), "spec.ipp: unknown field (did you mean ip?)")


def test_a_misspelt_required_field_is_one_problem_with_a_suggestion():
    doc = network_doc()
    doc["spec"]["ipRnage"] = doc["spec"].pop("ipRange")
    assert problems_of(doc) == ["spec.ipRnage: unknown field (did you mean ipRange?)"]


def test_status_and_generation_on_input_are_ignored():
    doc = network_doc()
    doc["metadata"]["generation"] = "anything"
    doc["status"] = {"ready": True, "resources": []}
    assert parse_object(doc) == parse_object(network_doc())


@pytest.mark.parametrize("doc, line", [
    ({"apiVersion": "zmesh.io/v1", "kind": "Network", "metadata": "blue", "spec": {}}, "metadata: must be a mapping"),
    ({"apiVersion": "zmesh.io/v1", "kind": "Workload", "metadata": {"name": "w"},
      "spec": {"network": "b", "node": "n1", "netns": "x", "interface": 3}}, "spec.interface: must be a string"),
    ({"apiVersion": "zmesh.io/v1", "kind": "Netwrok"}, "kind: 'Netwrok' is not one of Network, Workload, Node (did you mean Network?)"),
])
def test_problems_are_said_in_plain_words(doc, line):
    assert line in problems_of(doc)


@pytest.mark.parametrize("api", ["zmesh.io/v2", "v1", None, ""])
def test_wrong_api_version_is_rejected(api):
    doc = network_doc()
    doc["apiVersion"] = api
    assert_rejected(doc, "apiVersion: ", "must be 'zmesh.io/v1'")


@pytest.mark.parametrize("kind", ["Networks", "network", "Pod", None, ["Network"]])
def test_wrong_kind_is_rejected(kind):
    doc = network_doc()
    doc["kind"] = kind
    assert_rejected(doc, "kind: ", "one of Network, Workload, Node")


def test_kinds_can_be_restricted():
    with pytest.raises(ManifestError, match="not one of Network"):
        parse_object(workload_doc(), "t", kinds=("Network",))


@pytest.mark.parametrize("data", ["just text", 42, ["a"], None])
def test_a_document_that_is_not_a_mapping_is_rejected(data):
    assert_rejected(data, "expected a mapping")


def test_spec_is_required():
    doc = network_doc()
    del doc["spec"]
    assert_rejected(doc, "spec: required field is missing")


def test_problems_name_the_document_and_object():
    with pytest.raises(ManifestError) as e:
        parse_object(network_doc(egress="n9"), "net.yaml#2")
    assert str(e.value).startswith("net.yaml#2 Network/blue: spec.egress: ")


# --- files: YAML, JSON, several documents -------------------------------------------------


YAML_TWO = """
apiVersion: zmesh.io/v1
kind: Network
metadata: {name: blue}
spec:
  ipRange: 10.1.0.0/16
  resources:
  - {node: n1, subnet: 10.1.1.0/24}
---
# a comment-only document in between is skipped
---
apiVersion: zmesh.io/v1
kind: Workload
metadata: {name: web}
spec: {network: blue, node: n1, netns: ctr-web, ip: 10.1.1.10}
"""


def test_a_yaml_stream_gives_one_document_each():
    docs = split_documents(YAML_TWO, "f.yaml")
    assert [d.where for d in docs] == ["f.yaml#1", "f.yaml#2"]
    objs = [parse_object(d.data, d.where) for d in docs]
    assert [type(o).__name__ for o in objs] == ["Network", "Workload"]


def test_json_is_accepted():
    docs = split_documents(json.dumps(network_doc()), "f.json")
    assert len(docs) == 1 and docs[0].where == "f.json"
    assert parse_object(docs[0].data).name == "blue"


def test_a_json_list_and_a_kind_list_are_several_documents():
    as_list = split_documents(json.dumps([network_doc(), workload_doc()]), "f")
    assert [d.where for d in as_list] == ["f#1.1", "f#1.2"]
    as_kind_list = split_documents(json.dumps({"kind": "List", "items": [network_doc()]}), "f")
    assert len(as_kind_list) == 1


def test_a_kind_list_whose_items_are_not_a_list_is_one_bad_document():
    docs = split_documents('{"kind": "List", "items": "abc"}', "f")
    assert len(docs) == 1
    with pytest.raises(ManifestError, match="kind: 'List' is not one of"):
        parse_object(docs[0].data, docs[0].where)


@pytest.mark.parametrize("text, where", [('{"kind": "Network", ', "bad.yaml:1:21"), ("a: b: c", "bad.yaml:1:5"),
                                         ("key: [unclosed", "bad.yaml:1:15"), ("\t- x", "bad.yaml:1:1")])
def test_malformed_text_is_one_clear_problem_with_line_and_column(text, where):
    with pytest.raises(ManifestError) as e:
        split_documents(text, "bad.yaml")
    assert e.value.where == where
    assert len(e.value.problems) == 1
    assert e.value.problems[0].startswith("not valid YAML or JSON: ")
    assert "\n" not in e.value.problems[0] and "<unicode string>" not in str(e.value)


def test_a_broken_document_does_not_hide_the_others():
    text = "a: 1\n---\nb: [\n---\nc: 3\n"
    docs, problems = parse_stream(text, "f.yaml")
    assert [(d.where, d.data) for d in docs] == [("f.yaml#1", {"a": 1}), ("f.yaml#3", {"c": 3})]
    assert len(problems) == 1 and problems[0].startswith("f.yaml:4:1: not valid YAML or JSON: ")


def test_an_empty_file_has_no_documents():
    assert split_documents("", "f") == []
    assert split_documents("---\n---\n", "f") == []


# --- values in etcd ----------------------------------------------------------------------


def test_canonical_json_round_trips_and_drops_the_generation():
    net = parse_object(network_doc(), "t")
    net.metadata.generation = 7
    text = to_json(net)
    assert "generation" not in text and "labels" not in text
    again = parse_json_value(text.encode(), "etcd")
    assert again == parse_object(network_doc(), "t")
    assert to_json(again) == text


def test_canonical_json_is_stable_regardless_of_input_order():
    doc = network_doc()
    reordered = {"spec": doc["spec"], "metadata": doc["metadata"], "kind": "Network", "apiVersion": "zmesh.io/v1"}
    assert to_json(parse_object(doc)) == to_json(parse_object(copy.deepcopy(reordered)))


def test_a_hand_written_yaml_value_reads_like_json():
    yaml_value = b"apiVersion: zmesh.io/v1\nkind: Network\nmetadata: {name: blue}\nspec:\n  ipRange: 10.1.0.0/16\n"
    assert to_json(parse_json_value(yaml_value, "k")) == to_json(
        parse_object(network_doc(resources=[]), "t"))


@pytest.mark.parametrize("raw, fragment", [
    (b"\xff\xfe", "not UTF-8"),
    (b"{not json: [", "not valid JSON"),
    (b"key: [unclosed", "neither JSON nor YAML"),
    (b"42", "expected a mapping"),
    (b'{"apiVersion":"zmesh.io/v1","kind":"Network","metadata":{"name":"x"},"spec":{"ipRange":"100.64.0.0/16"}}', "100.64.0.0/10"),
])
def test_malformed_values_in_etcd_are_reported(raw, fragment):
    with pytest.raises(ManifestError) as e:
        parse_json_value(raw, "/zmesh/v1/networks/x")
    assert fragment in str(e.value)
    assert str(e.value).startswith("/zmesh/v1/networks/x")


def test_the_example_manifest_is_valid():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "examples" / "network.yaml").read_text()
    objs = [parse_object(d.data, d.where) for d in split_documents(text, "examples/network.yaml")]
    net, workloads = objs[0], objs[1:]
    assert isinstance(net, Network) and len(net.spec.nodes) == 3
    assert sorted(w.spec.node for w in workloads) == net.spec.nodes
    assert all(workload_problems(w, net) == [] for w in workloads)


# --- hostile values (hand-written into etcd, or a bad file) --------------------------------


@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000,
                                 b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
                                 b"x: " + b"[" * 100_000 + b"]" * 100_000])
def test_deeply_nested_garbage_is_one_problem_not_a_crash(raw):
    # A RecursionError used to escape and fail every listing (and every agent reading it).
    with pytest.raises(ManifestError) as e:
        parse_json_value(raw, "/zmesh/v1/networks/deep")
    assert e.value.problems == ["nested too deeply to be a manifest"]
    with pytest.raises(ManifestError, match="nested too deeply"):
        split_documents(raw.decode(), "deep.yaml")


def big_network_doc(n: int) -> dict:
    # n /30 subnets inside 10.0.0.0/8, nodes n1..n3 repeated: every resource after the third is
    # a duplicate node.
    return network_doc(ip_range="10.0.0.0/8", resources=[
        {"node": f"n{i % 3 + 1}", "subnet": f"10.{i // 64}.{(i % 64) * 4}.0/30"} for i in range(n)])


# The pairwise overlap check took two minutes on this input; the sorted sweep takes well under a
# second. The timeout is a hang guard, not a speed measurement.
@pytest.mark.timeout(60)
def test_a_huge_network_is_validated_with_a_bounded_report():
    problems = problems_of(big_network_doc(16_000))  # about 700 KB of JSON
    assert len(problems) == 21 and problems[-1] == "... and 15977 more problem(s)"


def test_overlaps_are_found_among_many_subnets_in_any_order():
    resources = [{"node": f"n{i}", "subnet": f"10.1.{i}.0/24"} for i in range(1, 200)]
    resources.insert(100, {"node": "wide", "subnet": "10.1.64.0/22"})  # covers 10.1.64-67
    resources.append({"node": "twin", "subnet": "10.1.3.0/24"})
    problems = problems_of(network_doc(resources=resources))
    assert "spec.resources[200].subnet: subnet 10.1.3.0/24 (node twin) overlaps 10.1.3.0/24 (node n3)" in problems
    assert "spec.resources[100].subnet: subnet 10.1.64.0/22 (node wide) overlaps 10.1.67.0/24 (node n67)" in problems
    assert len(problems) == 1 + 4  # each overlapping pair is reported once


@pytest.mark.parametrize("ip_range, subnet, why", [
    ("127.0.0.0/8", "127.0.1.0/24", "loopback"),
    ("224.0.0.0/8", "224.0.1.0/24", "multicast"),
    ("240.0.0.0/8", "240.0.1.0/24", "reserved"),
    ("169.254.0.0/16", "169.254.1.0/24", "link-local"),
    ("0.0.0.0/8", "0.0.1.0/24", "this network"),
])
def test_ranges_that_cannot_be_routed_are_rejected(ip_range, subnet, why):
    problems = assert_rejected(network_doc(ip_range=ip_range, resources=[{"node": "n1", "subnet": subnet}]), why)
    assert any(p.startswith("spec.ipRange:") for p in problems)
    assert any(p.startswith("spec.resources[0].subnet:") for p in problems)


@pytest.mark.parametrize("ip_range", ["8.8.0.0/16", "172.16.0.0/12", "192.168.0.0/16", "198.18.0.0/15"])
def test_public_and_private_unicast_ranges_are_fine(ip_range):
    net = ipaddress.ip_network(ip_range)
    sub = str(next(net.subnets(new_prefix=24)))
    assert problems_of(network_doc(ip_range=ip_range, resources=[{"node": "n1", "subnet": sub}])) == []


@pytest.mark.parametrize("value, message", [
    ("fd00::/64", "'fd00::/64' is an IPv6 prefix, but networks are IPv4"),
    ("10.1.0.1/16", "spec.ipRange: '10.1.0.1/16' has host bits set (did you mean 10.1.0.0/16?)"),
    ("10.1.0.0/33", "'10.1.0.0/33' is not an IPv4 prefix"),
])
def test_a_bad_prefix_says_what_is_wrong_with_it(value, message):
    assert_rejected(network_doc(ip_range=value, resources=[]), message)


# --- facts a node publishes for its peers: input from someone else ---------------------------

FACTS = {"apiVersion": "zmesh.io/v1", "kind": "NetworkResourceFacts", "network": "blue", "node": "n2",
         "publicKey": "A" * 43 + "=", "listenPort": 51820,
         "endpoints": ["198.51.100.2", "2001:db8::2"], "subnet": "10.1.2.0/24"}


def test_facts_accept_what_an_agent_publishes():
    from controller.models.resources import NetworkResourceFacts

    facts = NetworkResourceFacts.model_validate(FACTS)
    assert facts.public and str(facts.endpoints[1]) == "2001:db8::2"


@pytest.mark.parametrize("field,value,why", [
    ("endpoints", ["fe80::1%x\nremove=true"], "without a zone index"),
    ("endpoints", ["fe80::1%eth0"], "without a zone index"),
    ("endpoints", ["fe80::1"], "link-local"),
    ("endpoints", ["169.254.1.1"], "link-local"),
    ("endpoints", ["127.0.0.1"], "loopback"),
    ("endpoints", ["::1"], "loopback"),
    ("endpoints", ["0.0.0.0"], "unspecified"),
    ("endpoints", ["::"], "unspecified"),
    ("endpoints", ["224.0.0.1"], "multicast"),
    ("endpoints", ["ff02::1"], "multicast"),
    ("endpoints", ["255.255.255.255"], "reserved"),
    ("endpoints", ["::ffff:198.51.100.2"], "IPv4-mapped"),
    ("endpoints", [" 198.51.100.2"], "not an IPv4 or IPv6 address"),
    ("endpoints", [3325256706], "not an IPv4 or IPv6 address"),
    ("endpoints", ["198.51.100.2"] * 17, "at most 16"),
    ("endpoints", "198.51.100.2", "valid list"),
    ("listenPort", 0, "greater than or equal to 1"),
    ("listenPort", 99999, "less than or equal to 65535"),
    ("listenPort", "51820", "valid integer"),
    ("listenPort", True, "valid integer"),
    ("publicKey", "not-a-key", "WireGuard public key"),
    ("publicKey", "A" * 42 + "==", "32 bytes"),
    ("publicKey", "A" * 44 + "\nremove=true", "WireGuard public key"),
    ("publicKey", None, "string"),
    ("subnet", "10.1.2.1/24", "host bits"),
    ("node", "N2/../x", "not a valid name"),
    ("extra", "x", "Extra inputs"),
])
def test_hostile_facts_are_rejected_with_the_reason(field, value, why):
    from controller.models.resources import NetworkResourceFacts

    with pytest.raises(ValidationError) as e:
        NetworkResourceFacts.model_validate(FACTS | {field: value})
    assert why in str(e.value), str(e.value)


def test_agent_endpoints_follow_the_same_rule():
    from controller.reconciler.config import parse_endpoint

    assert str(parse_endpoint("[2001:db8::2]")) == "2001:db8::2"
    with pytest.raises(ValueError, match="loopback"):
        parse_endpoint("127.0.0.1")
