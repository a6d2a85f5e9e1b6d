"""NodeScope: the part of etcd that concerns one node, kept current by watches.

A node watches only its index (`index/nodes/<node>/`), and for every network and workload the
index names, that spec and the network's published statuses: never every change in the system
(design.md section 3, "plan the layout for 10,000 nodes"). Every change turns into "look at
network N again" (`on_network`); the reconciler then reads the whole state from here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from controller.models.manifest import ManifestError
from controller.models.resources import Network, ResourceStatus, Workload
from controller.store.cache import WatchCache
from controller.store.client import Entry, EtcdStore

log = logging.getLogger(__name__)


class NodeScope:
    def __init__(self, store: EtcdStore, node_id: str, on_network: Callable[[str], None]):
        self.store = store
        self.layout = store.layout
        self.node_id = node_id
        self.on_network = on_network
        self._index_prefix = self.layout.node_index(node_id)
        self.index = WatchCache(store, self._index_prefix, self._index_changed)
        self._specs: dict[str, WatchCache] = {}  # network -> its spec key
        self._statuses: dict[str, WatchCache] = {}  # network -> its status prefix
        self._workloads: dict[str, WatchCache] = {}  # workload -> its spec key
        self._workload_network: dict[str, str] = {}  # last network each workload named

    async def start(self) -> None:
        await self.index.start()

    async def stop(self) -> None:
        caches = [self.index, *self._specs.values(), *self._statuses.values(), *self._workloads.values()]
        await asyncio.gather(*(c.stop() for c in caches), return_exceptions=True)

    def relists(self) -> int:
        caches = [self.index, *self._specs.values(), *self._statuses.values(), *self._workloads.values()]
        return sum(c.relists for c in caches)

    # --- the index drives which keys are watched -------------------------------------------

    async def _index_changed(self, key: str) -> None:
        rest = key[len(self._index_prefix):]
        kind, _, name = rest.partition("/")
        present = key in self.index.items
        if kind == "networks" and name:
            if present and name not in self._specs:
                self._specs[name] = await WatchCache(
                    self.store, self.layout.network(name), lambda _k, n=name: self.on_network(n),
                    prefix=False).start()
                self._statuses[name] = await WatchCache(
                    self.store, self.layout.nr_statuses(name), lambda _k, n=name: self.on_network(n),
                    prefix=True).start()
            elif not present:
                for caches in (self._specs, self._statuses):
                    cache = caches.pop(name, None)
                    if cache is not None:
                        await cache.stop()
            self.on_network(name)
        elif kind == "workloads" and name:
            if present and name not in self._workloads:
                self._workloads[name] = await WatchCache(
                    self.store, self.layout.workload(name),
                    lambda _k, w=name: self._workload_changed(w), prefix=False).start()
            elif not present:
                cache = self._workloads.pop(name, None)
                if cache is not None:
                    await cache.stop()
                self._workload_changed(name)

    def _workload_changed(self, name: str) -> None:
        """Look again at the network the workload names now and the one it named before."""
        before = self._workload_network.get(name)
        workload, _ = self.workload(name)
        now = workload.spec.network if workload else None
        if now is None:
            self._workload_network.pop(name, None)
        else:
            self._workload_network[name] = now
        for network in {before, now} - {None}:
            self.on_network(network)

    # --- reads -----------------------------------------------------------------------------

    @property
    def index_synced(self) -> bool:
        return self.index.synced.is_set()

    def network_names(self) -> set[str]:
        """Networks the index says this node takes part in."""
        prefix = self._index_prefix + "networks/"
        return {k[len(prefix):] for k in self.index.items if k.startswith(prefix)}

    def known(self, network: str) -> bool:
        """Whether we have listed this network's keys at least once: only then may its absence
        be trusted (a restart must never tear down an NR before its spec has been read)."""
        if not self.index_synced and self.index.revision == 0:
            return False
        if network not in self.network_names():
            return self.index.revision > 0
        caches = [self._specs.get(network), self._statuses.get(network)]
        return all(c is not None and c.revision > 0 for c in caches) and self._workloads_listed()

    def _workloads_listed(self) -> bool:
        return all(c.revision > 0 for c in self._workloads.values())

    def network(self, name: str) -> tuple[Network | None, str | None]:
        """(spec, None), (None, None) if absent, or (None, message) if malformed."""
        return self._decode("Network", self._specs.get(name), self.layout.network(name))

    def _decode(self, kind: str, cache: WatchCache | None, key: str):
        """A cached spec decoded exactly as the store decodes it (name check, generation)."""
        kv = cache.get(key) if cache else None
        if kv is None:
            return None, None
        try:
            return self.store.decode_spec(kind, Entry(key, kv.value, kv.mod_revision, 0, 0)), None
        except ManifestError as e:
            return None, "; ".join(e.problems)

    def statuses(self, network: str) -> dict[str, ResourceStatus]:
        cache = self._statuses.get(network)
        out: dict[str, ResourceStatus] = {}
        if cache is None:
            return out
        for key, kv in cache.items.items():
            try:
                status = ResourceStatus.model_validate_json(kv.value)
            except ValueError as e:
                log.warning("ignoring malformed status %s: %s", key, str(e).splitlines()[0])
                continue
            if key.endswith("/" + status.node):
                out[status.node] = status
        return out

    def own_status_raw(self, network: str) -> bytes | None:
        cache = self._statuses.get(network)
        kv = cache.get(self.layout.nr_status(network, self.node_id)) if cache else None
        return kv.value if kv else None

    def workload(self, name: str) -> tuple[Workload | None, str | None]:
        return self._decode("Workload", self._workloads.get(name), self.layout.workload(name))

    def workloads_of(self, network: str) -> tuple[list[Workload], dict[str, str]]:
        """This node's workloads that name `network`, and malformed workload values by name."""
        found, broken = [], {}
        for name in sorted(self._workloads):
            workload, error = self.workload(name)
            if error:
                broken[name] = error
            elif workload and workload.spec.network == network and workload.spec.node == self.node_id:
                found.append(workload)
        return found, broken
