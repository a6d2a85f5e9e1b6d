"""Spec writes for admission: read what a review needs (`read_snapshot`), write what it admitted
in one transaction (`write_items`), delete several specs in one transaction (`delete_specs`).

This module talks to etcd; controller/admission decides. Every write compares the mod_revision
of each spec key and of each guard (`guards/networks/<net>`) as the snapshot read them and bumps
those guards, so a review can never race another write of the same network: the loser gets
`StaleView` and reads and reviews again. Writes to different networks never touch a common key.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence

from ..admission import Item, Reads, Snapshot, Stored, first_reads, further_reads, guarded_networks
from ..models.manifest import ManifestError, to_json
from ..models.resources import Workload, WorkloadStatus
from .client import (
    Delete,
    EtcdStore,
    Put,
    StaleView,
    StoreError,
    TooLarge,
    lenient_nodes,
    mod_revision_is,
    spec_nodes,
)

SpecKey = tuple[str, str]


# --- reading what a review needs ---------------------------------------------------------------


async def read_snapshot(store: EtcdStore, items: Sequence[Item]) -> Snapshot:
    """What `admission.review(items, ...)` judges against, and nothing more (see review.py)."""
    snap = Snapshot()
    first = first_reads(items)
    # Guards first: read no later than the specs they protect, so a write compared against
    # them fails if anything changed after (or while) the specs were read.
    guard_keys = {store.layout.network_guard(n): n for n in sorted(first.guards)}
    spec_keys = {store.spec_key(kind, name): (kind, name) for kind, name in sorted(first.specs)}
    entries = await store.get_many([*guard_keys, *spec_keys])
    snap.guards = {net: entries[k].mod_revision if k in entries else 0 for k, net in guard_keys.items()}
    snap.specs = {key: _stored(store, key, entries.get(k)) for k, key in spec_keys.items()}
    await _read_further(store, further_reads(items, snap.specs), snap)
    return snap


def _stored(store: EtcdStore, key: SpecKey, entry) -> Stored:
    if entry is None:
        return Stored()
    try:
        return Stored(entry.mod_revision, store.decode_spec(key[0], entry), raw=entry.value)
    except ManifestError as e:
        return Stored(entry.mod_revision, error="; ".join(e.problems), raw=entry.value)


async def _read_further(store: EtcdStore, reads: Reads, snap: Snapshot) -> None:
    layout = store.layout
    if reads.nodes:
        found = await store.get_many(layout.node_registration(n) for n in sorted(reads.nodes))
        snap.registered = {n for n in reads.nodes if layout.node_registration(n) in found}
    names: dict[str, list[str]] = {}
    for node in sorted(reads.workload_nodes):
        entries, _ = await store.list_prefix(layout.index_workload(node, ""), keys_only=True)
        names[node] = [e.key.rsplit("/", 1)[-1] for e in entries]
    specs = await store.get_many(layout.workload(n) for on_node in names.values() for n in on_node)
    statuses = await store.get_many(layout.workload_status(node, n) for node, on_node in names.items() for n in on_node)
    for node, on_node in names.items():
        snap.workloads_on[node], snap.in_use[node] = {}, {}
        for name in on_node:
            stored = _stored(store, ("Workload", name), specs.get(layout.workload(name)))
            if isinstance(stored.obj, Workload) and stored.obj.spec.node == node:
                snap.workloads_on[node][name] = stored.obj
                snap.specs.setdefault(("Workload", name), stored)
            ip = _published_ip(statuses.get(layout.workload_status(node, name)), node)
            if ip is not None:
                snap.in_use[node][name] = ip


def _published_ip(entry, node: str) -> ipaddress.IPv4Address | None:
    if entry is None:
        return None
    try:
        status = WorkloadStatus.model_validate_json(entry.value)
    except ValueError:
        return None  # a malformed status claims nothing
    return status.ip if status.node == node else None


# --- writing what was admitted -----------------------------------------------------------------


async def write_items(store: EtcdStore, items: Sequence[Item], snap: Snapshot,
                      on_written: Callable[[Item, int], None] = lambda item, revision: None) -> None:
    """Write `items` (specs and node-index entries), guarded by `snap`: one transaction where
    etcd's limits allow, else one per object (each still guarded; `on_written` says which landed
    before a failure). Raises StaleView when anything the review read has changed since."""
    if not items:
        return
    try:
        revision = await _write(store, items, snap)
    except TooLarge:
        if len(items) == 1:
            raise
    else:
        for it in items:
            on_written(it, revision)
        return
    # Too large for one transaction: object by object, networks before their workloads.
    for it in items:
        revision = await _write(store, [it], snap)
        on_written(it, revision)
        # Our own write moved these keys: the next object compares against the new revision.
        snap.specs[it.key] = Stored(revision, it.obj, raw=to_json(it.obj).encode())
        for net in guarded_networks(it.obj):
            snap.guards[net] = revision


async def _write(store: EtcdStore, items: Sequence[Item], snap: Snapshot) -> int:
    compare, ops, guards = [], [], set()
    for it in items:
        kind, name = it.key
        key = store.spec_key(kind, name)
        stored = snap.stored(it.key)
        compare.append(mod_revision_is(key, stored.revision))
        old = store.index_keys(kind, name, (lenient_nodes(kind, stored.raw) or ()) if stored.exists else ())
        new = store.index_keys(kind, name, spec_nodes(it.obj))
        ops += [Put(key, to_json(it.obj))] + [Put(k, b"") for k in sorted(new)]
        ops += [Delete(k) for k in sorted(old - new)]
        guards |= guarded_networks(it.obj)
    for net in sorted(guards):
        compare.append(mod_revision_is(store.layout.network_guard(net), snap.guards.get(net, 0)))
        ops.append(Put(store.layout.network_guard(net), b""))
    res = await store.checked_txn(compare, ops, ", ".join(it.subject for it in items[:3]))
    if not res.succeeded:
        raise StaleView("the specs changed since they were reviewed")
    return res.revision


async def delete_specs(store: EtcdStore, keys: Sequence[SpecKey], *, max_attempts: int = 20,
                       on_deleted: Callable[[SpecKey], None] = lambda key: None) -> None:
    """Delete the specs that exist among `keys`, with their index entries, in one transaction
    where etcd's limits allow (else one by one). A network's deletion removes its guard (so no
    key outlives the network), which fails a write reviewed against the network meanwhile."""
    keys = list(dict.fromkeys(keys))
    for _attempt in range(max_attempts):
        current = await store.get_many([store.spec_key(k, n) for k, n in keys])
        existing = [(k, n) for k, n in keys if store.spec_key(k, n) in current]
        if not existing:
            return
        compare, ops = [], []
        for kind, name in existing:
            entry = current[store.spec_key(kind, name)]
            compare.append(mod_revision_is(entry.key, entry.mod_revision))
            ops.append(Delete(entry.key))
            ops += [Delete(k) for k in sorted(store.index_keys(kind, name, lenient_nodes(kind, entry.value) or ()))]
            if kind == "Network":  # its guard goes too: a review of it meanwhile is done again
                ops.append(Delete(store.layout.network_guard(name)))
        try:
            res = await store.checked_txn(compare, ops, f"delete {len(existing)} object(s)")
        except TooLarge:
            for key in existing:
                if await store.delete_object(*key):
                    on_deleted(key)
            return
        if res.succeeded:
            for key in existing:
                on_deleted(key)
            return
    raise StoreError(f"delete: the specs kept changing under us ({max_attempts} attempts)")
