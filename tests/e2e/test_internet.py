"""Internet access for every NR, end to end: the ndmz, NAT, the diode firewall in nftables, the
egress NR and dual-NIC nodes, on a simulated world with real agents, namespaces, nftables,
wireguard-go and etcd (tests/e2e/conftest.py)."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from internetlib import (
    PORT, answered, drops, host_table, leg_address, ndmz_ns, ping_from, public_address, seen_from,
)
from meshlib import RESYNC, network_manifest, wait_until, workload_manifest

from controller.planner import names
from controller.sim.world import INTERNET_HOST, netns_exec, run_ip_batch

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.etcd]

SUBNETS = {"n1": "10.1.1.0/24", "n2": "10.1.2.0/24", "n3": "10.1.3.0/24"}
IPS = {"w1": "10.1.1.10", "w2": "10.1.2.10", "w3": "10.1.3.10"}
NODE_OF = {"w1": "n1", "w2": "n2", "w3": "n3"}


def build(mesh) -> dict[str, str]:
    """Network blue on n1 and n2 with workloads w1, w2, converged; returns {workload: ip}."""
    wls = {w: IPS[w] for w in ("w1", "w2")}
    manifest = network_manifest("blue", {n: SUBNETS[n] for n in ("n1", "n2")})
    for w in wls:
        manifest += workload_manifest(w, "blue", NODE_OF[w], mesh.add_workload_ns(w), wls[w])
    mesh.apply(manifest)
    mesh.wait_mesh(wls)
    return wls


async def test_every_workload_reaches_the_internet_as_its_node(mesh):
    mesh.start("n1", "n2")
    wls = build(mesh)
    for w in wls:
        wait_until(lambda: mesh.ping(mesh.workload_ns(w), str(INTERNET_HOST)), 20,
                   what=f"{w} pings the Internet host")
        assert seen_from(mesh, w) == public_address(mesh, NODE_OF[w])
    seen = set(mesh.world.internet_host_seen())
    assert seen == {public_address(mesh, n) for n in ("n1", "n2")}
    assert not any(a.startswith(("10.", "100.64.")) for a in seen)


# --- helpers: listeners that record what reaches them, probes, nftables counters ---------------

LISTENER = r"""
import socket, sys, threading
port, log = int(sys.argv[1]), open(sys.argv[2], "a", buffering=1)
tcp = socket.socket(); tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("0.0.0.0", port)); tcp.listen(16)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.bind(("0.0.0.0", port))
def accept():
    while True:
        c, a = tcp.accept(); log.write(f"tcp {a[0]}\n"); c.close()
threading.Thread(target=accept, daemon=True).start()
print("ready", flush=True)
while True:
    d, a = udp.recvfrom(100); log.write(f"udp {a[0]}\n")
"""

class Listeners:
    """TCP and UDP listeners on PORT in some namespaces, each recording every source that
    reached it; stopped by their PIDs."""

    def __init__(self, mesh):
        self.mesh, self.procs, self.logs = mesh, [], {}

    def start(self, netns: str) -> None:
        log = self.mesh.world.workdir / f"listener-{netns}.log"
        log.touch()
        proc = subprocess.Popen(["ip", "netns", "exec", netns, self.mesh.world.python, "-c", LISTENER,
                                 str(PORT), str(log)], stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        assert proc.stdout.readline().strip() == "ready"
        self.logs[netns] = log

    def heard(self, netns: str) -> list[str]:
        return self.logs[netns].read_text().split("\n")[:-1]

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
            proc.stdout.close()


async def test_from_the_internet_nothing_opens_a_connection_inward_while_replies_come_back(mesh):
    mesh.start("n1", "n2")
    build(mesh)
    w, n1 = mesh.world, mesh.world.nodes["n1"]
    host, nr, ndmz, wl = n1.netns, mesh.nr_netns("n1", "blue"), ndmz_ns(mesh, "n1"), mesh.workload_ns("w1")
    leg = leg_address(mesh, "n1", "blue")
    # A hostile upstream routes the overlay and CGNAT ranges to n1, and every hop inside n1 has
    # routes inward too, so each firewall layer is what stops a packet, not a missing route.
    run_ip_batch(w.inet, [f"route add 10.0.0.0/8 via {n1.ipv4}", f"route add 100.64.0.0/10 via {n1.ipv4}"])
    run_ip_batch(host, ["route add 10.1.1.0/24 via 100.127.255.254", "route add 100.64.0.0/16 via 100.127.255.254"])
    run_ip_batch(ndmz, [f"route add 10.1.1.0/24 via {leg}"])
    listeners = Listeners(mesh)
    try:
        for ns in (wl, nr, ndmz, host):
            listeners.start(ns)
            assert answered(ns, ["127.0.0.1"], w.python) == {"tcp 127.0.0.1", "icmp 127.0.0.1"}  # they work
        inside = ["10.1.1.10", "10.1.1.1", leg]  # the workload, the NR's gateway and its public leg
        ndmz_addresses = ["100.64.0.1", "100.127.255.254"]
        layers = [  # (from, targets, the namespace whose diode must count the drops)
            (w.ihost, inside + ndmz_addresses + ["100.127.255.253"], host),
            (host, inside + ndmz_addresses, ndmz),
            (ndmz, inside, nr),
        ]
        for src, targets, guard in layers:
            table = host_table(mesh, "n1") if guard == host else "zmesh"
            before = drops(guard, table)
            assert answered(src, targets, w.python) == set(), f"from {src}"
            assert drops(guard, table) > before, f"{guard}'s diode saw the probes from {src}"
        heard = {ns: [line for line in listeners.heard(ns) if "127.0.0.1" not in line]
                 for ns in (wl, nr, ndmz, host)}
        assert heard == {wl: [], nr: [], ndmz: [], host: []}
        # Replies to what the workload opens do come back, through every layer.
        assert mesh.ping(wl, str(INTERNET_HOST)) and seen_from(mesh, "w1") == str(n1.ipv4)
    finally:
        listeners.stop()


async def test_networks_with_the_same_subnet_on_one_node_cannot_reach_each_other_through_the_ndmz(mesh):
    mesh.start("n1")
    subnet = {"n1": SUBNETS["n1"]}
    manifest = network_manifest("red", subnet) + "---\n" + network_manifest("blue", subnet)
    manifest += workload_manifest("r1", "red", "n1", mesh.add_workload_ns("r1"), "10.1.1.10")
    manifest += workload_manifest("b1", "blue", "n1", mesh.add_workload_ns("b1"), "10.1.1.20")
    mesh.apply(manifest)
    red_nr, blue_nr, ndmz = mesh.nr_netns("n1", "red"), mesh.nr_netns("n1", "blue"), ndmz_ns(mesh, "n1")
    for w in ("r1", "b1"):
        wait_until(lambda: seen_from(mesh, w) == public_address(mesh, "n1"), 20, what=f"{w} on the Internet")
    red_leg, blue_leg = leg_address(mesh, "n1", "red"), leg_address(mesh, "n1", "blue")
    assert red_leg != blue_leg
    python = mesh.world.python

    # A workload reaches neither the other network's public leg nor anything else in the ndmz.
    before = drops(red_nr, comment="ndmz range")
    assert answered(mesh.workload_ns("r1"), [blue_leg, red_leg, "100.64.0.1"], python) == set()
    assert drops(red_nr, comment="ndmz range") > before
    # An NR itself reaches the ndmz gateway (that is its way out) but no other NR's leg: the
    # bridge ports are isolated ...
    assert answered(red_nr, ["100.64.0.1"], python) == {"icmp 100.64.0.1"}
    assert answered(red_nr, [blue_leg], python) == set()
    assert answered(blue_nr, [red_leg], python) == set()
    # ... nor through the gateway (a route added by hand in red's NR, as if it were compromised),
    run_ip_batch(red_nr, [f"route add {blue_leg}/32 via 100.64.0.1 dev public",
                          "route add 10.1.1.20/32 via 100.64.0.1 dev public"])
    before = drops(ndmz, comment="each other")
    assert answered(red_nr, [blue_leg, "10.1.1.20"], python) == set()
    assert drops(ndmz, comment="each other") > before
    # ... nor the ndmz's other addresses or the node's own.
    node = public_address(mesh, "n1")
    assert answered(red_nr, ["100.127.255.254", "100.127.255.253", node], python) == set()
    # The hand-made routes are ours to remove: gone within one resync.
    wait_until(lambda: "via 100.64.0.1" not in netns_exec(red_nr, "ip", "route", "show", blue_leg).stdout,
               RESYNC + 10, what="routes added by hand in red's NR removed")


async def test_a_spoofed_source_from_a_workload_is_dropped(mesh):
    mesh.start("n1", "n2")
    build(mesh)
    wl, nr = mesh.workload_ns("w1"), mesh.nr_netns("n1", "blue")
    # The workload takes addresses that are not its own, another node's and none of the
    # network's (on its lo: the agent keeps eth0's addresses as they should be), and sends
    # from them through eth0.
    run_ip_batch(wl, ["addr add 10.1.2.99/32 dev lo", "addr add 192.0.2.99/32 dev lo"])
    seen = len(mesh.world.internet_host_seen())
    for spoofed in ("10.1.2.99", "192.0.2.99"):
        before = drops(nr, comment="anti-spoofing")
        for target in (str(INTERNET_HOST), IPS["w2"], "10.1.1.1"):
            assert not ping_from(wl, spoofed, target), (spoofed, target)
        assert drops(nr, comment="anti-spoofing") > before
        assert mesh.world.http_get(wl, timeout=1, source=spoofed) is None
    assert len(mesh.world.internet_host_seen()) == seen  # nothing arrived from the spoofed sources
    # Its own address still works.
    assert ping_from(wl, IPS["w1"], str(INTERNET_HOST)) and ping_from(wl, IPS["w1"], IPS["w2"])


def pinger(mesh, src: str, dst: str, count: int) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", mesh.workload_ns(src), "ping", "-n", "-q", "-c", str(count),
                             "-i", "0.05", "-W", "1", IPS[dst]], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


async def test_egress_sends_every_workload_out_as_the_egress_node_and_back_without_a_restart(mesh):
    mesh.start("n1", "n2", "n3")
    manifests = {egress: network_manifest("blue", SUBNETS, **({"egress": egress} if egress else {}))
                 for egress in (None, "n1")}
    workloads = "".join(workload_manifest(w, "blue", NODE_OF[w], mesh.add_workload_ns(w), ip)
                        for w, ip in IPS.items())
    mesh.apply(manifests[None] + workloads)
    mesh.wait_mesh(IPS)
    own = {w: public_address(mesh, NODE_OF[w]) for w in IPS}
    wait_until(lambda: {w: seen_from(mesh, w) for w in IPS} == own, 20, what="each workload out as its node")
    untouched = {n: (mesh.wg_pid(n, "blue"), mesh.netns_inode(mesh.nr_netns(n, "blue"))) for n in SUBNETS}

    # Mesh traffic flows all along: w2 -> w3 (neither is the egress) and w2 -> w1.
    pings = [pinger(mesh, "w2", "w3", 240), pinger(mesh, "w2", "w1", 240)]
    try:
        mesh.apply(manifests["n1"])
        n1 = public_address(mesh, "n1")
        wait_until(lambda: {w: seen_from(mesh, w) for w in IPS} == {w: n1 for w in IPS}, 20,
                   what="every workload out as the egress node n1")
        assert "default dev " + mesh.wg_ifname("n2", "blue") in netns_exec(
            mesh.nr_netns("n2", "blue"), "ip", "route", "show", "default").stdout
        assert mesh.ping(mesh.workload_ns("w3"), str(INTERNET_HOST))  # ICMP goes the same way

        mesh.apply(manifests[None])
        wait_until(lambda: {w: seen_from(mesh, w) for w in IPS} == own, 20, what="each workload out as its node again")
        outputs = [p.communicate(timeout=60)[0] for p in pings]
    finally:
        for p in pings:
            if p.poll() is None:
                p.kill()
                p.wait()
    for out in outputs:
        assert " 0% packet loss" in out, out
    assert {n: (mesh.wg_pid(n, "blue"), mesh.netns_inode(mesh.nr_netns(n, "blue"))) for n in SUBNETS} == untouched
    assert not set(mesh.world.internet_host_seen()) - set(own.values())


INET_COUNTERS = """
table bridge zmtest {
  chain prerouting {
    type filter hook prerouting priority 0;
    iifname "%(up0)s" ip daddr %(host)s counter comment "up0"
    iifname "%(up1)s" ip daddr %(host)s counter comment "up1"
  }
}
"""


def inet_counts(mesh) -> dict[str, int]:
    out = netns_exec(mesh.world.inet, "nft", "-j", "list", "table", "bridge", "zmtest", check=True).stdout
    return {item["rule"]["comment"]: next(e["counter"]["packets"] for e in item["rule"]["expr"] if "counter" in e)
            for item in json.loads(out)["nftables"] if "rule" in item}


async def test_a_dual_nic_node_sends_nr_traffic_out_of_its_dedicated_nic_only(mesh):
    node = mesh.world.add_node("n1", dual_nic=True)
    mesh.world.start_agent("n1")
    mesh.start("n2")
    wait_until(lambda: mesh.ready("n1"), 30, what="n1 ready")
    build(mesh)
    w = mesh.world
    subprocess.run(["ip", "netns", "exec", w.inet, "nft", "-f", "-"], check=True, text=True, input=INET_COUNTERS % {
        "up0": f"{w.id}p{node.index}", "up1": f"{w.id}q{node.index}", "host": INTERNET_HOST})
    dedicated = str(node.ndmz_address.ip)
    wait_until(lambda: seen_from(mesh, "w1") == dedicated, 20, what="w1 out through the dedicated NIC")
    # The NIC is in the ndmz now, carrying the NRs' traffic; the host keeps its own uplink.
    assert "up1" in mesh.links(ndmz_ns(mesh, "n1")) and "up1" not in mesh.links(node.netns)
    assert mesh.world.http_get(node.netns).split()[1] == str(node.ipv4)

    before = inet_counts(mesh)
    assert mesh.ping(mesh.workload_ns("w1"), str(INTERNET_HOST), count=20)
    assert seen_from(mesh, "w1") == dedicated
    after = inet_counts(mesh)
    assert after["up1"] - before["up1"] >= 20 + 1  # the pings and the HTTP request's packets
    assert after["up0"] == before["up0"]  # not one NR packet to the Internet on the node's own NIC
    assert all(mesh.matrix({wl: IPS[wl] for wl in ("w1", "w2")}).values())  # the mesh runs on up0
    assert w.nodes["n1"].agent.poll() is None


FOREIGN = """
table inet foreign {
  chain forward { type filter hook forward priority 10; policy accept; counter; }
}
table ip foreignnat {
  chain post { type nat hook postrouting priority 110; policy accept; counter; }
}
"""


def nft_objects(netns: str, family: str, table: str) -> list[dict] | None:
    """The table as nft lists it (handles included); None if it does not exist."""
    res = netns_exec(netns, "nft", "-j", "list", "table", family, table)
    return [o for o in json.loads(res.stdout)["nftables"] if "metainfo" not in o] if res.returncode == 0 else None


def uncounted(objects: list[dict]) -> list[dict]:
    """nft objects with their handles, counters' values blanked (foreign rules count traffic)."""
    def clean(e):
        return {"counter": None} if isinstance(e, dict) and "counter" in e else e
    return [{k: ({**v, "expr": [clean(e) for e in v["expr"]]} if k == "rule" else v) for k, v in o.items()}
            for o in objects]


def nft_writes(mesh, node: str) -> float:
    return mesh.metric_sum(node, "zmesh_dataplane_writes_total", kind="nftables")


def settled(mesh, nodes) -> dict[str, float]:
    """Wait until no agent of `nodes` writes any nftables table for two resyncs; the counts."""
    last = {}

    def still():
        nonlocal last
        now = {n: nft_writes(mesh, n) for n in nodes}
        same, last = now == last, now
        return same
    wait_until(still, 30, interval=RESYNC * 2, what="nftables writes settled")
    return last


async def test_hand_made_changes_are_restored_within_one_resync_and_foreign_tables_are_left_alone(mesh):
    mesh.start("n1", "n2")
    build(mesh)
    n1 = mesh.world.nodes["n1"]
    host, nr, ndmz = n1.netns, mesh.nr_netns("n1", "blue"), ndmz_ns(mesh, "n1")
    for ns in (host, nr, ndmz):
        subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=FOREIGN, text=True, check=True)
    def foreign_tables():
        return {ns: [uncounted(nft_objects(ns, *t)) for t in (("inet", "foreign"), ("ip", "foreignnat"))]
                for ns in (host, nr, ndmz)}
    foreign = foreign_tables()
    wait_until(lambda: all(seen_from(mesh, w) for w in ("w1", "w2")), 20, what="both workloads online")
    writes = settled(mesh, ("n1", "n2"))
    want = {ns: nft_objects(ns, "inet", t) for ns, t in ((host, host_table(mesh, "n1")), (nr, "zmesh"),
                                                          (ndmz, "zmesh"))}
    # Without handles and counter values (the counters count the workloads' traffic, and a
    # restored table counts from zero).
    strip = lambda objs: objs and [json.dumps({k: {f: v for f, v in o[k].items() if f != "handle"}
                                               for k in o}, sort_keys=True) for o in uncounted(objs)]  # noqa: E731
    port = names.ndmz_port("blue")

    # By hand, all at once: a rule, a chain, a whole table, a route, an address, a port flag,
    # the ndmz's default route, and another node's whole public leg.
    first_rule = next(o["rule"]["handle"] for o in want[nr] if "rule" in o)
    netns_exec(nr, "nft", "delete", "rule", "inet", "zmesh", "prerouting", "handle", str(first_rule), check=True)
    netns_exec(ndmz, "nft", "flush", "chain", "inet", "zmesh", "forward", check=True)
    netns_exec(host, "nft", "delete", "table", "inet", host_table(mesh, "n1"), check=True)
    run_ip_batch(nr, ["route del default", "addr flush dev public"])
    run_ip_batch(ndmz, [f"link set {port} type bridge_slave isolated off", "route del default"])
    run_ip_batch(mesh.nr_netns("n2", "blue"), ["link del public"])

    def restored():
        tables = all(strip(nft_objects(ns, "inet", t)) == strip(want[ns]) for ns, t in (
            (host, host_table(mesh, "n1")), (nr, "zmesh"), (ndmz, "zmesh")))
        isolated = "isolated on" in netns_exec(ndmz, "ip", "-d", "link", "show", port).stdout
        routes = all("default via" in netns_exec(ns, "ip", "route", "show", "default").stdout
                     for ns in (nr, ndmz, mesh.nr_netns("n2", "blue")))
        return tables and isolated and routes
    wait_until(restored, RESYNC + 10, interval=0.2, what="every hand-made change undone")
    for w in ("w1", "w2"):
        assert seen_from(mesh, w) == public_address(mesh, NODE_OF[w])
    # One transaction per broken table (NR, ndmz, host on n1), none on n2 (only a link was lost).
    after = settled(mesh, ("n1", "n2"))
    assert after == {"n1": writes["n1"] + 3, "n2": writes["n2"]}
    assert foreign_tables() == foreign  # the same objects, with the same handles


async def test_a_converged_node_rewrites_no_ruleset_not_even_after_a_restart(mesh):
    mesh.start("n1", "n2")
    build(mesh)
    n1 = mesh.world.nodes["n1"]
    tables = {(n1.netns, host_table(mesh, "n1")), (mesh.nr_netns("n1", "blue"), "zmesh"),
              (ndmz_ns(mesh, "n1"), "zmesh")}
    settled(mesh, ("n1",))
    before = {t: nft_objects(*t[:1], "inet", t[1]) for t in tables}
    writes = nft_writes(mesh, "n1")
    converged = mesh.metric_sum("n1", "zmesh_reconcile_total", network="blue", result="converged")
    time.sleep(RESYNC * 3)
    assert nft_writes(mesh, "n1") == writes
    assert mesh.metric_sum("n1", "zmesh_reconcile_total", network="blue", result="converged") >= converged + 2
    assert mesh.world.stop_agent("n1") == 0
    mesh.world.start_agent("n1")
    wait_until(lambda: mesh.ready("n1"), 30, what="n1 ready again")
    time.sleep(RESYNC * 2)
    assert nft_writes(mesh, "n1") == 0  # the new agent found every table as planned
    assert {t: nft_objects(*t[:1], "inet", t[1]) for t in tables} == before  # same handles
