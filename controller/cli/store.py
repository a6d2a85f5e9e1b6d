"""The CLI's view of etcd: typed reads joined into what the commands print, with every
malformed value turned into a warning line instead of an exception."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from controller.models.manifest import ManifestError, parse_json_value
from controller.models.resources import Network, ResourceStatus, Workload, WorkloadStatus
from controller.store.layout import Layout

from .output import NetworkView, NodeView, WorkloadView


def cannot_reach(e: BaseException) -> str | None:
    """A short reason when `e` means etcd could not be reached, else None."""
    from controller.store.client import StoreUnavailable

    if isinstance(e, StoreUnavailable):
        # "etcd unreachable at URLS (what): REASON" -> REASON; the CLI names the endpoints itself.
        text = " ".join(str(e).split())
        return text.split("): ", 1)[1] if "): " in text else text
    if isinstance(e, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return " ".join(str(e).split()) or "timed out"
    return None


def is_store_error(e: BaseException) -> bool:
    from controller.store.client import StoreError

    return isinstance(e, StoreError)


class StoreView:
    def __init__(self, store, prefix: str):
        self.store = store
        self.layout = Layout(prefix)
        self.warnings: list[str] = []
        self._cache: dict[str, object] = {}

    def _warn(self, errors) -> None:
        for e in errors or ():
            for line in str(e).splitlines():
                if line not in self.warnings:
                    self.warnings.append(line)

    async def _objects(self, kind: str) -> list:
        if kind not in self._cache:
            objs, errors = await self.store.list_objects(kind)
            self._warn(errors)
            self._cache[kind] = sorted(objs, key=lambda o: o.name)
        return self._cache[kind]

    async def networks(self) -> list[Network]:
        return await self._objects("Network")

    async def workloads(self) -> list[Workload]:
        return await self._objects("Workload")

    async def _parsed(self, prefix: str, kind: str) -> list:
        """Every value under `prefix` parsed as `kind`; malformed ones become warnings."""
        entries, _ = await self.store.list_prefix(prefix)
        out = []
        for e in entries:
            try:
                out.append(parse_json_value(e.value, e.key, (kind,)))
            except ManifestError as err:
                self._warn(["; ".join(str(err).splitlines())])
        return out

    async def registered_nodes(self) -> set[str]:
        """Names of every node record, even a malformed one: the node exists all the same."""
        entries, _ = await self.store.list_prefix(self.layout.nodes(), keys_only=True)
        return {e.key[len(self.layout.nodes()):] for e in entries}

    async def nodes(self) -> list[NodeView]:
        nodes = await self._parsed(self.layout.nodes(), "Node")
        alive = await self.store.alive_nodes()
        return [NodeView(n, n.name in alive) for n in sorted(nodes, key=lambda n: n.name)]

    async def statuses(self, network: str) -> dict[str, ResourceStatus]:
        return {s.node: s for s in await self._parsed(self.layout.nr_statuses(network), "NetworkResourceStatus")}

    async def network_views(self) -> list[NetworkView]:
        # One range over every NR status rather than one request per network.
        by_network: dict[str, dict[str, ResourceStatus]] = {}
        every_status = self.layout.nr_statuses("").rstrip("/") + "/"
        for st in await self._parsed(every_status, "NetworkResourceStatus"):
            by_network.setdefault(st.network, {})[st.node] = st
        return [NetworkView(n, by_network.get(n.name, {})) for n in await self.networks()]

    async def network_view(self, name: str) -> NetworkView | None:
        net = next((n for n in await self.networks() if n.name == name), None)
        return None if net is None else NetworkView(net, await self.statuses(name))

    async def workload_status(self, name: str) -> WorkloadStatus | None:
        key = self.layout.workload_status(name)
        entry = await self.store.get(key)
        if entry is None:
            return None
        try:
            return parse_json_value(entry.value, key, ("WorkloadStatus",))
        except ManifestError as err:
            self._warn(["; ".join(str(err).splitlines())])
            return None

    async def workload_views(self) -> list[WorkloadView]:
        return [WorkloadView(w, await self.workload_status(w.name)) for w in await self.workloads()]

    async def workload_view(self, name: str) -> WorkloadView | None:
        w = next((w for w in await self.workloads() if w.name == name), None)
        return None if w is None else WorkloadView(w, await self.workload_status(name))

    async def specs_revision(self) -> int:
        return await self.store.specs_revision()

    async def apply(self, obj, guard: int | None = None) -> int:
        """Write `obj` if no spec changed since `guard` (StaleView otherwise); the new guard."""
        try:
            written = await self.store.apply(obj, guard=guard)
        finally:
            self._cache.clear()  # written, or stale: either way the next read must be fresh
        return written.metadata.generation

    async def delete(self, kind: str, name: str) -> bool:
        deleted = await self.store.delete_object(kind, name)
        self._cache.clear()
        return bool(deleted)


@contextlib.asynccontextmanager
async def open_store(endpoints: list[str], prefix: str, timeout: float) -> AsyncIterator[StoreView]:
    from controller.store.client import EtcdStore  # lazy: gRPC only for commands that need it

    # The store logs each endpoint failover; the CLI reports the outcome in one line instead.
    logging.getLogger("controller.store").setLevel(logging.ERROR)
    # One round over the endpoints plus a short retry: a person is waiting for the answer.
    async with EtcdStore(endpoints, prefix=prefix, timeout=timeout, retry_for=min(timeout, 1.0)) as store:
        yield StoreView(store, prefix)
