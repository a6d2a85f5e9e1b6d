"""The etcd key layout: the one place that knows where each kind of value lives.

Everything is under one configurable prefix (default `/zmesh/`), then a layout version (`v1/`).
See docs/etcd-layout.md for the user-facing description.
"""

from __future__ import annotations


class Layout:
    VERSION = "v1"

    def __init__(self, prefix: str = "/zmesh/"):
        if not prefix.startswith("/"):
            raise ValueError(f"etcd prefix {prefix!r} must start with '/'")
        self.prefix = prefix.rstrip("/") + "/"
        self.root = f"{self.prefix}{self.VERSION}/"

    # Specs, written by users (CLI or etcdctl). Value: the manifest as JSON (YAML accepted).
    def networks(self) -> str:
        return f"{self.root}networks/"

    def network(self, name: str) -> str:
        return f"{self.networks()}{name}"

    def workloads(self) -> str:
        return f"{self.root}workloads/"

    def workload(self, name: str) -> str:
        return f"{self.workloads()}{name}"

    # Written by node agents: everything a node writes lives under its own prefix
    # `nodes/<node>/`, so an etcd role can confine the node's credentials to it.
    def nodes(self) -> str:
        return f"{self.root}nodes/"

    def node_root(self, node: str) -> str:
        """Everything node `node` writes, and nothing any other node writes."""
        return f"{self.nodes()}{node}/"

    def node_registration(self, node: str) -> str:
        """The node's `Node` record (persistent)."""
        return f"{self.node_root(node)}registration"

    def node_mesh(self, node: str) -> str:
        """What the node tells its peers: liveness, its NRs' facts, its probe verdicts. Peers
        watch this prefix (one watch per peer node); conditions live apart, unwatched."""
        return f"{self.node_root(node)}mesh/"

    def node_alive(self, node: str) -> str:
        """Exists while the node's agent holds its lease: the node's liveness."""
        return f"{self.node_mesh(node)}alive"

    def facts(self, node: str, network: str) -> str:
        """The small, rarely changing facts peers need to reach the node's NR of `network`."""
        return f"{self.node_mesh(node)}facts/{network}"

    def verdicts(self, node: str, network: str) -> str:
        """The node's probe verdicts about the NRs of `network` it probes."""
        return f"{self.node_mesh(node)}verdicts/{network}"

    def node_statuses(self, node: str) -> str:
        return f"{self.node_root(node)}status/"

    def nr_status(self, node: str, network: str) -> str:
        """Conditions of the node's NR of `network` (read by people and tools, not by peers)."""
        return f"{self.node_statuses(node)}networks/{network}"

    def workload_status(self, node: str, workload: str) -> str:
        return f"{self.node_statuses(node)}workloads/{workload}"

    def node_events(self, node: str) -> str:
        return f"{self.node_root(node)}events/"

    def events_of(self, node: str, network: str | None) -> str:
        """The events node `node` recorded about its NR of `network` (None: about itself)."""
        return f"{self.node_events(node)}" + (f"networks/{network}/" if network else "node/")

    def parse_node_key(self, key: str) -> tuple[str, str] | None:
        """(node, rest) of a key under `nodes/`, e.g. ("n1", "mesh/facts/blue"); else None."""
        rest = key.removeprefix(self.nodes())
        node, sep, tail = rest.partition("/")
        if rest == key or not sep or not node or not tail:
            return None
        return node, tail

    # The per-node index: what concerns a node, so that its agent watches only that.
    # Kept consistent with the specs in the same transaction by the store (and repaired by
    # the indexer for values written by hand). Values are empty.
    def node_index(self, node: str) -> str:
        return f"{self.root}index/nodes/{node}/"

    def index_network(self, node: str, network: str) -> str:
        return f"{self.node_index(node)}networks/{network}"

    def index_workload(self, node: str, workload: str) -> str:
        return f"{self.node_index(node)}workloads/{workload}"

    def index_root(self) -> str:
        return f"{self.root}index/"

    def network_guard(self, network: str) -> str:
        """Bumped by every write of the network's spec or of one of its workloads made through
        the store, and compared by admitted writes: a write reviewed against revision G of the
        network's guard lands only while no other write of that network came in between."""
        return f"{self.root}guards/networks/{network}"

    def leader(self, role: str) -> str:
        return f"{self.root}leader/{role}"

    def parse_index_key(self, key: str) -> tuple[str, str, str] | None:
        """(node, kind, name) of a node-index key, or None if `key` is not one."""
        rest = key.removeprefix(f"{self.root}index/nodes/")
        if rest == key:
            return None
        parts = rest.split("/")
        if len(parts) != 3 or not all(parts):
            return None
        kind = {"networks": "Network", "workloads": "Workload"}.get(parts[1])
        return (parts[0], kind, parts[2]) if kind else None

    def parse_spec_key(self, key: str) -> tuple[str, str] | None:
        """(kind, name) of a spec key, or None if `key` is not one."""
        for kind, prefix in (("Network", self.networks()), ("Workload", self.workloads())):
            name = key.removeprefix(prefix)
            if name != key and name and "/" not in name:
                return kind, name
        return None
