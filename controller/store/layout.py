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

    # Written by node agents.
    def nodes(self) -> str:
        return f"{self.root}nodes/"

    def node(self, node: str) -> str:
        return f"{self.nodes()}{node}"

    def alive_nodes(self) -> str:
        return f"{self.root}alive/"

    def node_alive(self, node: str) -> str:
        """Exists while the node's agent holds its lease: the node's liveness."""
        return f"{self.alive_nodes()}{node}"

    def nr_statuses(self, network: str) -> str:
        return f"{self.root}status/networks/{network}/"

    def nr_status(self, network: str, node: str) -> str:
        return f"{self.nr_statuses(network)}{node}"

    def workload_statuses(self) -> str:
        return f"{self.root}status/workloads/"

    def workload_status(self, name: str) -> str:
        return f"{self.workload_statuses()}{name}"

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

    def specs_guard(self) -> str:
        """Bumped by every spec write the CLI/store makes, and compared in it: an apply that
        validated against revision G of the specs writes only while nothing changed since G."""
        return f"{self.root}guard/specs"

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
