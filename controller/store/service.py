"""A long-running asyncio task with start/stop and `async with`, stopped by cancellation."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)

# A cancellation can be swallowed (grpc.aio turns some into errors a retry loop absorbs), so
# stop() cancels again a few times, and never waits forever: shutdown must end.
STOP_ATTEMPTS = 5
STOP_WAIT = 1.0


class Service:
    """Subclasses implement `_run()`; it must only end by being cancelled."""

    _task: asyncio.Task | None = None

    async def _run(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    async def start(self):
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=repr(self))
        return self

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        for _ in range(STOP_ATTEMPTS):
            task.cancel()
            done, _pending = await asyncio.wait({task}, timeout=STOP_WAIT)
            if done:
                if not task.cancelled():
                    task.exception()  # retrieved: a crash here was logged by the task itself
                return
        log.error("%r did not stop after %d cancellations; leaving it", self, STOP_ATTEMPTS)

    async def __aenter__(self):
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()
