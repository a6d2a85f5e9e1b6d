"""What the agent last observed, kept for /metrics, /status and the mesh page.

The reconciler hands over its latest plan (`DesiredNR`), the WireGuard device it read, the
links of the NR and the conditions it published; the observer (reconciler/observer.py)
refreshes the WireGuard side on its own short period. Readers only ever read this object: a
scrape never waits for netlink or a UAPI socket, however slow those are.

Everything here is pure bookkeeping on data handed in, with an injectable clock: no I/O.

Peer health. WireGuard renews a session every 2 minutes, and only while there is traffic, so
an old handshake alone says nothing about an idle peer. A peer is judged by what it should be
doing (docs/observability.md, "Peer states"):
- with a persistent keepalive (ours, or the one a hidden peer keeps towards us), a session is
  renewed at least every 180 s (REJECT_AFTER_TIME): the peer is **stale** when its last
  handshake is older than max(stale_after, 180 s) + the keepalive;
- without one, a healthy peer answers anything it receives within 10 s (WireGuard's passive
  keepalive) or completes a handshake: the peer is **stale** when we have been sending to it
  for more than `stale_after` seconds without hearing anything back (no handshake, no byte);
- **up** when heard within the window, **idle** when neither (nothing is expected of it), and
  **pending** while the plan has it but the device does not (yet).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from controller.models.nftables import DROP_REASONS
from controller.models.resources import Condition
from controller.planner.plan import HIDDEN_KEEPALIVE, DesiredNR

if TYPE_CHECKING:  # the CLI imports the defaults below; pyroute2 is not needed for them
    from controller.dataplane.links import NRState
    from controller.dataplane.nftables import TableCounters
    from controller.dataplane.wireguard.base import DeviceState

# WireGuard's protocol constants (whitepaper, section 6): the longest a session lives, and how
# soon a peer answers data it received when it has nothing to send back.
REJECT_AFTER_TIME = 180.0
KEEPALIVE_TIMEOUT = 10.0
REKEY_TIMEOUT = 5.0
DEFAULT_STALE_AFTER = 180.0
DEFAULT_OBSERVE_INTERVAL = 5.0
DEFAULT_PEER_SERIES_LIMIT = 100  # per node; see AgentMetrics


def reply_grace(observe_interval: float) -> float:
    """How long after we last heard from a peer a send of ours may still be the passive
    keepalive answering it (it leaves 10 s later and is seen at the next observation)."""
    return KEEPALIVE_TIMEOUT + observe_interval + 1.0


def min_stale_after(observe_interval: float) -> float:
    """The shortest usable stale_after: a healthy peer's answer (passive keepalive or
    handshake response) must have arrived and been observed before anything is called stale."""
    return KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + observe_interval

UP, IDLE, STALE, PENDING = "up", "idle", "stale", "pending"
PEER_STATES = (UP, IDLE, STALE, PENDING)

PEERS_CONDITION = "PeersReachable"
NAMED_IN_MESSAGES = 3  # stale peers named in a condition message; the rest are counted


@dataclass
class PeerRecord:
    """One planned peer of one NR, as this agent has seen it (keyed by the peer's node)."""

    node: str
    public_key: str
    endpoint: str | None  # as observed (learned for hidden peers), else as planned
    allowed_ips: tuple[str, ...]
    keepalive: int  # the persistent keepalive we send (0: none)
    calls_in: int  # the keepalive the peer sends us (a hidden peer calling its aggregator)
    first_seen: float  # when this agent first had it planned
    configured: bool = False  # present on the device at the last observation
    last_handshake: float = 0.0  # unix time, 0: none yet
    heard_at: float = 0.0  # last handshake or last time its received bytes grew
    unanswered_since: float | None = None  # we sent to it after heard_at and heard nothing
    rx_bytes: int = 0  # counted by this agent, monotonic across peer churn and device restarts
    tx_bytes: int = 0
    raw: tuple[int, int] | None = None  # the device's own counters at the last observation

    def handshake_age(self, now: float) -> float:
        """Seconds since the last handshake; for a peer without one, since it was planned."""
        return max(0.0, now - (self.last_handshake or self.first_seen))

    def state(self, now: float, stale_after: float) -> str:
        if not self.configured:
            return PENDING
        keepalive = self.keepalive or self.calls_in
        if keepalive:
            window = max(stale_after, REJECT_AFTER_TIME) + keepalive
            if self.handshake_age(now) > window:
                return STALE
            return UP if self.last_handshake or self.heard_at else IDLE
        if self.unanswered_since is not None and now - self.unanswered_since > stale_after:
            return STALE
        return UP if self.heard_at and now - self.heard_at <= stale_after else IDLE

    def stale_reason(self, stale_after: float) -> str:
        keepalive = self.keepalive or self.calls_in
        if keepalive:
            window = max(stale_after, REJECT_AFTER_TIME) + keepalive
            return f"no handshake for more than {window:g} s despite a {keepalive} s keepalive"
        return f"no reply for more than {stale_after:g} s while sending to it"


@dataclass(frozen=True)
class LinkInfo:
    name: str
    kind: str | None
    up: bool
    mtu: int


NR_DROP_REASONS = ("inbound", "spoofed", "to_node")  # what an NR's own table can drop


@dataclass
class FirewallTally:
    """The counters of Zero-Mesh's counted nftables rules (`Rule.counts`) in one or more tables
    (`source`: "nr", "ndmz", "host"), counted by the agent so that they only grow. The kernel's
    counters start again at zero whenever a table is replaced (drift repaired, a rule changed):
    a reading is compared with the last one of the same rule (table generation and rule handle),
    and a rule not seen before counts from zero. As for WireGuard's bytes, counting starts at
    the agent's first reading of a table, and what a replaced table counted after our last
    reading of it is lost."""

    packets: dict[str, int] = field(default_factory=dict)  # counts -> total
    bytes: dict[str, int] = field(default_factory=dict)
    raw: dict[tuple, tuple[int, int]] = field(default_factory=dict)  # (source, generation, handle) ->
    read: set[str] = field(default_factory=set)  # sources read at least once (None included)
    observed_at: float = 0.0
    error: str | None = None

    def add(self, source: str, counters: TableCounters | None) -> None:
        first = source not in self.read
        self.read.add(source)
        current = {}
        for rc in counters.rules if counters is not None else ():
            key = (source, counters.generation, rc.handle)
            value = (rc.packets, rc.bytes)
            last = self.raw.get(key)
            if last is None:
                delta = (0, 0) if first else value
            elif value[0] >= last[0] and value[1] >= last[1]:
                delta = (value[0] - last[0], value[1] - last[1])
            else:  # reset in place (`nft reset counters`)
                delta = value
            self.packets[rc.counts] = self.packets.get(rc.counts, 0) + delta[0]
            self.bytes[rc.counts] = self.bytes.get(rc.counts, 0) + delta[1]
            current[key] = value
        self.raw = {k: v for k, v in self.raw.items() if k[0] != source} | current

    def view(self, reasons: tuple[str, ...], traffic: bool) -> dict:
        out = {"observedAt": iso_time(self.observed_at) if self.observed_at else None,
               "observeError": self.error,
               "connections": self.packets.get("connections", 0)}
        if traffic:
            out |= {"sentBytes": self.bytes.get("sent", 0), "receivedBytes": self.bytes.get("received", 0)}
        out["droppedPackets"] = {r: self.packets.get(r, 0) for r in reasons}
        return out


@dataclass
class NRRecord:
    """One network's NR on this node."""

    network: str
    desired: DesiredNR | None = None
    applied: DesiredNR | None = None  # the plan as of the last successful reconcile
    peers: dict[str, PeerRecord] = field(default_factory=dict)
    rx_bytes: int = 0  # network totals: removed peers' bytes stay counted
    tx_bytes: int = 0
    observed_at: float = 0.0  # last WireGuard observation
    counting: bool = False  # a device reading was taken: later peers count from zero
    observe_error: str | None = None
    links: tuple[LinkInfo, ...] = ()
    observed_generation: int = 0
    conditions: tuple[Condition, ...] = ()
    drift_repairs: int = 0
    aggregator_changes: int = 0
    aggregator_failovers: int = 0  # the changes that left an aggregator for a less preferred one
    stale: frozenset[str] = frozenset()  # peers stale at the last observation
    firewall: FirewallTally = field(default_factory=FirewallTally)  # the NR's own table


@dataclass(frozen=True)
class Transition:
    network: str
    peer: str
    stale: bool  # True: became stale; False: heard again after being stale
    message: str


class Snapshot:
    def __init__(self, node: str, *, stale_after: float = DEFAULT_STALE_AFTER,
                 observe_interval: float = DEFAULT_OBSERVE_INTERVAL,
                 clock: Callable[[], float] = time.time):
        if not stale_after >= min_stale_after(observe_interval):
            raise ValueError(f"a stale-after of {stale_after:g} s is too short for an observe interval "
                             f"of {observe_interval:g} s: at least {min_stale_after(observe_interval):g} s")
        self.node = node
        self.stale_after = stale_after
        self.observe_interval = observe_interval
        self.clock = clock
        self.networks: dict[str, NRRecord] = {}
        self.ndmz = FirewallTally()  # the ndmz's table and, single NIC, ours in the host
        self.ndmz_drift_repairs = 0  # ndmz passes that wrote back what was changed outside the agent
        self.refreshed_at = 0.0  # end of the observer's last pass over every network

    def _nr(self, network: str) -> NRRecord:
        return self.networks.setdefault(network, NRRecord(network))

    # --- handed in by the reconciler --------------------------------------------------------

    def planned(self, desired: DesiredNR) -> bool:
        """The reconciler's latest plan of an NR: which peers there should be. True when the
        aggregator in effect was replaced or lost; the first one being chosen (a new NR, or after
        none was usable) is not a change. A change is a failover unless it moves to a candidate
        preferred to the old one (a recovered one after its hold-down, or at start-up the
        preferred one publishing its facts after the NR had settled for another)."""
        nr = self._nr(desired.network)
        now = self.clock()
        before = nr.desired.aggregator if nr.desired is not None else None
        changed = before is not None and before != desired.aggregator
        if changed:
            nr.aggregator_changes += 1
            if not _moves_to_a_preferred_candidate(before, desired):
                nr.aggregator_failovers += 1
        nr.desired = desired
        # A hidden peer calls its aggregator with a keepalive (plan.HIDDEN_KEEPALIVE); the
        # aggregator sees it as a peer without an endpoint.
        calls_in = HIDDEN_KEEPALIVE if desired.aggregator == self.node and not desired.hidden else 0
        wanted = {}
        for p in desired.peers:
            old = nr.peers.get(p.node)
            rec = old if old is not None else PeerRecord(
                node=p.node, public_key=p.public_key, endpoint=p.endpoint, allowed_ips=(),
                keepalive=0, calls_in=0, first_seen=now)
            if rec.public_key != p.public_key:  # a new key is a new peer on the device
                rec.public_key, rec.raw, rec.configured = p.public_key, None, False
                rec.last_handshake, rec.heard_at, rec.unanswered_since = 0.0, 0.0, None
                rec.first_seen = now
            rec.allowed_ips = tuple(str(a) for a in p.allowed_ips)
            rec.keepalive = p.persistent_keepalive or 0
            rec.calls_in = calls_in if p.endpoint is None else 0
            if p.endpoint is not None:
                rec.endpoint = p.endpoint
            wanted[p.node] = rec
        nr.peers = wanted
        nr.stale = frozenset(n for n in nr.stale if n in wanted)
        return changed

    def reconciled(self, network: str, *, ok: bool, kernel_writes: int = 0) -> bool:
        """A reconcile of `network` ended. Kernel writes made for a plan equal to the one the
        previous reconcile applied mean the kernel drifted (someone or something changed it):
        returns True for such a drift repair."""
        nr = self.networks.get(network)
        if nr is None:
            return False
        drift = bool(ok and kernel_writes and nr.applied is not None and nr.applied == nr.desired)
        nr.drift_repairs += drift
        nr.applied = nr.desired if ok else None
        return drift

    def ndmz_passed(self, *, writes: int, baseline: bool) -> bool:
        """An ndmz pass converged with `writes` kernel writes; `baseline`: the pass before
        converged too, so the plan was in place and writes now mean the ndmz (its namespace,
        links, routes, its table or ours in the host) had been changed outside the agent.
        Returns True for such a drift repair."""
        drift = bool(baseline and writes)
        self.ndmz_drift_repairs += drift
        return drift

    def status(self, network: str, generation: int, conditions: Iterable[Condition]) -> None:
        nr = self._nr(network)
        nr.observed_generation = generation
        nr.conditions = tuple(conditions)

    def observed_links(self, network: str, state: NRState | None) -> None:
        links = state.links.values() if state is not None else ()
        self._nr(network).links = tuple(sorted(
            (LinkInfo(link.name, link.kind, link.up, link.mtu) for link in links), key=lambda l: l.name))

    def forget(self, network: str) -> None:
        self.networks.pop(network, None)

    # --- WireGuard observations ----------------------------------------------------------

    def observed_device(self, network: str, device: DeviceState | None, *,
                        error: str | None = None) -> list[Transition]:
        """The WireGuard device of `network` as just read (None with `error`: unreadable).
        Returns the peers that became stale or were heard again."""
        nr = self.networks.get(network)
        if nr is None or nr.desired is None:
            return []
        now = self.clock()
        nr.observed_at = now
        nr.observe_error = error
        if device is None:
            return []  # states age on their own; counters wait for the next reading
        first, nr.counting = not nr.counting, True
        grace = reply_grace(self.observe_interval)
        for rec in nr.peers.values():
            seen = device.peers.get(rec.public_key)
            rec.configured = seen is not None
            if seen is None:
                continue
            if seen.endpoint:
                rec.endpoint = seen.endpoint
            if rec.raw is None:
                # Counting starts at this agent's first look at a device it found running (its
                # bytes were counted by whoever ran before); a peer added later starts at 0.
                drx, dtx = (0, 0) if first else (seen.rx_bytes, seen.tx_bytes)
            else:
                # Counters below the last reading: the device or the peer was recreated.
                drx = seen.rx_bytes - rec.raw[0] if seen.rx_bytes >= rec.raw[0] else seen.rx_bytes
                dtx = seen.tx_bytes - rec.raw[1] if seen.tx_bytes >= rec.raw[1] else seen.tx_bytes
            rec.raw = (seen.rx_bytes, seen.tx_bytes)
            rec.rx_bytes += drx
            rec.tx_bytes += dtx
            nr.rx_bytes += drx
            nr.tx_bytes += dtx
            heard = max(rec.heard_at, seen.last_handshake, now if drx else 0.0)
            if seen.last_handshake > rec.last_handshake:
                rec.last_handshake = seen.last_handshake
            if heard > rec.heard_at:
                rec.heard_at, rec.unanswered_since = heard, None
            elif dtx and rec.unanswered_since is None and now - (rec.heard_at or rec.first_seen) > grace:
                # Sent, and not merely the keepalive that answers what we last received.
                rec.unanswered_since = now
        return self._transitions(nr, now)

    # --- nftables counters ---------------------------------------------------------------

    def observed_firewall(self, network: str, counters: TableCounters | None, *,
                          error: str | None = None) -> None:
        """The counters of the NR's table as just read (None: no table yet, or with `error`)."""
        nr = self.networks.get(network)
        if nr is not None and nr.desired is not None:
            self._tally(nr.firewall, "nr", counters, error)

    def observed_ndmz(self, readings: dict[str, TableCounters | None], errors: Iterable[str] = ()) -> None:
        """The counters of the ndmz's table (source "ndmz") and, single NIC, of ours in the host
        ("host"), as just read; a source that could not be read is left out, with its error."""
        self.ndmz.observed_at = self.clock()
        self.ndmz.error = "; ".join(errors) or None
        for source, counters in readings.items():
            self.ndmz.add(source, counters)

    def _tally(self, tally: FirewallTally, source: str, counters, error) -> None:
        tally.observed_at = self.clock()
        tally.error = error
        if error is None:
            tally.add(source, counters)

    def _transitions(self, nr: NRRecord, now: float) -> list[Transition]:
        stale = frozenset(n for n, rec in nr.peers.items() if rec.state(now, self.stale_after) == STALE)
        out = [Transition(nr.network, n, True, f"peer {n}: {nr.peers[n].stale_reason(self.stale_after)}")
               for n in sorted(stale - nr.stale)]
        out += [Transition(nr.network, n, False, f"peer {n}: heard from again")
                for n in sorted(nr.stale - stale) if n in nr.peers]
        nr.stale = stale
        return out

    # --- reads ------------------------------------------------------------------------------

    def peers_condition(self, network: str) -> tuple[str, str, str, str]:
        """(type, status, reason, message) of the NR's PeersReachable condition. The message
        names peers and thresholds only (never ages), so it changes only when the set does."""
        nr = self.networks.get(network)
        stale = sorted(nr.stale) if nr else []
        if not stale:
            return (PEERS_CONDITION, "True", "NoStalePeers",
                    "every peer expected to talk was heard from recently")
        parts = [f"{n} ({nr.peers[n].stale_reason(self.stale_after)})" for n in stale[:NAMED_IN_MESSAGES]]
        more = len(stale) - NAMED_IN_MESSAGES
        text = f"{len(stale)} stale peer(s): " + ", ".join(parts) + (f" and {more} more" if more > 0 else "")
        return (PEERS_CONDITION, "False", "HandshakeStale", text)

    def peer_states(self, network: str, now: float | None = None) -> dict[str, str]:
        nr = self.networks.get(network)
        now = self.clock() if now is None else now
        return {n: rec.state(now, self.stale_after) for n, rec in sorted(nr.peers.items())} if nr else {}

    def view(self) -> dict:
        """Everything, as JSON-ready data (/status). Public keys only, never a private one."""
        now = self.clock()
        return {
            "node": self.node,
            "time": iso_time(now),
            "staleAfterSeconds": self.stale_after,
            "networks": [self.network_view(name, now) for name in sorted(self.networks)],
            "ndmz": self.ndmz_view(),
        }

    def ndmz_view(self) -> dict | None:
        """The node's ndmz counters (/status and the mesh page); None until its tables were read."""
        if not self.ndmz.read:
            return None
        return self.ndmz.view(DROP_REASONS, traffic=False) | {"driftRepairs": self.ndmz_drift_repairs}

    def network_view(self, name: str, now: float | None = None) -> dict | None:
        nr = self.networks.get(name)
        if nr is None:
            return None
        now = self.clock() if now is None else now
        d = nr.desired
        return {
            "name": name,
            "observedAt": iso_time(nr.observed_at) if nr.observed_at else None,
            "observeError": nr.observe_error,
            "observedGeneration": nr.observed_generation,
            "conditions": [c.model_dump(mode="json") for c in nr.conditions],
            "hidden": d.hidden if d else None,
            "aggregator": d.aggregator if d else None,
            "publicKey": d.public_key if d else None,
            "listenPort": d.listen_port if d else None,
            "gateway": str(d.gateway) if d else None,
            "mtu": d.mtu if d else None,
            "issues": [{"reason": i.reason, "message": i.message} for i in d.issues] if d else [],
            "links": [{"name": l.name, "kind": l.kind, "up": l.up, "mtu": l.mtu} for l in nr.links],
            "receivedBytes": nr.rx_bytes,
            "sentBytes": nr.tx_bytes,
            "driftRepairs": nr.drift_repairs,
            "internet": nr.firewall.view(NR_DROP_REASONS, traffic=True) if d and d.ruleset else None,
            "peers": [{
                "node": rec.node,
                "publicKey": rec.public_key,
                "endpoint": rec.endpoint,
                "allowedIPs": list(rec.allowed_ips),
                "persistentKeepalive": rec.keepalive,
                "state": rec.state(now, self.stale_after),
                "lastHandshake": iso_time(rec.last_handshake) if rec.last_handshake else None,
                "handshakeAgeSeconds": round(rec.handshake_age(now), 1),
                "receivedBytes": rec.rx_bytes,
                "sentBytes": rec.tx_bytes,
            } for rec in sorted(nr.peers.values(), key=lambda r: r.node)],
        }


def iso_time(t: float) -> str:
    """Unix time as RFC 3339 UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _moves_to_a_preferred_candidate(before: str, desired: DesiredNR) -> bool:
    order = [c.node for c in desired.choice.candidates] if desired.choice else []
    return (desired.aggregator in order and before in order
            and order.index(desired.aggregator) < order.index(before))
