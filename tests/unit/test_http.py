"""The HTTP surface: /metrics in Prometheus text format from the agent's own registry,
/healthz while alive, /readyz 503 with reasons until the agent is ready."""

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from controller.http.metrics import AgentMetrics
from controller.http.server import HttpServer, Readiness, make_app


def samples(text):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
async def client_for():
    clients = []

    async def make(metrics, readiness=lambda: (True, "ready")):
        client = TestClient(TestServer(make_app(metrics.registry, readiness)))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def test_metrics_are_served_in_prometheus_text_format(client_for):
    m = AgentMetrics("n1", "0.1.0")
    m.reconcile.labels(network="blue", result="converged").inc()
    m.reconcile_duration.labels(network="blue").observe(0.003)
    m.dataplane_writes.labels(kind="route").inc(2)
    m.wireguard_peers.labels(network="blue").set(4)
    m.set_wireguard_traffic("blue", received_bytes=1000, sent_bytes=2000)
    m.observe_queue(lambda: 3)
    resp = await (await client_for(m)).get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    got = samples(await resp.text())
    assert got[("zmesh_node_info", (("node", "n1"), ("version", "0.1.0")))] == 1
    assert got[("zmesh_reconcile_total", (("network", "blue"), ("result", "converged")))] == 1
    assert got[("zmesh_reconcile_duration_seconds_count", (("network", "blue"),))] == 1
    assert got[("zmesh_reconcile_duration_seconds_bucket", (("le", "0.005"), ("network", "blue")))] == 1
    assert got[("zmesh_dataplane_writes_total", (("kind", "route"),))] == 2
    assert got[("zmesh_wireguard_peers", (("network", "blue"),))] == 4
    assert got[("zmesh_wireguard_received_bytes_total", (("network", "blue"),))] == 1000
    assert got[("zmesh_wireguard_sent_bytes_total", (("network", "blue"),))] == 2000
    assert got[("zmesh_workqueue_depth", ())] == 3


def test_every_metric_follows_the_naming_conventions():
    m = AgentMetrics("n1", "0.1.0")
    m.set_wireguard_traffic("blue", 1, 1)
    for family in text_string_to_metric_families(m.exposition().decode()):
        assert family.name.startswith("zmesh_")
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        assert "_milliseconds" not in family.name and "_kilobytes" not in family.name
    names = {f.name for f in text_string_to_metric_families(m.exposition().decode())}
    for expected in ("zmesh_reconcile", "zmesh_reconcile_duration_seconds", "zmesh_reconcile_errors",
                     "zmesh_dataplane_writes", "zmesh_network_resources", "zmesh_wireguard_peers",
                     "zmesh_wireguard_restarts", "zmesh_etcd_watch_restarts", "zmesh_workqueue_depth",
                     "zmesh_node_info", "zmesh_wireguard_received_bytes", "zmesh_wireguard_sent_bytes"):
        assert expected in names


def test_two_agents_in_one_process_have_separate_registries():
    a, b = AgentMetrics("n1", "0.1.0"), AgentMetrics("n2", "0.1.0")  # no duplicate-name error
    a.wireguard_restarts.inc()
    assert b"zmesh_wireguard_restarts_total 1.0" in a.exposition()
    assert b"zmesh_wireguard_restarts_total 0.0" in b.exposition()
    assert b"zmesh_" not in generate_latest(REGISTRY)  # the global default stays untouched


def test_forget_network_drops_its_series_and_keeps_others():
    m = AgentMetrics("n1", "0.1.0")
    for net in ("blue", "red"):
        m.reconcile.labels(network=net, result="converged").inc()
        m.reconcile.labels(network=net, result="error").inc()
        m.reconcile_errors.labels(network=net).inc()
        m.reconcile_duration.labels(network=net).observe(0.1)
        m.wireguard_peers.labels(network=net).set(1)
        m.set_wireguard_traffic(net, 1, 1)
    m.forget_network("blue")
    m.forget_network("never-seen")
    text = m.exposition().decode()
    assert 'network="blue"' not in text
    assert text.count('network="red"') > 6


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
