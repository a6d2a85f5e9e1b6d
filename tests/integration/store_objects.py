"""Sample objects for the store tests (imported by test_store*.py)."""

from __future__ import annotations

from controller.models.resources import Network, Workload


def network(name="net1", nodes=("node-a", "node-b"), **spec) -> Network:
    return Network.model_validate({
        "metadata": {"name": name},
        "spec": {
            "ipRange": "10.1.0.0/16",
            "resources": [{"node": n, "subnet": f"10.1.{i + 1}.0/24"} for i, n in enumerate(nodes)],
            **spec,
        },
    })


def workload(name="w1", node="node-a", net="net1", ip=None) -> Workload:
    return Workload.model_validate({
        "metadata": {"name": name},
        "spec": {"network": net, "node": node, "netns": f"ns-{name}", **({"ip": ip} if ip else {})},
    })


def wide_network(name: str, n: int) -> Network:
    return Network.model_validate({
        "metadata": {"name": name},
        "spec": {"ipRange": "10.0.0.0/8",
                 "resources": [{"node": f"n{i}", "subnet": f"10.{i}.0.0/24"} for i in range(n)]},
    })
