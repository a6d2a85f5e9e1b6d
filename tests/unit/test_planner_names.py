"""Names a node gives to what it creates: short enough for the kernel, unique per machine,
stable across restarts, and recognisable for garbage collection."""

import pytest

from controller.planner import names


@pytest.mark.parametrize("prefix", ["", "n1-", "a-", "node1-", "n-1-"])
def test_valid_prefixes_are_accepted(prefix):
    assert names.check_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix", ["n1", "node12-", "-", "-a-", "N1-", "n_1-", "zmnr-"])
def test_invalid_prefixes_are_rejected_with_a_reason(prefix):
    with pytest.raises(ValueError, match="name prefix"):
        names.check_prefix(prefix)


def test_nr_namespace_carries_prefix_and_network():
    assert names.nr_netns("n1-", "blue") == "n1-zmnr-blue"
    assert names.nr_netns("", "blue") == "zmnr-blue"


def test_ndmz_namespace_is_one_per_node():
    assert names.ndmz_netns("n1-") == "n1-zmndmz"


@pytest.mark.parametrize("prefix", ["", "n1-", "node1-"])
def test_wireguard_ifname_fills_ifnamsiz_and_is_stable(prefix):
    name = names.wg_ifname(prefix, "a-network-name-that-is-quite-long-really")
    assert len(name) == 15
    assert name.startswith(prefix + "zw")
    assert name == names.wg_ifname(prefix, "a-network-name-that-is-quite-long-really")


def test_wireguard_ifname_differs_per_network_and_per_node():
    found = {names.wg_ifname(p, n) for p in ("", "n1-", "n2-") for n in ("blue", "red")}
    assert len(found) == 6


def test_workload_veth_is_short_stable_and_per_workload():
    a = names.workload_veth("n1-", "web")
    assert len(a) == 15 and a.startswith("n1-zv")
    assert a == names.workload_veth("n1-", "web")
    assert a != names.workload_veth("n1-", "db")


def test_bridge_inside_the_nr_has_a_fixed_name():
    assert names.NR_BRIDGE == "zmbr"


def test_namespace_parses_back_to_its_network_for_its_own_node_only():
    assert names.network_of_netns("n1-", "n1-zmnr-blue") == "blue"
    assert names.network_of_netns("n1-", "n2-zmnr-blue") is None
    assert names.network_of_netns("", "n1-zmnr-blue") is None
    assert names.network_of_netns("", "zmnr-blue") == "blue"
    assert names.network_of_netns("n1-", "n1-zmndmz") is None
    assert names.network_of_netns("n1-", "n1-zmnr-") is None
    assert names.network_of_netns("n1-", "n1-zmnr-Not_A_Name") is None
    assert names.network_of_netns("n1-", "docker") is None


def test_interface_ownership_is_recognised_by_shape_and_prefix():
    wg = names.wg_ifname("n1-", "blue")
    assert names.owns_wg_ifname("n1-", wg)
    assert not names.owns_wg_ifname("n2-", wg)
    assert not names.owns_wg_ifname("", wg)
    assert not names.owns_wg_ifname("n1-", "n1-zwnothex0000")
    assert not names.owns_wg_ifname("n1-", "wg0")
    veth = names.workload_veth("n1-", "web")
    assert names.owns_workload_veth("n1-", veth)
    assert not names.owns_wg_ifname("n1-", veth)


def test_ifname_collisions_are_detected(monkeypatch):
    assert names.wg_ifname_collisions("n1-", ["blue", "red", "blue"]) == {}
    monkeypatch.setattr(names, "short_hash", lambda text, length: "0" * length)
    assert names.wg_ifname_collisions("n1-", ["red", "blue"]) == {"n1-zw0000000000": ["blue", "red"]}
