"""A long-running asyncio task with start/stop and `async with`, stopped by cancellation."""

from __future__ import annotations

import asyncio


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
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def __aenter__(self):
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()
