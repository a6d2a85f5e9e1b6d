"""The sweep's decision (pure): which keys a node published outlived their objects."""

from __future__ import annotations


def test_stale_own_keys_are_those_of_objects_gone_in_any_order():
    from controller.reconciler.reconcile import stale_own_keys
    from controller.store.layout import Layout

    lay = Layout()
    own = {lay.node_registration("n1"), lay.node_alive("n1"), lay.node_events("n1") + "e1",
           lay.facts("n1", "blue"), lay.nr_status("n1", "blue"), lay.verdicts("n1", "blue"),
           lay.facts("n1", "gone"), lay.nr_status("n1", "gone"), lay.verdicts("n1", "gone"),
           lay.workload_status("n1", "w1"), lay.workload_status("n1", "w-gone")}
    assert stale_own_keys(lay, "n1", own, {"blue"}, {"w1"}) == sorted(
        [lay.facts("n1", "gone"), lay.nr_status("n1", "gone"), lay.verdicts("n1", "gone"),
         lay.workload_status("n1", "w-gone")])
    assert stale_own_keys(lay, "n1", own, {"blue", "gone"}, {"w1", "w-gone"}) == []
