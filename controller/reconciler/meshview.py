"""The data behind the mesh page (/mesh/data): for every network of this node, its nodes (role,
liveness, whether it is the aggregator), this node's peers with their states and handshake
ages, its NR's Internet counters, every node's conditions and the network's recent events; and
the node's own events and its ndmz's counters.

What this node watches anyway (specs, peers' facts and liveness) and what it observed (the
Snapshot) is read from memory, and so are the node's own events (its recorder's). Other nodes'
conditions and the networks' events are read from etcd on
demand: bounded by a timeout, cached for a moment (several open pages cost one read), and
reported as a problem instead of failing the page when etcd does not answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from controller.http.snapshot import Snapshot, iso_time
from controller.models.resources import Condition, NodeEvent, ResourceStatus
from controller.store.client import EtcdStore, StoreError
from controller.store.events import read_events

from .scope import NodeScope
from .telemetry import HEALTHY

ETCD_TIMEOUT = 2.0
CACHE_FOR = 2.0  # seconds the etcd part of a network's picture is reused
MAX_NODES = 200  # nodes drawn per network; the page says how many more there are
MAX_EVENTS = 30


class MeshView:
    def __init__(self, node_id: str, scope: NodeScope, snapshot: Snapshot, store: EtcdStore, *,
                 hidden: bool, node_events: Callable[[], list[NodeEvent]] = list,
                 etcd_timeout: float = ETCD_TIMEOUT, cache_for: float = CACHE_FOR):
        self.node_id = node_id
        self.node_events = node_events
        self.scope = scope
        self.snapshot = snapshot
        self.store = store
        self.hidden = hidden
        self.etcd_timeout = etcd_timeout
        self.cache_for = cache_for
        self._cache: dict[str, tuple[float, dict[str, ResourceStatus], list[NodeEvent]]] = {}

    async def __call__(self) -> dict:
        problems: list[str] = []
        names = sorted(self.scope.network_names() | set(self.snapshot.networks))
        networks = [await self._network(name, problems) for name in names]
        return {"node": self.node_id, "time": iso_time(time.time()), "problems": problems,
                "staleAfterSeconds": self.snapshot.stale_after, "networks": networks,
                "ndmz": self.snapshot.ndmz_view(),
                "nodeEvents": [e.model_dump(mode="json", exclude_none=True)
                               for e in self.node_events()[-MAX_EVENTS:]]}

    async def _network(self, name: str, problems: list[str]) -> dict:
        network, error = self.scope.network(name)
        own = self.snapshot.network_view(name) or {}
        if error:
            problems.append(f"network {name}: the spec is invalid: {error}")
        resources = list(network.spec.resources) if network else []
        shown = resources[:MAX_NODES]
        if len(resources) > len(shown):
            problems.append(f"network {name}: {len(resources) - len(shown)} more node(s) not drawn")
        nodes = [r.node for r in shown]
        statuses, events = await self._from_etcd(name, nodes, problems)
        facts, bad = self.scope.facts(name)
        aggregator = own.get("aggregator")
        drawn = []
        for r in shown:
            if r.node == self.node_id:
                role, alive, hidden = "self", True, self.hidden
                conditions = list(self.snapshot.networks[name].conditions) if name in self.snapshot.networks else []
            else:
                f = facts.get(r.node)  # no facts yet: its role is not known
                role = "unknown" if f is None else ("public" if f.public else "hidden")
                alive, hidden = self.scope.peer_alive(r.node), role == "hidden"
                st = statuses.get(r.node)
                conditions = list(st.conditions) if st else []
            drawn.append({"name": r.node, "subnet": str(r.subnet), "role": role, "hidden": hidden,
                          "alive": alive, "aggregator": r.node == aggregator,
                          "factsProblem": bad.get(r.node), "conditions": [_condition(c) for c in conditions]})
        return {
            "name": name,
            "ipRange": str(network.spec.ipRange) if network else None,
            "aggregator": aggregator,
            "aggregators": list(network.spec.aggregators) if network else [],
            "nodes": drawn,
            "peers": own.get("peers", []),
            "internet": own.get("internet"),  # this node's NR: NAT and firewall counters
            "observedAt": own.get("observedAt"),
            "observeError": own.get("observeError"),
            "events": [e.model_dump(mode="json", exclude_none=True) for e in events],
        }

    async def _from_etcd(self, name: str, nodes: list[str], problems: list[str]):
        cached = self._cache.get(name)
        if cached is not None and time.monotonic() - cached[0] < self.cache_for:
            return cached[1], cached[2]
        try:
            statuses, events = await asyncio.wait_for(asyncio.gather(
                self.store.get_statuses(name, nodes), read_events(self.store, nodes, name, MAX_EVENTS)),
                self.etcd_timeout)
        except (StoreError, asyncio.TimeoutError) as e:
            problems.append(f"etcd did not answer ({e or 'timed out'}): other nodes' conditions and "
                            "the events are not shown")
            return {}, []
        self._cache = {k: v for k, v in self._cache.items() if k in self.snapshot.networks}
        self._cache[name] = (time.monotonic(), statuses, events)
        return statuses, events


def _condition(c: Condition) -> dict:
    return {**c.model_dump(mode="json"), "healthy": HEALTHY.get(c.type, "True") == c.status}
