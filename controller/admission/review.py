"""May these objects be written, given what etcd holds? Pure: decided over a `Snapshot` that
the store read (controller/store/specs.py) and answered with one `Problem` per broken rule.

What a review reads is only what it judges against, so that a write on one node of a
10,000-node installation costs reads about that node and that network, not about everything:

1. `first_reads(items)`: the input objects' own spec keys, the networks the input refers to,
   and those networks' guards, all read at one revision;
2. `further_reads(items, specs)`: the registrations of nodes a network adds, and the workloads
   (with the addresses their nodes published) on the nodes whose workloads a change can hurt.

A write of an object compares and bumps the guard of every network in `guarded_networks`, so a
review cannot race another writer of the same network: the loser reads and reviews again.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from controller.models.manifest import to_json
from controller.models.resources import Network, Workload, address_problems

from .rules import workload_problems

SpecKey = tuple[str, str]  # (kind, name)


@dataclass(frozen=True)
class Item:
    """One object to admit, and where it came from (`m.yaml#2`) for messages."""

    obj: Network | Workload
    where: str = ""

    @property
    def key(self) -> SpecKey:
        return (self.obj.kind, self.obj.name)

    @property
    def subject(self) -> str:
        return f"{self.where} {self.obj.kind}/{self.obj.name}".lstrip()


@dataclass(frozen=True)
class Problem:
    subject: str  # "m.yaml#2 Workload/web"
    path: str  # the field judged, "spec.ip"; empty for the object as a whole
    message: str

    def __str__(self) -> str:
        return f"{self.subject}: {self.path}: {self.message}" if self.path else f"{self.subject}: {self.message}"


@dataclass(frozen=True)
class Stored:
    """One spec key as read: absent (revision 0), a valid object, or a value that is not one."""

    revision: int = 0  # the key's mod_revision
    obj: Network | Workload | None = None
    error: str | None = None
    raw: bytes = b""  # the value itself (to find the index entries even of an invalid one)

    @property
    def exists(self) -> bool:
        return self.revision != 0


@dataclass
class Snapshot:
    specs: dict[SpecKey, Stored] = field(default_factory=dict)
    guards: dict[str, int] = field(default_factory=dict)  # network -> its guard's mod_revision
    registered: set[str] = field(default_factory=set)  # of the nodes asked for
    # node -> workload name -> the (valid) workloads etcd's node index lists on that node
    workloads_on: dict[str, dict[str, Workload]] = field(default_factory=dict)
    # node -> workload name -> the address that node's agent published as in use
    in_use: dict[str, dict[str, ipaddress.IPv4Address]] = field(default_factory=dict)

    def stored(self, key: SpecKey) -> Stored:
        return self.specs.get(key) or Stored()


@dataclass(frozen=True)
class Reads:
    specs: frozenset[SpecKey] = frozenset()
    guards: frozenset[str] = frozenset()
    nodes: frozenset[str] = frozenset()  # registrations
    workload_nodes: frozenset[str] = frozenset()  # workloads and published addresses


def guarded_networks(obj: Network | Workload) -> set[str]:
    """The networks whose guard a write of `obj` compares and bumps: those it was judged with."""
    return {obj.name} if isinstance(obj, Network) else {obj.spec.network}


def first_reads(items: Iterable[Item]) -> Reads:
    specs, guards = set(), set()
    for it in items:
        specs.add(it.key)
        guards |= guarded_networks(it.obj)
        if isinstance(it.obj, Workload):
            specs.add(("Network", it.obj.spec.network))
    return Reads(specs=frozenset(specs), guards=frozenset(guards))


def further_reads(items: Iterable[Item], specs: dict[SpecKey, Stored]) -> Reads:
    nodes, workload_nodes = set(), set()
    for it in items:
        old = (specs.get(it.key) or Stored()).obj
        if old is not None and to_json(old) == to_json(it.obj):
            continue  # unchanged: not written, not judged
        if isinstance(it.obj, Network):
            nodes |= set(it.obj.spec.nodes) - set(old.spec.nodes if old else ())
            if old is not None:
                workload_nodes |= _affected_nodes(old, it.obj)
        else:
            workload_nodes.add(it.obj.spec.node)
    return Reads(nodes=frozenset(nodes), workload_nodes=frozenset(workload_nodes))


def changed_items(items: Sequence[Item], snap: Snapshot) -> list[Item]:
    """The items that differ from what etcd holds (the others need no write)."""
    out = []
    for it in items:
        old = snap.stored(it.key).obj
        if old is None or to_json(old) != to_json(it.obj):
            out.append(it)
    return out


def review(items: Sequence[Item], snap: Snapshot, broken: Iterable[SpecKey] = ()) -> list[Problem]:
    """Every problem of writing `items` over `snap`, in input order. `broken` names input
    documents that were invalid on their own: what depends on them is not judged again."""
    broken = set(broken)
    problems: list[Problem] = []
    first: dict[SpecKey, Item] = {}
    for it in items:
        if it.key in first:
            problems.append(Problem(it.subject, "", f"defined more than once in the input "
                                                    f"(also at {first[it.key].where or 'an earlier document'})"))
        else:
            first[it.key] = it
    todo = changed_items(list(first.values()), snap)
    networks = {name: st.obj for (kind, name), st in snap.specs.items() if kind == "Network" and st.obj}
    networks |= {it.obj.name: it.obj for it in first.values() if isinstance(it.obj, Network)}
    workloads = _effective_workloads(snap, first.values())
    # Changed input workloads not judged yet: a clash between two of them is reported once, on
    # the later one, when it is judged against the earlier.
    pending = {it.obj.name for it in todo if isinstance(it.obj, Workload)}
    for it in todo:
        if isinstance(it.obj, Network):
            problems += _network_problems(it, snap, workloads, set(first))
        else:
            pending.discard(it.obj.name)
            problems += _workload_problems(it, snap, networks, workloads, pending, broken)
    return problems


def _effective_workloads(snap: Snapshot, items: Iterable[Item]) -> dict[str, Workload]:
    """Every workload the snapshot knows, as it will be once the input is written."""
    out = {name: w for on_node in snap.workloads_on.values() for name, w in on_node.items()}
    out |= {it.obj.name: it.obj for it in items if isinstance(it.obj, Workload)}
    return out


def _network_problems(it: Item, snap: Snapshot, workloads: dict[str, Workload],
                      in_input: set[SpecKey]) -> list[Problem]:
    net: Network = it.obj
    old = snap.stored(it.key).obj
    old_nodes = set(old.spec.nodes) if old else set()
    problems = [Problem(it.subject, f"spec.resources[{i}].node", f"node {r.node!r} is not a registered node")
                for i, r in enumerate(net.spec.resources)
                if r.node not in old_nodes and r.node not in snap.registered]
    if old is None:
        return problems
    for node in sorted(_affected_nodes(old, net)):
        index = next((i for i, r in enumerate(net.spec.resources) if r.node == node), None)
        path = "spec.resources" if index is None else f"spec.resources[{index}].subnet"
        for name in sorted(snap.workloads_on.get(node, {})):
            w = workloads.get(name)
            if w is None or ("Workload", name) in in_input or w.spec.network != net.name or w.spec.node != node:
                continue  # judged as an input object, or not (any more) on this NR
            for p in workload_problems(w, net):
                problems.append(Problem(it.subject, path, f"existing workload {name!r} would become invalid: {p}"))
            held = snap.in_use.get(node, {}).get(name)
            subnet = net.spec.resource_for(node).subnet if index is not None else None
            if w.spec.ip is None and held is not None and subnet is not None and address_problems(held, subnet):
                problems.append(Problem(it.subject, path, f"existing workload {name!r} would be renumbered: "
                                                          f"its address {held} (allocated by node {node}) "
                                                          f"is not a host of the new subnet {subnet}"))
    return problems


def _workload_problems(it: Item, snap: Snapshot, networks: dict[str, Network], workloads: dict[str, Workload],
                       pending: set[str], broken: set[SpecKey]) -> list[Problem]:
    w: Workload = it.obj
    spec = w.spec
    net = networks.get(spec.network)
    if net is None:
        if ("Network", spec.network) in broken:
            return []  # the network's own document is wrong: that is what to fix first
        stored = snap.stored(("Network", spec.network))
        why = (f"network {spec.network!r} in etcd is invalid ({stored.error})" if stored.error
               else f"network {spec.network!r} does not exist")
        return [Problem(it.subject, "spec.network", why)]
    resource = net.spec.resource_for(spec.node)
    if resource is None:
        return [Problem(it.subject, "spec.node", f"node {spec.node!r} is not part of network {net.name!r}")]
    if spec.ip is None:
        return []
    problems = [Problem(it.subject, "spec.ip", p) for p in address_problems(spec.ip, resource.subnet)]
    holder = _holder(w, snap, workloads, pending)
    if holder:
        problems.append(Problem(it.subject, "spec.ip", f"ip {spec.ip} is already used by {holder}"))
    return problems


def _holder(w: Workload, snap: Snapshot, workloads: dict[str, Workload], pending: set[str]) -> str | None:
    """Who already holds the address `w` pins on its NR: a workload pinning it, or one whose
    node allocated it and that keeps it (it pins nothing else) -- the agent's allocation never
    takes an address from the workload holding it, so admitting `w` would only break `w`."""
    spec = w.spec
    published = snap.in_use.get(spec.node, {})
    for name in sorted(workloads):
        other = workloads[name]
        if (name == w.name or name in pending or other.spec.network != spec.network
                or other.spec.node != spec.node):
            continue
        if other.spec.ip == spec.ip:
            return f"workload {name!r}"
        if other.spec.ip is None and published.get(name) == spec.ip:
            return f"workload {name!r} (allocated by node {spec.node})"
    return None


def _affected_nodes(old: Network, new: Network) -> set[str]:
    """Nodes whose NR a network change removes or gives another subnet: their workloads may break."""
    return {r.node for r in old.spec.resources
            if (n := new.spec.resource_for(r.node)) is None or n.subnet != r.subnet}
