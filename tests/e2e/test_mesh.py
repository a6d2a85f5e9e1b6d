"""The mesh, end to end: `zmesh apply` -> agents -> namespaces, wireguard-go, routes -> packets.

Every test runs a fresh simulated world (tests/e2e/conftest.py) against a real etcd."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import time

import pytest
from meshlib import RESYNC, network_manifest, wait_until, workload_manifest

from controller.models.manifest import split_documents
from controller.sim.world import netns_exec

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.etcd]

SUBNETS = {"n1": "10.1.1.0/24", "n2": "10.1.2.0/24", "n3": "10.1.3.0/24"}
IPS = {"w1": "10.1.1.10", "w2": "10.1.2.10", "w3": "10.1.3.10"}
NODE_OF = {"w1": "n1", "w2": "n2", "w3": "n3"}


def three_node_network(mesh, name: str = "blue") -> str:
    manifest = network_manifest(name, SUBNETS)
    for w, node in NODE_OF.items():
        manifest += workload_manifest(w, name, node, mesh.add_workload_ns(w), IPS[w])
    return manifest


def two_node_mesh(mesh) -> dict[str, str]:
    """Nodes n1, n2 in network blue with workloads w1, w2, converged; returns {workload: ip}."""
    mesh.start("n1", "n2")
    two = {w: IPS[w] for w in ("w1", "w2")}
    manifest = network_manifest("blue", {"n1": SUBNETS["n1"], "n2": SUBNETS["n2"]})
    manifest += "".join(workload_manifest(w, "blue", NODE_OF[w], mesh.add_workload_ns(w), ip) for w, ip in two.items())
    mesh.apply(manifest)
    mesh.wait_mesh(two)
    return two


def underlay_counter(mesh) -> None:
    """Count, on the Internet bridge, packets whose inner addresses would leak and WireGuard UDP."""
    rules = """
table bridge zmtest {
  chain forward {
    type filter hook forward priority 0;
    ip saddr 10.0.0.0/8 counter comment "overlay-src"
    ip daddr 10.0.0.0/8 counter comment "overlay-dst"
    udp dport 51820-52819 counter comment "wireguard"
  }
}
"""
    subprocess.run(["ip", "netns", "exec", mesh.world.inet, "nft", "-f", "-"], input=rules,
                   text=True, check=True, capture_output=True)


def underlay_counts(mesh) -> dict[str, int]:
    out = netns_exec(mesh.world.inet, "nft", "-j", "list", "table", "bridge", "zmtest", check=True).stdout
    counts = {}
    for item in json.loads(out)["nftables"]:
        rule = item.get("rule")
        if rule:
            packets = next(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
            counts[rule["comment"]] = packets
    return counts


async def test_workloads_on_three_nodes_reach_each_other_only_through_wireguard(mesh):
    mesh.start("n1", "n2", "n3")
    underlay_counter(mesh)
    mesh.apply(three_node_network(mesh))

    mesh.wait_mesh(IPS, timeout=20)
    assert all(mesh.matrix(IPS).values())

    before = {n: await mesh.wg_device(n, "blue") for n in SUBNETS}
    assert mesh.ping(mesh.workload_ns("w1"), IPS["w2"], count=5)
    after = {n: await mesh.wg_device(n, "blue") for n in SUBNETS}
    # The ping crossed n1's and n2's WireGuard interfaces: their peer counters grew.
    for node, peer_node in (("n1", "n2"), ("n2", "n1")):
        peer_key = next(k for k, p in after[node].peers.items() if "10.1.%s.0/24" % peer_node[1] in
                        {str(a) for a in p.allowed_ips})
        assert after[node].peers[peer_key].tx_bytes > before[node].peers[peer_key].tx_bytes
        assert after[node].peers[peer_key].rx_bytes > before[node].peers[peer_key].rx_bytes
        assert after[node].peers[peer_key].last_handshake > 0

    counts = underlay_counts(mesh)
    assert counts["wireguard"] > 0, counts
    assert counts["overlay-src"] == 0 and counts["overlay-dst"] == 0, counts

    # Each NR peers with exactly the other two, at their public endpoint and listen port.
    for node in SUBNETS:
        device = after[node]
        assert len(device.peers) == 2
        assert all(p.endpoint and p.endpoint.startswith("198.51.100.") for p in device.peers.values())

    # Private keys stay on their node: in the state dir (0600), never in etcd, logs or metrics.
    private_keys = [k.read_text().strip() for n in SUBNETS
                    for k in (mesh.world.nodes[n].state_dir / "keys").iterdir()]
    assert len(private_keys) == 3 and all(len(k) == 44 for k in private_keys)
    everything_in_etcd = mesh.etcdctl("get", "--prefix", "").stdout
    assert "publicKey" in everything_in_etcd
    for n in SUBNETS:
        visible = everything_in_etcd + mesh.world.agent_log(n) + mesh.metrics_text(n)
        assert not any(k in visible for k in private_keys)


async def test_two_networks_with_the_same_ranges_work_and_cannot_reach_each_other(mesh):
    mesh.start("n1", "n2")
    subnets = {"n1": "10.1.1.0/24", "n2": "10.1.2.0/24"}
    manifest = network_manifest("red", subnets) + "---\n" + network_manifest("blue", subnets)
    red = {"r1": "10.1.1.10", "r2": "10.1.2.10"}
    blue = {"b1": "10.1.1.20", "b2": "10.1.2.20"}
    for w, ip in red.items():
        manifest += workload_manifest(w, "red", "n" + w[1], mesh.add_workload_ns(w), ip)
    for w, ip in blue.items():
        manifest += workload_manifest(w, "blue", "n" + w[1], mesh.add_workload_ns(w), ip)
    mesh.apply(manifest)

    mesh.wait_mesh(red)
    mesh.wait_mesh(blue)
    # Same subnets, same gateways, different namespaces: no path between the networks.
    assert not mesh.ping(mesh.workload_ns("r1"), blue["b2"])
    assert not mesh.ping(mesh.workload_ns("r1"), blue["b1"])
    assert not mesh.ping(mesh.workload_ns("b2"), red["r1"])
    assert mesh.wg_ifname("n1", "red") != mesh.wg_ifname("n1", "blue")
    # Two NRs on one node listen on two different ports of the node's range.
    ports = {(await mesh.wg_device("n1", net)).listen_port for net in ("red", "blue")}
    assert ports == {51820, 51821}


async def test_an_ipv6_only_node_meshes_with_dual_stack_nodes(mesh):
    mesh.start("n1", "n2")
    mesh.start("n3", ipv4=False, ipv6=True)
    mesh.apply(three_node_network(mesh))

    mesh.wait_mesh(IPS)
    n3 = await mesh.wg_device("n3", "blue")
    assert len(n3.peers) == 2
    assert all(p.endpoint.startswith("[2001:db8:100::") for p in n3.peers.values())
    n1 = await mesh.wg_device("n1", "blue")
    endpoints = sorted(p.endpoint for p in n1.peers.values())
    # n1 reaches n2 over IPv4 (preferred) and n3 over IPv6 (the only family they share).
    assert endpoints[0].startswith("198.51.100.12:") and endpoints[1].startswith("[2001:db8:100::13]:")


async def test_editing_a_network_converges_without_touching_unaffected_nrs(mesh):
    mesh.start("n1", "n2", "n3")
    ns = {w: mesh.add_workload_ns(w) for w in NODE_OF}
    two = {"n1": SUBNETS["n1"], "n2": SUBNETS["n2"]}
    base = "".join(workload_manifest(w, "blue", NODE_OF[w], ns[w], IPS[w]) for w in ("w1", "w2"))
    mesh.apply(network_manifest("blue", two) + base)
    mesh.wait_mesh({w: IPS[w] for w in ("w1", "w2")})
    untouched = {
        "pid": mesh.wg_pid("n1", "blue"),
        "netns": mesh.netns_inode(mesh.nr_netns("n1", "blue")),
        "links": mesh.links(mesh.nr_netns("n1", "blue")),
        "w1": mesh.links(ns["w1"]),
    }

    # Add a node (its workload gets an address allocated from its subnet).
    mesh.apply(network_manifest("blue", SUBNETS) + base + workload_manifest("w3", "blue", "n3", ns["w3"]))
    mesh.wait_mesh({"w1": IPS["w1"], "w2": IPS["w2"], "w3": "10.1.3.2"})

    # Change that node's subnet: its workload moves with it.
    moved = {**SUBNETS, "n3": "10.1.30.0/24"}
    mesh.apply(network_manifest("blue", moved) + base + workload_manifest("w3", "blue", "n3", ns["w3"]))
    mesh.wait_mesh({"w1": IPS["w1"], "w2": IPS["w2"], "w3": "10.1.30.2"})
    assert not mesh.ping(mesh.workload_ns("w1"), "10.1.3.2")

    # Remove a node: its NR and wireguard-go go away, the rest keeps working.
    n2_pid = mesh.wg_pid("n2", "blue")
    without_n2 = {"n1": SUBNETS["n1"], "n3": "10.1.30.0/24"}
    mesh.zmesh("delete", "workload", "w2")  # the CLI refuses to strand a workload on a removed node
    mesh.apply(network_manifest("blue", without_n2))
    wait_until(lambda: mesh.netns_inode(mesh.nr_netns("n2", "blue")) is None, 15, what="n2's NR removed")
    try:
        wait_until(lambda: not os.path.exists(f"/proc/{n2_pid}"), 10, what="n2's wireguard-go stopped")
    except AssertionError as e:
        raise AssertionError(f"{e}: {_proc_state(n2_pid)}; agent log: {mesh.world.agent_log('n2')[-2000:]}") from None
    mesh.wait_mesh({"w1": IPS["w1"], "w3": "10.1.30.2"})
    assert not mesh.ping(mesh.workload_ns("w1"), IPS["w2"])

    # n1's NR lived through all of it: same process, same namespace, same links.
    assert mesh.wg_pid("n1", "blue") == untouched["pid"]
    assert mesh.netns_inode(mesh.nr_netns("n1", "blue")) == untouched["netns"]
    assert mesh.links(mesh.nr_netns("n1", "blue")) == untouched["links"]
    assert mesh.links(ns["w1"]) == untouched["w1"]


async def test_deleting_a_network_removes_everything_it_created(mesh):
    mesh.start("n1", "n2", "n3")
    mesh.apply(three_node_network(mesh))
    mesh.wait_mesh(IPS)
    made = {n: (mesh.nr_netns(n, "blue"), mesh.wg_ifname(n, "blue"), mesh.wg_pid(n, "blue")) for n in SUBNETS}
    keys = {n: mesh.world.nodes[n].state_dir / "keys" / f"{made[n][1]}.key" for n in SUBNETS}
    assert all(k.exists() and (k.stat().st_mode & 0o777) == 0o600 for k in keys.values())

    mesh.zmesh("delete", "network", "blue")
    for w in NODE_OF:
        mesh.zmesh("delete", "workload", w)

    def leftovers():
        left = []
        for n, (netns, ifname, pid) in made.items():
            left += [f"{n}: netns {netns}"] if mesh.netns_inode(netns) is not None else []
            left += [f"{n}: process {pid} ({_proc_state(pid)})"] if os.path.exists(f"/proc/{pid}") else []
            left += [f"{n}: socket"] if os.path.exists(f"/var/run/wireguard/{ifname}.sock") else []
            left += [f"{n}: key"] if keys[n].exists() else []
        return left
    try:
        wait_until(lambda: not leftovers(), 20, what="every NR, wireguard-go process, socket and key removed")
    except AssertionError as e:
        raise AssertionError(f"{e}; left: {leftovers()}") from None
    # The workloads' namespaces are the containers': they stay, without our veth.
    for w in NODE_OF:
        assert mesh.netns_inode(mesh.workload_ns(w)) is not None
        wait_until(lambda: "eth0" not in mesh.links(mesh.workload_ns(w)), 10, what=f"{w}'s veth removed")
    # What the agents published about the network goes with it: only each node's own
    # registration and liveness stay, and the events that tell what happened (its removal
    # included; and the nodes' own, e.g. their agent starting), which expire with their lease.
    def published():
        kvs = json.loads(mesh.etcdctl("get", "--prefix", "-w", "json", "/zmesh/v1/nodes/").stdout).get("kvs", [])
        return {base64.b64decode(kv["key"]).decode(): kv for kv in kvs}

    def removals():
        return {json.loads(base64.b64decode(kv["value"]))["node"] for k, kv in published().items()
                if "/events/networks/blue/" in k and b'"Removed"' in base64.b64decode(kv["value"])}
    wait_until(lambda: removals() == set(SUBNETS), 10, what="a Removed event from every node")
    left = published()
    events = {k: kv for k, kv in left.items() if "/events/networks/blue/" in k or "/events/node/" in k}
    assert sorted(set(left) - set(events)) == sorted(
        f"/zmesh/v1/nodes/{n}/{k}" for n in SUBNETS for k in ("registration", "mesh/alive"))
    assert all(int(kv.get("lease", 0)) for kv in events.values())


async def test_agent_restart_changes_nothing_and_traffic_keeps_flowing(mesh):
    mesh.start("n1", "n2", "n3")
    mesh.apply(three_node_network(mesh))
    mesh.wait_mesh(IPS)
    time.sleep(RESYNC * 2)  # let every agent publish its final status
    snapshot = {n: (mesh.wg_pid(n, "blue"), mesh.netns_inode(mesh.nr_netns(n, "blue")),
                    mesh.links(mesh.nr_netns(n, "blue"))) for n in SUBNETS}
    status_revs = _published(mesh)

    # 60 pings at 50 ms from w1 to w2 while both ends' agents restart.
    pinger = subprocess.Popen(["ip", "netns", "exec", mesh.workload_ns("w1"), "ping", "-n", "-q",
                               "-c", "60", "-i", "0.05", "-W", "1", IPS["w2"]],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for node in ("n1", "n2"):
            assert mesh.world.stop_agent(node) == 0  # SIGTERM: a clean exit
            mesh.world.start_agent(node)
        for node in ("n1", "n2"):
            wait_until(lambda: mesh.ready(node), 30, what=f"{node} ready again")
        time.sleep(RESYNC * 2)
        out, _ = pinger.communicate(timeout=30)
    finally:
        if pinger.poll() is None:
            pinger.kill()
            pinger.wait()
    assert " 0% packet loss" in out, out

    for n in SUBNETS:
        assert (mesh.wg_pid(n, "blue"), mesh.netns_inode(mesh.nr_netns(n, "blue")),
                mesh.links(mesh.nr_netns(n, "blue"))) == snapshot[n]
    # Nor did the restarted agents rewrite their published facts or status.
    assert status_revs and _published(mesh) == status_revs


def _published(mesh) -> dict[str, int]:
    """mod_revision of every fact and status the agents published."""
    revs = _mod_revisions(mesh.etcdctl("get", "--prefix", "-w", "json", "/zmesh/v1/nodes/").stdout)
    return {k: r for k, r in revs.items() if "/status/" in k or "/mesh/facts/" in k}


def _proc_state(pid: int) -> str:
    """'state S ppid P' of a process, for failure messages."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return f"state {fields[0]} ppid {fields[1]}"
    except (OSError, IndexError):
        return "gone"


def _mod_revisions(etcdctl_json: str) -> dict[str, int]:
    return {base64.b64decode(kv["key"]).decode(): kv["mod_revision"]
            for kv in json.loads(etcdctl_json).get("kvs", [])}


async def test_a_converged_node_makes_no_writes_on_resync(mesh):
    two_node_mesh(mesh)
    time.sleep(RESYNC * 2)

    writes = {n: mesh.metric_sum(n, "zmesh_dataplane_writes_total") for n in ("n1", "n2")}
    converged = {n: mesh.metric_sum(n, "zmesh_reconcile_total", network="blue", result="converged")
                 for n in ("n1", "n2")}
    revision = json.loads(mesh.etcdctl("endpoint", "status", "-w", "json").stdout)[0]["Status"]["header"]["revision"]
    time.sleep(RESYNC * 3)

    for n in ("n1", "n2"):
        assert mesh.metric_sum(n, "zmesh_dataplane_writes_total") == writes[n]
        assert mesh.metric_sum(n, "zmesh_reconcile_total", network="blue", result="converged") >= converged[n] + 2
    assert json.loads(mesh.etcdctl("endpoint", "status", "-w", "json").stdout)[0]["Status"]["header"]["revision"] == revision


async def test_a_killed_wireguard_go_is_repaired_within_one_resync(mesh):
    two_node_mesh(mesh)
    pid = mesh.wg_pid("n2", "blue")
    port = (await mesh.wg_device("n2", "blue")).listen_port

    os.kill(pid, signal.SIGKILL)  # the PID the agent recorded for its own process
    # Nothing in etcd changed: only the periodic resync can notice (the margin is for slow CI).
    wait_until(lambda: mesh.wg_pid("n2", "blue") not in (None, pid), RESYNC + 10, what="a new wireguard-go")
    mesh.wait_mesh({w: IPS[w] for w in ("w1", "w2")}, timeout=RESYNC + 10)
    assert mesh.metric_sum("n2", "zmesh_wireguard_restarts_total") == 1
    assert (await mesh.wg_device("n2", "blue")).listen_port == port  # peers need not learn anything new


async def test_a_1400_byte_ping_with_df_set_crosses_the_mesh(mesh):
    two_node_mesh(mesh)

    assert mesh.ping(mesh.workload_ns("w1"), IPS["w2"], size=1400, dont_fragment=True, count=3)
    # The largest packet that fits the 1440-byte overlay MTU crosses too ...
    assert mesh.ping(mesh.workload_ns("w1"), IPS["w2"], size=1440 - 28, dont_fragment=True)
    # ... and one byte more is refused at once by the workload's own interface: no black hole.
    res = netns_exec(mesh.workload_ns("w1"), "ping", "-n", "-c", "1", "-W", "1", "-M", "do", "-s",
                     str(1440 - 28 + 1), IPS["w2"])
    assert res.returncode != 0 and "too long" in (res.stdout + res.stderr).lower(), res


async def test_a_malformed_spec_written_by_hand_hurts_no_other_network(mesh):
    mesh.start("n1", "n2")
    subnets = {"n1": "10.1.1.0/24", "n2": "10.1.2.0/24"}
    manifest = network_manifest("good", subnets) + "---\n" + network_manifest("later-bad", subnets)
    manifest += "".join(workload_manifest(w, "good", NODE_OF[w], mesh.add_workload_ns(w), IPS[w]) for w in ("w1", "w2"))
    mesh.apply(manifest)
    mesh.wait_mesh({w: IPS[w] for w in ("w1", "w2")})
    bad_nr = mesh.nr_netns("n1", "later-bad")
    wait_until(lambda: mesh.netns_inode(bad_nr) is not None, 10, what="later-bad's NR")
    bad_inode, bad_pid = mesh.netns_inode(bad_nr), mesh.wg_pid("n1", "later-bad")

    # Overwrite one network and one workload with garbage, as hand-edits with etcdctl would.
    mesh.etcdctl("put", "/zmesh/v1/networks/later-bad", '{"apiVersion": "zmesh.io/v1", "kind": "Network", oops')
    mesh.etcdctl("put", "/zmesh/v1/workloads/w2", '{"kind": "Workload", "spec": {"ip": "not-an-ip"}}')

    def reported(key):
        raw = mesh.etcdctl("get", "--print-value-only", key).stdout
        return raw and "InvalidSpec" in raw
    wait_until(lambda: reported("/zmesh/v1/nodes/n1/status/networks/later-bad"), 10, what="later-bad InvalidSpec")
    wait_until(lambda: reported("/zmesh/v1/nodes/n2/status/workloads/w2"), 10, what="w2 InvalidSpec")
    time.sleep(RESYNC * 2)
    # The other network is untouched and keeps working, the broken workload stays attached as it
    # was, and the broken network keeps its last good NR.
    assert all(mesh.matrix({w: IPS[w] for w in ("w1", "w2")}).values())
    assert mesh.netns_inode(bad_nr) == bad_inode and mesh.wg_pid("n1", "later-bad") == bad_pid
    for n in ("n1", "n2"):
        assert mesh.world.nodes[n].agent.poll() is None  # the agents did not crash


async def test_a_network_written_with_plain_etcdctl_is_built_like_one_from_the_cli(mesh):
    mesh.start("n1", "n2")
    manifest = network_manifest("handmade", {"n1": SUBNETS["n1"], "n2": SUBNETS["n2"]})
    manifest += "".join(workload_manifest(w, "handmade", NODE_OF[w], mesh.add_workload_ns(w), IPS[w])
                        for w in ("w1", "w2"))
    # No index entries, no CLI: just the documented keys and JSON values.
    for doc in split_documents(manifest):
        kind, name = doc.data["kind"], doc.data["metadata"]["name"]
        key = f"/zmesh/v1/{kind.lower()}s/{name}"
        mesh.etcdctl("put", key, json.dumps(doc.data))

    mesh.wait_mesh({w: IPS[w] for w in ("w1", "w2")}, timeout=30)
    shown = json.loads(mesh.zmesh("get", "networks", "handmade", "-o", "json").stdout)
    assert shown["spec"]["resources"] == [{"node": "n1", "subnet": "10.1.1.0/24"},
                                          {"node": "n2", "subnet": "10.1.2.0/24"}]


async def test_with_etcd_down_the_dataplane_keeps_forwarding_and_is_still_repaired(mesh):
    two = two_node_mesh(mesh)

    mesh.etcd.kill()  # as a crash would
    try:
        time.sleep(RESYNC * 2)
        assert all(mesh.matrix(two).values())  # nothing was torn down
        pid = mesh.wg_pid("n1", "blue")
        os.kill(pid, signal.SIGKILL)
        # Repaired from the last known desired state, without etcd.
        mesh.wait_mesh(two, timeout=RESYNC + 15)
        assert mesh.wg_pid("n1", "blue") not in (None, pid)
    finally:
        mesh.etcd.start()
    # Back in touch: a change made now still reaches the agents.
    mesh.zmesh("delete", "workload", "w2")
    wait_until(lambda: "eth0" not in mesh.links(mesh.workload_ns("w2")), 30, what="w2 detached after etcd came back")
    assert all(mesh.world.nodes[n].agent.poll() is None for n in ("n1", "n2"))


def _nr_status(mesh, network: str, node: str) -> dict:
    raw = mesh.etcdctl("get", "--print-value-only", f"/zmesh/v1/nodes/{node}/status/networks/{network}").stdout
    return json.loads(raw) if raw.strip() else {}


def _published_facts(mesh, network: str, node: str) -> dict:
    raw = mesh.etcdctl("get", "--print-value-only", f"/zmesh/v1/nodes/{node}/mesh/facts/{network}").stdout
    return json.loads(raw) if raw.strip() else {}


def _condition(status: dict, ctype: str) -> dict:
    return next((c for c in status.get("conditions", []) if c["type"] == ctype), {})


async def test_an_unwritable_state_dir_is_reported_and_nothing_unrecorded_is_attached(mesh):
    two = two_node_mesh(mesh)
    state_dir = str(mesh.world.nodes["n1"].state_dir)
    ns = mesh.add_workload_ns("w4")
    # Read-only even for root: a bind mount of the state dir onto itself, remounted ro.
    subprocess.run(["mount", "--bind", state_dir, state_dir], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", state_dir], check=True)
        mesh.apply(workload_manifest("w4", "blue", "n1", ns))  # its address is allocated here
        wait_until(lambda: _condition(_nr_status(mesh, "blue", "n1"), "Ready").get("reason") == "ApplyFailed",
                   15, what="the failure in n1's status")
        assert "Read-only file system" in _condition(_nr_status(mesh, "blue", "n1"), "Ready")["message"]
        time.sleep(RESYNC * 2)  # several retries
        # An address the record does not hold would not survive a restart: nothing attached.
        assert "eth0" not in mesh.links(ns)
        assert all(mesh.matrix(two).values())  # the running NR is unharmed
    finally:
        subprocess.run(["umount", state_dir], check=True)
    wait_until(lambda: mesh.ping(ns, IPS["w2"]), RESYNC + 15, what="w4 attached once the record can be written")
    record = json.loads((mesh.world.nodes["n1"].state_dir / "state.json").read_text())
    assert record["networks"]["blue"]["workloads"]["w4"] == "10.1.1.2"
    wait_until(lambda: _condition(_nr_status(mesh, "blue", "n1"), "Ready").get("status") == "True", 15,
               what="n1 Ready again")


async def test_an_agent_given_another_name_prefix_refuses_to_start_and_touches_nothing(mesh):
    two = two_node_mesh(mesh)
    node = mesh.world.nodes["n1"]
    nr = mesh.nr_netns("n1", "blue")
    before = (mesh.wg_pid("n1", "blue"), mesh.netns_inode(nr), mesh.links(nr))
    old = node.name_prefix
    assert mesh.world.stop_agent("n1") == 0
    node.name_prefix = "x" + old[1:]  # same length, still unique to this world
    try:
        mesh.world.start_agent("n1")
        assert node.agent.wait(30) == 1
        log = mesh.world.agent_log("n1")
        assert f"--name-prefix {old!r}" in log, log[-2000:]
        assert not [n for n in os.listdir("/var/run/netns") if n.startswith(node.name_prefix)]
        assert not [p for p in os.listdir(node.state_dir / "wireguard-go") if p.startswith(node.name_prefix)]
    finally:
        mesh.world.stop_agent("n1")
        for stray in [n for n in os.listdir("/var/run/netns") if n.startswith(node.name_prefix)]:
            subprocess.run(["ip", "netns", "del", stray])
        node.name_prefix = old
    assert (mesh.wg_pid("n1", "blue"), mesh.netns_inode(nr), mesh.links(nr)) == before
    assert all(mesh.matrix(two).values())
    # With its own prefix it starts again and adopts everything as it was.
    mesh.world.start_agent("n1")
    wait_until(lambda: mesh.ready("n1"), 30, what="n1 ready with its own prefix")
    assert (mesh.wg_pid("n1", "blue"), mesh.netns_inode(nr), mesh.links(nr)) == before


async def test_a_listen_port_held_by_another_program_is_left_to_it(mesh):
    from controller.dataplane.netns import open_socket_in

    mesh.world.add_node("n1")
    # Another program on n1's host already listens on the first port of the range.
    squatter = open_socket_in(mesh.world.nodes["n1"].netns, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        squatter.bind(("0.0.0.0", 51820))
        mesh.world.start_agent("n1")
        mesh.start("n2")
        wait_until(lambda: mesh.ready("n1"), 30, what="agent n1 ready")  # registered, so apply admits it
        two = {w: IPS[w] for w in ("w1", "w2")}
        manifest = network_manifest("blue", {"n1": SUBNETS["n1"], "n2": SUBNETS["n2"]})
        manifest += "".join(workload_manifest(w, "blue", NODE_OF[w], mesh.add_workload_ns(w), ip)
                            for w, ip in two.items())
        mesh.apply(manifest)
        mesh.wait_mesh(two)
        assert (await mesh.wg_device("n1", "blue")).listen_port == 51821
        assert _published_facts(mesh, "blue", "n1")["listenPort"] == 51821
        assert squatter.getsockname() == ("0.0.0.0", 51820)
    finally:
        squatter.close()


async def test_a_workload_naming_the_nodes_own_namespace_or_an_nr_is_refused(mesh):
    two = two_node_mesh(mesh)
    host, nr = mesh.world.nodes["n1"].netns, mesh.nr_netns("n1", "blue")

    def looks():
        return {ns: (mesh.links(ns), netns_exec(ns, "ip", "-4", "route", "show").stdout) for ns in (host, nr)}
    before = looks()
    # Attaching would put a veth into the node's host (or an NR) and replace its default route.
    mesh.apply("".join(
        f"---\napiVersion: zmesh.io/v1\nkind: Workload\nmetadata: {{name: {w}}}\n"
        f"spec: {{network: blue, node: n1, netns: {ns}, interface: zz0}}\n"
        for w, ns in (("intruder-host", host), ("intruder-nr", nr))))

    def refused(w):
        raw = mesh.etcdctl("get", "--print-value-only", f"/zmesh/v1/nodes/n1/status/workloads/{w}").stdout
        return "refusing" in raw
    wait_until(lambda: refused("intruder-host") and refused("intruder-nr"), 15, what="both refused in status")
    time.sleep(RESYNC)  # and retried
    assert looks() == before
    assert all(mesh.matrix(two).values())
