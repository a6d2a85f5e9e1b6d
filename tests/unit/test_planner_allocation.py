"""Listen ports and workload addresses: deterministic, stable, conflicts reported not raised."""

from ipaddress import IPv4Address as A, IPv4Network as N

import pytest

from controller.models.resources import PortRange, Workload
from controller.planner.allocation import PortsExhausted, allocate_listen_port, allocate_workload_ips, held_addresses

RANGE = PortRange(min=51820, max=51823)
SUBNET = N("10.1.1.0/29")  # hosts .1-.6; .1 is the gateway


def workload(name, ip=None):
    spec = {"network": "blue", "node": "n1", "netns": f"ns-{name}"}
    if ip:
        spec["ip"] = ip
    return Workload.model_validate({"metadata": {"name": name}, "spec": spec})


# --- listen ports ---------------------------------------------------------------------------

def test_first_network_gets_the_lowest_port():
    assert allocate_listen_port(RANGE, {}, "blue") == 51820


def test_new_network_gets_the_lowest_free_port():
    assert allocate_listen_port(RANGE, {"a": 51820, "b": 51822}, "blue") == 51821


def test_existing_port_is_kept_even_when_a_lower_one_is_free():
    assert allocate_listen_port(RANGE, {"blue": 51823}, "blue") == 51823


def test_port_outside_a_changed_range_is_reallocated():
    assert allocate_listen_port(RANGE, {"blue": 40000}, "blue") == 51820


def test_two_networks_on_one_port_the_first_by_name_keeps_it():
    in_use = {"blue": 51820, "red": 51820}
    assert allocate_listen_port(RANGE, in_use, "blue") == 51820
    assert allocate_listen_port(RANGE, in_use, "red") == 51821


def test_exhausted_range_raises_a_clear_error():
    in_use = {f"n{i}": 51820 + i for i in range(4)}
    with pytest.raises(PortsExhausted, match="no free WireGuard listen port for network 'blue'.*51820-51823"):
        allocate_listen_port(RANGE, in_use, "blue")


# --- workload addresses ---------------------------------------------------------------------

def test_new_workloads_get_the_lowest_free_hosts_after_the_gateway_in_name_order():
    ips, problems = allocate_workload_ips(SUBNET, [workload("b"), workload("a")], {})
    assert ips == {"a": A("10.1.1.2"), "b": A("10.1.1.3")}
    assert problems == {}


def test_fixed_ip_is_honoured_and_skipped_by_dynamic_allocation():
    ips, _ = allocate_workload_ips(SUBNET, [workload("a"), workload("z", "10.1.1.2")], {})
    assert ips == {"z": A("10.1.1.2"), "a": A("10.1.1.3")}


def test_previous_allocations_stay_stable_when_lower_addresses_free_up():
    ips, _ = allocate_workload_ips(SUBNET, [workload("b"), workload("c")], {"b": A("10.1.1.5")})
    assert ips == {"b": A("10.1.1.5"), "c": A("10.1.1.2")}


def test_a_later_fixed_ip_never_takes_the_address_of_a_running_workload():
    # The renumbering bug: pinning an address the node had allocated used to move its holder.
    previous = {"dyn": A("10.1.1.2")}
    ips, problems = allocate_workload_ips(SUBNET, [workload("dyn"), workload("fix", "10.1.1.2")], previous)
    assert ips == {"dyn": A("10.1.1.2")}
    assert problems == {"fix": "ip 10.1.1.2 is already used by workload 'dyn'"}


def test_the_later_fixed_ip_gets_its_address_once_the_holder_is_gone():
    ips, problems = allocate_workload_ips(SUBNET, [workload("fix", "10.1.1.2")], {"dyn": A("10.1.1.2")})
    assert ips == {"fix": A("10.1.1.2")} and problems == {}


def test_a_workload_that_pins_another_address_releases_the_one_it_held():
    previous = {"a": A("10.1.1.2")}
    ips, problems = allocate_workload_ips(SUBNET, [workload("a", "10.1.1.5"), workload("b", "10.1.1.2")], previous)
    assert ips == {"a": A("10.1.1.5"), "b": A("10.1.1.2")} and problems == {}


def test_a_new_dynamic_workload_never_gets_an_address_someone_pins():
    ips, _ = allocate_workload_ips(SUBNET, [workload("a"), workload("pinned", "10.1.1.2")], {})
    assert ips == {"pinned": A("10.1.1.2"), "a": A("10.1.1.3")}


def test_duplicate_fixed_ip_goes_to_the_workload_that_holds_it_and_the_other_is_reported():
    previous = {"b": A("10.1.1.4")}
    ips, problems = allocate_workload_ips(SUBNET, [workload("a", "10.1.1.4"), workload("b", "10.1.1.4")], previous)
    assert ips == {"b": A("10.1.1.4")}
    assert problems == {"a": "ip 10.1.1.4 is already used by workload 'b'"}


def test_duplicate_fixed_ip_without_history_goes_to_the_first_by_name():
    ips, problems = allocate_workload_ips(SUBNET, [workload("b", "10.1.1.4"), workload("a", "10.1.1.4")], {})
    assert ips == {"a": A("10.1.1.4")}
    assert set(problems) == {"b"}


@pytest.mark.parametrize("ip, reason", [
    ("10.1.2.9", "outside the node's subnet"),
    ("10.1.1.0", "network address"),
    ("10.1.1.1", "gateway"),
    ("10.1.1.7", "broadcast address"),
])
def test_invalid_fixed_ip_is_reported_per_workload(ip, reason):
    ips, problems = allocate_workload_ips(SUBNET, [workload("bad", ip), workload("good")], {})
    assert ips == {"good": A("10.1.1.2")}
    assert reason in problems["bad"]


def test_previous_allocation_no_longer_in_the_subnet_is_replaced():
    ips, _ = allocate_workload_ips(SUBNET, [workload("a")], {"a": A("10.9.9.9")})
    assert ips == {"a": A("10.1.1.2")}


def test_exhausted_subnet_reports_the_workloads_left_over():
    many = [workload(f"w{i}") for i in range(7)]
    ips, problems = allocate_workload_ips(SUBNET, many, {})
    assert sorted(ips.values()) == [A(f"10.1.1.{i}") for i in range(2, 7)]
    assert problems == {"w5": "no free address left in 10.1.1.0/29", "w6": "no free address left in 10.1.1.0/29"}


def test_reserved_addresses_go_to_nobody_else():
    kept = {"unreadable": A("10.1.1.2")}
    got, problems = allocate_workload_ips(N("10.1.1.0/24"), [workload("fresh"), workload("fixed", "10.1.1.2")],
                                          {}, reserved=kept)
    assert got == {"fresh": A("10.1.1.3")}
    assert problems == {"fixed": "ip 10.1.1.2 is already used by workload 'unreadable'"}


def test_what_a_node_published_holds_an_address_its_record_lost():
    # The state dir was lost: the published status still says who runs on 10.1.1.2.
    previous = held_addresses({}, {"dyn": A("10.1.1.2")})
    ips, problems = allocate_workload_ips(SUBNET, [workload("dyn"), workload("fix", "10.1.1.2")], previous)
    assert ips == {"dyn": A("10.1.1.2")} and set(problems) == {"fix"}
    # The record, where it knows the workload, is the truth.
    assert held_addresses({"dyn": A("10.1.1.3")}, {"dyn": A("10.1.1.2")}) == {"dyn": A("10.1.1.3")}
