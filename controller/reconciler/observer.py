"""The observer: reads every NR's WireGuard device on its own short period, and once more right
after each reconcile, into the agent's Snapshot (controller/http/snapshot.py).

It reads only (UAPI `get=1` or its netlink equivalent), each read bounded by a timeout, so a
hung wireguard-go delays its own network's numbers and nothing else; /metrics, /status and the
mesh page read the snapshot and never wait for it. Reads of one network are serialised, so the
snapshot always sees a device's counters in the order they were read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from controller.dataplane.wireguard.base import WireGuardBackend, WireGuardError
from controller.http.snapshot import Snapshot, Transition

log = logging.getLogger(__name__)

READ_TIMEOUT = 2.0  # one device read; a healthy one takes well under 10 ms
CONCURRENCY = 8  # devices read at once during a pass


class Observer:
    def __init__(self, snapshot: Snapshot, wireguard: WireGuardBackend, *,
                 on_transition: Callable[[Transition], None] = lambda t: None,
                 on_error: Callable[[str, str], None] = lambda network, error: None,
                 read_timeout: float = READ_TIMEOUT):
        self.snapshot = snapshot
        self.wg = wireguard
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
        await asyncio.gather(*(self.refresh(n) for n in names))
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
