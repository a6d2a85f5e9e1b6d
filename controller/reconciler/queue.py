"""WorkQueue: an asyncio work queue in the controller-runtime (client-go) style.

- A key is only ever a name ("network/blue"), never an event: the reconciler reads the whole
  state when it runs, so coalescing many adds of one key into one run loses nothing.
- `add` deduplicates: a waiting key is queued once; a key added while it is being processed is
  queued again once `done` is called, so it is never processed twice at the same time.
- `add_rate_limited` retries with per-key exponential backoff; `forget` resets it on success.
- `run(worker, concurrency)` guards every task: a worker exception is logged and retried with
  backoff, a `TerminalError` is logged and not retried, nothing is silently lost; `shutdown()`
  lets in-flight keys finish and then stops the workers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)

# 5 ms doubling to 30 s: a transient failure (an etcd blip, a link still being created) is
# retried at once, a persistent one (a missing binary) settles at two tries a minute; 30 s stays
# well below a typical resync period so a retry never waits longer than the next resync would.
BASE_DELAY = 0.005
MAX_DELAY = 30.0


class ShutDown(Exception):
    """Raised by `get()` once the queue is shut down and holds nothing more to hand out."""


class TerminalError(Exception):
    """A failure retrying cannot fix (e.g. invalid input); logged and not requeued."""


class WorkQueue(Generic[K]):
    def __init__(self, *, base_delay: float = BASE_DELAY, max_delay: float = MAX_DELAY,
                 name: str = "workqueue"):
        self.name = name
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._queue: deque[K] = deque()
        self._dirty: set[K] = set()  # keys that need processing (queued or to requeue)
        self._processing: set[K] = set()
        self._failures: dict[K, int] = {}
        self._timers: dict[K, asyncio.TimerHandle] = {}
        self._waiters: deque[asyncio.Future] = deque()
        self._shutting_down = False
        # For the metrics: since when a key has been waiting, since when one is processed.
        self._waiting_since: dict[K, float] = {}
        self._started: dict[K, float] = {}
        self.adds = 0  # keys queued (not counting adds coalesced into a waiting key)
        self.retries = 0  # rate-limited requeues after a failure

    # --- adding ---------------------------------------------------------------------------

    def add(self, key: K) -> None:
        """Queue `key` unless it is already waiting; ignored after shutdown."""
        if self._shutting_down or key in self._dirty:
            return
        self._dirty.add(key)
        self._waiting_since[key] = time.monotonic()
        self.adds += 1
        if key in self._processing:
            return  # done() requeues it: never two workers on one key
        self._queue.append(key)
        self._wake_one()

    def add_after(self, key: K, delay: float) -> None:
        """Queue `key` after `delay` seconds; of several pending delays the earliest wins."""
        if self._shutting_down:
            return
        if delay <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        timer = self._timers.get(key)
        if timer is not None:
            if timer.when() <= when:
                return
            timer.cancel()
        self._timers[key] = loop.call_at(when, self._fire, key)

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def add_rate_limited(self, key: K) -> float:
        """Queue `key` after its next backoff delay; returns the delay."""
        delay = self.backoff(key)
        self._failures[key] = self._failures.get(key, 0) + 1
        self.retries += 1
        self.add_after(key, delay)
        return delay

    def backoff(self, key: K) -> float:
        """The delay the next `add_rate_limited(key)` will use."""
        n = self._failures.get(key, 0)
        return self._max_delay if n >= 32 else min(self._base_delay * 2 ** n, self._max_delay)

    def forget(self, key: K) -> None:
        """Reset the backoff of `key` (after it was processed successfully)."""
        self._failures.pop(key, None)

    def num_requeues(self, key: K) -> int:
        return self._failures.get(key, 0)

    # --- taking -----------------------------------------------------------------------------

    async def get(self) -> K:
        """The next key; the caller must call `done(key)` when finished with it."""
        while not self._queue:
            if self._shutting_down:
                raise ShutDown(self.name)
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                # Woken and cancelled at once: pass the wake-up on so no queued key is stranded.
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        key = self._queue.popleft()
        self._dirty.discard(key)
        self._waiting_since.pop(key, None)
        self._processing.add(key)
        self._started[key] = time.monotonic()
        return key

    def done(self, key: K) -> None:
        """Mark `key` finished; if it was added meanwhile it is queued again now."""
        self._processing.discard(key)
        self._started.pop(key, None)
        if key in self._dirty:
            self._queue.append(key)
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    # --- state ----------------------------------------------------------------------------

    def __len__(self) -> int:
        """Keys waiting to be processed (the depth metric); delayed keys are not counted."""
        return len(self._queue)

    def oldest_wait(self) -> float:
        """Seconds the longest-waiting queued key has waited (0 when none waits); a key added
        while it was being processed counts from that add."""
        now = time.monotonic()
        return max((now - self._waiting_since[k] for k in self._queue if k in self._waiting_since),
                   default=0.0)

    def longest_running(self) -> float:
        """Seconds the longest-running worker has been on its key (0 when idle)."""
        now = time.monotonic()
        return max((now - t for t in self._started.values()), default=0.0)

    def queued(self, key: K) -> bool:
        """Whether `key` waits to be processed, also if it was added while being processed (it
        runs again then); a delayed key is not queued until its delay is over."""
        return key in self._dirty

    @property
    def processing(self) -> frozenset[K]:
        return frozenset(self._processing)

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    def shutdown(self) -> None:
        """Stop accepting keys, drop delayed ones and wake every idle worker so it exits. Keys
        being processed finish normally; keys still waiting are not handed out any more."""
        self._shutting_down = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._queue.clear()
        self._dirty.clear()
        self._waiting_since.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    # --- workers ----------------------------------------------------------------------------

    async def run(self, worker: Callable[[K], Awaitable[float | None]], concurrency: int = 1) -> None:
        """Process keys with `concurrency` workers until `shutdown()` (or cancellation).

        `worker(key)` returns None when done, or a number of seconds after which the key should
        be looked at again (e.g. a peer's facts are still pending). An exception requeues the key
        with backoff; a TerminalError does not. Every failure is logged with its traceback.
        """
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        tasks = [asyncio.create_task(self._work(worker), name=f"{self.name}-worker-{i}")
                 for i in range(concurrency)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _work(self, worker: Callable[[K], Awaitable[float | None]]) -> None:
        while True:
            try:
                key = await self.get()
            except ShutDown:
                return
            try:
                requeue_after = await worker(key)
            except asyncio.CancelledError:
                raise
            except TerminalError:
                log.exception("%s: %r failed permanently; not retrying", self.name, key)
                self.forget(key)
            except Exception:
                delay = self.add_rate_limited(key)
                log.exception("%s: %r failed; retrying in %.3fs", self.name, key, delay)
            else:
                self.forget(key)
                if requeue_after is not None:
                    self.add_after(key, requeue_after)
            finally:
                self.done(key)
