"""Hidden nodes behind home routers (NAT), end to end: a real etcd, one agent per node, real
wireguard-go, routers that masquerade and drop unsolicited inbound traffic. Connectivity through
the aggregator, re-pointing by hand, automatic failover (a dead, a blackholed and a flapping
aggregator), hostile verdicts, and the Internet from behind NAT (own ndmz, or the egress NR over
the aggregator)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from datetime import datetime, timedelta, timezone

import pytest
from meshlib import network_manifest, wait_until, workload_manifest

from controller.sim.world import metric_total, netns_exec

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
        # n2, the second candidate, holds the hidden NRs as standby peers, with no subnet.
        assert set(peers) == {"n1", "n2", "n3", *(HIDDEN if n == "n2" else ())} - {n}
        assert all(not peers[h].allowed_ips for h in HIDDEN if h in peers)
        assert {str(a) for a in peers["n1"].allowed_ips} == {SUBNETS["n1"], *(SUBNETS[h] for h in HIDDEN)}

    # Every NR publishes its probe verdicts once; probing goes on without rewriting them.
    verdict_keys = [f"/zmesh/v1/nodes/{n}/mesh/verdicts/blue" for n in SUBNETS if n != "n1"]
    wait_until(lambda: all(mesh.etcd_json(k) for k in verdict_keys), 20, what="verdicts published")
    revisions = {k: mesh.mod_revision(k) for k in verdict_keys}
    probes = {n: mesh.metric_sum(n, "zmesh_probes_total", outcome="ok") for n in SUBNETS}
    wait_until(lambda: all(mesh.metric_sum(n, "zmesh_probes_total", outcome="ok") >= probes[n] + 5
                           for n in SUBNETS if n != "n1"), 30, what="five more probes on every prober")
    assert {k: mesh.mod_revision(k) for k in verdict_keys} == revisions
    assert all(v["state"] == "Forwarding" for k in verdict_keys for v in mesh.etcd_json(k)["verdicts"])

    # Hidden-to-hidden traffic crosses the aggregator: its counters for both ends grow.
    before = await peers_by_node(mesh, "n1")
    assert mesh.ping(mesh.workload_ns("w-h1"), ip_of("h3"), count=5)
    after = await peers_by_node(mesh, "n1")
    for h in ("h1", "h3"):
        assert after[h].rx_bytes > before[h].rx_bytes and after[h].tx_bytes > before[h].tx_bytes


async def test_a_hidden_node_dialling_before_its_aggregator_knows_it_dials_again_without_waiting_5_s(mesh):
    # WireGuard answers an initiation from an unknown key with silence and retries only after
    # 5 s; the agent dials afresh every second for those 5 s (docs/agent.md, "First handshake").
    mesh.start("n1")
    mesh.start_hidden("r1", "h1")
    w_n1 = workload_manifest("w-n1", "blue", "n1", mesh.add_workload_ns("w-n1"), ip_of("n1"))
    mesh.apply(network_manifest("blue", {"n1": SUBNETS["n1"]}, aggregators=["n1"]) + w_n1)
    wait_until(lambda: mesh.etcd_json("/zmesh/v1/nodes/n1/mesh/facts/blue"), 20, what="n1's facts")
    # n1's agent paused (its NR goes on forwarding): nobody configures h1 on n1 meanwhile.
    n1_agent = mesh.world.nodes["n1"].agent.pid
    os.kill(n1_agent, signal.SIGSTOP)
    try:
        mesh.apply(network_manifest("blue", {n: SUBNETS[n] for n in ("n1", "h1")}, aggregators=["n1"])
                   + w_n1 + workload_manifest("w-h1", "blue", "h1", mesh.add_workload_ns("w-h1"), ip_of("h1")))
        wait_until(lambda: mesh.metric_sum("h1", "zmesh_wireguard_redials_total") > 0, 20,
                   what="h1 dialling n1 afresh")
        (peer,) = (await peers_by_node(mesh, "h1")).values()
        assert peer.last_handshake == 0  # unanswered indeed
    finally:
        os.kill(n1_agent, signal.SIGCONT)
    mesh.wait_mesh({"w-n1": ip_of("n1"), "w-h1": ip_of("h1")}, timeout=30)
    assert (await peers_by_node(mesh, "h1"))["n1"].last_handshake > 0

    # Answered: no more fresh dials, however often h1 looks again.
    redials = mesh.metric_sum("h1", "zmesh_wireguard_redials_total")
    reconciles = mesh.metric_sum("h1", "zmesh_reconcile_total", network="blue")
    wait_until(lambda: mesh.metric_sum("h1", "zmesh_reconcile_total", network="blue") >= reconciles + 2, 30,
               what="two more reconciles of h1")
    assert mesh.metric_sum("h1", "zmesh_wireguard_redials_total") == redials


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


# --- re-pointing and failover -------------------------------------------------------------------

def hidden_workloads() -> dict[str, str]:
    return {f"w-{h}": ip_of(h) for h in HIDDEN}


def reachable_from_hidden(mesh, targets, hidden=HIDDEN) -> bool:
    """Every hidden workload reaches every workload of `targets` (nodes) and each other."""
    wanted = [ip_of(n) for n in (*targets, *hidden)]
    return all(mesh.ping(mesh.workload_ns(f"w-{h}"), ip) for h in hidden for ip in wanted if ip != ip_of(h))


def blackhole_wireguard(mesh, node: str) -> None:
    """A foreign table in the node's host namespace drops its WireGuard UDP both ways (its agent
    and its etcd connection, on loopback outside that namespace, are untouched)."""
    port = mesh.wg_listen_port(node, "blue")
    subprocess.run(["ip", "netns", "exec", mesh.world.nodes[node].netns, "nft", "-f", "-"], check=True,
                   text=True, input=f"""
table inet zmtest-blackhole {{
  chain input {{ type filter hook input priority -10; udp dport {port} drop; }}
  chain output {{ type filter hook output priority -10; udp sport {port} drop; }}
}}""")


def wait_failover(mesh, deciders, new: str, reach, timeout: float = 40) -> float:
    """Wait until every node of `deciders` publishes `new` as aggregator and the hidden workloads
    reach the workloads of the public nodes `reach` and each other; returns the seconds it took."""
    started = time.monotonic()
    wait_until(lambda: mesh.aggregator_everywhere("blue", deciders) == {new}, timeout,
               interval=0.2, what=f"every node choosing {new}")
    wait_until(lambda: reachable_from_hidden(mesh, reach), timeout,
               interval=0.2, what="hidden workloads reaching everyone again")
    return time.monotonic() - started


def aggregator_changes(mesh, nodes) -> dict[str, tuple[float, float]]:
    """Each node's (changes, failovers) of blue's aggregator so far."""
    return {n: (mesh.metric_sum(n, "zmesh_aggregator_changes_total", network="blue"),
                mesh.metric_sum(n, "zmesh_aggregator_failovers_total", network="blue")) for n in nodes}


def assert_the_operator_sees_the_failover(mesh, nodes, old: str, new: str, changes_before: dict,
                                          since: datetime) -> None:
    """What an operator sees on every node of `nodes` once it failed over from `old` to `new`:
    its metrics name `new` (and no longer `old`) and count exactly one change, its NR status says
    why and when it switched, and `zmesh describe network` shows its AggregatorChanged event
    with the reason."""
    for n in nodes:
        text = mesh.metrics_text(n)
        assert metric_total(text, "zmesh_aggregator_info", network="blue", aggregator=new) == 1, n
        assert metric_total(text, "zmesh_aggregator_info", network="blue", aggregator=old) == 0, n
        changes, failovers = changes_before[n]
        assert metric_total(text, "zmesh_aggregator_changes_total", network="blue") == changes + 1, n
        assert metric_total(text, "zmesh_aggregator_failovers_total", network="blue") == failovers + 1, n
        status = mesh.aggregator_status(n, "blue")
        assert status["reason"] == "FailedOver", (n, status)
        # lastSwitchTime is to the second
        assert datetime.fromisoformat(status["lastSwitchTime"]) >= since - timedelta(seconds=1), (n, status)

    wanted = f"aggregator is now {new} (was {old}): FailedOver: {new}, because {old} is not"

    def recorded():  # the changes seen since the failure (the start may have had its own)
        out = mesh.zmesh("describe", "network", "blue").stdout
        lines = [x for x in out[out.index("Events:"):].splitlines() if "AggregatorChanged" in x
                 and x.split()[1] in nodes and datetime.fromisoformat(x.split()[0]) >= since - timedelta(seconds=1)]
        return lines if {x.split()[1] for x in lines if wanted in x} >= set(nodes) else None
    lines = wait_until(recorded, 20, what=f"an AggregatorChanged event with its reason from each of {nodes}")
    assert all(wanted in x for x in lines), lines


async def test_changing_aggregators_by_hand_repoints_everything_and_leaves_nothing_stale(mesh):
    hidden_world(mesh)
    mesh.wait_mesh(hidden_workloads(), timeout=40)
    wait_until(lambda: mesh.aggregator_everywhere("blue", SUBNETS) == {"n1"}, 20, what="n1 everywhere")
    switches = {n: mesh.aggregator_status(n, "blue")["switches"] for n in SUBNETS}

    manifest = network_manifest("blue", SUBNETS, aggregators=["n2", "n1"])
    mesh.apply(manifest)
    took = wait_failover(mesh, SUBNETS, "n2", reach=PUBLIC)
    print(f"re-pointed in {took:.1f} s")
    for h in HIDDEN:
        assert list(await peers_by_node(mesh, h)) == ["n2"]
    # Nothing stale on the old aggregator: no hidden subnet on any of its peers and no route but
    # the other NRs' subnets; as the second candidate it keeps the hidden NRs as standby peers
    # without AllowedIPs (ready for a failover back).
    old = await peers_by_node(mesh, "n1")
    assert set(old) == {"n2", "n3", *HIDDEN}
    assert {str(a) for a in old["n2"].allowed_ips} == {SUBNETS["n2"], *(SUBNETS[h] for h in HIDDEN)}
    assert {str(a) for a in old["n3"].allowed_ips} == {SUBNETS["n3"]}
    assert all(not old[h].allowed_ips for h in HIDDEN)
    routes = mesh.routes_via(mesh.nr_netns("n1", "blue"), mesh.wg_ifname("n1", "blue"))
    assert routes == {SUBNETS[n] for n in SUBNETS if n != "n1"}
    n3 = await peers_by_node(mesh, "n3")
    assert {str(a) for a in n3["n1"].allowed_ips} == {SUBNETS["n1"]}
    new = await peers_by_node(mesh, "n2")
    assert set(new) == {"n1", "n3", *HIDDEN}
    assert {str(a) for h in HIDDEN for a in new[h].allowed_ips} == {SUBNETS[h] for h in HIDDEN}
    for n in SUBNETS:
        status = mesh.aggregator_status(n, "blue")
        assert status["reason"] == "Preferred" and status["switches"] == switches[n] + 1, status

    # No longer a candidate at all: n1 drops the standby peers too.
    mesh.apply(network_manifest("blue", SUBNETS, aggregators=["n2"]))

    async def n1_has_only_public_peers():
        return set(await peers_by_node(mesh, "n1")) == {"n2", "n3"}
    deadline = time.monotonic() + 20
    while not await n1_has_only_public_peers():
        assert time.monotonic() < deadline, "n1 still holds hidden peers"
        await asyncio.sleep(0.2)
    assert reachable_from_hidden(mesh, PUBLIC)


async def test_killing_the_aggregator_node_fails_over_automatically(mesh):
    hidden_world(mesh)
    mesh.wait_mesh(hidden_workloads(), timeout=40)
    wait_until(lambda: mesh.aggregator_everywhere("blue", SUBNETS) == {"n1"}, 20, what="n1 everywhere")
    survivors = [n for n in SUBNETS if n != "n1"]
    changes, since = aggregator_changes(mesh, survivors), datetime.now(timezone.utc)

    mesh.world.stop_agent("n1", sig=signal.SIGKILL)
    mesh.world.set_uplink("n1", False)
    took = wait_failover(mesh, survivors, "n2", reach=("n2", "n3"))
    print(f"failed over in {took:.1f} s")
    status = mesh.aggregator_status("n3", "blue")
    assert status["reason"] == "FailedOver" and "n1 is not" in status["message"], status
    for h in HIDDEN:
        assert list(await peers_by_node(mesh, h)) == ["n2"]
    # Its lease runs out too; the choice stays (and is not counted again).
    wait_until(lambda: "n1 is not alive" in mesh.aggregator_status("h1", "blue").get("message", ""), 30,
               what="n1's lease expired")
    assert mesh.aggregator_everywhere("blue", survivors) == {"n2"}
    assert_the_operator_sees_the_failover(mesh, survivors, "n1", "n2", changes, since)


async def test_an_aggregator_dropping_its_wireguard_traffic_is_failed_over(mesh):
    hidden_world(mesh)
    mesh.wait_mesh(hidden_workloads(), timeout=40)
    wait_until(lambda: mesh.aggregator_everywhere("blue", SUBNETS) == {"n1"}, 20, what="n1 everywhere")
    changes, since = aggregator_changes(mesh, SUBNETS), datetime.now(timezone.utc)

    blackhole_wireguard(mesh, "n1")
    # n1 itself agrees: it reads the same verdicts
    took = wait_failover(mesh, SUBNETS, "n2", reach=("n2", "n3"))
    print(f"failed over in {took:.1f} s")
    assert mesh.ready("n1"), "its agent is fine"
    status = mesh.aggregator_status("n1", "blue")
    assert status["reason"] == "FailedOver" and "n1 is not forwarding" in status["message"], status
    assert_the_operator_sees_the_failover(mesh, SUBNETS, "n1", "n2", changes, since)
    described = mesh.zmesh("describe", "network", "blue").stdout
    assert "Hidden nodes: h1, h2, h3" in described
    assert "Aggregator:   n2 (FailedOver): n2, because n1 is not forwarding" in described
    assert "not yet followed by" not in described


async def test_a_flapping_aggregator_link_does_not_make_the_choice_flap(mesh):
    hold_down = 6  # seconds; longer than each up period of the flapping link below
    mesh.world.agent_args = ["--probe-hold-down", str(hold_down)]
    hidden_world(mesh)
    mesh.wait_mesh(hidden_workloads(), timeout=40)
    wait_until(lambda: mesh.aggregator_everywhere("blue", SUBNETS) == {"n1"}, 20, what="n1 everywhere")
    before = {n: mesh.aggregator_status(n, "blue")["switches"] for n in SUBNETS}

    seen = []  # what every node published, sampled while the link flaps
    for _ in range(3):  # down 4 s (long enough to be failed over), up 2 s (shorter than the hold-down)
        for up, seconds in ((False, 4), (True, 2)):
            mesh.world.set_uplink("n1", up)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                seen.append({n: mesh.aggregator_status(n, "blue").get("node") for n in SUBNETS})
                time.sleep(0.25)
    during = {n: mesh.aggregator_status(n, "blue")["switches"] - before[n] for n in SUBNETS}
    assert any(s["h1"] == "n2" for s in seen), "the failure was noticed: a failover to n2"
    for n in SUBNETS:
        choices = [s[n] for s in seen]
        changes = sum(a != b for a, b in zip(choices, choices[1:]))
        assert changes <= 1 and during[n] <= 1, f"{n} flapped: {choices}"
        assert choices[-1] == "n2", f"{n} went back to n1 while its link still flapped: {choices}"

    # Once the link stays up, the choice moves back to the preferred aggregator, once.
    wait_until(lambda: mesh.aggregator_everywhere("blue", SUBNETS) == {"n1"}, hold_down + 30,
               interval=0.5, what="the move back to n1 after the hold-down")
    assert all(mesh.aggregator_status(n, "blue")["switches"] - before[n] == 2 for n in SUBNETS)
    wait_until(lambda: reachable_from_hidden(mesh, PUBLIC), 20, interval=0.2, what="hidden traffic back")


# --- hostile verdicts -----------------------------------------------------------------------------

def verdicts_corpus(good: dict) -> dict[str, str]:
    def verdicts(items, **change):
        return json.dumps({**good, "verdicts": items, **change})
    one = {"node": "n1", "state": "Failing", "since": "2026-01-01T00:00:00Z"}
    return {
        "a verdict on itself": verdicts([{**one, "node": "n2"}]),
        "twice the same node": verdicts([one, one]),
        "an unknown state": verdicts([{**one, "state": "Dead"}]),
        "a state with a newline": verdicts([{**one, "state": "Failing\nForwarding"}]),
        "no time": verdicts([{"node": "n1", "state": "Failing"}]),
        "a bad node name": verdicts([{**one, "node": "N1/../x"}]),
        "too many": verdicts([{**one, "node": f"x{i}"} for i in range(65)]),
        "another node's name": verdicts([one], node="n3"),
        "another network's name": verdicts([one], network="red"),
        "an unknown field": verdicts([one], blame="n1"),
        "not JSON": "{{{ not json",
        "a megabyte": verdicts([one], network="b" * 1_000_000),
    }


async def test_hostile_verdicts_are_reported_and_one_liar_cannot_move_the_aggregator(mesh):
    mesh.start("n1", "n2", "n3")
    mesh.start_hidden("r1", "h1")
    nodes = ("n1", "n2", "n3", "h1")
    manifest = network_manifest("blue", {n: SUBNETS[n] for n in nodes}, aggregators=["n1", "n2"])
    for n in nodes:
        manifest += workload_manifest(f"w-{n}", "blue", n, mesh.add_workload_ns(f"w-{n}"), ip_of(n))
    mesh.apply(manifest)
    mesh.wait_mesh({f"w-{n}": ip_of(n) for n in nodes}, timeout=40)
    key = "/zmesh/v1/nodes/n2/mesh/verdicts/blue"
    wait_until(lambda: mesh.etcd_json(key), 20, what="n2's verdicts")
    good = mesh.etcd_json(key)
    # The forger owns n2's keys from here: its agent stops (its dataplane stays), and n2's
    # liveness key is held by a lease of ours, so n2 still counts as alive.
    mesh.world.stop_agent("n2")
    lease = mesh.etcdctl("lease", "grant", "300").stdout.split()[1]
    mesh.etcdctl("put", "--lease", lease, "/zmesh/v1/nodes/n2/mesh/alive", '{"since": "2026-01-01T00:00:00Z"}')

    def degraded(node: str) -> str:
        st = mesh.nr_status(node, "blue") or {}
        return " ".join(c["message"] for c in st.get("conditions", []) if c["type"] == "Degraded")

    for case, value in verdicts_corpus(good).items():
        mesh.etcdctl("put", key, "--", value) if len(value) < 100_000 else mesh.etcdctl("put", key, input=value)
        wait_until(lambda: all("node 'n2' published invalid probe verdicts" in degraded(n) for n in ("n1", "h1")),
                   20, what=f"the bad verdicts ({case}) reported")
        assert mesh.aggregator_everywhere("blue", ("n1", "n3", "h1")) == {"n1"}, case
        mesh.etcdctl("put", key, "--", json.dumps(good))
        wait_until(lambda: "invalid probe verdicts" not in degraded("n1"), 20, what=f"no report after {case}")

    # Valid, but lies: n2 says every candidate's tunnel fails. One node's word is one failed
    # tunnel each, against the working ones the others report: nobody is blamed.
    lie = {**good, "verdicts": [{"node": n, "state": "Failing", "since": "2026-01-01T00:00:00Z"} for n in ("n1", "n3")]}
    readers = ("n1", "n3", "h1")
    reconciles = {n: mesh.metric_sum(n, "zmesh_reconcile_total", network="blue") for n in readers}
    mesh.etcdctl("put", key, "--", json.dumps(lie))
    wait_until(lambda: all(mesh.metric_sum(n, "zmesh_reconcile_total", network="blue") > reconciles[n]
                           and mesh.metric_sum(n, "zmesh_etcd_revision_lag") == 0 for n in readers),
               20, what="the lie read and reconciled by n1, n3 and h1")
    for n in ("n1", "n3", "h1"):
        status = mesh.aggregator_status(n, "blue")
        assert (status["node"], status["reason"]) == ("n1", "Preferred"), status
    assert reachable_from_hidden(mesh, ("n1", "n3"), hidden=("h1",))
    for n in ("n1", "n3", "h1"):
        assert mesh.ready(n) and "Traceback" not in mesh.world.agent_log(n)
    mesh.etcdctl("lease", "revoke", lease)


# --- the Internet from behind NAT -------------------------------------------------------------------

async def test_hidden_workloads_reach_the_internet_through_their_ndmz_or_the_egress_over_the_aggregator(mesh):
    mesh.start("n1", "n2")
    mesh.start_hidden("r1", "h1")
    nodes = ("n1", "n2", "h1")
    workloads = "".join(workload_manifest(f"w-{n}", "blue", n, mesh.add_workload_ns(f"w-{n}"), ip_of(n))
                        for n in nodes)
    subnets = {n: SUBNETS[n] for n in nodes}
    mesh.apply(network_manifest("blue", subnets, aggregators=["n1"]) + workloads)
    mesh.wait_mesh({f"w-{n}": ip_of(n) for n in nodes}, timeout=40)
    router = str(mesh.world.routers["r1"].wan)

    def seen_from_hidden():
        answer = mesh.world.http_get(mesh.workload_ns("w-h1"))
        return answer.split()[1] if answer else None

    # Without an egress NR: out through h1's own ndmz, then its home router's NAT.
    wait_until(lambda: seen_from_hidden() == router, 20, what="w-h1 out as its router")

    # With egress n2: out through the aggregator n1 to n2, and from there as n2.
    mesh.apply(network_manifest("blue", subnets, aggregators=["n1"], egress="n2"))
    n2 = str(mesh.world.nodes["n2"].ipv4)
    wait_until(lambda: seen_from_hidden() == n2, 20, what="w-h1 out as the egress node n2")
    (peer,) = (await peers_by_node(mesh, "h1")).values()
    assert {str(a) for a in peer.allowed_ips} == {"0.0.0.0/0", "10.1.0.0/16"}
    before = await peers_by_node(mesh, "n1")
    assert seen_from_hidden() == n2
    after = await peers_by_node(mesh, "n1")
    for relayed in ("h1", "n2"):  # the request crossed the aggregator's tunnels to both
        assert after[relayed].rx_bytes > before[relayed].rx_bytes
        assert after[relayed].tx_bytes > before[relayed].tx_bytes
    assert mesh.world.internet_host_seen().count(router) >= 1 and not any(
        a.startswith(("10.", "100.64.", "192.168.")) for a in mesh.world.internet_host_seen())
