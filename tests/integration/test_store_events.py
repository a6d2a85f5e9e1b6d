"""Events in a real etcd: under the node's own prefix, leased so they expire, a bounded history
per network and node, repeats counted instead of added, never in the way of their recorder
(buffered while etcd is away), and read back across nodes without trusting what they say."""

from __future__ import annotations

import asyncio

import pytest
from waits import wait_for

from controller.models.resources import NodeEvent
from controller.store.events import EventRecorder, read_events

pytestmark = pytest.mark.etcd


async def stored(store, node="n1", network="blue"):
    entries, _ = await store.list_prefix(store.layout.events_of(node, network))
    return entries


def parsed(entries):
    return [NodeEvent.model_validate_json(e.value) for e in entries]


async def test_an_event_is_written_under_the_nodes_prefix_on_a_lease(store):
    async with EventRecorder(store, "n1", ttl=600) as rec:
        rec.record("blue", "Warning", "PeerStale", "peer n3: no reply for more than 16 s while sending to it")
        await rec.flush(10)
    (entry,) = await stored(store)
    assert entry.key.startswith("/zmesh/v1/nodes/n1/events/networks/blue/")
    assert entry.lease != 0
    (event,) = parsed([entry])
    assert (event.node, event.network, event.type, event.reason, event.count) == ("n1", "blue", "Warning", "PeerStale", 1)
    ttl = await store.refresh_lease(entry.lease)  # what is left of it: the TTL plus one slice at most
    assert 0 < ttl <= 600 + 100


async def test_a_repeat_counts_and_the_history_keeps_the_most_recent(store):
    async with EventRecorder(store, "n1", history=3) as rec:
        rec.record("blue", "Warning", "ApplyFailed", "Ready is False: disk full")
        rec.record("blue", "Warning", "ApplyFailed", "Ready is False: disk full")
        await rec.flush(10)
        (only,) = parsed(await stored(store))
        assert only.count == 2 and only.lastTimestamp >= only.firstTimestamp
        for i in range(5):
            rec.record("blue", "Normal", "Created", f"attempt {i}")
        rec.record("red", "Normal", "Created", "another network has its own history")
        await rec.flush(10)
    messages = sorted(e.message for e in parsed(await stored(store)))
    assert messages == ["attempt 2", "attempt 3", "attempt 4"]
    assert len(await stored(store, network="red")) == 1


async def test_a_restarted_recorder_continues_the_history_it_finds(store):
    async with EventRecorder(store, "n1", history=2) as rec:
        rec.record("blue", "Warning", "PeerStale", "peer n3: gone")
        rec.record("blue", "Normal", "Created", "one")
        await rec.flush(10)
    # Someone else's garbage under our prefix is the first to go, never a crash.
    await store.put(store.layout.events_of("n1", "blue") + "0000000000000-junk", b"{not json")
    async with EventRecorder(store, "n1", history=2) as rec:
        rec.record("blue", "Warning", "PeerStale", "peer n3: gone")  # a repeat of the old one
        rec.record("blue", "Normal", "Created", "two")
        await rec.flush(10)
    events = {e.message: e for e in parsed(await stored(store))}
    assert sorted(events) == ["peer n3: gone", "two"]
    assert events["peer n3: gone"].count == 2


async def test_events_expire_with_their_lease(store):
    async with EventRecorder(store, "n1", ttl=2) as rec:
        rec.record("blue", "Normal", "Created", "short-lived")
        await rec.flush(10)
    assert await stored(store)

    async def gone():
        return not await stored(store)
    await wait_for(gone, 20, "the event to expire")


async def test_events_recorded_while_etcd_is_away_are_written_when_it_is_back(etcd, store):
    async with EventRecorder(store, "n1") as rec:
        rec.record("blue", "Normal", "Created", "before")
        await rec.flush(10)
        etcd.kill()
        try:
            rec.record("blue", "Warning", "PeerStale", "while etcd was down")  # returns at once
            await asyncio.sleep(0.5)
        finally:
            etcd.start()
        await rec.flush(30)
    assert sorted(e.message for e in parsed(await stored(store))) == ["before", "while etcd was down"]


async def test_an_invalid_event_is_logged_not_raised(store, caplog):
    async with EventRecorder(store, "n1") as rec:
        rec.record("blue", "Normal", "not a reason", "x")  # reasons are CamelCase words
        rec.record("blue", "Sideways", "Created", "x")
        rec.record("blue", "Normal", "Created", "the valid one")
        await rec.flush(10)
    assert [e.message for e in parsed(await stored(store))] == ["the valid one"]
    assert caplog.text.count("not recording an invalid event") == 2


async def test_a_full_buffer_drops_the_oldest_and_says_so(store):
    dropped = []
    rec = EventRecorder(store, "n1", buffer=2, on_dropped=lambda: dropped.append(1))
    for i in range(4):  # not started: nothing is written yet
        rec.record("blue", "Normal", "Created", f"e{i}")
    assert len(dropped) == 2
    async with rec:
        await rec.flush(10)
    assert sorted(e.message for e in parsed(await stored(store))) == ["e2", "e3"]


async def test_reading_events_of_many_nodes_skips_what_is_not_theirs(store):
    for node in ("n1", "n2"):
        async with EventRecorder(store, node) as rec:
            rec.record("blue", "Normal", "Created", f"NR on {node}")
            await rec.flush(10)
    # n3 writes an event claiming to be n1's, and a value that is no event at all.
    forged = NodeEvent(node="n1", network="blue", type="Warning", reason="Forged", message="x",
                       firstTimestamp="2030-01-01T00:00:00Z", lastTimestamp="2030-01-01T00:00:00Z")
    await store.put(store.layout.events_of("n3", "blue") + "1", forged.model_dump_json())
    await store.put(store.layout.events_of("n3", "blue") + "2", b"garbage")
    events = await read_events(store, [f"n{i}" for i in range(1, 151)], "blue")  # two transactions
    assert [(e.node, e.message) for e in events] == [("n1", "NR on n1"), ("n2", "NR on n2")]
    assert await read_events(store, ["n1"], "red") == []
