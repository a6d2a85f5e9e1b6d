"""The observer: reads every NR's WireGuard device and the counters of its nftables table on its
own short period, and once more right after each reconcile, into the agent's Snapshot
(controller/http/snapshot.py); on the same period the counters of the ndmz's table and of ours
in the host namespace.

It reads only (UAPI `get=1` or its netlink equivalent, `nft -j list table`), each read bounded
by a timeout, so a hung wireguard-go or nft delays its own numbers and nothing else; /metrics, /status and the
mesh page read the snapshot and never wait for it. Reads of one network are serialised, so the
snapshot always sees a device's counters in the order they were read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from controller.dataplane.nftables import Nftables, NftError, TableCounters
from controller.dataplane.wireguard.base import WireGuardBackend, WireGuardError
from controller.http.snapshot import Snapshot, Transition
from controller.models.nftables import Table

log = logging.getLogger(__name__)

READ_TIMEOUT = 2.0  # one device read; a healthy one takes well under 10 ms
CONCURRENCY = 8  # devices read at once during a pass


class Observer:
    def __init__(self, snapshot: Snapshot, wireguard: WireGuardBackend, *,
                 on_transition: Callable[[Transition], None] = lambda t: None,
                 on_error: Callable[[str, str], None] = lambda network, error: None,
                 read_timeout: float = READ_TIMEOUT, nftables: Nftables | None = None,
                 ndmz_tables: Callable[[], Iterable[tuple[str, str | None, Table]]] = lambda: ()):
        self.snapshot = snapshot
        self.wg = wireguard
        self.nft = nftables  # None: no counters are read
        # The node's tables beside the NRs': (source, namespace, desired table) at call time.
        self.ndmz_tables = ndmz_tables
        self.on_transition = on_transition
        self.on_error = on_error
        self.read_timeout = read_timeout
        self._locks: dict[str, asyncio.Lock] = {}
        self._pokes: dict[str, asyncio.Task] = {}
        self._limit = asyncio.Semaphore(CONCURRENCY)

    async def run(self) -> None:
        """Pass over every planned NR every `snapshot.observe_interval` seconds, until cancelled."""
        try:
            while True:
                await self.refresh_all()
                await asyncio.sleep(self.snapshot.observe_interval)
        finally:
            for task in self._pokes.values():
                task.cancel()

    async def refresh_all(self) -> None:
        names = [n for n, nr in self.snapshot.networks.items() if nr.desired is not None]
        await asyncio.gather(self.refresh_ndmz(), *(self.refresh(n) for n in names))
        self.snapshot.refreshed_at = self.snapshot.clock()

    def poke(self, network: str) -> None:
        """Read `network`'s device soon (after a reconcile); repeated pokes coalesce."""
        task = self._pokes.get(network)
        if task is not None and not task.done():
            return
        task = asyncio.get_running_loop().create_task(self.refresh(network), name=f"observe-{network}")
        self._pokes[network] = task
        task.add_done_callback(lambda t, n=network: self._poked(n, t))

    def _poked(self, network: str, task: asyncio.Task) -> None:
        if self._pokes.get(network) is task:
            del self._pokes[network]
        if not task.cancelled() and task.exception() is not None:
            log.error("observing network %s failed", network, exc_info=task.exception())

    async def refresh(self, network: str) -> None:
        lock = self._locks.setdefault(network, asyncio.Lock())
        async with lock, self._limit:
            nr = self.snapshot.networks.get(network)
            if nr is None or nr.desired is None:
                self._locks.pop(network, None)
                return
            device, error = None, None
            try:
                device = await asyncio.wait_for(self.wg.get(nr.desired.wg_ifname, nr.desired.netns),
                                                self.read_timeout)
            except (WireGuardError, OSError, asyncio.TimeoutError) as e:
                error = " ".join(str(e).split()) or f"no answer within {self.read_timeout:g} s"
                self.on_error(network, error)
            for transition in self.snapshot.observed_device(network, device, error=error):
                try:
                    self.on_transition(transition)
                except Exception:  # a failing consumer must not stop the observations
                    log.exception("handling %s failed", transition)
            if self.nft is not None and nr.desired.ruleset is not None:
                counters, error = await self._counters(nr.desired.netns, nr.desired.ruleset)
                if error is not None:
                    self.on_error(network, error)
                self.snapshot.observed_firewall(network, counters, error=error)

    async def refresh_ndmz(self) -> None:
        """The counters of the node's own tables (the ndmz's, ours in the host)."""
        tables = list(self.ndmz_tables()) if self.nft is not None else []
        if not tables:
            return
        lock = self._locks.setdefault("/ndmz", asyncio.Lock())  # no network name holds a '/'
        async with lock, self._limit:
            readings, errors = {}, []
            for source, netns, table in tables:
                counters, error = await self._counters(netns, table)
                if error is None:
                    readings[source] = counters
                else:
                    errors.append(f"{source}: {error}")
                    self.on_error("", error)
            self.snapshot.observed_ndmz(readings, errors)

    async def _counters(self, netns: str | None, table: Table) -> tuple[TableCounters | None, str | None]:
        try:
            return await asyncio.wait_for(self.nft.counters(netns, table), self.read_timeout), None
        except (NftError, OSError, asyncio.TimeoutError) as e:
            return None, " ".join(str(e).split()) or f"no answer within {self.read_timeout:g} s"
