"""The CLI's view of etcd: typed reads joined into what the commands print. A malformed value
is data (an InvalidObject, an unreadable status), never an exception."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from controller.models.manifest import ManifestError, parse_json_value
from controller.models.resources import Network, ResourceStatus, Workload, WorkloadStatus
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


@dataclass
class InvalidObject:
    """A spec value in etcd that is not a valid object: shown with its problems, never hidden."""

    kind: str
    name: str
    key: str
    revision: int
    problems: list[str]
    nodes: list[str] = field(default_factory=list)  # the nodes its value names, as far as readable
    network: str | None = None  # a workload's network, as far as readable

    @property
    def ref(self) -> str:
        return f"{self.kind.lower()}/{self.name}"


class StoreView:
    """Reads for the commands. Nothing here prints: what is invalid comes back as data, and a
    command warns about what concerns it, once (`warn_invalid`)."""

    def __init__(self, store, prefix: str):
        self.store = store
        self.layout = Layout(prefix)
        self.warnings: list[str] = []
        self._cache: dict[str, tuple[list, list[InvalidObject]]] = {}

    def warn_invalid(self, kind: str, invalid: list[InvalidObject]) -> None:
        """One line for every invalid object of a kind: how many, which, how to see why."""
        if not invalid:
            return
        names = ", ".join(o.name for o in invalid[:5]) + (f" and {len(invalid) - 5} more" if len(invalid) > 5 else "")
        noun = kind.lower() + ("s" if len(invalid) > 1 else "")
        self.warnings.append(f"{len(invalid)} invalid {noun} in etcd: {names} "
                             f"('zmesh describe {kind.lower()} NAME' shows why)")

    async def listing(self, kind: str) -> tuple[list, list[InvalidObject]]:
        """(valid objects, invalid values) of a kind, sorted by name."""
        if kind not in self._cache:
            objs, errors = await self.store.list_objects(kind)
            invalid = [self._invalid(kind, e.key, e.revision, list(e.problems) or [e.message], e.raw)
                       for e in errors]
            self._cache[kind] = (sorted(objs, key=lambda o: o.name), sorted(invalid, key=lambda o: o.name))
        return self._cache[kind]

    def _invalid(self, kind: str, key: str, revision: int, problems: list[str], raw: bytes) -> InvalidObject:
        from controller.store.client import lenient_nodes, lenient_spec

        name = key.removeprefix(self.layout.networks() if kind == "Network" else self.layout.workloads())
        network = (lenient_spec(raw) or {}).get("network") if kind == "Workload" else None
        return InvalidObject(kind, name, key, revision, problems, lenient_nodes(kind, raw) or [],
                             network if isinstance(network, str) else None)

    async def networks(self) -> list[Network]:
        return (await self.listing("Network"))[0]

    async def workloads(self) -> list[Workload]:
        return (await self.listing("Workload"))[0]

    async def lookup(self, kind: str, name: str) -> Network | Workload | InvalidObject | None:
        """One spec by name (a single read): the object, its problems if invalid, or None."""
        key = self.store.spec_key(kind, name)
        entry = await self.store.get(key)
        if entry is None:
            return None
        try:
            return self.store.decode_spec(kind, entry)
        except ManifestError as e:
            return self._invalid(kind, key, entry.mod_revision, e.problems, entry.value)

    async def registered_nodes(self) -> set[str]:
        """Names of every node record, even a malformed one: the node exists all the same."""
        return await self.store.registered_nodes()

    async def nodes(self) -> list[NodeView]:
        nodes = await self.store.list_nodes()
        alive = await self.store.alive_nodes()
        return [NodeView(n, n.name in alive) for n in sorted(nodes, key=lambda n: n.name)]

    async def invalid_nodes(self, valid: list[NodeView]) -> list[str]:
        """Nodes whose registration exists but cannot be read."""
        return sorted(await self.registered_nodes() - {v.node.name for v in valid})

    async def network_view(self, network: Network) -> NetworkView:
        """The network with what each of its nodes published: status and facts (the keys
        of its nodes only, read in batches; never the whole node tree)."""
        return (await self._network_views([network]))[0]

    async def network_views(self, networks: list[Network] | None = None) -> list[NetworkView]:
        return await self._network_views(await self.networks() if networks is None else networks)

    async def _network_views(self, networks: list[Network]) -> list[NetworkView]:
        published = await self._published([(net.name, net.spec.nodes) for net in networks])
        return [NetworkView(net, *published[net.name]) for net in networks]

    async def nr_statuses(self, network: str, nodes: list[str]) -> dict[str, ResourceStatus]:
        """node -> the status it published for its NR of `network` (also of an invalid network)."""
        return (await self._published([(network, nodes)]))[network][0]

    async def _published(self, networks: list[tuple[str, list[str]]]) -> dict[str, tuple]:
        """network -> (statuses, facts, unreadable, verdicts) by node and the set of its nodes
        holding their lease, for the (network, nodes) given: the keys of those nodes only, read
        in batches; never the whole node tree."""
        lay = self.layout
        entries = await self.store.get_many(
            k for net, nodes in networks for n in nodes
            for k in (lay.nr_status(n, net), lay.facts(n, net), lay.verdicts(n, net), lay.node_alive(n)))
        out = {}
        for net, nodes in networks:
            statuses, facts, unreadable, verdicts, alive = out.setdefault(net, ({}, {}, {}, {}, set()))
            for n in nodes:
                for found, kind, key in ((statuses, "NetworkResourceStatus", lay.nr_status(n, net)),
                                         (facts, "NetworkResourceFacts", lay.facts(n, net)),
                                         (verdicts, "NetworkResourceVerdicts", lay.verdicts(n, net))):
                    parsed = self._parse_entry(entries.get(key), kind, unreadable, n)
                    if parsed is not None and (parsed.node, parsed.network) == (n, net):
                        found[n] = parsed
                if lay.node_alive(n) in entries:
                    alive.add(n)
        return out

    def _parse_entry(self, entry, kind: str, unreadable: dict | None = None, node: str = ""):
        if entry is None:
            return None
        try:
            return parse_json_value(entry.value, entry.key, (kind,))
        except ManifestError as err:
            if unreadable is not None:
                unreadable[node] = f"{kind} at {entry.key}: {'; '.join(err.problems)}"
            return None

    async def statuses_on(self, node_workloads: list[tuple[str, str]]) -> dict[str, WorkloadStatus]:
        """(node, workload) -> the status that node published for it, for the pairs given."""
        lay = self.layout
        entries = await self.store.get_many(lay.workload_status(n, w) for n, w in node_workloads)
        out = {}
        for n, w in node_workloads:
            st = self._parse_entry(entries.get(lay.workload_status(n, w)), "WorkloadStatus")
            if st is not None and (st.node, st.workload) == (n, w):
                out[w] = st
        return out

    async def workload_views(self, workloads: list[Workload] | None = None) -> list[WorkloadView]:
        workloads = await self.workloads() if workloads is None else workloads
        statuses = await self.statuses_on([(w.spec.node, w.name) for w in workloads])
        return [WorkloadView(w, statuses.get(w.name)) for w in workloads]

    async def network(self, name: str) -> Network | None:
        return next((n for n in await self.networks() if n.name == name), None)

    async def events(self, network: Network) -> list:
        """The events the network's nodes recorded about it, the most recently seen last."""
        from controller.store.events import read_events  # lazy, like the store itself

        return await read_events(self.store, network.spec.nodes, network.name)

    async def node_events(self, node: str) -> list:
        """The events a node recorded about itself, the most recently seen last."""
        from controller.store.events import read_events

        return await read_events(self.store, [node], None)

    # --- writes: admission reads (controller/store/specs.py), the CLI orchestrates ---------

    async def snapshot(self, items):
        from controller.store.specs import read_snapshot

        return await read_snapshot(self.store, items)

    async def write(self, items, snap, on_written) -> None:
        """Write admitted items guarded by `snap` (StaleView when it is out of date)."""
        from controller.store.specs import write_items

        try:
            await write_items(self.store, items, snap, on_written)
        finally:
            self._cache.clear()  # written, or stale: either way the next read must be fresh

    async def delete(self, keys, on_deleted) -> set[tuple[str, str]]:
        """Delete the specs among `keys` that exist; the (kind, name) of those deleted."""
        from controller.store.specs import delete_specs

        deleted: set[tuple[str, str]] = set()

        def done(key):
            deleted.add(key)
            on_deleted(key)

        try:
            await delete_specs(self.store, keys, on_deleted=done)
        finally:
            self._cache.clear()
        return deleted


@contextlib.asynccontextmanager
async def open_store(access: EtcdAccess, prefix: str, timeout: float) -> AsyncIterator[StoreView]:
    # The store logs each endpoint failover; the CLI reports the outcome in one line instead.
    logging.getLogger("controller.store").setLevel(logging.ERROR)
    # One round over the endpoints plus a short retry: a person is waiting for the answer.
    async with access.open_store(prefix, timeout, retry_for=min(timeout, 1.0)) as store:
        yield StoreView(store, prefix)
