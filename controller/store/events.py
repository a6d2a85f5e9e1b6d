"""Events: a short, bounded history of what happened on a node, in etcd under the node's own
prefix (`nodes/<node>/events/networks/<network>/<id>`, `.../events/node/<id>`).

- **Bounded**: at most `history` events per network and node (the one least recently seen is
  deleted in the transaction that writes a new one); a repeat of an event still in the history
  (same network, type, reason and message) updates it: `count` + 1, `lastTimestamp` now.
- **Leased**: every write attaches the event to a lease that is never refreshed, so an event
  expires `ttl` to `ttl` + `ttl`/6 seconds after it was last seen, even when its node is gone
  for good. One lease serves every write of a `ttl`/6 time slice: a handful of leases per node.
- **Never in the way**: `record()` only queues (a bounded buffer; the oldest event is dropped
  when it is full); one background task writes, retrying while etcd is unreachable, so a
  reconcile never waits for an event.

Reads (`read_events`) fetch the histories of many nodes in transactions of prefix gets, so
`zmesh describe` and the mesh page cost a round trip per 100 nodes.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable
from datetime import datetime, timezone

from ..models.manifest import ManifestError, parse_json_value
from ..models.resources import MAX_MESSAGE, NodeEvent
from .client import Delete, EtcdStore, Get, Put, StoreError
from .service import Service

log = logging.getLogger(__name__)

EVENT_TTL = 3600  # seconds an event is kept after it was last seen (like Kubernetes' default)
HISTORY = 20  # events kept per network and node
BUFFER = 256  # events waiting to be written while etcd is slow or away
TXN_GETS = 100  # prefix reads batched in one transaction (etcd's default --max-txn-ops is 128)
RETRY_MAX = 5.0


def _now() -> datetime:
    now = datetime.now(timezone.utc)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


class EventRecorder(Service):
    def __init__(self, store: EtcdStore, node: str, *, ttl: int = EVENT_TTL, history: int = HISTORY,
                 buffer: int = BUFFER, on_recorded: Callable[[NodeEvent], None] = lambda e: None,
                 on_dropped: Callable[[], None] = lambda: None, clock: Callable[[], datetime] = _now):
        self.store = store
        self.node = node
        self.ttl = ttl
        self.history = history
        self.on_recorded = on_recorded
        self.on_dropped = on_dropped
        self.clock = clock
        self._pending: deque[NodeEvent] = deque(maxlen=buffer)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        # network (None: the node) -> key -> event, as written (or found at start)
        self._histories: dict[str | None, dict[str, NodeEvent]] = {}
        self._lease: tuple[int, int] | None = None  # (time slice, lease id)
        self._seq = 0
        self.written = 0

    def __repr__(self) -> str:
        return f"EventRecorder({self.node!r})"

    # --- recording ------------------------------------------------------------------------

    def record(self, network: str | None, type_: str, reason: str, message: str) -> None:
        """Queue an event; never blocks and never raises on a full buffer (the oldest goes)."""
        now = self.clock()
        try:
            event = NodeEvent(node=self.node, network=network, type=type_, reason=reason,
                              message=" ".join(message.split())[:MAX_MESSAGE], count=1,
                              firstTimestamp=now, lastTimestamp=now)
        except ValueError as e:  # a bug in a caller must not fail what it was doing
            log.error("not recording an invalid event (%s %s): %s", type_, reason, str(e).splitlines()[0])
            return
        if len(self._pending) == self._pending.maxlen:
            self.on_dropped()
        self._pending.append(event)
        self._idle.clear()
        self._wake.set()
        self.on_recorded(event)

    def recent(self, network: str | None = None) -> list[NodeEvent]:
        """What this agent knows of a history (None: the node's own) without asking etcd: the
        events written or found at start, and those still waiting to be written (while etcd is
        away, the event saying so among them); the most recently seen last."""
        written = [e for e in self._histories.get(network, {}).values() if e is not None]
        waiting = [e for e in self._pending if e.network == network]
        return sorted(written + waiting, key=lambda e: e.lastTimestamp)[-self.history:]

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued event is written (tests, shutdown)."""
        await asyncio.wait_for(self._idle.wait(), timeout)

    # --- writing --------------------------------------------------------------------------

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                await self._load()
                break
            except StoreError as e:
                log.debug("events of %s: cannot read the history yet: %s", self.node, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
        while True:
            if not self._pending:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            event = self._pending[0]
            try:
                await self._write(event)
            except StoreError as e:
                log.debug("events of %s: write failed, retrying: %s", self.node, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = 0.1
            if self._pending and self._pending[0] is event:
                self._pending.popleft()

    async def _load(self) -> None:
        """What an earlier run of this node left (so repeats still update and bounds hold)."""
        root = self.store.layout.node_events(self.node)
        entries, _ = await self.store.list_prefix(root)
        histories: dict[str | None, dict[str, NodeEvent | None]] = {}
        for e in entries:
            kind, _, rest = e.key[len(root):].partition("/")
            network = rest.partition("/")[0] if kind == "networks" else None
            event = _parse(e.key, e.value)
            if event is not None and (event.node, event.network) != (self.node, network):
                event = None  # not what its key says: unreadable, the first to go
            histories.setdefault(network, {})[e.key] = event
        self._histories = histories

    async def _write(self, event: NodeEvent) -> None:
        history = self._histories.setdefault(event.network, {})
        same = next((k for k, old in history.items() if old is not None and _same(old, event)), None)
        if same is not None:
            old = history[same]
            key, value = same, old.model_copy(update={"count": old.count + 1,
                                                       "lastTimestamp": event.lastTimestamp})
            evicted = []
        else:
            self._seq += 1
            key = self.store.layout.events_of(self.node, event.network) + _event_id(event, self._seq)
            value = event
            by_age = sorted(history, key=lambda k: (history[k] is not None,
                                                    history[k].lastTimestamp if history[k] else 0, k))
            evicted = by_age[:max(0, len(history) + 1 - self.history)]
        lease = await self._current_lease()
        body = value.model_dump_json(exclude_none=True)
        try:
            await self.store.txn([], [Put(key, body, lease=lease)] + [Delete(k) for k in evicted])
        except StoreError as e:
            if "lease not found" in str(e):
                self._lease = None  # revoked or expired under us: take a new one next time
            raise
        for k in evicted:
            history.pop(k, None)
        history[key] = value
        self.written += 1

    async def _current_lease(self) -> int:
        slice_ = max(1, self.ttl // 6)
        now_slice = int(time.time()) // slice_
        if self._lease is None or self._lease[0] != now_slice:
            self._lease = (now_slice, await self.store.grant_lease(self.ttl + slice_))
        return self._lease[1]


def _same(a: NodeEvent, b: NodeEvent) -> bool:
    return (a.network, a.type, a.reason, a.message) == (b.network, b.type, b.reason, b.message)


def _event_id(event: NodeEvent, seq: int) -> str:
    # Sorted by creation (time, then this recorder's sequence), unique without coordination: a
    # restarted agent starts its sequence again, the random tail keeps its keys apart.
    return f"{int(event.firstTimestamp.timestamp() * 1000):013d}-{seq % 10**6:06d}-{secrets.token_hex(2)}"


def _parse(key: str, raw: bytes) -> NodeEvent | None:
    try:
        return parse_json_value(raw, key, kinds=("Event",))
    except ManifestError:
        return None


async def read_events(store: EtcdStore, nodes: Iterable[str], network: str | None,
                      limit: int = 100) -> list[NodeEvent]:
    """The recorded events of `network` (None: of the nodes themselves) on `nodes`, the most
    recently seen last, at most `limit`. Values that are not events, or that name another
    node or network than their key, are skipped (they are someone else's input)."""
    layout = store.layout
    prefixes = {n: layout.events_of(n, network) for n in dict.fromkeys(nodes)}
    found: list[NodeEvent] = []
    items = list(prefixes.items())
    for i in range(0, len(items), TXN_GETS):
        chunk = items[i:i + TXN_GETS]
        res = await store.txn([], [Get(p, prefix=True) for _, p in chunk])
        for (node, prefix), entries in zip(chunk, res.results):
            for e in entries:
                event = _parse(e.key, e.value)
                if event is not None and (event.node, event.network) == (node, network):
                    found.append(event)
    found.sort(key=lambda e: (e.lastTimestamp, e.node))
    return found[-limit:]
