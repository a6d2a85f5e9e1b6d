"""The agent's local record of what it created, in its state dir (`state.json`, mode 0600).

It is the agent's proof of ownership: garbage collection only removes NRs recorded here, and an
NR is recorded *before* it is created, so a crash at any point leaves nothing the next start
would not find. It also keeps what must survive restarts: each NR's listen port and the
addresses allocated to workloads (so they never change under a running container), each NR's
public-leg address in the ndmz, and the ndmz itself (what purge must undo: a NIC moved into it,
our table in the host namespace).
Private keys are not here: they live in `keys/` (see dataplane.wireguard.base.KeyStore).

Writes never block the event loop: each is made durable (temp file, fsync, rename, fsync of
the dir) by a thread, bounded by `write_timeout`, and memory takes the change only once the
write is confirmed. Every change holds one lock across deciding and writing (`exclusive()`),
so concurrent reconciles never hand out one port or address twice and nothing is used before
its record is on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# Bound on one durable write of the record (waiting for the record's lock included): a hung
# state disk fails the reconcile that needed the write (reported, retried), nothing else.
WRITE_TIMEOUT = 10.0
NDMZ_ENTRY = "\0ndmz"  # the entries a write may change besides the networks'
PREFIX_ENTRY = "\0prefix"


@dataclass
class NRRecord:
    listen_port: int
    # workload name -> address this node allocated or confirmed for it
    workloads: dict[str, ipaddress.IPv4Address] = field(default_factory=dict)
    # the NR's public leg in the ndmz (100.64.0.0/16), recorded before it is used
    public_ip: ipaddress.IPv4Address | None = None


@dataclass(frozen=True)
class NdmzRecord:
    """The node's ndmz as made: enough for `zmesh purge` to undo it without etcd."""

    netns: str
    host_netns: str | None  # None: the agent's own namespace
    host_table: str  # our nftables table in the host namespace
    nic: str | None = None  # dual NIC: the NIC moved into the ndmz (moved back on purge)
    # single NIC: the host's net.ipv4.ip_forward before the agent turned it on (restored on purge)
    host_forwarding: str | None = None


class StateDirInUse(RuntimeError):
    """The state dir records NRs made under another name prefix: an agent with this prefix
    would neither find them (names differ) nor be allowed to touch them."""


class StateWriteError(OSError):
    """The record could not be made durable: what it was to record must not be used (the
    caller fails and is retried)."""


class StateWriteTimeout(StateWriteError, TimeoutError):
    """The write (or the wait for the record) did not finish within the write timeout."""


def _in_daemon_thread(fn: Callable[[], T]) -> asyncio.Future:
    """Run fn in a new daemon thread; the future is set on the loop when it returns. A hung
    fn never holds the loop, an executor worker, or the interpreter's exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(ok: bool, value) -> None:
        if not future.done():
            (future.set_result if ok else future.set_exception)(value)

    def body() -> None:
        try:
            ok, value = True, fn()
        except BaseException as e:  # handed to the loop
            ok, value = False, e
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, ok, value)

    threading.Thread(target=body, name="zmesh-state-write", daemon=True).start()
    return future


class LocalState:
    FILE = "state.json"

    def __init__(self, state_dir: Path | str, *, write_timeout: float = WRITE_TIMEOUT):
        self.dir = Path(state_dir)
        self.path = self.dir / self.FILE
        self.write_timeout = write_timeout
        self.networks: dict[str, NRRecord] = {}
        self.ndmz: NdmzRecord | None = None
        # The --name-prefix the recorded NRs were made with (None: not recorded yet).
        self.name_prefix: str | None = None
        self._lock = asyncio.Lock()
        self._holder: asyncio.Task | None = None
        self._writing: asyncio.Future | None = None  # the last write's thread, until it returns
        # Entries whose value on disk may differ from memory: a write that failed or timed out
        # may still land later. Their next change is written even if memory says "unchanged";
        # any confirmed write (the whole record) clears them.
        self._unsure: set[str] = set()
        self._load()

    def _load(self) -> None:
        try:
            raw = json.loads(self.path.read_text())
            prefix = raw.get("namePrefix")
            self.name_prefix = prefix if isinstance(prefix, str) else None
            self.networks = {
                name: NRRecord(int(rec["listenPort"]),
                               {w: ipaddress.IPv4Address(ip) for w, ip in rec.get("workloads", {}).items()},
                               ipaddress.IPv4Address(rec["publicIp"]) if rec.get("publicIp") else None)
                for name, rec in raw.get("networks", {}).items()
            }
            ndmz = raw.get("ndmz")
            self.ndmz = None if ndmz is None else NdmzRecord(
                str(ndmz["netns"]), ndmz.get("hostNetns"), str(ndmz["hostTable"]), ndmz.get("nic"),
                ndmz.get("hostForwarding"))
        except FileNotFoundError:
            self.networks = {}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            # Never guess about ownership from a damaged record: keep it aside for an operator
            # and start empty (the NRs it listed are then left alone, not deleted).
            aside = self.path.with_suffix(".corrupt")
            os.replace(self.path, aside)
            log.error("state record %s is damaged (%s); moved to %s", self.path, e, aside)
            self.networks = {}
            self.ndmz = None

    # --- the lock ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold the record: no other task changes it until the block ends. Hold it across
        choosing a value from the record (a port, an address) and recording it, so no other
        reconcile can choose the same one meanwhile. Re-entrant within one task; waiting for
        it is bounded by the write timeout (a hung write holds it at most that long)."""
        task = asyncio.current_task()
        if self._holder is task:
            yield
            return
        try:
            await asyncio.wait_for(self._lock.acquire(), self.write_timeout)
        except asyncio.TimeoutError:
            raise StateWriteTimeout(
                f"waited {self.write_timeout:g}s for the state record {self.path} (another "
                "write to it hangs); nothing was recorded, will retry") from None
        self._holder = task
        try:
            yield
        finally:
            self._holder = None
            self._lock.release()

    # --- changes (each written durably before memory takes it) -------------------------------

    async def claim_prefix(self, name_prefix: str) -> None:
        """Bind the record to `name_prefix`; StateDirInUse if it holds NRs made under another
        one (their names differ: building new NRs beside them would fight them for listen
        ports and UAPI names, and garbage collection could never find the old ones)."""
        if self.name_prefix not in (None, name_prefix) and (self.networks or self.ndmz):
            made = sorted(self.networks) + ([f"ndmz {self.ndmz.netns}"] if self.ndmz else [])
            raise StateDirInUse(
                f"state dir {self.dir} holds network resources made with --name-prefix "
                f"{self.name_prefix!r} ({', '.join(made)}), not {name_prefix!r}: "
                f"start the agent with --name-prefix {self.name_prefix!r}, or remove them first "
                f"with `zmesh purge --state-dir {self.dir}`")
        if self.name_prefix != name_prefix:
            try:
                async with self.exclusive():
                    await self._commit(PREFIX_ENTRY, self.networks, name_prefix, self.ndmz)
                    self.name_prefix = name_prefix
            except OSError as e:  # written with the next record; the NRs keep working meanwhile
                self.name_prefix = name_prefix
                log.warning("cannot write %s yet: %s", self.path, e)

    def ports(self) -> dict[str, int]:
        return {name: rec.listen_port for name, rec in self.networks.items()}

    def public_ips(self) -> dict[str, ipaddress.IPv4Address]:
        return {name: rec.public_ip for name, rec in self.networks.items() if rec.public_ip}

    async def record(self, network: str, listen_port: int,
                     workloads: dict[str, ipaddress.IPv4Address] | None = None,
                     public_ip: ipaddress.IPv4Address | None = None) -> None:
        """Record the NR durably; writes only when something changed (or an earlier write of
        it is unconfirmed). `workloads` and `public_ip` None keep what is recorded. Raises
        StateWriteError (memory unchanged) when the record cannot be written."""
        async with self.exclusive():
            current = self.networks.get(network)
            new = NRRecord(listen_port, dict(workloads if workloads is not None
                                             else (current.workloads if current else {})),
                           public_ip if public_ip is not None else (current.public_ip if current else None))
            if current != new or network in self._unsure:
                await self._commit(network, {**self.networks, network: new}, self.name_prefix, self.ndmz)
                self.networks[network] = new

    async def release_workloads(self, network: str, workloads: set[str]) -> None:
        """Give up the addresses of `workloads` (gone) in `network`'s record."""
        async with self.exclusive():
            current = self.networks.get(network)
            if current is not None and workloads & set(current.workloads):
                await self.record(network, current.listen_port,
                                  {w: ip for w, ip in current.workloads.items() if w not in workloads})

    async def record_ndmz(self, ndmz: NdmzRecord | None) -> None:
        """Record the ndmz durably, before it is made; None once it is gone."""
        async with self.exclusive():
            if ndmz != self.ndmz or NDMZ_ENTRY in self._unsure:
                await self._commit(NDMZ_ENTRY, self.networks, self.name_prefix, ndmz)
                self.ndmz = ndmz

    async def forget(self, network: str) -> None:
        async with self.exclusive():
            if network in self.networks:
                await self._commit(network, {n: r for n, r in self.networks.items() if n != network},
                                   self.name_prefix, self.ndmz)
                del self.networks[network]

    # --- the durable write --------------------------------------------------------------------

    async def _commit(self, entry: str, networks: dict[str, NRRecord], name_prefix: str | None,
                      ndmz: NdmzRecord | None) -> None:
        """Write the whole record (changing `entry`) from a thread, bounded by the write
        timeout; the caller holds the lock and updates memory only when this returns."""
        data = _serialize(networks, name_prefix, ndmz)
        if self._writing is not None and not self._writing.done():
            # Never two writes at once: the older one could land last and undo the newer.
            raise StateWriteTimeout(
                f"an earlier write of the state record {self.path} has not finished (the state "
                "dir's disk hangs?); nothing was recorded, will retry")
        self._unsure.add(entry)  # from here on the disk may hold this change, or not
        started = time.monotonic()
        self._writing = _in_daemon_thread(lambda: _write_durably(self.path, data))
        self._writing.add_done_callback(self._write_returned)
        done, _ = await asyncio.wait({self._writing}, timeout=self.write_timeout)
        if not done:
            raise StateWriteTimeout(
                f"writing the state record {self.path} did not finish within "
                f"{self.write_timeout:g}s (the state dir's disk hangs?); nothing was recorded, "
                "will retry")
        error = self._writing.exception()
        if error is not None:
            raise StateWriteError(f"cannot write the state record {self.path}: {error}") from error
        self._unsure.clear()  # the disk holds exactly what memory will
        log.debug("wrote %s in %.1f ms", self.path, (time.monotonic() - started) * 1e3)

    def _write_returned(self, future: asyncio.Future) -> None:
        """Retrieve the outcome of a write nobody waits for any more (it timed out)."""
        if not future.cancelled() and future.exception() is not None:
            log.debug("a write of %s failed: %s", self.path, future.exception())


def _serialize(networks: dict[str, NRRecord], name_prefix: str | None, ndmz: NdmzRecord | None) -> str:
    data: dict = {"networks": {
        name: {"listenPort": rec.listen_port,
               "workloads": {w: str(ip) for w, ip in sorted(rec.workloads.items())},
               **({"publicIp": str(rec.public_ip)} if rec.public_ip else {})}
        for name, rec in sorted(networks.items())
    }}
    if name_prefix is not None:
        data["namePrefix"] = name_prefix
    if ndmz is not None:
        data["ndmz"] = {"netns": ndmz.netns, "hostNetns": ndmz.host_netns,
                        "hostTable": ndmz.host_table, "nic": ndmz.nic,
                        "hostForwarding": ndmz.host_forwarding}
    return json.dumps(data, indent=1)


def _write_durably(path: Path, text: str) -> None:
    """Blocking: a crash at any point leaves the old record or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)  # the rename itself survives a power loss
    finally:
        os.close(dirfd)
