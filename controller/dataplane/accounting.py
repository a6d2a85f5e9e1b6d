"""Writes counted per reconcile, not per agent: with networks reconciled in parallel, a global
counter would make one network's reconcile look "changed" by another's writes.

    with counting() as writes:          # in the reconciler, around one reconcile
        ...                             # Links, the WireGuard and nftables backends, the store write
    writes.total                        # made by this reconcile only

`count(kind, n)` adds to the counter of the task that runs it (a ContextVar: asyncio copies the
context into each task, so concurrent reconciles never see each other's counts); outside a
`counting()` block it does nothing.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass
class WriteCount:
    link: int = 0
    wireguard: int = 0
    nftables: int = 0
    etcd: int = 0

    @property
    def total(self) -> int:
        return self.link + self.wireguard + self.nftables + self.etcd


_current: ContextVar[WriteCount | None] = ContextVar("zmesh_write_count", default=None)


def count(kind: str, n: int = 1) -> None:
    c = _current.get()
    if c is not None and n:
        setattr(c, kind, getattr(c, kind) + n)


def active() -> WriteCount | None:
    """The counter of the running reconcile, None outside `counting()`."""
    return _current.get()


def current() -> WriteCount:
    """The counter of the running reconcile (a throw-away one outside `counting()`)."""
    return _current.get() or WriteCount()


@contextlib.contextmanager
def counting():
    c = WriteCount()
    token = _current.set(c)
    try:
        yield c
    finally:
        _current.reset(token)
