"""wireguard-go, supervised by the agent and configured over its UAPI socket.

- Started as `wireguard-go -f IFNAME` (its daemonizing mode dies under some supervisors) in the
  node's host namespace via `nsenter --net=` (exec, no fork beside gRPC threads), so its UDP
  socket lives on the node's uplink; the TUN link is then moved into the NR namespace.
- Its own session (start_new_session): it outlives the agent. The agent exits leaving the
  dataplane up and re-adopts the process on restart from the pidfile in the state dir
  (`wireguard-go/IFNAME.pid`: "PID STARTTIME"), verified against /proc/PID/cmdline and the
  process start time before it is adopted or killed — a reused PID is never touched.
- Dead = pid gone/zombie, socket missing or refusing, or the TUN link missing from the NR:
  `ensure_device` then restarts it, so one resync repairs it.
- UAPI socket names are global (/var/run/wireguard/IFNAME.sock): IFNAME must be unique per machine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time

from ..links import Links, NRState
from ..netns import netns_exists, netns_path
from . import uapi
from .base import DeviceOps, DeviceState, WireGuardBackend, WireGuardError

log = logging.getLogger(__name__)

BINARY = "/usr/bin/wireguard-go"


def _proc_start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in ticks); None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # comm may contain spaces
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _is_wireguard_go(pid: int, ifname: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().rstrip(b"\0").split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    return (
        len(argv) == 3
        and os.path.basename(argv[0]) == b"wireguard-go"
        and argv[1:] == [b"-f", ifname.encode()]
    )


def _reap(pid: int) -> bool:
    """Reap `pid` if it is our child with no Popen handle (started by an earlier backend object
    in this process): an unreaped zombie lingers, and an orphaned one may never be reaped.
    True once nothing is left to reap (reaped now, or not our child)."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return True


async def _reaped(pid: int, timeout: float = 5.0) -> None:
    """Wait until our child `pid` is reaped. A Go process's leader turns zombie while its other
    threads still exit, and only then can it be reaped: one WNOHANG try can come too early."""
    deadline = time.monotonic() + timeout
    while not _reap(pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.005)


class UserspaceBackend(WireGuardBackend):
    kind = "userspace"

    def __init__(
        self,
        state_dir: str,
        host_netns: str | None = None,
        links: Links | None = None,
        binary: str = BINARY,
        start_timeout: float = 5.0,
    ) -> None:
        self.state_dir = state_dir
        self.pid_dir = os.path.join(state_dir, "wireguard-go")
        self.host_netns = host_netns
        self.links = links or Links()
        self._own_links = links is None
        self.binary = binary
        self.start_timeout = start_timeout
        self._children: dict[str, subprocess.Popen] = {}  # started by this object: to reap
        self.starts = 0  # processes started (a converged node starts none)
        # Devices whose wireguard-go accepted a UAPI request but never answered (SIGSTOPped,
        # wedged): dead for ensure_device, which restarts them.
        self._hung: set[str] = set()

    # --- records --------------------------------------------------------------------------

    def _pidfile(self, ifname: str) -> str:
        return os.path.join(self.pid_dir, f"{ifname}.pid")

    def _record(self, ifname: str) -> tuple[int, str] | None:
        try:
            with open(self._pidfile(ifname)) as f:
                pid_s, start = f.read().split()
            return int(pid_s), start
        except (FileNotFoundError, ValueError):
            return None

    def pid(self, ifname: str) -> int | None:
        """The recorded PID if that process is still our wireguard-go for `ifname`, else None."""
        child = self._children.get(ifname)
        if child is not None and child.poll() is not None:
            self._children.pop(ifname, None)  # reaped
        rec = self._record(ifname)
        if rec is None or _proc_start_time(rec[0]) != rec[1] or not _is_wireguard_go(rec[0], ifname):
            return None
        return rec[0]

    def owned_devices(self) -> list[str]:
        try:
            names = os.listdir(self.pid_dir)
        except FileNotFoundError:
            return []
        return sorted(n[: -len(".pid")] for n in names if n.endswith(".pid"))

    # --- lifecycle ------------------------------------------------------------------------

    async def device_alive(self, ifname: str, netns: str, observed: NRState | None = None) -> bool:
        if ifname in self._hung:
            return False
        if self.pid(ifname) is None or not netns_exists(netns):
            return False
        # the socket must be our process's (SO_PEERCRED), not merely exist; no get=1 here: it
        # costs ms on a big device and configure() does one anyway
        if uapi.socket_owner(ifname) != self.pid(ifname):
            return False
        st = observed or await self.links.observe(netns, sysctls=False)
        return st is not None and st.link(ifname) is not None

    async def ensure_device(self, ifname: str, netns: str, observed: NRState | None = None) -> bool:
        if await self.device_alive(ifname, netns, observed):
            return False
        if ifname in self._hung:
            log.warning("wireguard-go %s (pid %s) stopped answering its UAPI socket; restarting it",
                        ifname, self.pid(ifname))
        await self._stop(ifname)
        self._hung.discard(ifname)
        await self._start(ifname)
        try:
            await self.links.move_link(self.host_netns, ifname, netns)
        except BaseException:
            await self._stop(ifname)
            raise
        return True

    async def _start(self, ifname: str) -> None:
        owner = uapi.socket_owner(ifname)
        if owner is not None:
            raise WireGuardError(
                f"wireguard {ifname}: the name is in use by another process (pid {owner}); "
                "interface names must be unique per machine"
            )
        os.makedirs(self.pid_dir, mode=0o700, exist_ok=True)
        argv = [self.binary, "-f", ifname]
        if self.host_netns is not None:
            argv = ["nsenter", f"--net={netns_path(self.host_netns)}", "--", *argv]
        logpath = os.path.join(self.pid_dir, f"{ifname}.log")
        with open(logpath, "ab") as logf:
            # Popen, not asyncio's subprocess: asyncio kills its children when their transport
            # is closed, and this process must outlive the agent.
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                start_new_session=True,
                env={**os.environ, "LOG_LEVEL": "error"},
            )
        self._children[ifname] = proc
        self.starts += 1
        # record at once (the start time survives nsenter's exec): if the agent dies before the
        # socket is up, the next one still finds, verifies and stops this process
        tmp = self._pidfile(ifname) + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{proc.pid} {_proc_start_time(proc.pid)}\n")
        os.replace(tmp, self._pidfile(ifname))
        deadline = time.monotonic() + self.start_timeout
        while True:
            if proc.poll() is not None:
                os.unlink(self._pidfile(ifname))
                raise WireGuardError(
                    f"wireguard-go {ifname} exited with {proc.returncode}: {self._log_tail(logpath)}"
                )
            if uapi.socket_owner(ifname) == proc.pid and self.pid(ifname) is not None:
                break
            if time.monotonic() > deadline:
                await self._stop(ifname)
                raise WireGuardError(f"wireguard-go {ifname} did not open its UAPI socket")
            await asyncio.sleep(0.005)
        log.info("started wireguard-go %s (pid %d)", ifname, proc.pid)

    @staticmethod
    def _log_tail(path: str) -> str:
        try:
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - 300))
                return f.read().decode(errors="replace").strip().splitlines()[-1]
        except (OSError, IndexError):
            return "(no output)"

    def _kill(self, pid: int, sig: int = signal.SIGTERM) -> None:
        try:
            os.kill(pid, sig)
            if sig == signal.SIGTERM:
                os.kill(pid, signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
        except ProcessLookupError:
            pass

    async def _stop(self, ifname: str) -> bool:
        """Kill our process for `ifname` (by verified PID), remove its socket and records."""
        removed = False
        pid = self.pid(ifname)
        if pid is not None:
            self._kill(pid)
            removed = True
        rec = self._record(ifname)
        if rec is not None:
            # wait until the recorded process is gone (a dying one has an empty cmdline, so
            # pid() no longer vouches for it, but it may still hold the socket)
            deadline = time.monotonic() + 3.0
            give_up = deadline + 10.0  # a process stuck in the kernel ignores even SIGKILL
            while _proc_start_time(rec[0]) == rec[1]:
                child = self._children.get(ifname)
                if child is not None and child.poll() is not None:
                    break
                _reap(rec[0])
                if time.monotonic() > give_up:
                    raise WireGuardError(f"wireguard-go {ifname} (pid {rec[0]}) does not exit, "
                                         "even after SIGKILL")
                if time.monotonic() > deadline:
                    if self.pid(ifname) is not None:
                        self._kill(rec[0], signal.SIGKILL)
                    deadline += 3.0
                await asyncio.sleep(0.005)
            # a Go process's leader thread turns zombie first; the other threads still hold the
            # listening socket for a moment
            while uapi.socket_owner(ifname) == rec[0] and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            await _reaped(rec[0])
        child = self._children.pop(ifname, None)
        if child is not None and child.poll() is None:
            await _reaped(child.pid)
            child.poll()
        sock = uapi.socket_path(ifname)
        if os.path.exists(sock) and uapi.socket_owner(ifname) is None:
            os.unlink(sock)  # stale: nobody answers (a live one may belong to someone else)
            removed = True
        try:
            os.unlink(self._pidfile(ifname))
        except FileNotFoundError:
            pass
        return removed

    async def delete_device(self, ifname: str, netns: str) -> bool:
        """Stop the process (its TUN link goes with it) and forget it."""
        removed = await self._stop(ifname)
        self._hung.discard(ifname)
        try:
            os.unlink(os.path.join(self.pid_dir, f"{ifname}.log"))
        except FileNotFoundError:
            pass
        return removed

    # --- configuration --------------------------------------------------------------------

    async def get(self, ifname: str, netns: str) -> DeviceState:
        try:
            return await uapi.get(ifname)
        except uapi.UAPITimeout:
            self._hung.add(ifname)
            raise

    async def apply(self, ifname: str, netns: str, ops: DeviceOps) -> None:
        try:
            await uapi.set_ops(ifname, ops)
        except uapi.UAPITimeout:
            self._hung.add(ifname)
            raise

    async def close(self) -> None:
        # Children keep running (own session); drop the handles without waiting.
        self._children.clear()
        if self._own_links:
            self.links.close()

