"""The CLI's view of etcd: typed reads joined into what the commands print, with every
malformed value turned into a warning line instead of an exception."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from controller.models.manifest import ManifestError, parse_json_value
from controller.models.resources import Network, Workload, WorkloadStatus
from controller.store.access import EtcdAccess
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

    async def registered_nodes(self) -> set[str]:
        """Names of every node record, even a malformed one: the node exists all the same."""
        return await self.store.registered_nodes()

    async def nodes(self) -> list[NodeView]:
        nodes = await self.store.list_nodes()
        alive = await self.store.alive_nodes()
        return [NodeView(n, n.name in alive) for n in sorted(nodes, key=lambda n: n.name)]

    async def _network_view(self, network: Network) -> NetworkView:
        """The network with what each of its nodes published: status and facts (the keys
        of its nodes only, read in batches; never the whole node tree)."""
        nodes = network.spec.nodes
        keys = [k for n in nodes for k in (self.layout.nr_status(n, network.name),
                                            self.layout.facts(n, network.name))]
        entries = await self.store.get_many(keys)
        statuses, facts = {}, {}
        for n in nodes:
            st = self._parse_entry(entries.get(self.layout.nr_status(n, network.name)), "NetworkResourceStatus")
            fa = self._parse_entry(entries.get(self.layout.facts(n, network.name)), "NetworkResourceFacts")
            if st is not None and (st.node, st.network) == (n, network.name):
                statuses[n] = st
            if fa is not None and (fa.node, fa.network) == (n, network.name):
                facts[n] = fa
        return NetworkView(network, statuses, facts)

    def _parse_entry(self, entry, kind: str):
        if entry is None:
            return None
        try:
            return parse_json_value(entry.value, entry.key, (kind,))
        except ManifestError as err:
            self._warn(["; ".join(str(err).splitlines())])
            return None

    async def network_views(self) -> list[NetworkView]:
        return [await self._network_view(n) for n in await self.networks()]

    async def network_view(self, name: str) -> NetworkView | None:
        net = next((n for n in await self.networks() if n.name == name), None)
        return None if net is None else await self._network_view(net)

    async def workload_status(self, workload: Workload) -> WorkloadStatus | None:
        key = self.layout.workload_status(workload.spec.node, workload.name)
        return self._parse_entry(await self.store.get(key), "WorkloadStatus")

    async def workload_views(self) -> list[WorkloadView]:
        return [WorkloadView(w, await self.workload_status(w)) for w in await self.workloads()]

    async def workload_view(self, name: str) -> WorkloadView | None:
        w = next((w for w in await self.workloads() if w.name == name), None)
        return None if w is None else WorkloadView(w, await self.workload_status(w))

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
async def open_store(access: EtcdAccess, prefix: str, timeout: float) -> AsyncIterator[StoreView]:
    # The store logs each endpoint failover; the CLI reports the outcome in one line instead.
    logging.getLogger("controller.store").setLevel(logging.ERROR)
    # One round over the endpoints plus a short retry: a person is waiting for the answer.
    async with access.open_store(prefix, timeout, retry_for=min(timeout, 1.0)) as store:
        yield StoreView(store, prefix)
