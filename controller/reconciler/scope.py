"""NodeScope: the part of etcd that concerns one node, kept current by watches.

A node watches only (design.md section 3, "plan the layout for 10,000 nodes"):
- its index `index/nodes/<node>/`;
- for every network and workload the index names, that one spec key;
- for every peer node of those networks, the peer's `nodes/<peer>/mesh/` prefix (its liveness,
  the facts it publishes for its NRs and its probe verdicts): one watch per peer node, shared by
  every network the two have in common. Peers' conditions (`nodes/<peer>/status/`) are never
  watched, so a condition change of one node wakes no other node;
- its own `nodes/<node>/` prefix, to know what it published; only its own `mesh/` keys are a
  reason to reconcile (everyone, this node too, judges a candidate aggregator by its lease,
  facts and verdicts as published, so this node must look again when they change).
Every change that matters turns into "look at network N again" (`on_network`); the reconciler then
reads the whole state from here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from controller.models.manifest import ManifestError, parse_json_value
from controller.models.resources import Network, NetworkResourceFacts, NetworkResourceVerdicts, Workload
from controller.store.cache import WatchCache
from controller.store.client import Entry, EtcdStore, lenient_nodes

log = logging.getLogger(__name__)


class OwnKeys:
    """What this node has published under its own prefix, as far as it knows: the watch cache,
    or a write of ours the watch has not delivered yet (so a reconcile right after a write does
    not write the same value again)."""

    def __init__(self, cache: WatchCache):
        self.cache = cache
        self._writes: dict[str, tuple[bytes | None, int]] = {}  # key -> (value or None, revision)

    def get(self, key: str) -> bytes | None:
        pending = self._writes.get(key)
        if pending is not None:
            if self.cache.revision < pending[1]:
                return pending[0]
            del self._writes[key]  # the cache has caught up with our write (or later ones)
        kv = self.cache.get(key)
        return kv.value if kv else None

    def wrote(self, key: str, value: bytes | None, revision: int) -> None:
        """Record our own put (value) or delete (None) at `revision`."""
        # Forget the writes the cache has caught up with (a key never read again stays not).
        for k in [k for k, (_v, rev) in self._writes.items() if rev <= self.cache.revision]:
            del self._writes[k]
        self._writes[key] = (value, revision)

    def keys(self, prefix: str) -> set[str]:
        keys = {k for k in self.cache.items if k.startswith(prefix)}
        keys |= {k for k in self._writes if k.startswith(prefix)}
        return {k for k in keys if self.get(k) is not None}


class NodeScope:
    def __init__(self, store: EtcdStore, node_id: str, on_network: Callable[[str], None]):
        self.store = store
        self.layout = store.layout
        self.node_id = node_id
        self.on_network = on_network
        self._index_prefix = self.layout.node_index(node_id)
        self.index = WatchCache(store, self._index_prefix, self._index_changed)
        self.own = OwnKeys(WatchCache(store, self.layout.node_root(node_id), self._own_changed))
        self._specs: dict[str, WatchCache] = {}  # network -> its spec key
        self._workloads: dict[str, WatchCache] = {}  # workload -> its spec key
        self._workload_network: dict[str, str] = {}  # last network each workload named
        self._peers: dict[str, WatchCache] = {}  # peer node -> its nodes/<peer>/mesh/ prefix
        self._peer_networks: dict[str, set[str]] = {}  # peer node -> our networks naming it
        self._network_peers: dict[str, set[str]] = {}  # network -> its peer nodes
        self._parsed: dict[str, tuple[int, object]] = {}  # facts/verdicts key -> (mod_revision, parse)
        # For the metrics: the revision of the newest change that concerned each network, and
        # the watch totals of caches stopped so far (the totals only grow).
        self.changed: dict[str, int] = {}
        self._retired = (0, 0)  # (watch events, re-lists)

    async def start(self) -> None:
        await self.own.cache.start()
        await self.index.start()

    def _caches(self) -> list[WatchCache]:
        return [self.index, self.own.cache, *self._specs.values(), *self._workloads.values(),
                *self._peers.values()]

    async def stop(self) -> None:
        await asyncio.gather(*(c.stop() for c in self._caches()), return_exceptions=True)

    def synced(self) -> bool:
        """Every cache has listed and is watching (false while one re-lists)."""
        return all(c.synced.is_set() for c in self._caches())

    def watch_totals(self) -> tuple[int, int]:
        """(watch events received, re-lists) over every cache this scope ever ran."""
        caches = self._caches()
        return (self._retired[0] + sum(c.events for c in caches),
                self._retired[1] + sum(c.relists for c in caches))

    async def _retire(self, cache: WatchCache) -> None:
        self._retired = (self._retired[0] + cache.events, self._retired[1] + cache.relists)
        await cache.stop()

    def _notify(self, network: str, cache: WatchCache | None) -> None:
        """`on_network(network)`, remembering the revision of the change (the cache's now)."""
        if cache is not None:
            self.changed[network] = max(self.changed.get(network, 0), cache.revision)
        self.on_network(network)

    # --- the index drives which keys are watched -------------------------------------------

    async def _index_changed(self, key: str) -> None:
        rest = key[len(self._index_prefix):]
        kind, _, name = rest.partition("/")
        present = key in self.index.items
        if kind == "networks" and name:
            if present and name not in self._specs:
                self._specs[name] = await WatchCache(
                    self.store, self.layout.network(name),
                    lambda _k, n=name: self._spec_changed(n), prefix=False).start()
            elif not present:
                cache = self._specs.pop(name, None)
                if cache is not None:
                    await self._retire(cache)
                await self._set_peers(name, set())
            self._notify(name, self.index)
        elif kind == "workloads" and name:
            if present and name not in self._workloads:
                self._workloads[name] = await WatchCache(
                    self.store, self.layout.workload(name),
                    lambda _k, w=name: self._workload_changed(w), prefix=False).start()
            elif not present:
                cache = self._workloads.pop(name, None)
                if cache is not None:
                    await self._retire(cache)
                self._workload_changed(name)

    async def _spec_changed(self, network: str) -> None:
        """Watch the peers the spec names now (even an invalid spec: its nodes stay peers)."""
        cache = self._specs.get(network)
        kv = cache.get(self.layout.network(network)) if cache else None
        nodes = (lenient_nodes("Network", kv.value) or []) if kv else []
        await self._set_peers(network, set(nodes) - {self.node_id})
        self._notify(network, cache)

    async def _set_peers(self, network: str, peers: set[str]) -> None:
        before = self._network_peers.pop(network, set())
        if peers:
            self._network_peers[network] = peers
        for peer in peers - before:
            self._peer_networks.setdefault(peer, set()).add(network)
            if peer not in self._peers:
                self._peers[peer] = await WatchCache(
                    self.store, self.layout.node_mesh(peer),
                    lambda key, p=peer: self._peer_changed(p, key)).start()
        for peer in before - peers:
            self._parsed.pop(self.layout.facts(peer, network), None)
            self._parsed.pop(self.layout.verdicts(peer, network), None)
            networks = self._peer_networks.get(peer, set())
            networks.discard(network)
            if not networks:
                self._peer_networks.pop(peer, None)
                cache = self._peers.pop(peer, None)
                if cache is not None:
                    await self._retire(cache)
                for key in [k for k in self._parsed if k.startswith(self.layout.node_mesh(peer))]:
                    del self._parsed[key]

    def _peer_changed(self, peer: str, key: str) -> None:
        tail = key[len(self.layout.node_mesh(peer)):]
        kind, _, network = tail.partition("/")
        cache = self._peers.get(peer)
        if kind in ("facts", "verdicts") and network:
            if network in self._peer_networks.get(peer, ()):
                self._notify(network, cache)
        else:  # liveness (or anything else the peer tells the mesh) concerns all we share
            for network in sorted(self._peer_networks.get(peer, ())):
                self._notify(network, cache)

    def _own_changed(self, key: str) -> None:
        mesh = self.layout.node_mesh(self.node_id)
        if not key.startswith(mesh):
            return  # our status: written by us, read by people
        kind, _, network = key[len(mesh):].partition("/")
        # Our own facts and verdicts feed our plan (the aggregator choice) like a peer's: the
        # change is remembered too, so the revision lag counts it until it is reconciled.
        if kind in ("facts", "verdicts") and network:
            if network in self._specs:
                self._notify(network, self.own.cache)
        else:
            for network in sorted(self._specs):
                self._notify(network, self.own.cache)

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
            self._notify(network, self._workloads.get(name) or self.index)

    # --- reads -----------------------------------------------------------------------------

    @property
    def index_synced(self) -> bool:
        return self.index.synced.is_set()

    def network_names(self) -> set[str]:
        """Networks the index says this node takes part in."""
        prefix = self._index_prefix + "networks/"
        return {k[len(prefix):] for k in self.index.items if k.startswith(prefix)}

    def workload_names(self) -> set[str]:
        """Workloads the index names for this node."""
        prefix = self._index_prefix + "workloads/"
        return {k[len(prefix):] for k in self.index.items if k.startswith(prefix)}

    def known(self, network: str) -> bool:
        """Whether we have listed this network's keys at least once: only then may its absence
        be trusted (a restart must never tear down an NR before its spec has been read)."""
        if (not self.index_synced and self.index.revision == 0) or self.own.cache.revision == 0:
            return False
        if network not in self.network_names():
            return self.index.revision > 0
        spec = self._specs.get(network)
        if spec is None or spec.revision == 0:
            return False
        peers = [self._peers.get(p) for p in self._network_peers.get(network, ())]
        return all(c is not None and c.revision > 0 for c in peers) and self._workloads_listed()

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

    def facts(self, network: str) -> tuple[dict[str, NetworkResourceFacts], dict[str, str]]:
        """The facts every peer of `network` published for it (node -> facts), and why the
        values that are not valid facts are not (node -> problem)."""
        good: dict[str, NetworkResourceFacts] = {}
        bad: dict[str, str] = {}
        claimed: dict[str, tuple[int, str]] = {}  # public key -> (revision, node) of its first claim
        for peer in sorted(self._network_peers.get(network, ())):
            cache = self._peers.get(peer)
            key = self.layout.facts(peer, network)
            kv = cache.get(key) if cache else None
            if kv is None:
                continue
            parsed = self._parse_facts(peer, network, key, kv.value, kv.mod_revision)
            if isinstance(parsed, str):
                bad[peer] = parsed
                continue
            good[peer] = parsed
            first = claimed.get(parsed.publicKey)
            if first is None or kv.mod_revision < first[0]:
                claimed[parsed.publicKey] = (kv.mod_revision, peer)
        # WireGuard knows peers by key: a node publishing a key another node published before
        # it would take over that node's peer (endpoint, AllowedIPs). The earlier claim keeps it.
        for peer, facts in list(good.items()):
            owner = claimed[facts.publicKey][1]
            if owner != peer:
                del good[peer]
                bad[peer] = f"it claims the public key node {owner!r} published first"
        return good, bad

    def _parse_facts(self, peer: str, network: str, key: str, raw: bytes, revision: int):
        return self._parse_mesh_value("NetworkResourceFacts", peer, network, key, raw, revision)

    def _parse_mesh_value(self, kind: str, peer: str, network: str, key: str, raw: bytes, revision: int):
        """A peer's facts or verdicts, or why they are not valid (cached per revision)."""
        cached = self._parsed.get(key)
        if cached is not None and cached[0] == revision:
            return cached[1]
        result = _validated(kind, peer, network, key, raw)
        self._parsed[key] = (revision, result)
        return result

    def own_facts(self, network: str) -> NetworkResourceFacts | None:
        """The facts this node published for `network` (None: not yet, or unreadable)."""
        return self._own_value("NetworkResourceFacts", self.layout.facts(self.node_id, network), network)

    def own_verdicts(self, network: str) -> NetworkResourceVerdicts | None:
        """The verdicts this node published for `network` (None: none yet, or unreadable)."""
        return self._own_value("NetworkResourceVerdicts", self.layout.verdicts(self.node_id, network),
                               network)

    def _own_value(self, kind: str, key: str, network: str):
        raw = self.own.get(key)
        parsed = None if raw is None else _validated(kind, self.node_id, network, key, raw)
        return None if isinstance(parsed, str) else parsed

    def verdicts(self, network: str) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
        """Every member's probe verdicts for `network`, this node's included (prober -> probed
        node -> state), and why the values that are not valid verdicts are not (node -> problem)."""
        good: dict[str, dict[str, str]] = {}
        bad: dict[str, str] = {}
        mine = self.own_verdicts(network)
        if mine is not None:
            good[self.node_id] = mine.states()
        for peer in sorted(self._network_peers.get(network, ())):
            cache = self._peers.get(peer)
            key = self.layout.verdicts(peer, network)
            kv = cache.get(key) if cache else None
            if kv is None:
                continue
            parsed = self._parse_mesh_value("NetworkResourceVerdicts", peer, network, key, kv.value,
                                            kv.mod_revision)
            if isinstance(parsed, str):
                bad[peer] = parsed
            else:
                good[peer] = parsed.states()
        return good, bad

    def alive(self, network: str) -> set[str]:
        """The nodes of `network` that hold their liveness lease, as watched (this one too)."""
        nodes = {p for p in self._network_peers.get(network, ()) if self.peer_alive(p)}
        if self.own.get(self.layout.node_alive(self.node_id)) is not None:
            nodes.add(self.node_id)
        return nodes

    def peer_alive(self, peer: str) -> bool | None:
        """Whether a watched peer holds its liveness lease (None: not watched)."""
        cache = self._peers.get(peer)
        return None if cache is None else cache.get(self.layout.node_alive(peer)) is not None

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


def _validated(kind: str, node: str, network: str, key: str, raw: bytes):
    """The value of a node's mesh key as `kind`, or why it is not one (naming the wrong node or
    network counts: a value is trusted only for the key it is under)."""
    try:
        value = parse_json_value(raw, key, kinds=(kind,))
    except ManifestError as e:
        return "; ".join(e.problems[:3]) + (" ..." if len(e.problems) > 3 else "")
    if (value.node, value.network) != (node, network):
        return (f"the value names node {value.node!r} and network {value.network!r}, "
                f"not the key's {node!r} and {network!r}")
    return value
