"""Repair of the per-node index for specs written by hand (plain `etcdctl put`/`del`).

`EtcdStore.apply` keeps the index right in the spec's own transaction; a value written with
etcdctl bypasses that. Every agent runs an `Indexer`; one wins a leased leader key (a txn that
succeeds only while the key does not exist) and does the work: it keeps caches of the specs and
of the index and, for each spec whose entries differ from what it references, adds the missing
and removes the stale ones in a transaction guarded by the spec's mod_revision. When the leader
dies its lease expires and another agent takes over.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass

from controller.models.manifest import ManifestError, parse_json_value

from .cache import WatchCache
from .client import KV, Delete, EtcdStore, PermissionDenied, Put, StoreError, absent, lenient_nodes, mod_revision_is
from .service import Service

log = logging.getLogger(__name__)

TXN_CHUNK = 100  # below etcd's default --max-txn-ops of 128


@dataclass(frozen=True)
class Repair:
    spec_key: str
    spec_revision: int  # 0: the spec does not exist
    add: tuple[str, ...]
    remove: tuple[str, ...]


def plan_repairs(store: EtcdStore, specs: dict[str, KV], index_keys, only: set[str] | None = None) -> list[Repair]:
    """PURE: what to change so that the index matches the specs. `specs`: spec key -> KV;
    `index_keys`: every key under the index; `only`: restrict to these spec keys."""
    lay = store.layout
    by_spec: dict[str, set[str]] = {}
    for k in index_keys:
        parsed = lay.parse_index_key(k)
        if parsed:
            _, kind, name = parsed
            by_spec.setdefault(store.spec_key(kind, name), set()).add(k)
    repairs = []
    for spec_key in sorted(only if only is not None else set(specs) | set(by_spec)):
        parsed = lay.parse_spec_key(spec_key)
        if parsed is None:
            continue
        kind, name = parsed
        have = by_spec.get(spec_key, set())
        kv = specs.get(spec_key)
        if kv is None:
            want, rev = set(), 0
        else:
            nodes = lenient_nodes(kind, kv.value)
            if nodes is None:  # unreadable: cannot tell, leave its entries alone
                continue
            want, rev = store.index_keys(kind, name, nodes), kv.mod_revision
            if not _valid(kind, spec_key, kv.value):
                # An invalid value cannot say a node is no longer concerned: add the entries
                # it names, remove none (that node's agent keeps its last good state and
                # reports the problem, instead of silently dropping the object).
                want |= have
        if want != have:
            repairs.append(Repair(spec_key, rev, tuple(sorted(want - have)), tuple(sorted(have - want))))
    return repairs


def _valid(kind: str, key: str, raw: bytes) -> bool:
    try:
        parse_json_value(raw, key, kinds=(kind,))
    except ManifestError:
        return False
    return True


async def apply_repair(store: EtcdStore, r: Repair) -> bool:
    """One repair, in transactions of at most TXN_CHUNK ops, each guarded by the spec being
    unchanged (and entries to add still absent). False if a guard failed: look again later."""
    ok = True
    ops = [Put(k, b"") for k in r.add] + [Delete(k) for k in r.remove]
    for i in range(0, len(ops), TXN_CHUNK):
        chunk = ops[i:i + TXN_CHUNK]
        guard = [mod_revision_is(r.spec_key, r.spec_revision)]
        guard += [absent(op.key) for op in chunk if isinstance(op, Put)]
        res = await store.txn(guard, chunk)
        ok = ok and res.succeeded
    return ok


async def repair_index(store: EtcdStore) -> int:
    """One full pass from a consistent read (specs and index at one revision), without
    leadership: for tools and tests. Returns how many specs needed a repair."""
    lay = store.layout
    nets, rev = await store.list_prefix(lay.networks())
    wls, _ = await store.list_prefix(lay.workloads(), revision=rev)
    idx, _ = await store.list_prefix(lay.index_root(), revision=rev, keys_only=True)
    specs = {e.key: KV(e.value, e.mod_revision) for e in nets + wls}
    repairs = plan_repairs(store, specs, [e.key for e in idx])
    for r in repairs:
        await apply_repair(store, r)
    return len(repairs)


class Indexer(Service):
    """Run with `async with Indexer(store, identity=node_name):`. `leading` is set while this
    instance is the leader; `repairs` counts the repairs it made. When etcd denies it the
    leader key or the index (credentials of a node, with auth on) it stops for good: `denied`
    holds the reason and `stopped` is set."""

    def __init__(self, store: EtcdStore, identity: str, *, ttl: int = 10, resync: float = 300.0, debounce: float = 0.05):
        self.store = store
        self.identity = identity
        self.ttl = max(int(ttl), 2)
        self.resync = resync
        self.debounce = debounce
        self.key = store.layout.leader("indexer")
        self.leading = asyncio.Event()
        self.repairs = 0
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self.denied: PermissionDenied | None = None
        self.stopped = asyncio.Event()

    def __repr__(self) -> str:
        return f"Indexer({self.identity!r})"

    async def _run(self) -> None:
        failures = 0
        while True:
            lease = 0
            try:
                lease = await self._campaign()
                failures = 0
                log.info("indexer: %s is the leader", self.identity)
                self.leading.set()
                hold = asyncio.ensure_future(self._hold(lease))
                work = asyncio.ensure_future(self._lead())
                try:
                    await asyncio.wait({hold, work}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for t in (hold, work):
                        t.cancel()
                    await asyncio.gather(hold, work, return_exceptions=True)
                    self.leading.clear()
                for t in (hold, work):  # surface a crash of either for the log below
                    if not t.cancelled() and t.exception():
                        raise t.exception()
                log.warning("indexer: %s lost the leadership", self.identity)
            except asyncio.CancelledError:
                raise
            except PermissionDenied as e:
                self.denied = e
                log.warning("indexer %s: %s: these credentials may not maintain the node index; "
                            "run `zmesh indexer` with admin credentials instead", self.identity, e)
                self.stopped.set()
                return
            except Exception as e:
                failures += 1
                log.warning("indexer %s: %s; retrying", self.identity, e)
            finally:
                if lease:
                    await _quietly(self.store.revoke_lease(lease))  # let the next leader in now
            await asyncio.sleep(random.uniform(0, min(5.0, 0.1 * 2 ** failures)))

    async def _campaign(self) -> int:
        """Returns the lease of our leadership once we hold the leader key."""
        while True:
            lease = await self.store.grant_lease(self.ttl)
            res = await self.store.txn(
                [absent(self.key)], [Put(self.key, self.identity, lease=lease)], [],
            )
            if res.succeeded:
                return lease
            await _quietly(self.store.revoke_lease(lease))
            # Someone else leads: wait for the key to go (their lease expired or was revoked).
            async for ev in self.store.watch(self.key, start_revision=res.revision + 1):
                if ev.type == "delete":
                    break

    async def _hold(self, lease: int) -> None:
        """Keep the leader lease alive; return when it is lost."""
        last_ok = asyncio.get_running_loop().time()
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                if await self.store.refresh_lease(lease) <= 0:
                    return
                last_ok = asyncio.get_running_loop().time()
            except StoreError as e:
                if asyncio.get_running_loop().time() - last_ok > self.ttl:
                    log.warning("indexer: cannot keep the leader lease: %s", e)
                    return

    async def _lead(self) -> None:
        lay = self.store.layout
        caches = [
            WatchCache(self.store, lay.networks(), self._spec_changed),
            WatchCache(self.store, lay.workloads(), self._spec_changed),
            WatchCache(self.store, lay.index_root(), self._index_changed),
        ]
        self._dirty.clear()
        for c in caches:
            await c.start()
        try:
            for c in caches:
                await c.synced.wait()
            self._dirty.add("*")  # a full pass once synced
            self._wake.set()
            while True:
                try:
                    await asyncio.wait_for(self._wake.wait(), self.resync)
                except asyncio.TimeoutError:
                    self._dirty.add("*")
                self._wake.clear()
                await asyncio.sleep(self.debounce)  # let a burst of events (one txn) arrive
                for c in caches:
                    await c.synced.wait()
                dirty, self._dirty = self._dirty, set()
                specs = {**caches[0].items, **caches[1].items}
                only = None if "*" in dirty else dirty
                for r in plan_repairs(self.store, specs, caches[2].items.keys(), only):
                    try:
                        ok = await apply_repair(self.store, r)
                    except PermissionDenied:
                        raise
                    except StoreError as e:  # keep the leadership; try this one again soon
                        log.warning("indexer: cannot repair %s yet: %s", r.spec_key, e)
                        self._dirty.add(r.spec_key)
                        asyncio.get_running_loop().call_later(1.0, self._wake.set)
                        continue
                    if ok:
                        self.repairs += 1
                        log.info("indexer: repaired the index of %s (+%d -%d)", r.spec_key, len(r.add), len(r.remove))
        finally:
            for c in caches:
                await c.stop()

    def _spec_changed(self, key: str) -> None:
        self._dirty.add(key)
        self._wake.set()

    def _index_changed(self, key: str) -> None:
        parsed = self.store.layout.parse_index_key(key)
        if parsed:
            self._dirty.add(self.store.spec_key(parsed[1], parsed[2]))
            self._wake.set()


async def _quietly(coro) -> None:
    try:
        await coro
    except asyncio.CancelledError:
        raise
    except Exception as e:  # best effort: the lease expires on its own anyway
        log.debug("ignored: %s", e)


async def run_indexer(access, prefix: str, identity: str, log_level: str = "info", timeout: float = 5.0) -> int:
    """`zmesh indexer`: campaign and repair until SIGTERM/SIGINT. Exit 1 if etcd denies these
    credentials the index (they are a node's, not an admin's)."""
    import contextlib
    import signal

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with access.open_store(prefix, timeout) as store:
        indexer = Indexer(store, identity=identity)
        log.info("indexer %s: keeping the node index of %s right", identity, store.layout.root)
        async with indexer:
            waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(indexer.stopped.wait())}
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
    if indexer.denied is not None:
        log.error("indexer %s: %s", identity, indexer.denied)
        return 1
    return 0
