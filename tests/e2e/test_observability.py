"""What an operator sees of a real mesh: a peer whose WireGuard UDP is dropped grows an old
handshake, turns stale in the metrics, in its NR's condition (with a reason), in the events and
on the mesh page (rendered by headless Chromium); a scrape during a stuck reconcile answers at
once; moving the aggregator is counted and recorded while hidden peers, which keep their path
open with a keepalive, stay up. Real agents, real wireguard-go, real etcd, on a simulated world
(tests/e2e/conftest.py).

The agents run with `--observe-interval 1 --peer-stale-after 16` (the shortest stale-after that
interval allows, docs/observability.md), so a broken peer is stale within half a minute."""

from __future__ import annotations

import contextlib
import html.parser
import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
from internetlib import ping_from
from meshlib import (
    OBSERVE_FAST, network_manifest, pinging, running_mesh, wait_until, wireguard_udp_dropped, workload_manifest,
)

from controller.planner import names
from controller.sim.world import INTERNET_HOST, run_ip_batch

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.etcd]

SUBNETS = {"n1": "10.1.1.0/24", "n2": "10.1.2.0/24", "n3": "10.1.3.0/24", "h1": "10.1.11.0/24"}
IPS = {"w1": "10.1.1.10", "w2": "10.1.2.10", "w3": "10.1.3.10", "wh": "10.1.11.10"}
NODE_OF = {"w1": "n1", "w2": "n2", "w3": "n3", "wh": "h1"}
ARTIFACTS = Path(os.environ.get("ZMESH_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))


@pytest.fixture
async def mesh(etcd):
    async with running_mesh(etcd, agent_args=OBSERVE_FAST) as m:
        yield m


def build(mesh, nodes=("n1", "n2", "n3"), hidden=(), aggregators=()) -> dict[str, str]:
    """Network blue on public `nodes` and `hidden` ones (behind home router r1), a workload per
    node; returns {workload: ip} once every workload reaches every other."""
    mesh.start(*nodes)
    if hidden:
        mesh.start_hidden("r1", *hidden)
    nodes = (*nodes, *hidden)
    workloads = {w: ip for w, ip in IPS.items() if NODE_OF[w] in nodes}
    manifest = network_manifest("blue", {n: SUBNETS[n] for n in nodes}, aggregators=list(aggregators))
    manifest += "".join(workload_manifest(w, "blue", NODE_OF[w], mesh.add_workload_ns(w), ip)
                        for w, ip in workloads.items())
    mesh.apply(manifest)
    mesh.wait_mesh(workloads)
    return workloads


def peer_metric(mesh, node: str, name: str, peer: str) -> float | None:
    text = mesh.metrics_text(node)
    from controller.sim.world import metric_total

    if f'peer="{peer}"' not in text:
        return None
    return metric_total(text, name, network="blue", peer=peer)


def flat_counters(view: dict) -> dict[str, int]:
    """/status's Internet counters as the mesh page keys its cells (dropped.<reason>)."""
    return {k: v for k, v in view.items() if isinstance(v, int)} | {
        f"dropped.{r}": n for r, n in view["droppedPackets"].items()}


def internet_counters(mesh) -> dict[str, int]:
    (blue,) = [n for n in mesh.get_json("n1", "/status")["networks"] if n["name"] == "blue"]
    return flat_counters(blue["internet"])


def ndmz_counters(mesh) -> dict[str, int]:
    ndmz = mesh.get_json("n1", "/status")["ndmz"]
    return flat_counters(ndmz) if ndmz else {"connections": 0}  # not read yet


def peer_state(mesh, node: str, peer: str) -> str | None:
    (blue,) = mesh.get_json(node, "/status")["networks"]
    return next((p["state"] for p in blue["peers"] if p["node"] == peer), None)


def nr_condition(mesh, node: str, ctype: str) -> dict:
    import json

    raw = mesh.etcdctl("get", "--print-value-only", f"/zmesh/v1/nodes/{node}/status/networks/blue").stdout
    status = json.loads(raw) if raw.strip() else {}
    return next((c for c in status.get("conditions", []) if c["type"] == ctype), {})


class Elements(html.parser.HTMLParser):
    """Every element's tag and attributes, and the document's text, from a dumped DOM."""

    def __init__(self, dom: str):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(dom)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def find(self, tag: str, **attrs) -> list[dict]:
        want = {k.replace("_", "-"): v for k, v in attrs.items()}
        return [a for t, a in self.elements if t == tag and all(a.get(k) == v for k, v in want.items())]


def render(url: str, screenshot: Path) -> Elements:
    """The page as headless Chromium renders it (its script run, its data fetched), and a
    screenshot. No name resolves, so Chromium reaches nothing but the agent on loopback."""
    profile = tempfile.mkdtemp(prefix="zmesh-chromium-")
    base = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--user-data-dir={profile}", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-extensions", "--no-pings",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--virtual-time-budget=8000", "--window-size=1400,1100"]
    try:
        dom = subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True, timeout=120)
        assert dom.returncode == 0, dom.stderr[-2000:]
        shot = subprocess.run(base + [f"--screenshot={screenshot}", url], capture_output=True, text=True,
                              timeout=120)
        assert shot.returncode == 0 and screenshot.stat().st_size > 0, shot.stderr[-2000:]
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    return Elements(dom.stdout)


needs_chromium = pytest.mark.skipif(not shutil.which("chromium"), reason="chromium not installed")


@needs_chromium
async def test_a_peer_whose_wireguard_udp_is_dropped_turns_stale_everywhere_an_operator_looks(mesh):
    build(mesh, hidden=("h1",), aggregators=("n2",))
    # w1 on the Internet through n1, and once from an address that is not its own: NAT and
    # firewall counters for the page to show.
    w1 = mesh.workload_ns("w1")
    assert mesh.world.http_get(w1)
    run_ip_batch(w1, ["addr add 192.0.2.99/32 dev lo"])
    assert not ping_from(w1, "192.0.2.99", str(INTERNET_HOST))
    wait_until(lambda: (i := internet_counters(mesh))["connections"] >= 1 and i["dropped.spoofed"] >= 1
               and ndmz_counters(mesh)["connections"] >= 1, 30, interval=0.3,
               what="n1 counting w1's Internet traffic and its spoofed packet")
    port = (await mesh.wg_device("n3", "blue")).listen_port
    age_before = peer_metric(mesh, "n1", "zmesh_wireguard_peer_handshake_age_seconds", "n3")
    assert age_before is not None

    with wireguard_udp_dropped(mesh, "n3", port), pinging(mesh, "w1", IPS["w3"]):
        # Metrics: n1 keeps sending to n3 and hears nothing back.
        wait_until(lambda: peer_metric(mesh, "n1", "zmesh_wireguard_peer_stale", "n3") == 1, 90,
                   interval=0.5, what="n3 stale on n1")
        age_stale = peer_metric(mesh, "n1", "zmesh_wireguard_peer_handshake_age_seconds", "n3")
        assert age_stale > age_before and age_stale > 16  # it grew, past the threshold
        assert mesh.metric_sum("n1", "zmesh_wireguard_peers_stale", network="blue") == 1
        assert peer_metric(mesh, "n1", "zmesh_wireguard_peer_stale", "n2") == 0  # n2 is fine

        # The NR's condition, with a reason and the peer named.
        wait_until(lambda: nr_condition(mesh, "n1", "PeersReachable").get("status") == "False", 30,
                   what="PeersReachable=False on n1")
        cond = nr_condition(mesh, "n1", "PeersReachable")
        assert cond["reason"] == "HandshakeStale"
        assert "n3 (no reply for more than 16 s while sending to it)" in cond["message"]
        assert nr_condition(mesh, "n1", "Ready")["status"] == "True"  # converged all the same

        # An event, shown by `zmesh describe` like kubectl's.
        def described():
            out = mesh.zmesh("describe", "network", "blue").stdout
            return out if "PeerStale" in out else None
        out = wait_until(described, 20, what="the PeerStale event in zmesh describe")
        # n1's, about n3 (under load another node may find n3 stale too, each with its own line).
        lines = [x for x in out[out.index("Events:"):].splitlines() if "PeerStale" in x]
        assert any(x.split()[1:4] == ["n1", "Warning", "PeerStale"]
                   and x.endswith("peer n3: no reply for more than 16 s while sending to it") for x in lines), lines

        # The mesh page, rendered by a real browser, with what n1 sees.
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        screenshot = ARTIFACTS / "mesh-page-stale-peer.png"
        before = (internet_counters(mesh), ndmz_counters(mesh))
        page = render(mesh.url("n1", "/mesh"), screenshot)
        after = (internet_counters(mesh), ndmz_counters(mesh))
        print(f"mesh page screenshot: {screenshot}")
        (section,) = page.find("section", data_network="blue")
        nodes = {a["data-node"]: a for a in page.find("g", **{"class": "node"})}
        assert set(nodes) == {"n1", "n2", "n3", "h1"}
        assert nodes["n1"]["data-role"] == "self"
        assert nodes["n2"]["data-role"] == nodes["n3"]["data-role"] == "public"
        assert nodes["h1"]["data-role"] == "hidden"  # not a peer of n1: reached via the aggregator
        assert nodes["h1"]["data-state"] == "none"
        assert "aggregator n2" in "".join(page.text)
        assert nodes["n3"]["data-state"] == "stale"
        assert nodes["n2"]["data-state"] in ("up", "idle")
        lines = {a["data-peer"]: a["data-state"] for a in page.find("line", **{"class": "peer"})}
        assert lines == {"n2": nodes["n2"]["data-state"], "n3": "stale"}
        rows = {a["data-peer"]: a["data-state"] for a in page.find("tr", **{"class": "peer"})}
        assert rows == lines
        assert page.find("tr", **{"class": "condition", "data-node": "n1", "data-type": "PeersReachable",
                                  "data-status": "False"})
        assert page.find("tr", **{"class": "event", "data-reason": "PeerStale"})
        assert page.find("tr", **{"class": "node-event", "data-reason": "AgentStarted"})  # n1's own
        assert page.find("span", id="live", **{"class": "muted"})  # not the "agent unreachable" style
        # Internet access as /status counts it (between a reading before and one after the
        # render: they only grow): blue's NR on n1 and n1's ndmz.
        assert page.find("table", **{"class": "internet", "data-network": "blue"})
        for table, low, high in (("internet", before[0], after[0]), ("ndmz", before[1], after[1])):
            shown = {a["data-counter"]: int(a["data-value"]) for a in page.find("td", data_table=table)}
            assert set(shown) == set(low), table
            assert all(low[k] <= shown[k] <= high[k] for k in shown), (table, low, shown, high)
        text = "".join(page.text)
        assert "Internet connections" in text and "dropped: spoofed source address" in text
        assert {a["data-counter"] for a in page.find("td", data_table="internet") if int(a["data-value"])} >= {
            "connections", "sentBytes", "receivedBytes", "dropped.spoofed"}

    # The path is back: n1 hears n3 again, says so, and records it.
    wait_until(lambda: peer_metric(mesh, "n1", "zmesh_wireguard_peer_stale", "n3") == 0, 60,
               interval=0.5, what="n3 heard again")
    with pinging(mesh, "w1", IPS["w3"]):
        wait_until(lambda: nr_condition(mesh, "n1", "PeersReachable").get("status") == "True", 30,
                   what="PeersReachable=True again")
    wait_until(lambda: "PeerRecovered" in mesh.zmesh("describe", "network", "blue").stdout, 20,
               what="the PeerRecovered event")


async def test_a_scrape_during_a_stuck_reconcile_answers_at_once(mesh):
    workloads = build(mesh, nodes=("n1", "n2"))
    pid = mesh.wg_pid("n1", "blue")
    os.kill(pid, signal.SIGSTOP)  # n1's own wireguard-go (its recorded PID): its socket stops answering
    try:
        # The next resync of blue waits on the frozen UAPI socket (5 s per request). A scrape
        # served while a reconcile has been running for seconds proves /metrics did not wait.
        def stuck():
            running = mesh.metric_sum("n1", "zmesh_workqueue_longest_running_seconds")
            return running if running > 3 else None
        running = wait_until(stuck, 60, interval=0.2, what="a scrape during a reconcile stuck for 3 s")
        assert running > 3
        status = mesh.get_json("n1", "/status")  # the rest of the surface answers too
        assert [n["name"] for n in status["networks"]] == ["blue"]
        wait_until(lambda: mesh.metric_sum("n1", "zmesh_observe_errors_total") > 0, 30,
                   what="the observer reporting the device that does not answer")
        assert mesh.get_json("n1", "/status")["networks"][0]["observeError"]
    finally:
        # The agent may have replaced it as hung meanwhile: continue it only if it is still ours.
        with contextlib.suppress(OSError):
            if b"wireguard-go" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGCONT)
    mesh.wait_mesh(workloads, timeout=60)
    wait_until(lambda: mesh.metric_sum("n1", "zmesh_workqueue_longest_running_seconds") < 3, 60,
               what="reconciles quick again")


async def test_moving_the_aggregator_is_counted_and_recorded_and_hidden_peers_stay_up(mesh):
    workloads = build(mesh, nodes=("n1", "n2"), hidden=("h1",), aggregators=("n1",))
    # h1 keeps its NAT mapping open with a keepalive: with no traffic of ours, both ends of the
    # hidden peer are up (its handshake renews every few minutes), not idle, never stale.
    wait_until(lambda: peer_state(mesh, "h1", "n1") == "up" and peer_state(mesh, "n1", "h1") == "up", 30,
               what="h1 and its aggregator up")
    for node in ("n1", "n2", "h1"):
        assert mesh.metric_sum(node, "zmesh_aggregator_info", network="blue", aggregator="n1") == 1

    mesh.apply(network_manifest("blue", {n: SUBNETS[n] for n in ("n1", "n2", "h1")}, aggregators=["n2"]))
    mesh.wait_mesh(workloads, timeout=60)
    for node in ("n1", "n2", "h1"):
        wait_until(lambda: mesh.metric_sum(node, "zmesh_aggregator_info", network="blue", aggregator="n2") == 1,
                   30, what=f"{node} using aggregator n2")
        assert mesh.metric_sum(node, "zmesh_aggregator_changes_total", network="blue") == 1
        # n1 is no candidate any more: leaving it is a failover (a move to a preferred one is not)
        assert mesh.metric_sum(node, "zmesh_aggregator_failovers_total", network="blue") == 1
    wait_until(lambda: peer_state(mesh, "n2", "h1") == "up", 30, what="h1 up at its new aggregator")

    def recorded():
        out = mesh.zmesh("describe", "network", "blue").stdout
        lines = [x for x in out[out.index("Events:"):].splitlines() if "AggregatorChanged" in x]
        return lines if len(lines) == 3 else None
    lines = wait_until(recorded, 20, what="an AggregatorChanged event per node")
    assert {x.split()[1] for x in lines} == {"n1", "n2", "h1"}
    assert all("aggregator is now n2 (was n1): Preferred: n2 is the first candidate" in x for x in lines)


# --- what happens to the node itself ------------------------------------------------------------

def node_events(mesh, node: str) -> list[str]:
    """The Events lines of `zmesh describe node` (LAST SEEN TYPE REASON COUNT MESSAGE)."""
    out = mesh.zmesh("describe", "node", node).stdout
    return out[out.index("Events:"):].splitlines()[2:]


def node_event(mesh, node: str, reason: str, text: str = "", timeout: float = 30) -> str:
    def found():
        return next((x for x in node_events(mesh, node) if x.split()[2] == reason and text in x), None)
    return wait_until(found, timeout, interval=0.3, what=f"a {reason} event of {node} {text!r}")


async def test_the_agent_etcd_outages_the_lease_the_ndmz_and_a_refused_network_are_node_events(mesh):
    mesh.start("n1")
    node_event(mesh, "n1", "NdmzCreated")
    node_event(mesh, "n1", "AgentStarted", "0 network resource(s), 0 adopted from the last run, 0 created")
    mesh.apply(network_manifest("blue", {"n1": SUBNETS["n1"]}))
    wait_until(lambda: (mesh.nr_status("n1", "blue") or {}).get("conditions"), 30, what="blue on n1")
    # A restarted agent adopts what the last run built.
    mesh.world.stop_agent("n1")
    mesh.world.start_agent("n1")
    node_event(mesh, "n1", "AgentStarted", "1 network resource(s), 1 adopted from the last run, 0 created")

    # Someone deletes the ndmz's firewall, then sets its bridge down: each written back, counted
    # for the operator's alerts, and said so.
    ndmz = names.ndmz_netns(mesh.world.nodes["n1"].name_prefix)
    wait_until(lambda: mesh.get_json("n1", "/status")["ndmz"], 30, what="n1's ndmz built and read")
    repairs = mesh.metric_sum("n1", "zmesh_ndmz_drift_repairs_total")
    subprocess.run(["ip", "netns", "exec", ndmz, "nft", "delete", "table", "inet", "zmesh"], check=True)
    node_event(mesh, "n1", "NdmzDriftRepaired", "written back: it had been changed outside the agent")
    assert mesh.metric_sum("n1", "zmesh_ndmz_drift_repairs_total") == repairs + 1
    subprocess.run(["ip", "-n", ndmz, "link", "set", names.NDMZ_BRIDGE, "down"], check=True)
    wait_until(lambda: mesh.metric_sum("n1", "zmesh_ndmz_drift_repairs_total") == repairs + 2, 30,
               interval=0.3, what="the ndmz's bridge set up again and counted")
    bridge = subprocess.run(["ip", "-n", ndmz, "-j", "link", "show", names.NDMZ_BRIDGE],
                            capture_output=True, text=True, check=True).stdout
    assert "UP" in json.loads(bridge)[0]["flags"]
    assert mesh.get_json("n1", "/status")["ndmz"]["driftRepairs"] == repairs + 2
    wait_until(lambda: sum(int(x.split()[3]) for x in node_events(mesh, "n1")
                           if x.split()[2] == "NdmzDriftRepaired") == 2, 30, what="both repairs as events")

    # etcd goes away (a crash) and comes back; the node's /status says so meanwhile, from memory.
    mesh.etcd.kill()
    try:
        wait_until(lambda: any(e["reason"] == "EtcdDisconnected" for e in mesh.get_json("n1", "/status")["events"]),
                   30, what="/status telling that etcd is away")
        assert mesh.get_json("n1", "/status")["etcd"]["connected"] is False
    finally:
        mesh.etcd.start()
    disconnected = node_event(mesh, "n1", "EtcdDisconnected", "does not answer")
    reconnected = node_event(mesh, "n1", "EtcdReconnected", "answers again at")
    assert node_events(mesh, "n1").index(disconnected) < node_events(mesh, "n1").index(reconnected)

    # The liveness lease gone (here revoked by hand): the node registers again and says so.
    alive = json.loads(mesh.etcdctl("get", "/zmesh/v1/nodes/n1/mesh/alive", "-w", "json").stdout)["kvs"][0]
    mesh.etcdctl("lease", "revoke", format(alive["lease"], "x"))
    node_event(mesh, "n1", "LeaseRegranted", "registered again with a new lease")
    wait_until(lambda: mesh.etcd_json("/zmesh/v1/nodes/n1/mesh/alive"), 10, what="n1 alive again")
    # An index entry written by hand for a network whose name is not one: refused, said once.
    bad = {"apiVersion": "zmesh.io/v1", "kind": "Network", "metadata": {"name": "Bad_Name"},
           "spec": {"ipRange": "10.9.0.0/16", "resources": [{"node": "n1", "subnet": "10.9.1.0/24"}]}}
    mesh.etcdctl("put", "/zmesh/v1/networks/Bad_Name", json.dumps(bad))
    mesh.etcdctl("put", "/zmesh/v1/index/nodes/n1/networks/Bad_Name", "")
    node_event(mesh, "n1", "NetworkRefused", "network 'Bad_Name' refused: 'Bad_Name' is not a valid name")
    assert mesh.ready("n1") and mesh.metric_sum("n1", "zmesh_reconcile_errors_total") == 0

    described = json.loads(mesh.zmesh("describe", "node", "n1", "-o", "json").stdout)
    assert described["status"]["alive"] is True
    assert [n["name"] for n in described["status"]["networks"]] == ["blue"]
    assert {"AgentStarted", "NdmzCreated", "NdmzDriftRepaired", "EtcdDisconnected", "EtcdReconnected",
            "LeaseRegranted", "NetworkRefused"} <= {e["reason"] for e in described["status"]["events"]}
    print(mesh.zmesh("describe", "node", "n1").stdout)
