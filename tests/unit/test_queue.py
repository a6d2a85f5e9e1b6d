"""WorkQueue: dedup, one worker per key, backoff, forget, delayed adds, guarded workers, shutdown."""

import asyncio
import logging

import pytest

from controller.reconciler.queue import ShutDown, TerminalError, WorkQueue


async def test_a_key_added_many_times_while_waiting_is_handed_out_once():
    q = WorkQueue()
    for _ in range(3):
        q.add("blue")
    q.add("red")
    assert len(q) == 2
    assert await q.get() == "blue"
    assert await q.get() == "red"
    assert len(q) == 0


async def test_a_key_added_while_processing_is_requeued_only_after_done():
    q = WorkQueue()
    q.add("blue")
    key = await q.get()
    q.add("blue")
    q.add("blue")
    assert len(q) == 0  # not handed to a second worker while the first holds it
    q.done(key)
    assert len(q) == 1
    assert await q.get() == "blue"


async def test_done_without_new_add_does_not_requeue():
    q = WorkQueue()
    q.add("blue")
    q.done(await q.get())
    assert len(q) == 0


async def test_queued_says_whether_a_key_will_be_handed_out_again():
    q = WorkQueue()
    assert not q.queued("blue")
    q.add("blue")
    assert q.queued("blue")
    key = await q.get()
    assert not q.queued("blue")  # being processed, nothing new
    q.add("blue")
    assert q.queued("blue")  # added meanwhile: it runs again after done()
    q.done(key)
    q.done(await q.get())
    q.add_after("blue", 60)
    assert not q.queued("blue")  # only once the delay is over
    q.shutdown()


async def test_get_waits_for_a_key():
    q = WorkQueue()
    getter = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    assert not getter.done()
    q.add("blue")
    assert await asyncio.wait_for(getter, 1) == "blue"


async def test_no_key_is_ever_processed_twice_at_the_same_time():
    q = WorkQueue()
    running: set[str] = set()
    overlaps = []
    runs = 0
    fifth_run = asyncio.Event()

    async def worker(key):
        nonlocal runs
        if key in running:
            overlaps.append(key)
        running.add(key)
        runs += 1
        await asyncio.sleep(0.01)  # idle workers get every chance to grab the key meanwhile
        if runs < 5:
            q.add(key)  # a change arrives while we work
        else:
            fifth_run.set()
        running.discard(key)

    q.add("blue")
    runner = asyncio.create_task(q.run(worker, concurrency=4))
    await asyncio.wait_for(fifth_run.wait(), 5)
    await asyncio.sleep(0.05)
    q.shutdown()
    await asyncio.wait_for(runner, 5)
    assert overlaps == []
    assert runs == 5  # every add during processing led to exactly one more run


async def test_backoff_doubles_per_failure_and_is_capped():
    q = WorkQueue(base_delay=0.005, max_delay=30.0)
    delays = [q.add_rate_limited("blue") for _ in range(16)]
    q.shutdown()  # drop the timers
    assert delays[:4] == [0.005, 0.01, 0.02, 0.04]
    assert delays[-1] == 30.0
    assert all(b >= a for a, b in zip(delays, delays[1:]))


async def test_rate_limited_adds_grow_and_forget_resets():
    q = WorkQueue(base_delay=0.01)
    assert q.add_rate_limited("blue") == 0.01
    assert q.add_rate_limited("blue") == 0.02
    assert q.add_rate_limited("blue") == 0.04
    assert q.num_requeues("blue") == 3
    assert q.backoff("red") == 0.01  # backoff is per key
    q.forget("blue")
    assert q.num_requeues("blue") == 0
    assert q.backoff("blue") == 0.01


async def test_add_after_queues_the_key_once_the_delay_has_passed():
    q = WorkQueue()
    q.add_after("blue", 0.05)
    assert len(q) == 0
    assert await asyncio.wait_for(q.get(), 1) == "blue"


async def test_add_after_keeps_the_earliest_of_several_delays():
    q = WorkQueue()
    loop = asyncio.get_running_loop()
    start = loop.time()
    q.add_after("blue", 5)
    q.add_after("blue", 0.02)
    q.add_after("blue", 10)
    await asyncio.wait_for(q.get(), 1)
    assert loop.time() - start < 1
    await asyncio.sleep(0.05)
    assert len(q) == 0  # the later delays were dropped, not queued again


async def test_failing_worker_is_logged_and_retried_with_backoff_then_forgotten(caplog):
    q = WorkQueue(base_delay=0.001)
    attempts = []

    async def worker(key):
        attempts.append(key)
        if len(attempts) < 3:
            raise RuntimeError("link not ready")
        q.shutdown()

    q.add("blue")
    with caplog.at_level(logging.ERROR):
        await asyncio.wait_for(q.run(worker), 2)
    assert attempts == ["blue"] * 3
    assert sum("link not ready" in r.exc_text for r in caplog.records if r.exc_text) == 2
    assert q.num_requeues("blue") == 0  # success forgets the failures


async def test_terminal_error_is_logged_and_not_retried(caplog):
    q = WorkQueue(base_delay=0.001)
    attempts = []

    async def worker(key):
        attempts.append(key)
        raise TerminalError("spec is invalid")

    q.add("blue")
    runner = asyncio.create_task(q.run(worker))
    with caplog.at_level(logging.ERROR):
        await asyncio.sleep(0.1)
    q.shutdown()
    await asyncio.wait_for(runner, 1)
    assert attempts == ["blue"]
    assert any("failed permanently" in r.getMessage() for r in caplog.records)


async def test_worker_may_ask_to_look_again_later():
    q = WorkQueue()
    attempts = 0

    async def worker(key):
        nonlocal attempts
        attempts += 1
        if attempts == 2:
            q.shutdown()
        return 0.01  # e.g. peers still pending

    q.add("blue")
    await asyncio.wait_for(q.run(worker), 1)
    assert attempts == 2


async def test_shutdown_lets_in_flight_work_finish_and_stops_idle_workers():
    q = WorkQueue()
    finished = []
    started = asyncio.Event()

    async def worker(key):
        started.set()
        await asyncio.sleep(0.05)
        finished.append(key)

    q.add("blue")
    runner = asyncio.create_task(q.run(worker, concurrency=3))
    await started.wait()
    q.add("red")  # waiting, never handed out after shutdown
    q.shutdown()
    await asyncio.wait_for(runner, 1)
    assert finished == ["blue"]


async def test_after_shutdown_adds_are_ignored_and_get_raises():
    q = WorkQueue()
    q.add_after("late", 0.01)
    q.shutdown()
    q.add("blue")
    q.add_after("blue", 0.01)
    await asyncio.sleep(0.03)
    assert len(q) == 0
    with pytest.raises(ShutDown):
        await q.get()


async def test_cancelling_run_cancels_the_workers():
    q = WorkQueue()
    cancelled = asyncio.Event()

    async def worker(key):
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    q.add("blue")
    runner = asyncio.create_task(q.run(worker, concurrency=2))
    await asyncio.sleep(0.01)
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    assert cancelled.is_set()
    assert q.processing == frozenset()  # done() ran for the cancelled key


async def test_a_cancelled_getter_does_not_strand_a_key():
    q = WorkQueue()
    first = asyncio.create_task(q.get())
    second = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    q.add("blue")  # wakes `first`...
    first.cancel()  # ...which is cancelled before it runs
    assert await asyncio.wait_for(second, 1) == "blue"
