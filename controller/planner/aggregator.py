"""Which public NR relays for a network's hidden NRs: the effective aggregator.

Pure: a function of what every node reads from etcd (the spec, the published facts, the
liveness leases and the probe verdicts), with no clock and no local state, so every node that
sees the same etcd revision derives the same choice, with no leader and no vote.

- **Candidates**, in order: `spec.aggregators` as listed, or when it is empty the three live
  public nodes of the network that rank highest by a rendezvous hash of (network, node), so
  networks spread over their public nodes instead of all landing on the same one, a node joining
  or leaving moves only the networks it ranks first for, and probing stays bounded.
- **Usable**: public, facts published, alive (its lease), and not blamed by the verdicts.
- **Blame** (`blamed_nodes`): every tunnel some live prober reports as Failing or Recovering is
  a failed tunnel. A node is blamed when most of its reported tunnels fail, taking first the node
  with the most failed tunnels (then the fewest working ones, then the name) and setting aside
  the tunnels it explains. So a blackholed aggregator (every tunnel to it fails) is blamed and
  its victims, each with one failed tunnel to it, are not, while one prober that is cut off
  itself blames nobody but itself.
- **Choice**: the first usable candidate; when none is usable, the first alive public published
  candidate anyway (a degraded relay beats none); else no aggregator.

Damping lives in the verdicts (`health.TunnelHealth`): a prober reports a tunnel that failed as
Recovering, which blames like Failing, until it has worked for a hold-down period, so a
recovered preferred aggregator is moved back to only once it has stayed up that long.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

FORWARDING = "Forwarding"  # the tunnel works (and has for the hold-down since it last failed)
FAILING = "Failing"  # probes through the tunnel fail
RECOVERING = "Recovering"  # probes work again, but not yet for the whole hold-down
# With `aggregators` empty, this many public nodes are candidates (and probed by every NR).
IMPLICIT_CANDIDATES = 3

# Reasons of a choice, as the status and `zmesh describe network` show them.
PREFERRED = "Preferred"  # the first candidate is in effect
FAILED_OVER = "FailedOver"  # an earlier candidate is unusable; the first usable one is
DEGRADED = "NoneForwarding"  # no candidate is usable; the first alive one relays anyway
NONE_USABLE = "NoAggregator"  # no candidate is public, published and alive


@dataclass(frozen=True)
class Candidate:
    node: str
    usable: bool
    why: str = ""  # why it is not usable ("" when it is)


@dataclass(frozen=True)
class AggregatorChoice:
    node: str | None
    reason: str
    message: str
    candidates: tuple[Candidate, ...]  # in order of preference


def rendezvous_order(network: str, nodes: Collection[str]) -> tuple[str, ...]:
    """`nodes` ranked by highest random weight for `network` (BLAKE2b of network and node)."""
    def weight(node: str) -> bytes:
        return hashlib.blake2b(f"{network}\0{node}".encode(), digest_size=16).digest()

    return tuple(sorted(nodes, key=lambda n: (weight(n), n), reverse=True))


def candidate_order(network: str, aggregators: Sequence[str], public: Collection[str],
                    published: Collection[str], live: Collection[str]) -> tuple[str, ...]:
    """The candidates in order of preference: `aggregators` as listed, or when it is empty the
    IMPLICIT_CANDIDATES live public nodes with published facts that rank highest for `network`.
    Liveness (not blame) picks the implicit few, because blame comes from probing the
    candidates: a candidate dropped for blame would stop being probed and come straight back."""
    if aggregators:
        return tuple(aggregators)
    eligible = set(public) & set(published) & set(live)
    return rendezvous_order(network, eligible)[:IMPLICIT_CANDIDATES]


def blamed_nodes(verdicts: Mapping[str, Mapping[str, str]]) -> frozenset[str]:
    """The nodes to blame for the failed tunnels in `verdicts` (prober -> target -> state).
    A tunnel fails when either end reports it Failing or Recovering, and works when an end
    reports it Forwarding and neither reports it failing. See the module docstring."""
    failed: set[frozenset[str]] = set()
    working: set[frozenset[str]] = set()
    for prober, targets in verdicts.items():
        for target, state in targets.items():
            if target != prober:
                (failed if state in (FAILING, RECOVERING) else working).add(frozenset((prober, target)))
    working -= failed
    open_by_node: dict[str, set[frozenset[str]]] = {}
    n_working: dict[str, int] = {}
    for edge in failed:
        for n in edge:
            open_by_node.setdefault(n, set()).add(edge)
    for edge in working:
        for n in edge:
            n_working[n] = n_working.get(n, 0) + 1
    n_failed = {n: len(edges) for n, edges in open_by_node.items()}
    blamed: set[str] = set()
    while True:
        eligible = [n for n, edges in open_by_node.items()
                    if edges and n not in blamed and n_failed[n] > n_working.get(n, 0)]
        if not eligible:
            break  # what is left (if anything) is a link problem between nodes that mostly work
        worst = min(eligible, key=lambda n: (-len(open_by_node[n]), n_working.get(n, 0), n))
        blamed.add(worst)
        for edge in open_by_node[worst]:
            for n in edge - {worst}:
                open_by_node[n].discard(edge)
        open_by_node[worst] = set()
    return frozenset(blamed)


def choose_aggregator(
    network: str,
    aggregators: Sequence[str],
    members: Collection[str],
    public: Collection[str],
    published: Collection[str],
    alive: Collection[str] | None,
    verdicts: Mapping[str, Mapping[str, str]],
) -> AggregatorChoice:
    """The effective aggregator of `network`.

    `members`: the network's nodes; `public`/`published`: those whose published facts have
    endpoints / exist at all; `alive`: nodes holding their lease (None: unknown, all count);
    `verdicts`: prober -> target -> state as published. Verdicts of probers that are not alive
    members, and about targets that are not, are ignored (a dead node's last verdicts are stale
    and a dead node is unusable anyway)."""
    live = set(members) if alive is None else set(members) & set(alive)
    heard = {p: {t: s for t, s in v.items() if t in live} for p, v in verdicts.items() if p in live}
    blamed = blamed_nodes(heard)
    explicit = bool(aggregators)
    order = candidate_order(network, aggregators, public, published, live)

    candidates = []
    for node in order:
        why = ""
        if node not in published:
            why = "has not published its facts"
        elif node not in public:
            why = "is hidden (no public endpoint)"
        elif node not in live:
            why = "is not alive (its lease expired)"
        elif node in blamed:
            why = _blame_message(node, heard)
        candidates.append(Candidate(node, not why, why))

    listed = (f"aggregators: {', '.join(order)}" if explicit else
              f"aggregators empty: live public nodes ranked for {network!r}: {', '.join(order) or 'none'}")
    usable = [c for c in candidates if c.usable]
    if usable:
        chosen = usable[0]
        if chosen is candidates[0]:
            return AggregatorChoice(chosen.node, PREFERRED, f"{chosen.node} is the first candidate "
                                    f"({listed})", tuple(candidates))
        skipped = "; ".join(f"{c.node} {c.why}" for c in candidates[:candidates.index(chosen)])
        return AggregatorChoice(chosen.node, FAILED_OVER, f"{chosen.node}, because {skipped} ({listed})",
                                tuple(candidates))
    fallback = next((c for c in candidates if c.node in live and c.node in public and c.node in published),
                    None)
    reasons = "; ".join(f"{c.node} {c.why}" for c in candidates) or "no public node has published its facts"
    if fallback is not None:
        return AggregatorChoice(fallback.node, DEGRADED, f"{fallback.node}, although no candidate "
                                f"is forwarding ({reasons}) ({listed})", tuple(candidates))
    return AggregatorChoice(None, NONE_USABLE, f"no aggregator is usable ({reasons}) ({listed}); one "
                            "must be a public node that is alive and has published its facts",
                            tuple(candidates))


def _blame_message(node: str, verdicts: Mapping[str, Mapping[str, str]]) -> str:
    failing = sorted(p for p, v in verdicts.items() if v.get(node) == FAILING)
    recovering = sorted(p for p, v in verdicts.items() if v.get(node) == RECOVERING)
    its_own = sorted(t for t, s in verdicts.get(node, {}).items() if s in (FAILING, RECOVERING))
    if failing:
        return f"is not forwarding (tunnels from {', '.join(failing)} fail)"
    if recovering:
        return f"is recovering (held down by {', '.join(recovering)} after a failure)"
    return f"is not forwarding (its own tunnels to {', '.join(its_own)} fail)"
