"""The prober: for every NR of this node, probe the tunnels its plan names once per interval and
publish the verdicts (nodes/<node>/mesh/verdicts/<network>) when one changes, never per probe.

A probe of a tunnel passes when the NR behind it answers an ICMP echo sent through the tunnel
(dataplane.probe) and the peer's last WireGuard handshake is fresh (younger than WireGuard's
REJECT_AFTER_TIME, past which no session may carry data). The verdicts follow the probes with the
hysteresis of planner.health.TunnelHealth; their peers read them to agree on the aggregator
(planner.aggregator). What to probe is the planner's: `DesiredNR.probes`, handed over by the
reconciler after every plan (`track`) and dropped with the NR (`forget`).

A hidden NR probes only the aggregator in effect, so when it fails over, its evidence against
the old one would vanish with the tunnel and the old aggregator would look innocent again at
once. So a verdict that was Failing or Recovering when its tunnel stopped being probed stays
published, unchanged, for the hold-down (and resumes if the tunnel is probed again): moving back
waits for that evidence to expire, like any other.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from ipaddress import IPv4Address

from controller.dataplane import probe
from controller.dataplane.wireguard.base import WireGuardBackend, WireGuardError
from controller.models.resources import MAX_VERDICTS, NetworkResourceVerdicts, TunnelVerdict
from controller.planner.aggregator import FAILING, RECOVERING
from controller.planner.health import FAIL_AFTER, HOLD_DOWN, TunnelHealth

log = logging.getLogger(__name__)

INTERVAL = 1.0  # seconds between probe rounds
TIMEOUT = 1.0  # seconds an echo may take
REJECT_AFTER_TIME = 180.0  # WireGuard: a session older than this carries no data


@dataclass
class _Probed:
    """One NR's probing: where to probe from, what, and the verdicts so far."""

    netns: str
    wg_ifname: str
    source: IPv4Address
    targets: tuple = ()  # planner ProbeTargets: node, public_key, address
    health: dict[str, TunnelHealth] = field(default_factory=dict)
    # verdicts against tunnels no longer probed: target -> (its health, since when unprobed)
    former: dict[str, tuple[TunnelHealth, float]] = field(default_factory=dict)
    alive: dict[str, bool] = field(default_factory=dict)  # target -> lease held at last round
    restored: bool = False


class Prober:
    def __init__(self, *, node_id: str, wireguard: WireGuardBackend, publish, published, alive,
                 interval: float = INTERVAL, timeout: float = TIMEOUT, hold_down: float = HOLD_DOWN,
                 fail_after: int = FAIL_AFTER, clock=time.time, metrics=None):
        """`publish(verdicts)` writes a NetworkResourceVerdicts (async); `published(network)` is
        what this node published last (NetworkResourceVerdicts or None: a restarted agent carries
        its verdicts on); `alive(node)` whether a node holds its lease (None: unknown)."""
        self.node_id = node_id
        self.wg = wireguard
        self._publish = publish
        self._published = published
        self._alive = alive
        self.interval = interval
        self.timeout = min(timeout, interval)
        self.hold_down = hold_down
        self.fail_after = fail_after
        self.clock = clock
        self.metrics = metrics  # AgentMetrics (probes counted), or None
        self._nrs: dict[str, _Probed] = {}
        self._wake = asyncio.Event()

    # --- what to probe: from the reconciler -------------------------------------------------

    def track(self, network: str, netns: str, wg_ifname: str, source: IPv4Address, targets) -> None:
        nr = self._nrs.get(network)
        if nr is None:
            nr = self._nrs[network] = _Probed(netns, wg_ifname, source)
        nr.netns, nr.wg_ifname, nr.source = netns, wg_ifname, source
        if tuple(targets) != nr.targets:
            nr.targets = tuple(targets)
            probed = {t.node for t in nr.targets}
            for gone in set(nr.health) - probed:
                health = nr.health.pop(gone)
                nr.alive.pop(gone, None)
                if health.state in (FAILING, RECOVERING):
                    nr.former[gone] = (health, self.clock())
            for back in probed & set(nr.former):
                nr.health[back] = nr.former.pop(back)[0]
            self._wake.set()

    def forget(self, network: str) -> None:
        self._nrs.pop(network, None)

    # --- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            await self.probe_once()
            self._wake.clear()
            left = self.interval - (time.monotonic() - started)
            if left > 0:
                try:  # new targets are probed at once, not an interval later
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    pass

    async def probe_once(self) -> None:
        networks = sorted(self._nrs)
        results = await asyncio.gather(*(self._probe(n) for n in networks), return_exceptions=True)
        for network, result in zip(networks, results):
            if isinstance(result, Exception):
                log.warning("network %s: probing failed: %s", network, result)

    async def _probe(self, network: str) -> None:
        nr = self._nrs.get(network)
        if nr is None:
            return
        if not nr.restored:
            self._restore(network, nr)
        targets = nr.targets
        if targets:
            try:
                answers = await probe.echo(nr.netns, nr.wg_ifname, nr.source,
                                           [t.address for t in targets], self.timeout)
            except OSError as e:  # the NR is being (re)built or torn down: no evidence either way
                log.debug("network %s: cannot probe yet: %s", network, e)
                return
            peers = await self._peers(nr)
            now = self.clock()
            for t in targets:
                ok = answers.get(t.address, False) and self._fresh(peers, t.public_key, now)
                if self.metrics is not None:
                    self.metrics.probes.labels(network=network, outcome="ok" if ok else "failed").inc()
                health = nr.health.setdefault(t.node, TunnelHealth(self.fail_after, self.hold_down))
                health.observe(ok, now)
                alive = self._alive(t.node)
                if alive and nr.alive.get(t.node) is False:
                    health.target_returned(now)
                if alive is not None:
                    nr.alive[t.node] = alive
        if self._nrs.get(network) is nr:  # not forgotten meanwhile
            await self._publish_changed(network, nr)

    async def _peers(self, nr: _Probed):
        try:
            return (await self.wg.get(nr.wg_ifname, nr.netns)).peers
        except WireGuardError:
            return None  # the echo alone decides

    @staticmethod
    def _fresh(peers, public_key: str, now: float) -> bool:
        if peers is None:
            return True
        peer = peers.get(public_key)
        return peer is not None and now - peer.last_handshake < REJECT_AFTER_TIME

    def _restore(self, network: str, nr: _Probed) -> None:
        """Carry on from the verdicts published before a restart (a failing tunnel stays failing
        until a probe works, a recovering one is held down for a whole hold-down again)."""
        nr.restored = True
        before = self._published(network)
        if before is None:
            return
        now = self.clock()
        probed = {t.node for t in nr.targets}
        for v in before.verdicts:
            health = TunnelHealth.restored(v.state, v.since.timestamp(), now,
                                           fail_after=self.fail_after, hold_down=self.hold_down)
            if v.node in probed:
                nr.health[v.node] = health
            elif v.state in (FAILING, RECOVERING):
                nr.former[v.node] = (health, now)

    async def _publish_changed(self, network: str, nr: _Probed) -> None:
        now = self.clock()
        for node, (_, unprobed) in list(nr.former.items()):
            if now - unprobed >= self.hold_down:
                del nr.former[node]
        wanted = {t.node for t in nr.targets}
        judged = {**{n: h for n, (h, _) in nr.former.items()},
                  **{n: h for n, h in nr.health.items() if n in wanted}}
        verdicts = NetworkResourceVerdicts(network=network, node=self.node_id, verdicts=[
            TunnelVerdict(node=node, state=h.state,
                          since=datetime.fromtimestamp(h.since, timezone.utc).replace(microsecond=0))
            for node, h in sorted(judged.items()) if h.state is not None][:MAX_VERDICTS])
        before = self._published(network)
        if verdicts != before and (verdicts.verdicts or before is not None):
            await self._publish(verdicts)
