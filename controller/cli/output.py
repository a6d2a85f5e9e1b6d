"""What the CLI prints: tables for people, JSON/YAML for scripts. Pure functions (no I/O)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import yaml

from controller.models.resources import (
    Condition, Network, NetworkResourceFacts, NetworkResourceVerdicts, Node, NodeEvent, ResourceStatus,
    Workload, WorkloadStatus,
)
from controller.planner.aggregator import AggregatorChoice, choose_aggregator


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
    unreadable: dict[str, str] = field(default_factory=dict)  # node → why its status/facts cannot be read
    verdicts: dict[str, NetworkResourceVerdicts] = field(default_factory=dict)  # node → its verdicts
    alive: set[str] | None = None  # nodes of the network holding their lease (None: not read)

    def choice(self) -> AggregatorChoice:
        """The aggregator in effect, derived from etcd exactly as every agent derives it."""
        s = self.network.spec
        return choose_aggregator(self.network.name, s.aggregators, s.nodes,
                                 {n for n, f in self.facts.items() if f.public}, set(self.facts),
                                 self.alive, {n: v.states() for n, v in self.verdicts.items()})

    @property
    def hidden(self) -> list[str]:
        return [n for n in self.network.spec.nodes if n in self.facts and not self.facts[n].public]

    @property
    def ready_count(self) -> int:
        g = self.network.metadata.generation
        return sum(nr_ready(self.statuses.get(n), g) for n in self.network.spec.nodes)

    @property
    def ready(self) -> bool:
        return self.ready_count == len(self.network.spec.nodes)

    def nr_reason(self, node: str) -> str | None:
        """Why the node's NR is not ready (None: it is): its Ready condition's reason, or
        NoStatus / StatusUnreadable / Updating (ready for an older generation)."""
        st = self.statuses.get(node)
        if st is None:
            return "StatusUnreadable" if node in self.unreadable else "NoStatus"
        c = condition(st.conditions, "Ready")
        if c is None:
            return "NoStatus"
        if c.status != "True":
            return c.reason or "NotReady"
        return None if nr_ready(st, self.network.metadata.generation) else "Updating"

    @property
    def reason(self) -> str:
        """Every reason a node is not ready, with (a few of) the nodes: `NoStatus (n3)`."""
        return grouped_reasons({n: self.nr_reason(n) for n in self.network.spec.nodes})


def grouped_reasons(reasons: dict[str, str | None], most: int = 3) -> str:
    by_reason: dict[str, list[str]] = {}
    for subject, reason in reasons.items():
        if reason:
            by_reason.setdefault(reason, []).append(subject)
    parts = []
    for reason, subjects in by_reason.items():
        more = f" +{len(subjects) - most}" if len(subjects) > most else ""
        parts.append(f"{reason} ({', '.join(subjects[:most])}{more})")
    return "; ".join(parts) or "-"


@dataclass
class NodeView:
    node: Node
    alive: bool


@dataclass
class WorkloadView:
    workload: Workload
    status: WorkloadStatus | None = None

    @property
    def ready_text(self) -> str:
        """True/False from the workload's status, Pending while it is for an older generation,
        Unknown without one."""
        c = condition(self.status.conditions, "Ready") if self.status else None
        if c is None:
            return "Unknown"
        return "Pending" if self.stale else c.status

    @property
    def stale(self) -> bool:
        g = self.workload.metadata.generation
        return self.status is not None and g is not None and self.status.observedGeneration < g

    @property
    def reason(self) -> str:
        c = condition(self.status.conditions, "Ready") if self.status else None
        if c is None:
            return "NoStatus"
        if self.stale:
            return "Updating"
        return "-" if c.status == "True" else (c.reason or "NotReady")

    @property
    def ip(self) -> str:
        s = self.workload.spec
        return str(s.ip or (self.status.ip if self.status and self.status.ip else "") or "(auto)")


def _yes(b: bool) -> str:
    return "yes" if b else "no"


def networks_table(views: list[NetworkView], invalid=(), wide: bool = False) -> str:
    """Invalid values written by hand are rows too (REASON InvalidSpec): never hidden."""
    headers = ["NAME", "RANGE", "NODES", "READY", "AGGREGATORS", "GENERATION"]
    headers += ["EGRESS", "SUBNETS"] if wide else []
    rows = []
    for v in views:
        s = v.network.spec
        row = [v.network.name, s.ipRange, ",".join(s.nodes) or "-", f"{v.ready_count}/{len(s.nodes)}",
               ",".join(s.aggregators) or "auto", v.network.metadata.generation or "-"]
        row += [s.egress or "-", ",".join(f"{r.node}={r.subnet}" for r in s.resources) or "-"] if wide else []
        rows.append((v.network.name, row + [v.reason]))
    for o in invalid:
        rows.append((o.name, [o.name, "-", ",".join(o.nodes) or "-", "-", "-", o.revision]
                     + (["-", "-"] if wide else []) + ["InvalidSpec"]))
    return table(headers + ["REASON"], [r for _, r in sorted(rows, key=lambda r: r[0])])


def workloads_table(views: list[WorkloadView], invalid=(), wide: bool = False) -> str:
    headers = ["NAME", "NETWORK", "NODE", "IP", "READY"]
    headers += ["NETNS", "INTERFACE", "GENERATION"] if wide else []
    rows = []
    for v in views:
        s = v.workload.spec
        row = [v.workload.name, s.network, s.node, v.ip, v.ready_text]
        row += [s.netns, s.interface, v.workload.metadata.generation or "-"] if wide else []
        rows.append((v.workload.name, row + [v.reason]))
    for o in invalid:
        rows.append((o.name, [o.name, "-", ",".join(o.nodes) or "-", "-", "-"]
                     + (["-", "-", o.revision] if wide else []) + ["InvalidSpec"]))
    return table(headers + ["REASON"], [r for _, r in sorted(rows, key=lambda r: r[0])])


def nodes_table(views: list[NodeView], wide: bool = False) -> str:
    headers = ["NAME", "ENDPOINTS", "HIDDEN", "ALIVE", "PORTS", "VERSION"]
    if wide:
        headers += ["CAPABILITIES"]
    rows = []
    for v in views:
        s = v.node.spec
        ports = s.listenPortRange
        row = [v.node.name, ",".join(str(e) for e in s.endpoints) or "-", _yes(s.hidden),
               _yes(v.alive), f"{ports.min}-{ports.max}", s.version or "-"]
        if wide:
            row += [",".join(s.capabilities) or "-"]
        rows.append(row)
    return table(headers, rows)


def _conditions_lines(conditions: list[Condition], indent: str) -> list[str]:
    if not conditions:
        return [f"{indent}(no conditions reported)"]
    rows = [[c.type, c.status, c.reason or "-", c.lastTransitionTime.isoformat(), c.message]
            for c in conditions]
    t = table(["TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"], rows)
    return [indent + line for line in t.splitlines()]


AGGREGATORS_EMPTY = "(empty: the 3 live public nodes ranked first by a rendezvous hash of the network name)"


def describe_network(view: NetworkView, nodes: dict[str, NodeView], workloads: list[WorkloadView] = (),
                     events: Sequence[NodeEvent] = ()) -> str:
    n = view.network
    s = n.spec
    lines = [
        f"Name:         {n.name}",
        f"Generation:   {n.metadata.generation or '-'}",
        f"IP range:     {s.ipRange}",
        f"Aggregators:  {', '.join(s.aggregators) or AGGREGATORS_EMPTY}",
        f"Egress:       {s.egress or '(every NR exits locally)'}",
        f"Ready:        {view.ready_count}/{len(s.nodes)} network resources"
        + ("" if view.ready else f" (not ready: {view.reason})"),
        f"Hidden nodes: {', '.join(_hidden_nodes(view, nodes)) or '(none)'}",
    ]
    lines += _aggregator_lines(view)
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
        if r.node in view.unreadable:
            lines.append(f"    unreadable: {view.unreadable[r.node]}")
        if st is None:
            if r.node not in view.unreadable:
                lines.append("    status: none reported yet")
            continue
        lines.append(f"    observedGeneration {st.observedGeneration}")
        if st.aggregator is not None:
            a = st.aggregator
            lines.append(f"    aggregator as this node derives it: {a.node or '(none)'} ({a.reason}), "
                         f"last switch {a.lastSwitchTime.isoformat()}, {a.switches} switch(es)")
        verdicts = view.verdicts.get(r.node)
        if verdicts is not None and verdicts.verdicts:
            lines.append("    probe verdicts: " + ", ".join(
                f"{v.node} {v.state} since {v.since.isoformat()}" for v in verdicts.verdicts))
        lines.append("    " + internet_text(st))
        lines += _conditions_lines(st.conditions, "    ")
    lines.append("Workloads:")
    if not workloads:
        lines.append("  (none)")
    else:
        lines += ["  " + line for line in table(
            ["NAME", "NODE", "IP", "READY", "REASON"],
            [[v.workload.name, v.workload.spec.node, v.ip, v.ready_text, v.reason] for v in workloads]).splitlines()]
    lines += events_lines(events)
    return "\n".join(lines)


def _hidden_nodes(view: NetworkView, nodes: dict[str, NodeView]) -> list[str]:
    """Hidden by what each node published for the network, or by its registration before that."""
    return [n for n in view.network.spec.nodes
            if (not view.facts[n].public if n in view.facts else n in nodes and nodes[n].node.spec.hidden)]


def _aggregator_lines(view: NetworkView) -> list[str]:
    """The aggregator in effect and why (from facts, leases and verdicts, as the agents derive
    it), and whether the nodes' published choices agree with it."""
    choice = view.choice()
    lines = [f"Aggregator:   {choice.node or '(none)'} ({choice.reason}): {choice.message}"]
    published = {n: st.aggregator.node for n, st in view.statuses.items() if st.aggregator is not None}
    differ = sorted(n for n, a in published.items() if a != choice.node)
    if differ:
        lines.append("              not yet followed by: " + ", ".join(
            f"{n} (uses {published[n] or 'none'})" for n in differ))
    return lines


def events_lines(events: Sequence[NodeEvent], *, by_node: bool = True) -> list[str]:
    """kubectl-style Events: the most recently seen last (`by_node`: with the node's name)."""
    if not events:
        return ["Events:       <none>"]
    rows = [[e.lastTimestamp.strftime("%Y-%m-%dT%H:%M:%SZ"), *([e.node] if by_node else []), e.type,
             e.reason, e.count, e.message] for e in events]
    return ["Events:"] + ["  " + line for line in table(
        ["LAST SEEN", *(["NODE"] if by_node else []), "TYPE", "REASON", "COUNT", "MESSAGE"], rows).splitlines()]


def describe_node(view: NodeView, networks: Sequence[NetworkView], events: Sequence[NodeEvent] = ()) -> str:
    s, name = view.node.spec, view.node.name
    lines = [
        f"Name:         {name}",
        f"Endpoints:    {', '.join(str(e) for e in s.endpoints) or '(none: hidden)'}",
        f"Hidden:       {_yes(s.hidden)}",
        f"Alive:        {_yes(view.alive)}",
        f"Ports:        {s.listenPortRange.min}-{s.listenPortRange.max}",
        f"Version:      {s.version or '-'}",
        f"Capabilities: {', '.join(s.capabilities) or '-'}",
        "Networks:",
    ]
    if not networks:
        lines.append("  (none)")
    for v in networks:
        r = v.network.spec.resource_for(name)
        why = v.nr_reason(name)
        lines.append(f"  {v.network.name}  subnet {r.subnet}  " + ("ready" if why is None else f"not ready: {why}"))
    lines += events_lines(events, by_node=False)
    return "\n".join(lines)


def internet_text(st: ResourceStatus) -> str:
    """Where an NR's Internet traffic leaves, as its agent reports it."""
    leg = f"public address {st.publicAddress}" if st.publicAddress else "no public address yet"
    if st.internetVia:
        return f"{leg}; Internet through the egress NR, via node {st.internetVia}"
    return f"{leg}; Internet through this node's ndmz"


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
        f"Ready:        {view.ready_text}" + ("" if view.reason == "-" else f" ({view.reason})"),
    ]
    if view.status is None:
        lines.append("Status:       none reported yet")
    else:
        lines.append(f"Status:       observedGeneration {view.status.observedGeneration}"
                     + (f", ip in use {view.status.ip}" if view.status.ip else ""))
        lines.append("Conditions:")
        lines += _conditions_lines(view.status.conditions, "  ")
    return "\n".join(lines)


def describe_invalid(obj, reports: dict[str, list[Condition]]) -> str:
    """An invalid value in etcd: what is wrong with it, and what the nodes it names report."""
    lines = [
        f"Name:         {obj.name}",
        f"Kind:         {obj.kind}",
        f"Key:          {obj.key}",
        f"Generation:   {obj.revision}",
        "Valid:        no; the agents keep what they built from the last valid value. Problems:",
    ]
    lines += [f"  {p}" for p in obj.problems]
    for node, conditions in sorted(reports.items()):
        lines.append(f"Reported by {node}:")
        lines += _conditions_lines(conditions, "  ")
    return "\n".join(lines)


def invalid_manifest(obj) -> dict:
    """An invalid value for -o json/yaml: its identity and problems (it has no valid spec)."""
    return {"apiVersion": "zmesh.io/v1", "kind": obj.kind,
            "metadata": {"name": obj.name, "generation": obj.revision},
            "status": {"valid": False, "key": obj.key, "problems": list(obj.problems)}}


def status_dict(nodes: list[NodeView], networks: list[NetworkView], workloads: list[WorkloadView] = (),
                invalid: dict[str, list] | None = None) -> dict:
    invalid = invalid or {}
    return {
        "nodes": {"total": len(nodes) + len(invalid.get("Node", [])), "alive": sum(v.alive for v in nodes),
                  "invalid": len(invalid.get("Node", [])),
                  "items": [{"name": v.node.name, "alive": v.alive, "hidden": v.node.spec.hidden}
                            for v in nodes]},
        "networks": {"total": len(networks) + len(invalid.get("Network", [])),
                     "ready": sum(v.ready for v in networks), "invalid": len(invalid.get("Network", [])),
                     "items": [{"name": v.network.name, "ready": v.ready,
                                "readyResources": v.ready_count,
                                "resources": len(v.network.spec.nodes)} for v in networks]
                              + [{"name": o.name, "ready": False, "invalid": True} for o in invalid.get("Network", [])]},
        "workloads": {"total": len(workloads) + len(invalid.get("Workload", [])),
                      "ready": sum(v.ready_text == "True" for v in workloads),
                      "invalid": len(invalid.get("Workload", []))},
    }


def status_text(nodes: list[NodeView], networks: list[NetworkView], workloads: list[WorkloadView] = (),
                invalid: dict[str, list] | None = None) -> str:
    invalid = invalid or {}
    bad_nodes, bad_nets, bad_wls = (invalid.get(k, []) for k in ("Node", "Network", "Workload"))

    def also(bad) -> str:
        return f", {len(bad)} invalid" if bad else ""

    alive = sum(v.alive for v in nodes)
    lines = [f"Nodes: {alive}/{len(nodes) + len(bad_nodes)} alive{also(bad_nodes)}"]
    if nodes or bad_nodes:
        lines += ["  " + line for line in table(
            ["NAME", "ALIVE", "HIDDEN"],
            [[v.node.name, _yes(v.alive), _yes(v.node.spec.hidden)] for v in nodes]
            + [[name, "?", "(registration invalid)"] for name in bad_nodes]).splitlines()]
    ready = sum(v.ready for v in networks)
    lines.append(f"Networks: {ready}/{len(networks) + len(bad_nets)} ready{also(bad_nets)}")
    if networks or bad_nets:
        rows = [(v.network.name, [v.network.name, _yes(v.ready), f"{v.ready_count}/{len(v.network.spec.nodes)}",
                                  v.reason]) for v in networks]
        rows += [(o.name, [o.name, "no", "-", "InvalidSpec"]) for o in bad_nets]
        lines += ["  " + line for line in table(
            ["NAME", "READY", "RESOURCES", "REASON"], [r for _, r in sorted(rows, key=lambda r: r[0])]).splitlines()]
    wl_ready = sum(v.ready_text == "True" for v in workloads)
    lines.append(f"Workloads: {wl_ready}/{len(workloads) + len(bad_wls)} ready{also(bad_wls)}")
    return "\n".join(lines)
