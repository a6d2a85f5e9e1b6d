"""Admission: the rules between objects (a workload and its network, a network and the
registered nodes, addresses in use), decided purely over a snapshot of what etcd holds.

The CLI calls it today; a CNI plugin or a web page would call the same functions. Reading the
snapshot and writing what was admitted is the store's job (controller/store/specs.py)."""

from .review import (
    Item,
    Problem,
    Reads,
    Snapshot,
    Stored,
    changed_items,
    first_reads,
    further_reads,
    guarded_networks,
    review,
)
from .rules import workload_problems

__all__ = ["Item", "Problem", "Reads", "Snapshot", "Stored", "changed_items", "first_reads",
           "further_reads", "guarded_networks", "review", "workload_problems"]
