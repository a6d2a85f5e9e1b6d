"""The HTTP surface: /metrics in Prometheus text format from the agent's own registry (read from
the observed snapshot, never waiting for WireGuard), /healthz while alive, /readyz 503 with
reasons until ready, /status as JSON, and the mesh page with everything inline."""

import asyncio
import json
import re

import aiohttp
import pytest
from agent_metrics import FakeQueue, full_metrics, key, plan
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from controller.http.metrics import AgentMetrics, error_reason
from controller.http.server import HttpServer, Readiness, make_app
from controller.http.snapshot import Snapshot
from controller.reconciler.observer import Observer
from controller.store.client import StoreUnavailable


def samples(text):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
async def client_for():
    clients = []

    async def make(metrics, readiness=lambda: (True, "ready"), **kw):
        client = TestClient(TestServer(make_app(metrics.registry, readiness, **kw)))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def test_metrics_are_served_in_prometheus_text_format(client_for):
    m, _, _ = full_metrics()
    resp = await (await client_for(m)).get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    got = samples(await resp.text())
    assert got[("zmesh_node_info", (("node", "n1"), ("version", "0.1.0")))] == 1
    assert got[("zmesh_reconcile_total", (("network", "blue"), ("result", "converged")))] == 1
    assert got[("zmesh_reconcile_errors_total", (("network", "blue"), ("reason", "timeout")))] == 1
    assert got[("zmesh_reconcile_duration_seconds_bucket", (("le", "0.005"), ("network", "blue")))] == 1
    assert got[("zmesh_dataplane_writes_total", (("kind", "route"),))] == 2
    assert got[("zmesh_dataplane_writes_total", (("kind", "wireguard"),))] == 0
    assert got[("zmesh_workqueue_depth", ())] == 2
    assert got[("zmesh_workqueue_oldest_key_age_seconds", ())] == 0.5
    assert got[("zmesh_etcd_connected", ())] == 1
    assert got[("zmesh_etcd_endpoint_info", (("endpoint", "http://127.0.0.1:2379"),))] == 1
    assert got[("zmesh_etcd_request_errors_total", (("operation", "put"),))] == 1
    assert got[("zmesh_workloads", ())] == 2


async def test_wireguard_series_come_from_the_snapshot_per_network_and_per_peer(client_for):
    m, _, _ = full_metrics()
    got = samples(await (await (await client_for(m)).get("/metrics")).text())
    blue = (("network", "blue"),)
    assert got[("zmesh_wireguard_peers", blue)] == 4
    assert got[("zmesh_wireguard_peers_stale", blue)] == 1
    assert got[("zmesh_wireguard_oldest_handshake_age_seconds", blue)] == 39  # n3, heard at T0
    assert got[("zmesh_wireguard_received_bytes_total", blue)] == 3900
    assert got[("zmesh_wireguard_sent_bytes_total", blue)] == 7800
    assert got[("zmesh_aggregator_info", (("aggregator", "n2"), ("network", "blue")))] == 1
    assert got[("zmesh_network_resource_condition", (("condition", "Ready"), ("network", "blue"),
                                                     ("status", "True")))] == 1
    assert got[("zmesh_network_resource_condition", (("condition", "Ready"), ("network", "blue"),
                                                     ("status", "False")))] == 0

    def peer(name, node):
        return got.get((name, (("network", "blue"), ("peer", node))))
    assert peer("zmesh_wireguard_peer_handshake_age_seconds", "n2") == 0
    assert peer("zmesh_wireguard_peer_handshake_age_seconds", "n3") == 39
    assert [peer("zmesh_wireguard_peer_stale", n) for n in ("n2", "n3", "n4", "n5")] == [0, 1, 0, 0]
    assert peer("zmesh_wireguard_peer_received_bytes_total", "n2") == 3900
    assert got[("zmesh_wireguard_peer_series_omitted", ())] == 0


def test_per_peer_series_are_capped_stale_peers_first_and_totals_stay_whole():
    m, _, _ = full_metrics(peer_series_limit=2)
    got = samples(m.exposition().decode())
    ages = {dict(labels)["peer"] for (name, labels) in got if name == "zmesh_wireguard_peer_handshake_age_seconds"}
    assert ages == {"n3", "n2"}  # the stale one, then the first by name
    assert got[("zmesh_wireguard_peer_series_omitted", ())] == 2
    assert got[("zmesh_wireguard_peers", (("network", "blue"),))] == 4
    none = samples(full_metrics(peer_series_limit=0)[0].exposition().decode())
    assert not [k for k in none if k[0].startswith("zmesh_wireguard_peer_")
                and k[0] != "zmesh_wireguard_peer_series_omitted"]


def test_every_metric_follows_the_naming_conventions():
    m, _, _ = full_metrics()
    families = list(text_string_to_metric_families(m.exposition().decode()))
    for family in families:
        assert family.name.startswith("zmesh_")
        assert family.samples, family.name  # the fixture gives every family data
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        assert not re.search(r"_(milli|micro)seconds|_kilobytes|_ms\b", family.name)
    names = {f.name for f in families}
    for expected in ("zmesh_reconcile", "zmesh_reconcile_duration_seconds", "zmesh_reconcile_errors",
                     "zmesh_dataplane_writes", "zmesh_network_resources", "zmesh_wireguard_peers",
                     "zmesh_wireguard_peer_handshake_age_seconds", "zmesh_etcd_request_duration_seconds",
                     "zmesh_etcd_revision_lag", "zmesh_workqueue_oldest_key_age_seconds", "zmesh_build_info",
                     "zmesh_events", "zmesh_drift_repairs", "zmesh_ndmz_drift_repairs"):
        assert expected in names


def test_ndmz_drift_repairs_are_exported_from_zero_before_the_ndmz_is_read():
    snap = Snapshot("n1")
    m = AgentMetrics("n1", "0.1.0", snapshot=snap)
    assert samples(m.exposition().decode())[("zmesh_ndmz_drift_repairs_total", ())] == 0
    assert ("zmesh_ndmz_connections_total", ()) not in samples(m.exposition().decode())  # not read yet
    snap.ndmz_passed(writes=3, baseline=True)
    snap.ndmz_passed(writes=0, baseline=True)  # converged: nothing to repair
    assert samples(m.exposition().decode())[("zmesh_ndmz_drift_repairs_total", ())] == 1


def test_two_agents_in_one_process_have_separate_registries():
    a, b = AgentMetrics("n1", "0.1.0"), AgentMetrics("n2", "0.1.0")  # no duplicate-name error
    a.wireguard_restarts.inc()
    assert b"zmesh_wireguard_restarts_total 1.0" in a.exposition()
    assert b"zmesh_wireguard_restarts_total 0.0" in b.exposition()
    assert b"zmesh_" not in generate_latest(REGISTRY)  # the global default stays untouched


def test_forget_network_drops_its_series_and_keeps_others():
    m, snap, _ = full_metrics()
    snap.planned(plan("red", ["n2"]))
    m.reconcile.labels(network="red", result="converged").inc()
    m.forget_network("blue")
    m.forget_network("never-seen")
    text = m.exposition().decode()
    assert 'network="blue"' not in text
    assert 'network="red"' in text


def test_reconcile_errors_have_a_bounded_reason():
    assert error_reason(StoreUnavailable("x")) == "etcd"
    assert error_reason(asyncio.TimeoutError()) == "timeout"
    assert error_reason(PermissionError("read-only")) == "kernel"
    assert error_reason(KeyError("bug")) == "internal"


class HangingWireGuard:
    """A WireGuard backend whose device never answers (a stopped wireguard-go)."""

    kind = "userspace"

    def __init__(self):
        self.asked = asyncio.Event()

    async def get(self, ifname, netns):
        self.asked.set()
        await asyncio.Event().wait()


async def test_a_scrape_answers_while_the_wireguard_device_hangs(client_for):
    snap = Snapshot("n1", stale_after=20, observe_interval=1)
    m = AgentMetrics("n1", "0.1.0", snapshot=snap)
    m.observe_queue(FakeQueue())
    snap.planned(plan("blue", ["n2"]))
    wg = HangingWireGuard()
    observer = Observer(snap, wg, read_timeout=3600)
    reading = asyncio.create_task(observer.refresh("blue"))
    try:
        await asyncio.wait_for(wg.asked.wait(), 5)
        client = await client_for(m)
        resp = await asyncio.wait_for(client.get("/metrics"), 5)  # a hang guard, not a timing
        assert resp.status == 200
        assert samples(await resp.text())[("zmesh_wireguard_peers", (("network", "blue"),))] == 1
        assert not reading.done()
    finally:
        reading.cancel()


async def test_a_device_that_does_not_answer_in_time_is_an_observe_error():
    snap = Snapshot("n1", stale_after=20, observe_interval=1)
    snap.planned(plan("blue", ["n2"]))
    errors = []
    observer = Observer(snap, HangingWireGuard(), read_timeout=0.05, on_error=lambda n, e: errors.append((n, e)))
    await asyncio.wait_for(observer.refresh_all(), 5)
    assert errors == [("blue", "no answer within 0.05 s")]
    assert snap.networks["blue"].observe_error == "no answer within 0.05 s"
    assert snap.refreshed_at > 0


async def test_healthz_answers_while_the_loop_runs(client_for):
    resp = await (await client_for(AgentMetrics("n1", "x"))).get("/healthz")
    assert resp.status == 200
    assert await resp.text() == "ok\n"


async def test_readyz_is_503_with_reasons_until_every_gate_is_open(client_for):
    readiness = Readiness(["store cache synced", "first reconcile done"])
    client = await client_for(AgentMetrics("n1", "x"), readiness)
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert await resp.text() == "waiting for: store cache synced, first reconcile done\n"
    readiness.open("store cache synced")
    resp = await client.get("/readyz")
    assert (resp.status, await resp.text()) == (503, "waiting for: first reconcile done\n")
    readiness.open("first reconcile done")
    assert (await client.get("/readyz")).status == 200
    readiness.close("store cache synced")
    assert (await client.get("/readyz")).status == 503


async def test_a_failing_readiness_check_reports_503_not_500(client_for):
    def broken():
        raise RuntimeError("cache gone")

    resp = await (await client_for(AgentMetrics("n1", "x"), broken)).get("/readyz")
    assert resp.status == 503
    assert "cache gone" in await resp.text()


async def test_status_is_the_snapshot_as_json(client_for):
    m, snap, _ = full_metrics()
    resp = await (await client_for(m, status=snap.view)).get("/status")
    assert resp.status == 200
    doc = await resp.json()
    (blue,) = doc["networks"]
    assert [(p["node"], p["state"]) for p in blue["peers"]] == [
        ("n2", "up"), ("n3", "stale"), ("n4", "idle"), ("n5", "pending")]
    assert blue["peers"][1]["handshakeAgeSeconds"] == 39 and blue["aggregator"] == "n2"
    assert [c["type"] for c in blue["conditions"]] == ["Ready", "Degraded"]
    assert blue["publicKey"] == key("n1")


async def test_the_mesh_page_is_self_contained_and_locked_down(client_for):
    client = await client_for(AgentMetrics("n1", "x"))
    assert (await client.get("/", allow_redirects=False)).headers["Location"] == "/mesh"
    resp = await client.get("/mesh")
    assert resp.status == 200 and resp.content_type == "text/html"
    page = await resp.text()
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/]+=*'", csp)
    # Nothing is fetched from elsewhere: no external URL, no src/href attribute at all.
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", page)
    assert not re.search(r"\b(src|href)=", page)
    assert ".innerHTML" not in page  # text from etcd is only ever set as text


async def test_mesh_data_comes_from_its_provider_and_a_slow_one_is_a_503(client_for, monkeypatch):
    async def provider():
        return {"node": "n1", "networks": []}

    client = await client_for(AgentMetrics("n1", "x"), mesh=provider)
    resp = await client.get("/mesh/data")
    assert (resp.status, await resp.json()) == (200, {"node": "n1", "networks": []})

    async def stuck():
        await asyncio.Event().wait()

    monkeypatch.setattr("controller.http.server.MESH_TIMEOUT", 0.05)
    client = await client_for(AgentMetrics("n1", "x"), mesh=stuck)
    resp = await client.get("/mesh/data")
    assert resp.status == 503 and "no answer" in json.dumps(await resp.json())


async def test_server_starts_on_a_free_loopback_port_and_stops():
    m = AgentMetrics("n1", "0.1.0")
    async with HttpServer(m.registry, Readiness([]), port=0) as server:
        assert server.port
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{server.port}/metrics") as resp:
                assert resp.status == 200
                assert "zmesh_node_info" in await resp.text()
            async with session.get(f"http://127.0.0.1:{server.port}/readyz") as resp:
                assert resp.status == 200
        port = server.port
    assert server.port is None
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(f"http://127.0.0.1:{port}/healthz")


async def test_server_on_a_busy_port_fails_clearly():
    m = AgentMetrics("n1", "0.1.0")
    async with HttpServer(m.registry, Readiness([]), port=0) as first:
        with pytest.raises(OSError):
            await HttpServer(m.registry, Readiness([]), port=first.port).start()


class HangingNft:
    """An nft that never answers its listing."""

    async def __call__(self, netns, args, stdin, timeout):
        await asyncio.Event().wait()


async def test_firewall_counters_are_observed_and_an_nft_that_hangs_is_an_observe_error(monkeypatch):
    from controller.dataplane import nftables
    from controller.dataplane.nftables import FakeNft, Nftables

    monkeypatch.setattr(nftables, "netns_exists", lambda ref: True)
    monkeypatch.setattr(nftables, "namespace_id", lambda ref: 1)
    snap = Snapshot("n1", stale_after=20, observe_interval=1)
    desired = plan("blue", ["n2"])
    snap.planned(desired)
    fake = FakeNft()
    nft = Nftables(run=fake)
    await nft.ensure(desired.netns, desired.ruleset)
    ndmz = [("ndmz", "ndmz", desired.ruleset)]  # any counted table stands in for the ndmz's here
    await nft.ensure("ndmz", desired.ruleset)
    observer = Observer(snap, HangingWireGuard(), read_timeout=0.05, nftables=nft, ndmz_tables=lambda: ndmz)
    await asyncio.wait_for(observer.refresh_all(), 5)  # the first reading: where counting starts
    for netns in (desired.netns, "ndmz"):
        for obj in fake.tables[netns][("inet", "zmesh")]:
            for e in obj.get("rule", {}).get("expr", []):
                if "counter" in e:
                    e["counter"] = {"packets": 2, "bytes": 200}
    await asyncio.wait_for(observer.refresh_all(), 5)
    fw = snap.networks["blue"].firewall
    assert fw.packets["spoofed"] == 2 and fw.packets["inbound"] == 4 and fw.bytes["sent"] == 200
    assert snap.ndmz.packets["connections"] == 2 and snap.ndmz.error is None

    errors = []
    hung = Observer(snap, HangingWireGuard(), read_timeout=0.05, nftables=Nftables(run=HangingNft()),
                    ndmz_tables=lambda: ndmz, on_error=lambda n, e: errors.append((n, e)))
    await asyncio.wait_for(hung.refresh_all(), 5)
    assert ("blue", "no answer within 0.05 s") in errors and ("", "no answer within 0.05 s") in errors
    assert fw.error == "no answer within 0.05 s" and snap.ndmz.error == "ndmz: no answer within 0.05 s"
    assert fw.packets["spoofed"] == 2  # nothing lost, nothing invented
