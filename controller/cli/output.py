"""What the CLI prints: tables for people, JSON/YAML for scripts. Pure functions (no I/O)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import yaml

from controller.models.resources import (
    Condition, Network, NetworkResourceFacts, Node, ResourceStatus, Workload, WorkloadStatus,
)


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Left-aligned columns separated by three spaces, like kubectl."""
    cells = [list(headers)] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def dump(data: object, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(data, indent=2, sort_keys=True)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip("\n")


def manifest(obj) -> dict:
    """An object as its user-facing manifest (re-appliable; generation included for reference)."""
    data = obj.model_dump(mode="json", exclude_none=True)
    if isinstance(data.get("metadata"), dict) and not data["metadata"].get("labels"):
        data["metadata"].pop("labels", None)
    # The order people read and write manifests in (the models declare `kind` after `metadata`).
    order = ("apiVersion", "kind", "metadata", "spec")
    return {k: data[k] for k in order if k in data} | {k: v for k, v in data.items() if k not in order}


def as_list(items: list[dict]) -> dict:
    return {"apiVersion": "v1", "kind": "List", "items": items}


# --- readiness ---------------------------------------------------------------------------------


def condition(conditions: Iterable[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def nr_ready(status: ResourceStatus | None, generation: int | None) -> bool:
    """An NR counts as ready when its agent reports Ready=True for the current spec."""
    if status is None:
        return False
    c = condition(status.conditions, "Ready")
    return c is not None and c.status == "True" and (generation is None or status.observedGeneration >= generation)


@dataclass
class NetworkView:
    network: Network
    statuses: dict[str, ResourceStatus] = field(default_factory=dict)  # node → status
    facts: dict[str, NetworkResourceFacts] = field(default_factory=dict)  # node → published facts

    @property
    def ready_count(self) -> int:
        g = self.network.metadata.generation
        return sum(nr_ready(self.statuses.get(n), g) for n in self.network.spec.nodes)

    @property
    def ready(self) -> bool:
        return self.ready_count == len(self.network.spec.nodes)


@dataclass
class NodeView:
    node: Node
    alive: bool


@dataclass
class WorkloadView:
    workload: Workload
    status: WorkloadStatus | None = None


def _yes(b: bool) -> str:
    return "yes" if b else "no"


def _ready_text(view: WorkloadView) -> str:
    if view.status is None:
        return "Unknown"
    c = condition(view.status.conditions, "Ready")
    if c is None:
        return "Unknown"
    stale = (view.workload.metadata.generation is not None
             and view.status.observedGeneration < view.workload.metadata.generation)
    return "Pending" if stale else ("True" if c.status == "True" else c.status)


def networks_table(views: list[NetworkView]) -> str:
    rows = []
    for v in views:
        s = v.network.spec
        rows.append([v.network.name, s.ipRange, ",".join(s.nodes) or "-",
                     f"{v.ready_count}/{len(s.nodes)}", ",".join(s.aggregators) or "auto",
                     s.egress or "local", v.network.metadata.generation or "-"])
    return table(["NAME", "RANGE", "NODES", "READY", "AGGREGATORS", "EGRESS", "GENERATION"], rows)


def workloads_table(views: list[WorkloadView]) -> str:
    rows = []
    for v in views:
        s = v.workload.spec
        ip = s.ip or (v.status.ip if v.status else None)
        rows.append([v.workload.name, s.network, s.node, ip or "(auto)", s.netns, _ready_text(v)])
    return table(["NAME", "NETWORK", "NODE", "IP", "NETNS", "READY"], rows)


def nodes_table(views: list[NodeView]) -> str:
    rows = []
    for v in views:
        s = v.node.spec
        ports = s.listenPortRange
        rows.append([v.node.name, ",".join(str(e) for e in s.endpoints) or "-", _yes(s.hidden),
                     _yes(v.alive), f"{ports.min}-{ports.max}", s.version or "-"])
    return table(["NAME", "ENDPOINTS", "HIDDEN", "ALIVE", "PORTS", "VERSION"], rows)


def _conditions_lines(conditions: list[Condition], indent: str) -> list[str]:
    if not conditions:
        return [f"{indent}(no conditions reported)"]
    rows = [[c.type, c.status, c.reason or "-", c.lastTransitionTime.isoformat(), c.message]
            for c in conditions]
    t = table(["TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"], rows)
    return [indent + line for line in t.splitlines()]


def describe_network(view: NetworkView, nodes: dict[str, NodeView]) -> str:
    n = view.network
    s = n.spec
    lines = [
        f"Name:         {n.name}",
        f"Generation:   {n.metadata.generation or '-'}",
        f"IP range:     {s.ipRange}",
        f"Aggregators:  {', '.join(s.aggregators) or '(none: hidden nodes of this network get no peers)'}",
        f"Egress:       {s.egress or '(every NR exits locally)'}",
        f"Ready:        {view.ready_count}/{len(s.nodes)} network resources",
    ]
    if n.metadata.labels:
        lines.append("Labels:       " + ", ".join(f"{k}={v}" for k, v in sorted(n.metadata.labels.items())))
    lines.append("Network resources:")
    if not s.resources:
        lines.append("  (none)")
    for r in s.resources:
        node = nodes.get(r.node)
        where = ("unregistered node" if node is None else
                 f"{'hidden' if node.node.spec.hidden else 'public'}, {'alive' if node.alive else 'NOT alive'}")
        lines.append(f"  {r.node}  subnet {r.subnet}  gateway {r.gateway}  ({where})")
        st, published = view.statuses.get(r.node), view.facts.get(r.node)
        if published is not None:
            facts = [f"listen port {published.listenPort}"]
            if published.endpoints:
                facts.append("endpoints " + ", ".join(str(e) for e in published.endpoints))
            facts.append(f"public key {published.publicKey}")
            lines.append("    " + "; ".join(facts))
        if st is None:
            lines.append("    status: none reported yet")
            continue
        lines.append(f"    observedGeneration {st.observedGeneration}")
        lines += _conditions_lines(st.conditions, "    ")
    return "\n".join(lines)


def describe_workload(view: WorkloadView) -> str:
    w = view.workload
    s = w.spec
    lines = [
        f"Name:         {w.name}",
        f"Generation:   {w.metadata.generation or '-'}",
        f"Network:      {s.network}",
        f"Node:         {s.node}",
        f"Netns:        {s.netns}",
        f"Interface:    {s.interface}",
        f"IP:           {s.ip or '(allocated by the node)'}",
    ]
    if view.status is None:
        lines.append("Status:       none reported yet")
    else:
        lines.append(f"Status:       observedGeneration {view.status.observedGeneration}"
                     + (f", ip in use {view.status.ip}" if view.status.ip else ""))
        lines.append("Conditions:")
        lines += _conditions_lines(view.status.conditions, "  ")
    return "\n".join(lines)


def status_dict(nodes: list[NodeView], networks: list[NetworkView]) -> dict:
    return {
        "nodes": {"total": len(nodes), "alive": sum(v.alive for v in nodes),
                  "items": [{"name": v.node.name, "alive": v.alive, "hidden": v.node.spec.hidden}
                            for v in nodes]},
        "networks": {"total": len(networks), "ready": sum(v.ready for v in networks),
                     "items": [{"name": v.network.name, "ready": v.ready,
                                "readyResources": v.ready_count,
                                "resources": len(v.network.spec.nodes)} for v in networks]},
    }


def status_text(nodes: list[NodeView], networks: list[NetworkView]) -> str:
    alive = sum(v.alive for v in nodes)
    ready = sum(v.ready for v in networks)
    lines = [f"Nodes: {alive}/{len(nodes)} alive"]
    if nodes:
        lines += ["  " + line for line in table(
            ["NAME", "ALIVE", "HIDDEN"],
            [[v.node.name, _yes(v.alive), _yes(v.node.spec.hidden)] for v in nodes]).splitlines()]
    lines.append(f"Networks: {ready}/{len(networks)} ready")
    if networks:
        lines += ["  " + line for line in table(
            ["NAME", "READY", "RESOURCES"],
            [[v.network.name, _yes(v.ready), f"{v.ready_count}/{len(v.network.spec.nodes)}"]
             for v in networks]).splitlines()]
    return "\n".join(lines)
