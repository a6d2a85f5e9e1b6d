"""Waiting for a positive signal in async tests (never a fixed sleep before a negative check)."""

from __future__ import annotations

import asyncio


async def wait_for(cond, timeout: float, what: str):
    """Poll the async `cond()` every 0.1 s until it is true; fail after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)
