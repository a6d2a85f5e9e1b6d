"""Network namespaces and netlink sockets inside them, without forking.

pyroute2's own namespace API (`IPRoute(netns=...)`, `netns.create()`) forks a child per call, and
a fork beside aetcd's live gRPC threads can hang the child (design.md 5b). So:

- namespaces are created like `ip netns add` does, without a process: a throwaway thread
  unshares its network namespace and bind-mounts it under /var/run/netns (deleted by unmount),
- a socket inside a namespace is opened by a short-lived thread that `setns()`es into it, creates
  the socket and exits; a socket stays bound to the namespace it was created in, so the event-loop
  thread can use it afterwards. The thread dies with its foreign namespace: nothing to restore.
- sysctls under /proc/sys/net belong to the namespace of the thread that opens the file (verified
  on this kernel), so they are read and written from such a thread too.

A namespace ref is a name under /var/run/netns or an absolute path (e.g. /proc/PID/ns/net);
None means the process's own namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import os
import stat
import socket
import threading
from collections.abc import Callable
from typing import TypeVar

from pyroute2 import AsyncIPRoute
from pyroute2.netns import setns

NETNS_DIR = "/var/run/netns"
NETLINK_ROUTE = 0
NETLINK_GENERIC = 16

T = TypeVar("T")


class NetnsError(RuntimeError):
    """A namespace operation failed (message has the command's stderr)."""


def netns_path(ref: str) -> str:
    return ref if ref.startswith("/") else os.path.join(NETNS_DIR, ref)


def netns_exists(ref: str) -> bool:
    return os.path.exists(netns_path(ref))


def list_netns() -> list[str]:
    """Names under /var/run/netns (sorted)."""
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def netns_identity(ref: str | None) -> tuple[int, int]:
    """(dev, inode) of a namespace: a name recreated after deletion gets a new identity, and
    two refs (a name, a /proc path) to one namespace have the same one."""
    st = os.stat(netns_path(ref) if ref else "/proc/self/ns/net")
    return (st.st_dev, st.st_ino)


_libc = ctypes.CDLL(None, use_errno=True)

NSFS_MAGIC = 0x6E736673  # statfs f_type of namespace files (linux/magic.h)
NS_GET_NSTYPE = 0xB703  # ioctl: the CLONE_NEW* type of a namespace file (Linux 4.11)


class NotANetns(ValueError):
    """A workload's netns that is no network namespace file (or is not there)."""


def _fs_type(fd: int) -> int:
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86_64/arm64
    if _libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ctypes.c_long.from_buffer(buf).value


@contextlib.contextmanager
def pinned_netns(ref: str):
    """Check that `ref` (a name under /var/run/netns or an absolute path) is a network
    namespace, without ever blocking on it, and keep it: yields (identity, path), identity being
    (dev, inode) and path (/proc/self/fd/N) naming the verified file itself for as long as the
    block runs, so what is used is what was checked even if the original path is swapped
    meanwhile. Raises NotANetns with a message naming what the path is instead.

    The path is opened with O_PATH | O_NONBLOCK (no open of a FIFO or device, no read) and its
    file system type checked with fstatfs (nsfs); only then is it re-opened through that very
    descriptor to ask its namespace type (NS_GET_NSTYPE must say CLONE_NEWNET)."""
    path = netns_path(ref)
    try:
        fd = os.open(path, os.O_PATH | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotANetns(f"network namespace {ref} does not exist (yet)") from None
    except OSError as e:
        raise NotANetns(f"network namespace {ref} cannot be opened: {e.strerror}") from None
    try:
        try:
            identity = _check_netns_fd(fd, path)
        except OSError as e:
            raise NotANetns(f"network namespace {ref} cannot be checked: {e.strerror}") from None
        yield identity, f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _check_netns_fd(fd: int, path: str) -> tuple[int, int]:
    st = os.fstat(fd)
    if _fs_type(fd) != NSFS_MAGIC:
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode)
                else "a regular file" if stat.S_ISREG(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a namespace")
        raise NotANetns(f"{path} is {kind}, not a network namespace")
    real = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        nstype = fcntl.ioctl(real, NS_GET_NSTYPE)
    finally:
        os.close(real)
    if nstype != CLONE_NEWNET:
        raise NotANetns(f"{path} is a namespace, but not a network namespace")
    return (st.st_dev, st.st_ino)
CLONE_NEWNET = 0x40000000
MS_REC, MS_BIND, MS_SHARED, MNT_DETACH = 0x4000, 0x1000, 1 << 20, 2


def _check(rc: int, what: str, path: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"{what} {path}: {os.strerror(err)}")


def _share_netns_dir() -> None:
    # what `ip netns add` does first: /var/run/netns must be a shared mount, so that the bind
    # mounts below propagate to other mount namespaces (containers, `ip netns exec`)
    os.makedirs(NETNS_DIR, exist_ok=True)
    d = NETNS_DIR.encode()
    if _libc.mount(b"none", d, None, MS_SHARED | MS_REC, None) == 0:
        return
    _check(_libc.mount(d, d, b"none", MS_BIND | MS_REC, None), "bind-mount", NETNS_DIR)
    _check(_libc.mount(b"none", d, None, MS_SHARED | MS_REC, None), "make shared", NETNS_DIR)


def _create_blocking(name: str) -> None:
    """`ip netns add` without a process: a throwaway thread unshares its network namespace and
    bind-mounts it (/proc/thread-self: the thread's, not the process's) on /var/run/netns/NAME."""
    path = netns_path(name)
    _share_netns_dir()
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0)
    os.close(fd)
    try:

        def body():
            _check(_libc.unshare(CLONE_NEWNET), "unshare for", path)
            rc = _libc.mount(b"/proc/thread-self/ns/net", path.encode(), b"none", MS_BIND, None)
            _check(rc, "bind-mount", path)

        _in_fresh_thread(body, f"netns-add:{name}")
    except BaseException:
        os.unlink(path)
        raise


def _delete_blocking(name: str) -> None:
    path = netns_path(name)
    _check(_libc.umount2(path.encode(), MNT_DETACH), "unmount", path)
    os.unlink(path)


async def create_netns(name: str) -> bool:
    """Create namespace `name` unless it exists. Returns True if it was created."""
    if netns_exists(name):
        return False
    await asyncio.get_running_loop().run_in_executor(None, _create_blocking, name)
    return True


async def delete_netns(name: str) -> bool:
    """Delete namespace `name` (its veths go with it). Returns True if it existed."""
    if not netns_exists(name):
        return False
    await asyncio.get_running_loop().run_in_executor(None, _delete_blocking, name)
    return True


def _in_fresh_thread(fn: Callable[[], T], name: str) -> T:
    """Run fn in a new thread and wait: namespace changes die with that thread."""
    box: dict = {}

    def body():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    t = threading.Thread(target=body, name=name, daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def run_in_netns_blocking(ref: str | None, fn: Callable[[], T]) -> T:
    """Run fn in a fresh thread that has entered namespace `ref`; blocks the caller."""
    if ref is None:
        return fn()

    def entered():
        setns(netns_path(ref), flags=0, fork=False)
        return fn()

    return _in_fresh_thread(entered, f"setns:{ref}")


async def run_in_netns(ref: str | None, fn: Callable[[], T]) -> T:
    """Run a blocking fn inside namespace `ref` without blocking the event loop, without forking."""
    return await asyncio.get_running_loop().run_in_executor(None, run_in_netns_blocking, ref, fn)


def open_socket_in(ref: str | None, family: int, type_: int, proto: int = 0) -> socket.socket:
    if not (ref is None or netns_exists(ref)):
        raise FileNotFoundError(errno.ENOENT, "no such network namespace", ref)
    return run_in_netns_blocking(ref, lambda: socket.socket(family, type_, proto))


def _sysctl_file(key: str) -> str:
    if not key.startswith("net.") or ".." in key:
        raise ValueError(f"only net.* sysctls are per namespace: {key!r}")
    return "/proc/sys/" + key.replace(".", "/")


async def sysctl_get(ref: str | None, key: str) -> str:
    def read():
        with open(_sysctl_file(key)) as f:
            return f.read().strip()

    return await run_in_netns(ref, read)


async def sysctl_set(ref: str | None, key: str, value: str) -> bool:
    """Set a net.* sysctl inside a namespace if it differs. Returns True if it wrote."""

    def write():
        with open(_sysctl_file(key), "r+") as f:
            if f.read().strip() == value:
                return False
            f.seek(0)
            f.write(value)
            return True

    return await run_in_netns(ref, write)


class Netlink:
    """An AsyncIPRoute whose requests are serialized.

    The kernel runs one dump at a time per netlink socket (a second concurrent one fails with
    EBUSY), and the reconciler's workers share a namespace's socket (the host's, at least). So
    every request holds the lock until its answer is fully read; a dump returns a list.
    """

    def __init__(self, ipr: AsyncIPRoute) -> None:
        self.ipr = ipr
        self._lock = asyncio.Lock()

    async def _call(self, _method: str, _command: str, **kw):
        async with self._lock:
            res = await getattr(self.ipr, _method)(_command, **kw)
            if _command == "dump":
                res = [m async for m in res]
            return res

    async def link(self, command: str, **kw):
        return await self._call("link", command, **kw)

    async def addr(self, command: str, **kw):
        return await self._call("addr", command, **kw)

    async def route(self, command: str, **kw):
        return await self._call("route", command, **kw)

    async def link_lookup(self, **kw) -> list[int]:
        async with self._lock:
            return await self.ipr.link_lookup(**kw)

    def close(self) -> None:
        self.ipr.close()


async def open_iproute(ref: str | None) -> Netlink:
    """A new rtnetlink socket inside `ref` (the caller closes it)."""
    sock = await asyncio.get_running_loop().run_in_executor(
        None, open_socket_in, ref, socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE
    )
    ipr = AsyncIPRoute(fileno=sock.detach())
    await ipr.setup_endpoint()
    return Netlink(ipr)


@contextlib.asynccontextmanager
async def transient_iproute(ref: str | None):
    """A socket for one job in a namespace we must not pin (a workload's: when the container
    dies its namespace, and the veth in it, must go)."""
    ipr = await open_iproute(ref)
    try:
        yield ipr
    finally:
        ipr.close()


class NetlinkPool:
    """One rtnetlink socket (a serialized AsyncIPRoute) per namespace, reopened when the namespace changes.

    A cached socket pins its namespace: a deleted namespace lives on (with its veths) while a
    socket into it is open, so `forget(ref)` must be called before or after deleting one
    (`links.Links.delete_nr` does), and a name recreated under us is detected by inode.
    """

    def __init__(self) -> None:
        self._socks: dict[str | None, tuple[tuple[int, int], Netlink]] = {}
        self._lock = asyncio.Lock()

    async def get(self, ref: str | None) -> Netlink:
        """The cached socket into `ref`; FileNotFoundError (and the cache dropped) if it is gone."""
        try:
            ident = netns_identity(ref)
        except FileNotFoundError:
            self.forget(ref)  # don't pin a namespace someone else deleted
            raise
        async with self._lock:
            cached = self._socks.get(ref)
            if cached and cached[0] == ident:
                return cached[1]
            if cached:
                cached[1].close()
            ipr = await open_iproute(ref)
            self._socks[ref] = (ident, ipr)
            return ipr

    def forget(self, ref: str | None) -> None:
        cached = self._socks.pop(ref, None)
        if cached:
            cached[1].close()

    def close(self) -> None:
        for ref in list(self._socks):
            self.forget(ref)
