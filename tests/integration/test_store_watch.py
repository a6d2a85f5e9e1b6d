"""WatchCache and raw watches against a real etcd: order, restarts, compaction, lost connections."""

from __future__ import annotations

import asyncio

import pytest

from controller.store.cache import WatchCache
from controller.store.client import Compacted, EtcdStore

pytestmark = pytest.mark.etcd


class Recorder:
    """on_change that records (key, value as the cache has it at that moment)."""

    def __init__(self):
        self.cache: WatchCache | None = None
        self.seen: list[tuple[str, bytes | None]] = []

    def __call__(self, key: str):
        kv = self.cache.items.get(key)
        self.seen.append((key, kv.value if kv else None))

    def values(self, key: str) -> list[bytes | None]:
        return [v for k, v in self.seen if k == key]


def cache_with_recorder(store, key, **kw) -> tuple[WatchCache, Recorder]:
    rec = Recorder()
    rec.cache = WatchCache(store, key, rec, **kw)
    return rec.cache, rec


async def eventually(cond, timeout=10.0, what="condition"):
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def same_as_etcd(cache: WatchCache, store: EtcdStore, prefix: str) -> bool:
    entries, _ = await store.list_prefix(prefix)
    return {e.key: (e.value, e.mod_revision) for e in entries} == {k: tuple(v) for k, v in cache.items.items()}


async def test_list_then_watch_in_order(store):
    await store.put("/w/a", "0")
    await store.put("/w/b", "0")
    cache, rec = cache_with_recorder(store, "/w/")
    async with cache:
        await cache.wait_synced(5)
        assert sorted(rec.seen) == [("/w/a", b"0"), ("/w/b", b"0")]
        for i in range(1, 51):
            await store.put(f"/w/{'ab'[i % 2]}", str(i))
        await store.delete("/w/a")
        await store.put("/wx", "outside the prefix")
        await eventually(lambda: "/w/a" not in cache.items, what="the deletion")
        expected = [(f"/w/{'ab'[i % 2]}", str(i).encode()) for i in range(1, 51)] + [("/w/a", None)]
        assert rec.seen[2:] == expected
        assert await same_as_etcd(cache, store, "/w/")


async def test_exact_key_is_not_a_prefix(store):
    await store.put("/k/node", "1")
    await store.put("/k/node-2", "other")
    cache, rec = cache_with_recorder(store, "/k/node")
    async with cache:
        await cache.wait_synced(5)
        await store.put("/k/node-2", "ignored")
        await store.put("/k/node", "2")
        await eventually(lambda: cache.items["/k/node"].value == b"2")
        assert list(cache.items) == ["/k/node"]
        assert rec.seen == [("/k/node", b"1"), ("/k/node", b"2")]
    # A key ending in '/' can still be watched exactly when asked.
    assert WatchCache(store, "/k/", prefix=False).prefix is False


async def test_raw_watch_from_a_compacted_revision_raises(store):
    first = await store.put("/c/a", "1")
    last = await store.put("/c/a", "2")
    await store.compact(last)
    with pytest.raises(Compacted) as e:
        async for _ in store.watch("/c/", prefix=True, start_revision=first):
            pass
    assert e.value.compact_revision == last


async def test_every_change_in_order_across_etcd_restart(etcd, store):
    cache, rec = cache_with_recorder(store, "/r/")
    writes: list[tuple[str, bytes]] = []

    async def writer(n):
        for i in range(n):
            key, value = f"/r/{i % 3}", str(i).encode()
            while True:  # keep the order: retry one write until etcd is back
                try:
                    await store.put(key, value)
                    break
                except Exception:
                    await asyncio.sleep(0.05)
            writes.append((key, value))
            await asyncio.sleep(0.005)

    async with cache:
        await cache.wait_synced(5)
        w = asyncio.create_task(writer(200))
        await eventually(lambda: len(writes) > 50)
        await etcd.arestart()  # in a thread: the loop, the writer and the cache keep going
        await w
        last = {k: v for k, v in writes}
        await eventually(lambda: {k: kv.value for k, kv in cache.items.items()} == last, what="the last writes")
        assert cache.relists >= 1  # the restart broke the watch
        assert await same_as_etcd(cache, store, "/r/")
        # Per key, values only move forward: nothing reordered or replayed stale.
        for k in ("/r/0", "/r/1", "/r/2"):
            seen = [int(v) for v in rec.values(k)]
            # (a write retried across the restart may land twice: equal neighbours are fine)
            assert all(a <= b for a, b in zip(seen, seen[1:])), f"{k} went backwards: {seen}"
            assert seen[-1] == max(int(v) for kk, v in writes if kk == k)


async def test_relist_after_compaction_while_disconnected(etcd, etcd_proxy):
    # The cache reaches etcd through a proxy we can cut; a direct store writes meanwhile.
    async with EtcdStore(etcd.endpoints) as direct, EtcdStore([etcd_proxy.endpoint], timeout=1.0) as via_proxy:
        for k in "abc":
            await direct.put(f"/p/{k}", "1")
        cache, rec = cache_with_recorder(via_proxy, "/p/")
        async with cache:
            await cache.wait_synced(5)
            await direct.put("/p/a", "2")
            await eventually(lambda: cache.items["/p/a"].value == b"2")
            await etcd_proxy.cut()
            await eventually(lambda: not cache.synced.is_set(), what="the cache to notice the cut")
            # While it is away: change, delete, create, then compact all history it had.
            await direct.put("/p/a", "3")
            await direct.put("/p/a", "4")
            await direct.delete("/p/b")
            rev = await direct.put("/p/d", "1")
            await direct.compact(rev)
            before = len(rec.seen)
            await etcd_proxy.start()
            await cache.wait_synced(10)
            assert await same_as_etcd(cache, direct, "/p/")
            # One notification per key that differs (deletion first), none for unchanged /p/c.
            assert rec.seen[before:] == [("/p/b", None), ("/p/a", b"4"), ("/p/d", b"1")]
            # And the watch goes on from the re-listed revision.
            await direct.put("/p/c", "2")
            await eventually(lambda: cache.items["/p/c"].value == b"2")
            assert rec.seen[-1] == ("/p/c", b"2")


async def test_failing_callback_does_not_stop_the_cache(store):
    calls = []

    async def on_change(key):
        calls.append(key)
        raise RuntimeError("consumer bug")

    async with WatchCache(store, "/f/", on_change) as cache:
        await cache.wait_synced(5)
        await store.put("/f/a", "1")
        await store.put("/f/b", "1")
        await eventually(lambda: len(calls) == 2)
        assert set(cache.items) == {"/f/a", "/f/b"}
