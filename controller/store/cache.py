"""A local copy of one key or prefix, kept current by list + watch.

It lists at a revision R and watches from R+1, so no change between the two is missed. When the
watch breaks (connection lost, etcd restarted, history compacted) it re-lists with backoff and
reports every key whose value differs from what it had (deletions too): consumers are level
triggered and only need to know "look at this key again".
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
from typing import Any, Callable

from .client import KV, Compacted, EtcdStore, StoreError
from .service import Service

log = logging.getLogger(__name__)

OnChange = Callable[[str], Any]  # may return an awaitable


class WatchCache(Service):
    """`items`: key -> KV(value, mod_revision). `synced` is set while `items` reflects a
    list+watch session (cleared while re-listing after a break). `on_change(key)` is called,
    in revision order, for every key that changed; sync or async, a failing callback is logged.

    A key ending in '/' is watched as a prefix unless `prefix` says otherwise."""

    def __init__(
        self, store: EtcdStore, key_or_prefix: str, on_change: OnChange | None = None, *,
        prefix: bool | None = None, max_backoff: float = 5.0, page_size: int | None = None,
    ):
        self.store = store
        self.key = key_or_prefix
        self.prefix = key_or_prefix.endswith("/") if prefix is None else prefix
        self.on_change = on_change
        self.max_backoff = max_backoff
        self.page_size = page_size
        self.items: dict[str, KV] = {}
        self.revision = 0  # the store revision `items` reflects
        self.synced = asyncio.Event()
        self.relists = 0  # how many times the cache re-listed after a break
        self.events = 0  # watch events received

    def __repr__(self) -> str:
        return f"WatchCache({self.key!r}, prefix={self.prefix})"

    async def stop(self) -> None:
        await super().stop()
        self.synced.clear()

    async def wait_synced(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self.synced.wait(), timeout)

    def get(self, key: str) -> KV | None:
        return self.items.get(key)

    async def _run(self) -> None:
        failures = 0
        loop = asyncio.get_running_loop()
        while True:
            session_start = loop.time()
            try:
                await self._relist()
                async for ev in self.store.watch(self.key, prefix=self.prefix, start_revision=self.revision + 1):
                    self.events += 1
                    if ev.type == "put":
                        self.items[ev.key] = KV(ev.value, ev.mod_revision)
                    else:
                        self.items.pop(ev.key, None)
                    self.revision = ev.mod_revision
                    await self._emit(ev.key)
                raise StoreError("watch ended")  # the iterator only ends by raising; be safe
            except asyncio.CancelledError:
                raise
            except Compacted as e:
                log.info("watch on %s fell behind compaction (%s); re-listing", self.key, e)
            except StoreError as e:
                log.warning("watch on %s interrupted: %s; re-listing", self.key, e)
            except Exception:
                log.exception("watch cache on %s failed; re-listing", self.key)
            self.synced.clear()
            self.relists += 1
            # Back off more while breaks come quickly one after another; a long healthy session
            # starts the count again.
            failures = 1 if loop.time() - session_start > 30 else failures + 1
            # Full jitter: many agents losing the same etcd do not come back in lock-step.
            await asyncio.sleep(random.uniform(0, min(self.max_backoff, 0.05 * 2 ** failures)))

    async def _relist(self) -> None:
        kw = {"page_size": self.page_size} if self.page_size else {}
        entries, revision = await self.store.range(self.key, prefix=self.prefix, **kw)
        fresh = {e.key: KV(e.value, e.mod_revision) for e in entries}
        gone = sorted(k for k in self.items if k not in fresh)
        changed = sorted(
            (k for k, kv in fresh.items() if self.items.get(k) != kv), key=lambda k: fresh[k].mod_revision
        )
        self.items = fresh
        self.revision = revision
        # Deletions first (their revision is unknown), then changes in the order they were made.
        for k in gone + changed:
            await self._emit(k)
        self.synced.set()

    async def _emit(self, key: str) -> None:
        if self.on_change is None:
            return
        try:
            result = self.on_change(key)
            if inspect.isawaitable(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("on_change(%s) failed", key)
