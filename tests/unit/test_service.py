"""Service.stop(): a background task is stopped by cancellation, even one that swallows a
cancellation (as a retry loop around grpc.aio can)."""

from __future__ import annotations

import asyncio

from controller.store.service import Service


class SwallowsFirstCancel(Service):
    def __init__(self):
        self.swallowed = 0

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if self.swallowed:
                    raise
                self.swallowed += 1  # taken for a broken connection: retry


async def test_a_swallowed_cancellation_is_repeated_until_the_task_ends():
    s = SwallowsFirstCancel()
    await s.start()
    await asyncio.sleep(0)
    task = s._task
    await s.stop()
    assert s.swallowed == 1 and task.cancelled()
