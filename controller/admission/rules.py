"""Rules that relate objects to each other: a workload and its network, a network and the
registered nodes. Pure functions returning one message per problem (empty list: valid)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from .resources import Network, Workload, gateway_of


def workload_problems(workload: Workload, network: Network | None,
                      others: Iterable[Workload] = ()) -> list[str]:
    """Problems of one workload against its network and the other workloads of that network."""
    spec = workload.spec
    if network is None:
        return [f"network {spec.network!r} does not exist"]
    resource = network.spec.resource_for(spec.node)
    if resource is None:
        return [f"node {spec.node!r} is not part of network {network.name!r}"]
    problems = []
    if spec.ip is not None:
        problems += address_problems(spec.ip, resource.subnet)
        for other in others:
            if (other.name != workload.name and other.spec.network == spec.network
                    and other.spec.ip == spec.ip):
                problems.append(f"ip {spec.ip} is already used by workload {other.name!r}")
    return problems


def address_problems(ip: ipaddress.IPv4Address, subnet: ipaddress.IPv4Network) -> list[str]:
    if ip not in subnet:
        return [f"ip {ip} is outside the node's subnet {subnet}"]
    if ip == subnet.network_address:
        return [f"ip {ip} is the network address of {subnet}"]
    if ip == subnet.broadcast_address:
        return [f"ip {ip} is the broadcast address of {subnet}"]
    if ip == gateway_of(subnet):
        return [f"ip {ip} is the gateway of {subnet}, held by the network resource"]
    return []


def unknown_nodes(network: Network, registered: Iterable[str]) -> list[str]:
    known = set(registered)
    return [f"node {n!r} is not a registered node" for n in network.spec.nodes if n not in known]
