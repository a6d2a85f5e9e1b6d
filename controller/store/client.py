"""The etcd store: raw KV with endpoint failover, and typed operations on Zero-Mesh objects.

The connection (plaintext or TLS, authentication) is `connection.Connection`, built by the
`client_factory(endpoint, settings)` seam; aetcd gives us etcd's generated stubs. The requests
are built here because aetcd's helpers lack range limits and revisions (needed to paginate at
one revision) and wrap errors inconsistently. Every call goes through `_call`, which fails over
to the next endpoint on a connection error, with tenacity's backoff between rounds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import AsyncIterator, Awaitable, Callable, Literal, NamedTuple, TypeVar

import aetcd.utils
import grpc
import yaml
from aetcd import rpc
from pydantic import BaseModel
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    stop_all,
    wait_exponential_jitter,
)

from ..admission.review import guarded_networks
from ..models.manifest import ManifestError, parse_json_value, to_json
from ..models.resources import Network, NetworkResourceFacts, Node, ResourceStatus, Workload, WorkloadStatus
from .connection import ConfigError, Connection, Endpoint, Settings, TLSFiles, connect_to, connection_problem, parse_endpoint
from .layout import Layout

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_PAGE_SIZE = 1000
TXN_GETS = 100  # reads batched in one transaction: below etcd's default --max-txn-ops of 128
_CONNECTION_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


# --- errors -----------------------------------------------------------------------------------


class StoreError(Exception):
    """Any failure of the store, with a message fit for one line of CLI output."""


class StoreUnavailable(StoreError):
    """No endpoint answered (connection refused, reset or timed out)."""


class Compacted(StoreError):
    """The requested revision was compacted away; re-list to catch up."""

    def __init__(self, compact_revision: int):
        self.compact_revision = compact_revision
        super().__init__(f"revision compacted (oldest available is {compact_revision})")


class Conflict(StoreError):
    """An optimistic-concurrency update lost too many races in a row."""


class TooLarge(StoreError):
    """A transaction etcd refuses for its size (--max-txn-ops or --max-request-bytes)."""


class StaleView(StoreError):
    """Specs changed since the caller read (and validated against) them: read and check again."""


class AuthError(StoreError):
    """etcd refused who we are: no credentials where auth is on, a wrong user or password."""


class PermissionDenied(StoreError):
    """etcd's authorization refused this request (the user's roles do not allow it)."""


# --- values -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    version: int
    lease: int = 0

    @classmethod
    def from_pb(cls, kv) -> "Entry":
        return cls(kv.key.decode(), kv.value, kv.mod_revision, kv.create_revision, kv.version, kv.lease)


class KV(NamedTuple):
    """What a WatchCache keeps per key."""

    value: bytes
    mod_revision: int


@dataclass(frozen=True, slots=True)
class Event:
    type: Literal["put", "delete"]
    key: str
    value: bytes  # empty for deletions
    mod_revision: int  # for deletions: the revision of the deletion


ClientFactory = Callable[[Endpoint, Settings], Connection]


# --- transactions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Compare:
    """`target` of `key` compared with `value`: target is mod|create|version|value."""

    key: str
    target: Literal["mod", "create", "version", "value"]
    op: Literal["==", "!=", "<", ">"]
    value: int | bytes

    def to_pb(self):
        c = rpc.Compare(key=self.key.encode(), result=_CMP_OPS[self.op])
        if self.target == "mod":
            c.target, c.mod_revision = rpc.Compare.MOD, int(self.value)
        elif self.target == "create":
            c.target, c.create_revision = rpc.Compare.CREATE, int(self.value)
        elif self.target == "version":
            c.target, c.version = rpc.Compare.VERSION, int(self.value)
        else:
            c.target, c.value = rpc.Compare.VALUE, _b(self.value)
        return c


_CMP_OPS = {"==": rpc.Compare.EQUAL, "!=": rpc.Compare.NOT_EQUAL, "<": rpc.Compare.LESS, ">": rpc.Compare.GREATER}


def mod_revision_is(key: str, revision: int) -> Compare:
    """The optimistic-concurrency guard: unchanged since read (revision 0: still absent)."""
    return Compare(key, "mod", "==", revision)


def absent(key: str) -> Compare:
    return Compare(key, "create", "==", 0)


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes | str
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str
    prefix: bool = False


@dataclass(frozen=True)
class Get:
    key: str
    prefix: bool = False


Op = Put | Delete | Get


@dataclass
class TxnResult:
    succeeded: bool
    revision: int
    # One entry per op of the branch taken: list[Entry] for Get, deleted count for Delete, None for Put.
    results: list = field(default_factory=list)


def _b(v: bytes | str) -> bytes:
    return v if isinstance(v, bytes) else v.encode()


def prefix_end(prefix: str | bytes) -> bytes:
    return aetcd.utils.prefix_range_end(_b(prefix))


def _op_pb(op: Op):
    if isinstance(op, Put):
        return rpc.RequestOp(request_put=rpc.PutRequest(key=_b(op.key), value=_b(op.value), lease=op.lease))
    if isinstance(op, Delete):
        req = rpc.DeleteRangeRequest(key=_b(op.key))
        if op.prefix:
            req.range_end = prefix_end(op.key)
        return rpc.RequestOp(request_delete_range=req)
    if isinstance(op, Get):
        req = rpc.RangeRequest(key=_b(op.key))
        if op.prefix:
            req.range_end = prefix_end(op.key)
        return rpc.RequestOp(request_range=req)
    raise TypeError(f"not a transaction op: {op!r}")


# --- the store --------------------------------------------------------------------------------

SpecKind = Literal["Network", "Workload"]


@dataclass(frozen=True)
class ObjectError:
    """A value under a spec prefix that is not a valid object: reported, never raised."""

    key: str
    message: str
    problems: tuple[str, ...] = ()  # one per problem (`message` joins them)
    revision: int = 0  # the key's mod_revision
    raw: bytes = b""

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


class EtcdStore:
    def __init__(
        self,
        endpoints: list[str],
        prefix: str = "/zmesh/",
        username: str | None = None,
        password: str | None = None,
        timeout: float = 5.0,
        *,
        tls: TLSFiles | None = None,
        client_factory: ClientFactory = connect_to,
        retry_for: float | None = None,
    ):
        """`tls`: CA and client certificate files; with them an endpoint without a scheme is
        https, and an explicit http:// one is refused (no silent plaintext). Without them an
        https:// endpoint is verified against the system's trust roots. A ConfigError (a
        ValueError) says what cannot work, before anything is sent."""
        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.split(",") if e.strip()]
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self.endpoints = [parse_endpoint(e, "https" if tls else "http") for e in endpoints]
        if tls and any(e.scheme == "http" for e in self.endpoints):
            raise ConfigError("TLS files are given but an etcd endpoint is http://: use https:// "
                              "(or no scheme) for every endpoint")
        if (username is None) != (password is None):
            raise ValueError("etcd username and password go together")
        needs_tls = any(e.scheme == "https" for e in self.endpoints)
        self.settings = Settings(
            timeout=timeout, username=username, password=password,
            tls=(tls or TLSFiles()).credentials() if needs_tls else None,
            client_cert=bool(tls and tls.cert))
        self.layout = Layout(prefix)
        self.timeout = timeout
        # How long one call keeps failing over before StoreUnavailable (each endpoint is tried
        # at least once).
        self.retry_for = timeout if retry_for is None else retry_for
        self._username = username
        self._factory = client_factory
        self._current = 0
        self._unreachable = False  # since the last failover, no call has succeeded
        self._client: Connection | None = None
        self._client_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._closed = False
        # Observability: told (operation, seconds, ok) after every call, failover included.
        self.on_request: Callable[[str, float, bool], None] | None = None
        # ... and (connected, endpoint, why) when `connected` changes.
        self.on_connection: Callable[[bool, str, str], None] | None = None
        self.revision = 0  # the newest cluster revision any response carried
        self.failovers = 0  # moves to the next endpoint after a connection error

    # --- connection ---------------------------------------------------------------------------

    async def __aenter__(self) -> "EtcdStore":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        """Cancel background tasks (lease keep-alives) and close the channel."""
        self._closed = True
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        async with self._client_lock:
            await self._drop_client()

    @property
    def endpoint(self) -> Endpoint:
        """The endpoint in use (or to be tried next)."""
        return self.endpoints[self._current]

    @property
    def connected(self) -> bool:
        """False from a failed call until one succeeds again (True before the first call)."""
        return not self._unreachable

    async def _connected(self) -> Connection:
        async with self._client_lock:
            if self._client is None:
                client = self._factory(self.endpoint, self.settings)
                try:
                    await client.connect()
                except BaseException:
                    await _close_quietly(client)
                    raise
                self._client = client
            return self._client

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await _close_quietly(client)

    async def _fail_over(self, client: Connection | None, why: str) -> None:
        async with self._client_lock:
            if self._client is client:  # another task may have failed over already
                # Warn once per outage; while etcd stays away every retry would say it again.
                log.log(logging.DEBUG if self._unreachable else logging.WARNING,
                        "etcd endpoint %s failed (%s); trying the next one", self.endpoint, why)
                if not self._unreachable:
                    self._unreachable = True
                    self._tell_connection(False, why)
                await self._drop_client()
                self._current = (self._current + 1) % len(self.endpoints)
                self.failovers += 1

    def _tell_connection(self, connected: bool, why: str = "") -> None:
        if self.on_connection is not None:
            try:
                self.on_connection(connected, str(self.endpoint), why)
            except Exception:  # an observer's bug must not fail the call
                log.exception("on_connection failed")

    async def _call(self, fn: Callable[[Connection], Awaitable[T]], what: str) -> T:
        """Run `fn(client)`, failing over between endpoints on connection errors."""
        started = time.monotonic()
        ok = False
        try:
            result = await self._call_failing_over(fn, what)
            ok = True
            header = getattr(result[1] if isinstance(result, tuple) else result, "header", None)
            if header is not None and header.revision > self.revision:
                self.revision = header.revision
            return result
        finally:
            if self.on_request is not None:
                self.on_request(operation_of(what), time.monotonic() - started, ok)

    async def _call_failing_over(self, fn: Callable[[Connection], Awaitable[T]], what: str) -> T:
        last = ""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_Retry),
            stop=stop_all(stop_after_delay(self.retry_for), stop_after_attempt(len(self.endpoints))),
            # No wait while other endpoints are untried; back off once all failed in a row.
            wait=_RoundWait(len(self.endpoints)),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    client = None
                    try:
                        client = await self._connected()
                        result = await fn(client)
                        if self._unreachable:
                            self._unreachable = False
                            log.warning("etcd answers again at %s", self.endpoint)
                            self._tell_connection(True)
                        return result
                    except grpc.aio.AioRpcError as e:
                        if e.code() == grpc.StatusCode.UNAUTHENTICATED and self._username and "token" in (e.details() or ""):
                            # etcd's auth tokens expire; a new connection authenticates again.
                            last = f"{e.code().name}: {e.details()}"
                            async with self._client_lock:
                                if self._client is client:
                                    await self._drop_client()
                            raise _Retry() from None
                        if e.code() not in _CONNECTION_CODES:
                            raise _rpc_error(e, what, self._username) from None
                        last = (connection_problem(e.details(), self.endpoint, self.settings)
                                or f"{e.code().name}: {e.details()}")
                        await self._fail_over(client, last)
                        raise _Retry() from None
                    except asyncio.CancelledError:
                        if not _channel_closed_under_us():
                            raise
                        last = "channel closed by a failover in another task"
                        raise _Retry() from None
                    except (_StreamClosed, asyncio.TimeoutError) as e:
                        last = str(e) or type(e).__name__
                        await self._fail_over(client, last)
                        raise _Retry() from None
        except _Retry:
            pass
        raise StoreUnavailable(
            f"etcd unreachable at {', '.join(map(str, self.endpoints))} ({what}): {last}"
        )

    # --- raw KV -------------------------------------------------------------------------------

    def _md(self, client: Connection):
        return client.metadata

    async def get(self, key: str) -> Entry | None:
        entries, _ = await self.range(key)
        return entries[0] if entries else None

    async def range(
        self, key: str, *, prefix: bool = False, page_size: int = DEFAULT_PAGE_SIZE,
        revision: int | None = None, keys_only: bool = False,
    ) -> tuple[list[Entry], int]:
        """Every entry under `key` (exact key, or prefix), read page by page at ONE revision.

        Returns (entries sorted by key, the revision read at). Pages keep each gRPC message small
        (a single 10,000 x 1 KB response exceeds gRPC's default 4 MiB limit)."""
        for _ in range(5):
            try:
                return await self._range(key, prefix, page_size, revision, keys_only)
            except Compacted:
                if revision:
                    raise
                # Compacted between two pages: start again at the newest revision.
        raise StoreError(f"range {key}: compacted under us five times in a row")

    async def _range(self, key, prefix, page_size, revision, keys_only) -> tuple[list[Entry], int]:
        end = prefix_end(key) if prefix else b""
        start = _b(key)
        entries: list[Entry] = []
        at = revision or 0
        while True:
            req = rpc.RangeRequest(
                key=start, range_end=end, limit=page_size if prefix else 0, revision=at,
                keys_only=keys_only,
            )

            async def one(client, req=req):
                return await client.kvstub.Range(req, timeout=self.timeout, metadata=self._md(client))

            resp = await self._call(one, f"range {key}")
            if not at:
                at = resp.header.revision  # later pages are read at the first page's revision
            entries.extend(Entry.from_pb(kv) for kv in resp.kvs)
            if not prefix or not resp.more or not resp.kvs:
                return entries, at
            start = resp.kvs[-1].key + b"\0"

    async def list_prefix(
        self, prefix: str, *, page_size: int = DEFAULT_PAGE_SIZE, revision: int | None = None,
        keys_only: bool = False,
    ) -> tuple[list[Entry], int]:
        return await self.range(prefix, prefix=True, page_size=page_size, revision=revision, keys_only=keys_only)

    async def put(self, key: str, value: bytes | str, *, lease: int = 0) -> int:
        """Write a key; returns the new revision."""
        req = rpc.PutRequest(key=_b(key), value=_b(value), lease=lease)

        async def one(client):
            return await client.kvstub.Put(req, timeout=self.timeout, metadata=self._md(client))

        return (await self._call(one, f"put {key}")).header.revision

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        """Delete a key (or every key under a prefix); returns how many were deleted."""
        req = rpc.DeleteRangeRequest(key=_b(key), range_end=prefix_end(key) if prefix else b"")

        async def one(client):
            return await client.kvstub.DeleteRange(req, timeout=self.timeout, metadata=self._md(client))

        return (await self._call(one, f"delete {key}")).deleted

    async def txn(self, compare: list[Compare], success: list[Op], failure: list[Op] = ()) -> TxnResult:
        req = rpc.TxnRequest(
            compare=[c.to_pb() for c in compare],
            success=[_op_pb(o) for o in success],
            failure=[_op_pb(o) for o in failure],
        )

        async def one(client):
            return await client.kvstub.Txn(req, timeout=self.timeout, metadata=self._md(client))

        resp = await self._call(one, "transaction")
        results: list = []
        for r in resp.responses:
            which = r.WhichOneof("response")
            if which == "response_range":
                results.append([Entry.from_pb(kv) for kv in r.response_range.kvs])
            elif which == "response_delete_range":
                results.append(r.response_delete_range.deleted)
            else:
                results.append(None)
        return TxnResult(resp.succeeded, resp.header.revision, results)

    async def compact(self, revision: int, physical: bool = True) -> None:
        req = rpc.CompactionRequest(revision=revision, physical=physical)

        async def one(client):
            return await client.kvstub.Compact(req, timeout=self.timeout, metadata=self._md(client))

        await self._call(one, "compact")

    async def watch(
        self, key: str, *, prefix: bool = False, start_revision: int | None = None,
    ) -> AsyncIterator[Event]:
        """Events on `key` (or under the prefix) from `start_revision` on, in revision order.

        Raises Compacted if start_revision is gone, StoreUnavailable when the stream breaks
        (the caller re-lists: see WatchCache). Failover applies to opening the stream only."""
        create = rpc.WatchCreateRequest(
            key=_b(key), range_end=prefix_end(key) if prefix else b"",
            start_revision=start_revision or 0,
        )

        async def open_stream(client):
            # One stream per watch (not aetcd's shared one): a broken or compacted watch then
            # fails alone and cleanly.
            # hasleader: a member cut off from its cluster's leader cancels the watch instead
            # of leaving it silently stale.
            md = tuple(self._md(client) or ()) + (("hasleader", "true"),)
            call = rpc.WatchStub(client.channel).Watch(metadata=md)
            try:
                await call.write(rpc.WatchRequest(create_request=create))
                resp = await asyncio.wait_for(call.read(), self.timeout)
            except BaseException:
                call.cancel()
                raise
            if resp is grpc.aio.EOF:
                raise _StreamClosed("watch stream closed before it started")
            return call, resp

        call, first = await self._call(open_stream, f"watch {key}")
        try:
            resp = first
            while True:
                if resp.compact_revision:
                    raise Compacted(resp.compact_revision)
                if resp.canceled:
                    raise StoreUnavailable(f"etcd canceled the watch on {key}: {resp.cancel_reason or 'no reason'}")
                for ev in resp.events:
                    kv = ev.kv
                    if ev.type == rpc.Event.PUT:
                        yield Event("put", kv.key.decode(), kv.value, kv.mod_revision)
                    else:
                        yield Event("delete", kv.key.decode(), b"", kv.mod_revision)
                try:
                    resp = await call.read()
                except grpc.aio.AioRpcError as e:
                    raise StoreUnavailable(f"watch on {key} broke: {e.code().name}: {e.details()}") from None
                except asyncio.CancelledError:
                    if not _channel_closed_under_us():
                        raise
                    raise StoreUnavailable(f"watch on {key} broke: the channel was closed by a failover") from None
                if resp is grpc.aio.EOF:
                    raise StoreUnavailable(f"watch on {key} ended by the server")
        finally:
            call.cancel()

    # --- leases -------------------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        req = rpc.LeaseGrantRequest(TTL=int(ttl))

        async def one(client):
            return await client.leasestub.LeaseGrant(req, timeout=self.timeout, metadata=self._md(client))

        return (await self._call(one, "lease grant")).ID

    async def refresh_lease(self, lease_id: int) -> int:
        """Keep a lease alive once; returns its remaining TTL (0 or less: the lease is gone)."""

        async def one(client):
            call = client.leasestub.LeaseKeepAlive(
                iter([rpc.LeaseKeepAliveRequest(ID=lease_id)]), timeout=self.timeout, metadata=self._md(client)
            )
            async for reply in call:
                return reply.TTL
            return 0

        return await self._call(one, "lease keep-alive")

    async def revoke_lease(self, lease_id: int) -> None:
        req = rpc.LeaseRevokeRequest(ID=lease_id)

        async def one(client):
            try:
                return await client.leasestub.LeaseRevoke(req, timeout=self.timeout, metadata=self._md(client))
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:  # already expired: fine
                    return None
                raise

        await self._call(one, "lease revoke")

    async def auth_rpc(self, method: str, request, what: str):
        """One call of etcd's Auth service (user/role management, auth enable), with failover."""

        async def one(client):
            return await getattr(client.authstub, method)(request, timeout=self.timeout, metadata=self._md(client))

        return await self._call(one, what)

    def spawn(self, coro, name: str) -> asyncio.Task:
        """A background task owned by the store: cancelled on close; a crash is logged."""
        if self._closed:
            coro.close()
            raise StoreError("the store is closed")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)

        def done(t: asyncio.Task):
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("store task %s crashed", name, exc_info=t.exception())

        task.add_done_callback(done)
        return task

    # --- typed objects ------------------------------------------------------------------------

    def spec_key(self, kind: str, name: str) -> str:
        if kind == "Network":
            return self.layout.network(name)
        if kind == "Workload":
            return self.layout.workload(name)
        raise ValueError(f"kind {kind!r} is not a spec kind (Network or Workload)")

    def spec_prefix(self, kind: str) -> str:
        return self.spec_key(kind, "")

    def index_keys(self, kind: str, name: str, nodes) -> set[str]:
        entry = self.layout.index_network if kind == "Network" else self.layout.index_workload
        return {entry(n, name) for n in nodes}

    def decode_spec(self, kind: str, entry: Entry) -> Network | Workload:
        """A spec value (JSON as the CLI writes it, or YAML by hand) as an object whose
        metadata.generation is the key's mod_revision. Raises ManifestError."""
        name = entry.key.rsplit("/", 1)[-1]
        obj = parse_json_value(entry.value, entry.key, kinds=(kind,))
        if obj.metadata.name != name:
            raise ManifestError(entry.key, [f"metadata.name {obj.metadata.name!r} does not match the key's name {name!r}"])
        obj.metadata.generation = entry.mod_revision
        return obj

    async def get_object(self, kind: SpecKind, name: str) -> Network | Workload | None:
        """The object, or None if absent. A malformed value raises ManifestError."""
        entry = await self.get(self.spec_key(kind, name))
        return None if entry is None else self.decode_spec(kind, entry)

    async def list_objects(self, kind: SpecKind) -> tuple[list[Network | Workload], list[ObjectError]]:
        """Every object of a kind, plus one error per malformed value (never raised)."""
        entries, _ = await self.list_prefix(self.spec_prefix(kind))
        objects, errors = [], []
        for e in entries:
            try:
                objects.append(self.decode_spec(kind, e))
            except ManifestError as err:
                errors.append(ObjectError(e.key, "; ".join(err.problems), tuple(err.problems),
                                          e.mod_revision, e.value))
        return objects, errors

    async def apply(self, obj: Network | Workload, *, max_attempts: int = 20) -> Network | Workload:
        """Write the spec and its node-index entries in one transaction, unreviewed (admission
        is controller/admission with controller/store/specs.py; this is for trusted callers).

        Guarded by the spec key's mod_revision as read just before: on a concurrent change the
        read and write are retried. Index entries of nodes the old spec referenced and the new
        one does not are deleted (even if the old value was malformed). The guard of the network
        concerned is bumped, so a concurrent review of that network is done again. Returns the
        object with metadata.generation set."""
        return await self._cas_spec(obj.kind, obj.name, lambda _current: obj, max_attempts)

    async def update(
        self, kind: SpecKind, name: str, mutate: Callable[[Network | Workload | None], Network | Workload | None],
        *, max_attempts: int = 50,
    ) -> Network | Workload | None:
        """Read-modify-write with compare-and-swap: `mutate(current or None)` returns the new
        object (None: leave it). Retried on conflict, so no concurrent update is lost. A
        malformed current value raises ManifestError."""

        def make(current: Entry | None):
            return mutate(None if current is None else self.decode_spec(kind, current))

        return await self._cas_spec(kind, name, make, max_attempts)

    async def _cas_spec(self, kind: str, name: str, make, max_attempts: int):
        key = self.spec_key(kind, name)
        for attempt in range(max_attempts):
            current = await self.get(key)
            new = make(current)
            if new is None:
                return None if current is None else self.decode_spec(kind, current)
            if (new.kind, new.name) != (kind, name):
                raise ValueError(f"{kind}/{name}: the new object is {new.kind}/{new.name}")
            old_index = self.index_keys(kind, name, lenient_nodes(kind, current.value) or ()) if current else set()
            new_index = self.index_keys(kind, name, spec_nodes(new))
            # Every entry is re-put: self-healing for entries lost or never written (specs written
            # by hand); values are empty so this is cheap.
            ops: list[Op] = [Put(key, to_json(new))] + [Put(k, b"") for k in sorted(new_index)]
            ops += [Delete(k) for k in sorted(old_index - new_index)]
            compare = [mod_revision_is(key, current.mod_revision if current else 0)]
            ops += [Put(self.layout.network_guard(n), b"") for n in sorted(guarded_networks(new))]
            res = await self.checked_txn(compare, ops, f"apply {kind}/{name}")
            if res.succeeded:
                out = new.model_copy(deep=True)
                out.metadata.generation = res.revision
                return out
            await asyncio.sleep(random.uniform(0, 0.005 * (attempt + 1)))
        raise Conflict(f"apply {kind}/{name}: the spec kept changing under us ({max_attempts} attempts)")

    async def delete_object(self, kind: SpecKind, name: str, *, max_attempts: int = 20) -> bool:
        """Delete the spec and its index entries in one transaction; False if it did not exist.
        Statuses are the agents' to clean up; nothing else is touched."""
        key = self.spec_key(kind, name)
        for attempt in range(max_attempts):
            current = await self.get(key)
            if current is None:
                return False
            ops: list[Op] = [Delete(key)]
            if kind == "Network":  # its guard goes too: a review of it meanwhile is done again
                ops.append(Delete(self.layout.network_guard(name)))
            ops += [Delete(k) for k in sorted(self.index_keys(kind, name, lenient_nodes(kind, current.value) or ()))]
            res = await self.checked_txn([mod_revision_is(key, current.mod_revision)], ops, f"delete {kind}/{name}")
            if res.succeeded:
                return True
            await asyncio.sleep(random.uniform(0, 0.005 * (attempt + 1)))
        raise Conflict(f"delete {kind}/{name}: the spec kept changing under us ({max_attempts} attempts)")

    async def checked_txn(self, compare, ops, what: str) -> TxnResult:
        """`txn`, with a transaction too large for etcd raised as `TooLarge` saying which limit."""
        try:
            return await self.txn(compare, ops)
        except StoreError as e:
            if "too many operations" in str(e) or "request is too large" in str(e):
                raise TooLarge(
                    f"{what}: {len(ops)} operations are more than etcd takes in one transaction "
                    "(--max-txn-ops, default 128; --max-request-bytes, default 1.5 MiB); raise them "
                    "on the etcd cluster (see docs/etcd-layout.md)"
                ) from None
            raise

    # --- nodes, liveness, status --------------------------------------------------------------

    async def get_many(self, keys) -> dict[str, Entry]:
        """The entries of `keys` that exist, read in transactions of Gets (one round trip per
        TXN_GETS keys, each at one revision), in the order given; key by key on a cluster whose
        --max-txn-ops is lower."""
        keys = list(dict.fromkeys(keys))
        found: dict[str, Entry] = {}
        for i in range(0, len(keys), TXN_GETS):
            chunk = keys[i:i + TXN_GETS]
            try:
                results = (await self.checked_txn([], [Get(k) for k in chunk], "read")).results
            except TooLarge:
                results = [[e] if (e := await self.get(k)) else [] for k in chunk]
            for entries in results:
                found.update((e.key, e) for e in entries)
        return found

    async def _node_keys(self, tail: str) -> list[str]:
        """Every `nodes/<node>/<tail>` key (a keys-only scan: values are not sent)."""
        entries, _ = await self.list_prefix(self.layout.nodes(), keys_only=True)
        return [e.key for e in entries if (p := self.layout.parse_node_key(e.key)) and p[1] == tail]

    async def list_nodes(self) -> list[Node]:
        """Registered nodes (malformed records are logged and skipped)."""
        keys = await self._node_keys("registration")
        nodes = []
        for key, e in sorted((await self.get_many(keys)).items()):
            try:
                node = parse_json_value(e.value, key, kinds=("Node",))
            except ManifestError as err:
                log.warning("skipping malformed node record: %s", err)
                continue
            if key == self.layout.node_registration(node.name):  # a record names its own key
                nodes.append(node)
        return nodes

    async def registered_nodes(self) -> set[str]:
        """Names of every node with a registration key, even a malformed one."""
        return {self.layout.parse_node_key(k)[0] for k in await self._node_keys("registration")}

    async def alive_nodes(self) -> set[str]:
        """Nodes whose agent holds its liveness lease right now."""
        return {self.layout.parse_node_key(k)[0] for k in await self._node_keys("mesh/alive")}

    async def put_status(self, status: ResourceStatus | WorkloadStatus) -> int:
        if isinstance(status, ResourceStatus):
            key = self.layout.nr_status(status.node, status.network)
        elif isinstance(status, WorkloadStatus):
            key = self.layout.workload_status(status.node, status.workload)
        else:
            raise TypeError(f"not a status: {type(status).__name__}")
        return await self.put(key, status.model_dump_json(exclude_none=True))

    async def put_facts(self, facts: NetworkResourceFacts) -> int:
        return await self.put(self.layout.facts(facts.node, facts.network), facts.model_dump_json())

    async def get_statuses(self, network: str, nodes) -> dict[str, ResourceStatus]:
        """node -> the status that node published for its NR of `network` (malformed skipped)."""
        return self._parsed_by_node(ResourceStatus, await self.get_many(
            self.layout.nr_status(n, network) for n in nodes))

    async def get_facts(self, network: str, nodes) -> dict[str, NetworkResourceFacts]:
        """node -> the facts that node published for `network` (malformed ones skipped)."""
        return self._parsed_by_node(NetworkResourceFacts, await self.get_many(
            self.layout.facts(n, network) for n in nodes))

    def _parsed_by_node(self, model, entries: dict[str, Entry]) -> dict:
        out = {}
        for key, e in entries.items():
            parsed = _parse_status(model, e)
            if parsed is not None and self.layout.parse_node_key(key)[0] == parsed.node:
                out[parsed.node] = parsed
        return out

    async def get_workload_status(self, node: str, name: str) -> WorkloadStatus | None:
        e = await self.get(self.layout.workload_status(node, name))
        return None if e is None else _parse_status(WorkloadStatus, e)

    async def register_node(self, node: Node, ttl: int = 10,
                            on_regranted: Callable[[], None] = lambda: None) -> "NodeRegistration":
        """Write the persistent node record and the leased `alive/<node>` key, and keep the
        lease alive from a background task (re-granted if lost, e.g. after an etcd restart;
        `on_regranted()` is called each time it was)."""
        reg = NodeRegistration(self, node, ttl, on_regranted)
        await reg._register()
        reg.task = self.spawn(reg._keep_alive(), f"keepalive-{node.name}")
        return reg


class NodeRegistration:
    """A registered node: the lease behind `alive/<node>` and the task keeping it alive."""

    def __init__(self, store: EtcdStore, node: Node, ttl: int,
                 on_regranted: Callable[[], None] = lambda: None):
        self.store = store
        self.node = node
        self.ttl = max(int(ttl), 2)
        self.on_regranted = on_regranted
        self.lease_id = 0
        self.task: asyncio.Task | None = None
        self.lost = 0  # how many times the lease had to be re-granted

    async def _register(self) -> None:
        layout = self.store.layout
        self.lease_id = await self.store.grant_lease(self.ttl)
        alive = json.dumps({"since": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        await self.store.txn(
            [],
            [Put(layout.node_registration(self.node.name), to_json(self.node)),
             Put(layout.node_alive(self.node.name), alive, lease=self.lease_id)],
        )

    async def _keep_alive(self) -> None:
        period = self.ttl / 3
        while True:
            await asyncio.sleep(period)
            try:
                if await self.store.refresh_lease(self.lease_id) <= 0:
                    self.lost += 1
                    log.warning("liveness lease of node %s was lost; registering again", self.node.name)
                    await self._register()
                    self.on_regranted()
            except StoreError as e:
                # Keep trying: the dataplane outlives the store; the key expires meanwhile.
                log.warning("cannot keep node %s alive: %s", self.node.name, e)
            except Exception:
                log.exception("keep-alive of node %s failed; retrying", self.node.name)

    async def stop(self, *, revoke: bool = True) -> None:
        """Stop keeping the node alive; with revoke the alive key goes at once, else at TTL."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None
        if revoke and self.lease_id:
            try:
                await self.store.revoke_lease(self.lease_id)
            except StoreError as e:
                log.warning("cannot revoke the lease of node %s: %s", self.node.name, e)


# --- helpers ----------------------------------------------------------------------------------


class _Retry(Exception):
    pass


class _StreamClosed(Exception):
    """The server closed a stream before answering: a connection problem, fail over."""


async def _close_quietly(client: Connection) -> None:
    try:
        await client.close()
    except Exception:  # closing a broken channel may fail; it is gone either way
        pass


_KV_OPERATIONS = ("range", "put", "delete", "transaction", "compact", "watch")
_LEASE_OPERATIONS = ("grant", "keep-alive", "revoke")
OPERATIONS = _KV_OPERATIONS + tuple("lease_" + op.replace("-", "_") for op in _LEASE_OPERATIONS) + ("other",)


def operation_of(what: str) -> str:
    """The operation of a call's description, never its key (a bounded metric label, one of
    OPERATIONS): "range /zmesh/v1/x" -> "range", "lease keep-alive" -> "lease_keep_alive"."""
    word, _, rest = what.partition(" ")
    if word == "lease" and rest in _LEASE_OPERATIONS:
        return "lease_" + rest.replace("-", "_")
    return word if word in _KV_OPERATIONS else "other"


def _channel_closed_under_us() -> bool:
    """grpc.aio raises CancelledError in every call on a channel that is closed; when our own
    task is not being cancelled, that was another task failing over (closing the shared
    channel): a connection loss, not a cancellation."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


class _RoundWait:
    """tenacity wait: none between endpoints of one round, exponential between rounds."""

    def __init__(self, n: int):
        self.n = n
        self.backoff = wait_exponential_jitter(multiplier=0.05, max=2.0, jitter=0.05)

    def __call__(self, state) -> float:
        if state.attempt_number % self.n:
            return 0.0
        return self.backoff(state)


def _rpc_error(e: grpc.aio.AioRpcError, what: str, username: str | None = None) -> StoreError:
    details = e.details() or e.code().name
    if e.code() == grpc.StatusCode.OUT_OF_RANGE and "compacted" in details:
        return Compacted(0)
    if e.code() == grpc.StatusCode.PERMISSION_DENIED:
        who = f"user {username!r}" if username else "this client"
        return PermissionDenied(f"etcd {what}: permission denied for {who}")
    if "user name is empty" in details:
        return AuthError(f"etcd {what}: etcd requires authentication: give a user and password "
                         "(--etcd-user, --etcd-password-file) or a client certificate")
    if "authentication failed" in details:
        return AuthError(f"etcd: authentication failed for user {username!r}: invalid user name or password")
    return StoreError(f"etcd {what}: {details}")


def spec_nodes(obj: Network | Workload) -> list[str]:
    if isinstance(obj, Network):
        return list(obj.spec.nodes)
    return [obj.spec.node]


def lenient_spec(raw: bytes) -> dict | None:
    """The `spec` mapping of a stored value, however invalid the rest (None: unreadable)."""
    try:
        text = raw.decode()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = yaml.safe_load(text)
        spec = data.get("spec") or {}
        return spec if isinstance(spec, dict) else None
    except Exception:  # any shape of garbage
        return None


def lenient_nodes(kind: str, raw: bytes) -> list[str] | None:
    """The nodes a stored spec refers to, even when it is not a valid object (so its index
    entries can still be found). None when the value has no readable structure at all: then
    nobody can tell which nodes it meant, and existing entries are best left alone."""
    spec = lenient_spec(raw)
    if spec is None:
        return None
    try:
        if kind == "Network":
            nodes = [r.get("node") for r in spec.get("resources") or [] if isinstance(r, dict)]
        else:
            nodes = [spec.get("node")]
    except Exception:  # any shape of garbage
        return None
    return [n for n in nodes if isinstance(n, str) and n and "/" not in n]


def _parse_status(model: type[BaseModel], e: Entry):
    try:
        return model.model_validate_json(e.value)
    except Exception as err:
        log.warning("skipping malformed status %s: %s", e.key, str(err).splitlines()[0])
        return None
