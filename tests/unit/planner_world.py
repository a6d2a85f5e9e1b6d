"""A small world for planner tests (network "blue", ipRange 10.1.0.0/16):
  p1 public 198.51.100.1 + 2001:db8::1    10.1.1.0/24   first aggregator
  p2 public 203.0.113.2                  10.1.2.0/24   second aggregator
  p6 public 2001:db8::6 (IPv6 only)      10.1.6.0/24
  h1 hidden                              10.1.11.0/24
  h2 hidden                              10.1.12.0/24
"""

import base64
from ipaddress import ip_address

from controller.models.resources import Network, NetworkResourceFacts
from controller.planner.plan import LocalFacts, NodeContext, plan_network

ENDPOINTS = {
    "p1": ("198.51.100.1", "2001:db8::1"),
    "p2": ("203.0.113.2",),
    "p6": ("2001:db8::6",),
    "h1": (),
    "h2": (),
}
SUBNETS = {"p1": "10.1.1.0/24", "p2": "10.1.2.0/24", "p6": "10.1.6.0/24",
           "h1": "10.1.11.0/24", "h2": "10.1.12.0/24"}
PORTS = {"p1": 51821, "p2": 51822, "p6": 51826, "h1": 51831, "h2": 51832}


def network(nodes=tuple(SUBNETS), aggregators=("p1", "p2"), egress=None):
    return Network.model_validate({
        "metadata": {"name": "blue"},
        "spec": {"ipRange": "10.1.0.0/16",
                 "resources": [{"node": n, "subnet": SUBNETS[n]} for n in nodes],
                 "aggregators": [a for a in aggregators if a in nodes], "egress": egress},
    })


def key(node):
    """A well-formed, distinct WireGuard public key per node (base64 of 32 bytes)."""
    return base64.b64encode(node.encode().ljust(32, b".")).decode()


def facts(node, **override):
    published = dict(network="blue", node=node, publicKey=key(node), listenPort=PORTS[node],
                     endpoints=list(ENDPOINTS[node]), subnet=SUBNETS[node])
    published.update(override)
    return NetworkResourceFacts.model_validate(published)


def all_facts(*except_nodes):
    return {n: facts(n) for n in SUBNETS if n not in except_nodes}


def ctx(node, prefix="n-"):
    return NodeContext(node, prefix, tuple(ip_address(a) for a in ENDPOINTS[node]), 1500)


def plan(node, net=None, published=None, alive=None, workloads=(), ips=None, bad=None, public_ip=None,
         verdicts=None):
    return plan_network(ctx(node), net or network(), all_facts() if published is None else published,
                        alive, workloads, LocalFacts(key(node), PORTS[node], public_ip), ips or {}, bad,
                        verdicts)
