"""Rules that relate one workload to its network. Pure; one message per problem (empty: valid)."""

from __future__ import annotations

from controller.models.resources import Network, Workload, address_problems


def workload_problems(workload: Workload, network: Network | None) -> list[str]:
    """Problems of one workload against its network (addresses in use are `review`'s)."""
    spec = workload.spec
    if network is None:
        return [f"network {spec.network!r} does not exist"]
    resource = network.spec.resource_for(spec.node)
    if resource is None:
        return [f"node {spec.node!r} is not part of network {network.name!r}"]
    return address_problems(spec.ip, resource.subnet) if spec.ip is not None else []
