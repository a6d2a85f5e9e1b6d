"""Hidden nodes behind home routers (NAT), end to end: a real etcd, one agent per node, real
wireguard-go, routers that masquerade and drop unsolicited inbound traffic."""

from __future__ import annotations

import pytest
from meshlib import network_manifest, wait_until, workload_manifest

from controller.sim.world import netns_exec

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.etcd]

SUBNETS = {"n1": "10.1.1.0/24", "n2": "10.1.2.0/24", "n3": "10.1.3.0/24",
           "h1": "10.1.11.0/24", "h2": "10.1.12.0/24", "h3": "10.1.13.0/24"}
PUBLIC = ("n1", "n2", "n3")
HIDDEN = ("h1", "h2", "h3")


def ip_of(node: str) -> str:
    return SUBNETS[node].replace(".0/24", ".10")


def hidden_world(mesh, public=PUBLIC, aggregators=("n1", "n2")) -> dict[str, str]:
    """Public nodes on the Internet, h1 and h2 behind router r1, h3 behind router r2; one
    workload w-<node> per node. Returns {workload: ip}."""
    mesh.start(*public)
    mesh.start_hidden("r1", "h1", "h2")
    mesh.start_hidden("r2", "h3")
    nodes = (*public, *HIDDEN)
    manifest = network_manifest("blue", {n: SUBNETS[n] for n in nodes}, aggregators=list(aggregators))
    workloads = {}
    for n in nodes:
        manifest += workload_manifest(f"w-{n}", "blue", n, mesh.add_workload_ns(f"w-{n}"), ip_of(n))
        workloads[f"w-{n}"] = ip_of(n)
    mesh.apply(manifest)
    return workloads


async def peers_by_node(mesh, node: str) -> dict[str, object]:
    """node -> PeerState of `node`'s device, naming peers by the node whose key they carry."""
    keys = {mesh.public_key(n, "blue"): n for n in mesh.world.nodes}
    device = await mesh.wg_device(node, "blue")
    return {keys.get(k, k): p for k, p in device.peers.items()}


async def test_hidden_nodes_reach_everyone_through_the_aggregator(mesh):
    workloads = hidden_world(mesh)
    hidden_wl = {f"w-{h}": ip_of(h) for h in HIDDEN}
    # Hidden workloads reach every public one and each other (the hidden side opens the
    # tunnels to the aggregator, which it keeps open with keepalives).
    mesh.wait_mesh(hidden_wl, timeout=40)
    mesh.wait_mesh(workloads, timeout=40)

    for h in HIDDEN:
        peers = await peers_by_node(mesh, h)
        assert list(peers) == ["n1"], f"{h} peers only with the aggregator: {list(peers)}"
        assert peers["n1"].endpoint.startswith("198.51.100.11:")
        assert peers["n1"].persistent_keepalive == 25
        assert {str(a) for a in peers["n1"].allowed_ips} == {"10.1.0.0/16"}
    aggregator = await peers_by_node(mesh, "n1")
    routers = {h: mesh.world.nodes[h].router.wan for h in HIDDEN}
    for h in HIDDEN:
        # The aggregator learned each hidden node's address: its router's, after masquerading.
        assert aggregator[h].endpoint.split(":")[0] == str(routers[h])
        assert {str(a) for a in aggregator[h].allowed_ips} == {SUBNETS[h]}
    for n in ("n2", "n3"):
        peers = await peers_by_node(mesh, n)
        assert set(peers) == {"n1", "n2", "n3"} - {n}, "other public NRs never peer with hidden ones"
        assert {str(a) for a in peers["n1"].allowed_ips} == {SUBNETS["n1"], *(SUBNETS[h] for h in HIDDEN)}

    # Hidden-to-hidden traffic crosses the aggregator: its counters for both ends grow.
    before = await peers_by_node(mesh, "n1")
    assert mesh.ping(mesh.workload_ns("w-h1"), ip_of("h3"), count=5)
    after = await peers_by_node(mesh, "n1")
    for h in ("h1", "h3"):
        assert after[h].rx_bytes > before[h].rx_bytes and after[h].tx_bytes > before[h].tx_bytes


async def test_home_router_masquerades_and_drops_unsolicited_inbound(mesh):
    mesh.start("n1")
    mesh.start_hidden("r1", "h1")
    router = mesh.world.routers["r1"]
    h1 = mesh.world.nodes["h1"]
    n1 = mesh.world.nodes["n1"]
    # Out: the hidden node reaches the Internet, seen as its router's address.
    assert mesh.ping(h1.netns, str(n1.ipv4))
    # In: the Internet cannot open anything to the router or behind it, even with a route.
    netns_exec(n1.netns, "ip", "route", "add", str(router.lan), "via", str(router.wan), check=True)
    assert not mesh.ping(n1.netns, str(h1.ipv4))
    assert not mesh.ping(n1.netns, str(router.gateway))
