"""A reconcile that hangs anywhere is cancelled after RECONCILE_TIMEOUT, counted as an error,
reported in status, and raises (so the queue retries it with backoff and the worker is free)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from controller.http.metrics import AgentMetrics
from controller.reconciler import reconcile
from controller.reconciler.reconcile import Reconciler, ReconcileTimeout
from controller.reconciler.telemetry import Telemetry


async def test_a_hung_reconcile_is_cancelled_reported_and_retried(monkeypatch):
    r = Reconciler.__new__(Reconciler)  # only what reconcile() itself touches
    r.metrics, r.reconciled, r.state = AgentMetrics("n1", "0"), set(), SimpleNamespace(networks={})
    r.telemetry = Telemetry(r.metrics.snapshot)
    spec = object()
    r.scope = SimpleNamespace(network=lambda name: (spec, None))
    cancelled, reported = asyncio.Event(), []

    async def hang(_name):
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    async def publish_failure(network, error):
        reported.append((network, str(error)))

    r._reconcile, r._publish_failure = hang, publish_failure
    monkeypatch.setattr(reconcile, "RECONCILE_TIMEOUT", 0.05)
    with pytest.raises(ReconcileTimeout, match="did not finish within 0.05s"):
        await asyncio.wait_for(r.reconcile("blue"), 5)
    assert cancelled.is_set() and "blue" in r.reconciled
    assert reported == [(spec, "the reconcile did not finish within 0.05s; cancelled, will retry")]
    assert r.metrics.registry.get_sample_value("zmesh_reconcile_errors_total",
                                               {"network": "blue", "reason": "timeout"}) == 1
