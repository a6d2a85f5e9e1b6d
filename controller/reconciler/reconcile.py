"""Reconcile one network on this node: observe -> plan (pure) -> apply the difference -> status.

Level-triggered: the key is only a network name; every run reads the whole desired state from
the NodeScope cache and the whole observed state from the kernel. A converged NR costs reads only
(no kernel write, no etcd write), which `Reconciler.writes` and the metrics make visible.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from dataclasses import dataclass

from pyroute2.netlink.exceptions import NetlinkError

from controller.dataplane.accounting import count, counting
from controller.dataplane.links import DEFAULT_ROUTE, Links, Observation, VethAttachment
from controller.dataplane.netns import NotANetns, netns_exists, netns_identity, pinned_netns
from controller.dataplane.wireguard.base import DesiredPeer as WgPeer
from controller.dataplane.wireguard.base import KeyStore, WireGuardBackend, WireGuardError, redial_ops
from controller.dataplane.nftables import Nftables
from controller.dataplane.wireguard.uapi import UAPITimeout
from controller.http.metrics import AgentMetrics
from controller.models.resources import (
    MAX_MESSAGE,
    AggregatorStatus,
    Condition,
    Metadata,
    Network,
    NetworkResourceFacts,
    NetworkResourceVerdicts,
    PortRange,
    ResourceStatus,
    WorkloadStatus,
    name_problem,
    set_condition,
    utcnow,
)
from controller.planner import names
from controller.planner.allocation import (
    PortsExhausted,
    PublicAddressesExhausted,
    allocate_listen_port,
    allocate_public_ip,
    allocate_workload_ips,
    held_addresses,
)
from controller.planner.health import REDIAL_INTERVAL, FirstDial
from controller.planner.plan import PEER_PENDING, DesiredNR, Issue, LocalFacts, NodeContext, plan_network
from controller.store.client import Delete, EtcdStore, StoreError

from .ndmz import NdmzReconciler
from .probing import Prober
from .scope import NodeScope
from .state import LocalState
from .telemetry import Telemetry

log = logging.getLogger(__name__)


def _identity_or_none(ref: str | None) -> tuple[int, int] | None:
    try:
        return netns_identity(ref)
    except OSError:
        return None  # gone meanwhile: attaching reports it

# How soon to look again when something outside etcd must appear first (a workload's namespace
# that its container runtime has not created yet); etcd changes need no polling: they are watched.
WAIT_FOR_NETNS = 2.0
WAIT_FOR_CACHE = 0.2
WAIT_FOR_NDMZ = 1.0  # the ndmz is built by its own queue key, usually within milliseconds
NO_INTERNET = "InternetPending"  # the NR's public leg cannot be attached (the ndmz is not ready)
# Bound on attaching one workload (netlink in its namespace): a wedged one delays only itself.
NETLINK_TIMEOUT = 10.0
# Bound on one whole reconcile, whatever hangs in it (a kernel call, a helper like nft, etcd):
# it is cancelled, reported and retried with backoff, and its worker is free for other networks.
RECONCILE_TIMEOUT = 120.0


class ReconcileTimeout(RuntimeError):
    """One reconcile ran longer than RECONCILE_TIMEOUT (something in it hangs)."""


@dataclass
class Outcome:
    result: str  # converged | changed | pending | invalid | removed | waiting
    requeue_after: float | None = None


class Reconciler:
    def __init__(self, *, ctx: NodeContext, store: EtcdStore, scope: NodeScope, links: Links,
                 wireguard: WireGuardBackend, keys: KeyStore, state: LocalState,
                 port_range: PortRange, metrics: AgentMetrics, nftables: Nftables,
                 ndmz: NdmzReconciler, host_netns: str | None = None,
                 telemetry: Telemetry | None = None, prober: Prober | None = None):
        self.ctx = ctx
        self.nft = nftables
        self.ndmz = ndmz
        self.host_netns = host_netns
        self.store = store
        self.scope = scope
        self.links = links
        self.wg = wireguard
        self.keys = keys
        self.state = state
        self.port_range = port_range
        self.metrics = metrics
        self.telemetry = telemetry if telemetry is not None else Telemetry(metrics.snapshot)
        self.prober = prober  # probes the tunnels each plan names (None: no probing)
        self.etcd_writes = 0
        self.wg_writes = 0
        # Listen ports another program (or another agent on this host) turned out to hold.
        self._busy_ports: set[int] = set()
        # Networks reconciled at least once (to an outcome or an error), for /readyz.
        self.reconciled: set[str] = set()
        self._tearing_down: set[str] = set()
        # Peers dialled and not answered yet, by (network, public key): planner.health.FirstDial.
        self._first_dials: dict[tuple[str, str], FirstDial] = {}

    @property
    def writes(self) -> int:
        """Kernel + WireGuard + nftables + etcd writes so far, by every reconcile: unchanged
        across a converged resync."""
        return self.links.writes + self.wg_writes + self.nft.writes + self.etcd_writes

    def _wrote(self, kind: str) -> None:
        if kind == "etcd":
            self.etcd_writes += 1
        else:
            self.wg_writes += 1
        count(kind)

    # --- entry point -----------------------------------------------------------------------

    async def reconcile(self, network: str) -> float | None:
        started = time.perf_counter()
        try:
            # The writes of this reconcile only: other networks are reconciled concurrently.
            with counting() as writes:
                outcome = await asyncio.wait_for(self._reconcile(network), RECONCILE_TIMEOUT)
        except asyncio.TimeoutError:
            self.reconciled.add(network)
            error = ReconcileTimeout(f"the reconcile did not finish within {RECONCILE_TIMEOUT:g}s; "
                                     "cancelled, will retry")
            self.metrics.reconcile_failed(network, error)
            self.telemetry.reconciled(network, ok=False)
            spec, _ = self.scope.network(network)
            if spec is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._publish_failure(spec, error), 5)
            raise error from None
        except Exception as e:
            self.reconciled.add(network)
            self.metrics.reconcile_failed(network, e)
            self.telemetry.reconciled(network, ok=False)
            raise
        finally:
            self.metrics.reconcile_duration.labels(network=network).observe(time.perf_counter() - started)
        result = outcome.result
        if result != "waiting":
            self.reconciled.add(network)
        if result == "converged" and writes.total:
            result = "changed"
        self.metrics.reconcile.labels(network=network, result=result).inc()
        if result in ("converged", "changed", "pending"):
            # Only a fully applied plan is a baseline for telling drift from a change.
            self.telemetry.reconciled(network, ok=result != "pending",
                                      kernel_writes=writes.link + writes.wireguard + writes.nftables)
        if result == "removed":
            self.metrics.forget_network(network)
            if network not in self.scope.network_names():  # gone for good: forget it
                self.reconciled.discard(network)
        return outcome.requeue_after

    async def _reconcile(self, name: str) -> Outcome:
        bad_name = name_problem(name)
        if bad_name is not None:
            # An index entry written by hand: no status or network event can even name it.
            self.telemetry.network_refused(name, bad_name)
            return Outcome("invalid")
        if not self.scope.known(name):
            return Outcome("waiting", WAIT_FOR_CACHE)
        network, error = self.scope.network(name)
        if error is not None:
            # Bad input never hurts good input: the NR (if any) stays exactly as it was.
            await self._publish_invalid(name, error)
            return Outcome("invalid")
        if network is None or network.spec.resource_for(self.ctx.node_id) is None:
            await self.teardown(name)
            return Outcome("removed")
        try:
            return await self._converge(network)
        except Exception as e:
            await self._publish_failure(network, e)
            raise  # the queue retries with backoff

    async def _publish_failure(self, network: Network, error: Exception) -> None:
        """Say in status why the NR could not be converged (a missing wireguard-go, a listen
        port taken by another program, an unwritable state dir): an operator reads it with
        `zmesh describe` instead of the agent's log. Messages carry no key material."""
        if isinstance(error, StoreError):
            return  # etcd itself is the problem: nothing to write it to
        message = " ".join(str(error).split()) or type(error).__name__
        try:
            await self._publish_status(network, [("Ready", "False", "ApplyFailed", message[:500])])
        except Exception as e:  # the original error is the one to retry on
            log.debug("network %s: cannot publish the failure: %s", network.name, e)

    # --- converge --------------------------------------------------------------------------

    async def _converge(self, network: Network) -> Outcome:
        name = network.name
        own = network.spec.resource_for(self.ctx.node_id)
        # Allocate and record under the record's lock: networks reconcile concurrently, and
        # another one must see this port taken the moment it is chosen; nothing chosen is used
        # before its record is durable (a failed write fails this reconcile, and it is retried).
        async with self.state.exclusive():
            record = self.state.networks.get(name)
            # A busy port is held by a pseudo-network whose name sorts before every real one, so
            # the pure allocator moves whoever had it to the next free port.
            in_use = {**self.state.ports(), **{f"\0busy:{p}": p for p in self._busy_ports}}
            try:
                port = allocate_listen_port(self.port_range, in_use, name)
            except PortsExhausted as e:
                port = None
                exhausted = e
            workloads, broken = self.scope.workloads_of(name)
            previous = held_addresses(record.workloads if record else {},
                                      self._published_addresses(name, workloads))
            # A workload whose spec became unreadable stays attached exactly as it was, keeping
            # its address (bad input never hurts what was running).
            kept = {w: ip for w, ip in previous.items() if w in broken}
            allocations, ip_problems = allocate_workload_ips(own.subnet, workloads, previous, reserved=kept)
            # The public leg's address too, in the same step: no other NR may take it meanwhile.
            try:
                public_ip = allocate_public_ip(self.state.public_ips(), name)
            except PublicAddressesExhausted as e:
                public_ip, exhausted = None, e
            if port is not None and public_ip is not None:
                # Recorded before anything is created: ownership survives a crash at any later point.
                await self.state.record(name, port, {**allocations, **kept}, public_ip)
        await self._publish_broken_workloads(broken)
        if port is None or public_ip is None:
            reason = "PortsExhausted" if port is None else "PublicAddressesExhausted"
            await self._publish_status(network, [("Ready", "False", reason, str(exhausted))])
            return Outcome("invalid")

        wg_ifname = names.wg_ifname(self.ctx.name_prefix, name)
        private_key, public_key = self.keys.load_or_create(wg_ifname)
        peer_facts, bad_facts = self.scope.facts(name)
        own_facts = self.scope.own_facts(name)
        if own_facts is not None:  # judged as a candidate aggregator by it, like by everyone
            peer_facts = {**peer_facts, self.ctx.node_id: own_facts}
        verdicts, bad_verdicts = self.scope.verdicts(name)
        desired = plan_network(self.ctx, network, peer_facts, self.scope.alive(name), workloads,
                               LocalFacts(public_key, port, public_ip), allocations, bad_facts, verdicts,
                               bad_verdicts)
        self.telemetry.planned(desired)
        try:
            observed, no_internet, redial_in = await self._apply_nr(desired, private_key)
        except WireGuardError as e:
            if e.errno == errno.EADDRINUSE:
                # Never fight another program for a port: the retry takes the next free one,
                # and the peers learn it from our facts.
                self._busy_ports.add(port)
                log.warning("network %s: listen port %d is in use on this host; moving to another",
                            name, port)
            raise
        if self.prober is not None:
            self.prober.track(name, desired.netns, desired.wg_ifname, desired.gateway.ip, desired.probes)
        attach_problems = await self._apply_workloads(desired, observed, keep=set(kept))
        self.telemetry.observed_links(name, observed)

        workload_problems = {**ip_problems, **attach_problems}
        issues = desired.issues + ((Issue(NO_INTERNET, no_internet),) if no_internet else ())
        conditions = [("Ready", "True", "Converged", "network resource is up")]
        if issues or workload_problems:
            reason = issues[0].reason if issues else "WorkloadProblem"
            conditions.append(("Degraded", "True", reason, degraded_message(issues, workload_problems)))
        else:
            conditions.append(("Degraded", "False", "AsDesired", ""))
        conditions.append(self.telemetry.peers_condition(name))
        await self._publish_facts(NetworkResourceFacts(
            network=name, node=self.ctx.node_id, publicKey=public_key, listenPort=port,
            endpoints=list(self.ctx.endpoints), subnet=own.subnet))
        await self._publish_status(network, conditions, aggregator=self._aggregator_status(desired),
                                   internet=(public_ip, desired.internet_via))
        await self._publish_workloads(network, workloads, allocations, workload_problems,
                                      unaddressed=set(ip_problems))
        await self._forget_stale_workload_statuses(name, {w.name for w in workloads} | set(kept))
        if attach_problems:
            outcome = Outcome("pending", WAIT_FOR_NETNS)
        elif no_internet:
            outcome = Outcome("pending", WAIT_FOR_NDMZ)
        else:
            outcome = Outcome("pending" if issues or workload_problems else "converged")
        if redial_in is not None:  # a first handshake to watch for
            outcome = Outcome(outcome.result, min(outcome.requeue_after or redial_in, redial_in))
        return outcome

    async def _apply_nr(self, desired: DesiredNR, private_key: str):
        # One observation serves every step; it is refreshed only after a step of this reconcile
        # wrote (others run concurrently), so a converged NR costs a single netlink dump.
        observation = await Observation.of(self.links, desired.netns)
        nr_existed, fresh = observation.state is not None, observation.fresh

        if await self.links.ensure_nr(desired.netns, observed=observation.state) and not nr_existed:
            self.telemetry.created(desired.network, desired.netns)
        await self.links.ensure_bridge(desired.netns, desired.bridge, desired.gateway, mtu=desired.mtu,
                                       observed=await fresh())
        if await self.wg.ensure_device(desired.wg_ifname, desired.netns, observed=await fresh()):
            self._wrote("wireguard")
            observation.stale()  # the device (re)appeared: observe again
            if nr_existed:  # the NR was there but its WireGuard device was not (or hung): a repair
                log.warning("network %s: WireGuard device %s was gone or hung; restarted it",
                            desired.network, desired.wg_ifname)
                self.metrics.wireguard_restarts.inc()
                self.telemetry.wireguard_restarted(desired.network, desired.wg_ifname)
        await self.links.ensure_link(desired.netns, desired.wg_ifname, mtu=desired.mtu, up=True,
                                     observed=await fresh())
        peers = [WgPeer.make(p.public_key, p.allowed_ips, p.endpoint, p.persistent_keepalive or 0)
                 for p in desired.peers]
        try:
            device = await self.wg.get(desired.wg_ifname, desired.netns)
        except UAPITimeout:
            raise  # it hangs: fail now (reported), the retry's ensure_device restarts it
        except WireGuardError:
            device = None
        ops = await self.wg.configure(desired.wg_ifname, desired.netns, private_key,
                                      desired.listen_port, peers, observed=device)
        if ops:
            self._wrote("wireguard")
        redial_in = await self._redial_unanswered(desired, peers, device)
        await self.links.ensure_routes(desired.netns, desired.wg_ifname, desired.routes,
                                       observed=await fresh())
        no_internet = await self._apply_internet(desired, observation)
        return await fresh(), no_internet, redial_in

    async def _redial_unanswered(self, desired: DesiredNR, peers: list[WgPeer], device) -> float | None:
        """Dial afresh the peers this NR dials whose first handshake is unanswered, while that
        is quicker than WireGuard's own retry (planner.health.FirstDial). `device` is the
        device as read before this pass configured it. Returns when to look again, if at all."""
        now = time.monotonic()
        network = desired.network
        seen = device.peers if device is not None else {}
        dialled = {p.public_key: p for p in peers if p.endpoint is not None and p.persistent_keepalive}
        for key in [k for k in self._first_dials if k[0] == network and k[1] not in dialled]:
            del self._first_dials[key]
        waiting = False
        for key, peer in dialled.items():
            state = seen.get(key)
            if state is None:  # configured by this pass: WireGuard dials it now
                dial = self._first_dials.setdefault((network, key), FirstDial(now, now))
                if dial.waiting(now):
                    waiting = True
                else:  # the device keeps losing it: nothing to gain from dialling
                    del self._first_dials[(network, key)]
                continue
            dial = self._first_dials.get((network, key))
            if dial is None:
                continue  # answered, or configured before this agent started: WireGuard's retries
            if state.last_handshake or not dial.waiting(now):
                del self._first_dials[(network, key)]
                continue
            if dial.due(now):
                await self.wg.apply(desired.wg_ifname, desired.netns, redial_ops(peer))
                self._wrote("wireguard")
                self.metrics.wireguard_redials.inc()
                dial.dialled_at = now
            waiting = True
        return REDIAL_INTERVAL if waiting else None

    async def _apply_internet(self, desired: DesiredNR, observation: Observation) -> str | None:
        """The NR's firewall, then its public leg into the ndmz and its default route (the
        diode is in place before the leg exists). Returns why the NR has no Internet yet (the
        ndmz is built by its own key and may come later): the mesh works without it."""
        if desired.ruleset is not None:
            await self.nft.ensure(desired.netns, desired.ruleset)  # counted by the backend
        leg = desired.public
        if leg is None:
            return None
        try:
            await self.links.ensure_public_leg(self.ndmz.netns, names.NDMZ_BRIDGE, leg.ndmz_port,
                                               desired.netns, leg.ifname, leg.address,
                                               nr_observed=await observation.fresh())
        except FileNotFoundError:
            return f"the node's ndmz {self.ndmz.netns} is not ready ({self.ndmz.problem or 'being built'})"
        # When the default route moves to WireGuard (egress set), the WireGuard routes above
        # took it over already; when it comes back, it is added here.
        await self.links.ensure_routes(desired.netns, leg.ifname,
                                       [DEFAULT_ROUTE] if leg.default_route else [],
                                       observed=await observation.fresh(), via=leg.gateway)
        if self.ndmz.problem is not None:
            return f"the node's ndmz {self.ndmz.netns} is not working: {self.ndmz.problem}"
        return None

    async def _apply_workloads(self, desired: DesiredNR, observed, keep: set[str]) -> dict[str, str]:
        """Attach every desired workload, detach every other veth of ours except those of the
        workloads in `keep`; per-workload problems (e.g. its namespace does not exist yet) are
        returned, never fatal to the others."""
        problems: dict[str, str] = {}
        wanted = {a.veth for a in desired.workloads}
        wanted |= {names.workload_veth(self.ctx.name_prefix, w) for w in keep}
        forbidden_cache: dict = {}  # the node's own namespaces, read once, only if needed
        for a in desired.workloads:
            problem, written = await self._attach(desired, a, observed, forbidden_cache)
            if problem:
                problems[a.workload] = problem
            if written:
                observed = await self.links.observe(desired.netns, sysctls=False)
        for link in (observed.links.values() if observed else ()):
            if link.name not in wanted and names.owns_workload_veth(self.ctx.name_prefix, link.name):
                await self.links.remove_veth(desired.netns, link.name)
        return problems

    async def _attach(self, desired: DesiredNR, a, observed, forbidden_cache: dict) -> tuple[str | None, int]:
        """Attach one workload: (problem or None, writes made)."""
        # Input from someone else: a FIFO or a file there would block or mislead every later
        # open, so nothing touches the path before it proves to be a network namespace, and what
        # is then used is the very file checked (pinned by its descriptor), not the path again.
        try:
            with pinned_netns(a.netns) as (identity, pinned):
                if "ids" not in forbidden_cache:
                    forbidden_cache["ids"] = self._node_namespaces()
                if identity in forbidden_cache["ids"]:
                    # A spec naming the node's own namespace (or an NR) would get a veth there
                    # and its default route replaced: never touch what is not a container's.
                    return (f"network namespace {a.netns} is this node's own or an NR's; "
                            "refusing to attach a workload there"), 0
                try:
                    written = await asyncio.wait_for(self.links.ensure_workload(
                        desired.netns, desired.bridge, VethAttachment(
                            host_ifname=a.veth, netns=pinned, ifname=a.interface, address=a.address,
                            gateway=a.gateway, mtu=a.mtu), observed=observed), NETLINK_TIMEOUT)
                except asyncio.TimeoutError:  # this workload only; the others go on
                    return f"attaching timed out after {NETLINK_TIMEOUT:g}s", 1
                except (OSError, RuntimeError, NetlinkError) as e:  # this workload only
                    return str(e).replace(pinned, a.netns), 1  # it may have written before failing
                return None, written
        except NotANetns as e:
            return str(e), 0

    def _node_namespaces(self) -> set[tuple[int, int]]:
        """Identities of the agent's and the node host's namespaces, of the ndmz and of our NRs."""
        refs = [None, self.host_netns, self.ndmz.netns,
                *(names.nr_netns(self.ctx.name_prefix, n) for n in self.state.networks)]
        return {i for i in map(_identity_or_none, refs) if i is not None}

    # --- teardown --------------------------------------------------------------------------

    async def teardown(self, name: str) -> None:
        """Remove everything this node made for `name`; only what the state record owns."""
        record = self.state.networks.get(name)
        netns = names.nr_netns(self.ctx.name_prefix, name)
        wg_ifname = names.wg_ifname(self.ctx.name_prefix, name)
        if record is None and wg_ifname not in self.wg.owned_devices():
            return
        self._tearing_down.add(name)
        try:
            await self._teardown(name, record, netns, wg_ifname)
        finally:
            self._tearing_down.discard(name)

    async def _teardown(self, name, record, netns, wg_ifname) -> None:
        await self.wg.delete_device(wg_ifname, netns)
        if netns_exists(netns):
            await self.links.delete_nr(netns)
        self.keys.remove(wg_ifname)
        for workload in (record.workloads if record else {}):
            await self._delete_own(self.store.layout.workload_status(self.ctx.node_id, workload))
        if self.prober is not None:
            self.prober.forget(name)
        for key in [k for k in self._first_dials if k[0] == name]:
            del self._first_dials[key]
        await self._delete_own(self.store.layout.facts(self.ctx.node_id, name))
        await self._delete_own(self.store.layout.verdicts(self.ctx.node_id, name))
        await self._delete_own(self.store.layout.nr_status(self.ctx.node_id, name))
        await self.state.forget(name)
        self.telemetry.removed(name)
        log.info("removed network resource %s", name)

    async def sweep(self, networks: set[str]) -> int:
        """Delete what this node published for objects that are gone (a status whose workload
        was deleted while the agent was down, or before its network): `networks` are those it
        knows (index and state record). Returns how many keys went."""
        layout = self.store.layout
        node = self.ctx.node_id
        own = self.scope.own.keys(layout.node_root(node))
        stale = stale_own_keys(layout, node, own, networks | self._tearing_down,
                               self.scope.workload_names())
        for key in stale:
            await self._delete_own(key)
        return len(stale)

    async def _put_own(self, key: str, value: bytes) -> bool:
        """Write a key of this node's own prefix unless it already holds `value`."""
        if self.scope.own.get(key) == value:
            return False
        revision = await self.store.put(key, value)
        self.scope.own.wrote(key, value, revision)
        self._wrote("etcd")
        return True

    async def _delete_own(self, key: str) -> None:
        res = await self.store.txn([], [Delete(key)])
        self.scope.own.wrote(key, None, res.revision)
        if res.results and res.results[0]:
            self._wrote("etcd")

    # --- status ----------------------------------------------------------------------------

    async def publish_verdicts(self, verdicts: NetworkResourceVerdicts) -> None:
        """The prober's verdicts for one network, written when they changed."""
        if verdicts.network not in self.state.networks:
            return  # torn down meanwhile: nothing of ours to judge with
        await self._put_own(self.store.layout.verdicts(verdicts.node, verdicts.network),
                            verdicts.model_dump_json().encode())

    async def _publish_facts(self, facts: NetworkResourceFacts) -> None:
        """What peers need to reach this NR: written when it changes (rarely), never with a
        condition, so peers are woken only by what concerns them."""
        await self._put_own(self.store.layout.facts(facts.node, facts.network),
                            facts.model_dump_json().encode())

    def _aggregator_status(self, desired: DesiredNR) -> AggregatorStatus:
        """The choice the plan made, with the time of this node's last switch (kept across
        restarts in the status itself); a switch is logged (the metrics count it from the plan)."""
        current = self._own_status(desired.network)
        before = current.aggregator if current else None
        choice = desired.choice
        since, switches = utcnow(), 0
        if before is not None:
            if before.node == choice.node:
                since, switches = before.lastSwitchTime, before.switches
            else:
                switches = before.switches + 1
                log.info("network %s: aggregator %s -> %s (%s: %s)", desired.network, before.node,
                         choice.node, choice.reason, choice.message)
        return AggregatorStatus(node=choice.node, reason=choice.reason,
                                message=choice.message[:MAX_MESSAGE], lastSwitchTime=since,
                                switches=switches)

    async def _publish_status(self, network: Network, conditions: list[tuple[str, str, str, str]],
                              generation: int | None = None,
                              aggregator: AggregatorStatus | None = None,
                              internet: tuple | None = None) -> None:
        """Merge `conditions` into the NR's status and write it if it changed (`aggregator`
        None: the one published stays; `internet`: (public address, internet_via), None: the
        published ones stay)."""
        current = self._own_status(network.name)
        if internet is None:
            internet = (current.publicAddress, current.internetVia) if current else (None, None)
        merged = list(current.conditions) if current else []
        for ctype, status, reason, message in conditions:
            merged = set_condition(merged, Condition(type=ctype, status=status, reason=reason,
                                                     message=message[:MAX_MESSAGE]))
        if generation is None:
            generation = network.metadata.generation or 0
        if aggregator is None and current is not None:
            aggregator = current.aggregator
        status = ResourceStatus(network=network.name, node=self.ctx.node_id,
                                observedGeneration=generation, conditions=merged,
                                aggregator=aggregator, publicAddress=internet[0],
                                internetVia=internet[1])
        self.telemetry.published(network.name, generation, current.conditions if current else [], merged)
        await self._put_own(self.store.layout.nr_status(self.ctx.node_id, network.name),
                            status.model_dump_json().encode())

    async def _publish_invalid(self, name: str, error: str) -> None:
        """The spec cannot be read: say so, keeping the generation last acted on."""
        current = self._own_status(name)
        stub = Network.model_construct(metadata=Metadata(name=name))
        await self._publish_status(stub, [("Ready", "False", "InvalidSpec", error)],
                                   generation=current.observedGeneration if current else 0)

    def _own_status(self, network: str) -> ResourceStatus | None:
        raw = self.scope.own.get(self.store.layout.nr_status(self.ctx.node_id, network))
        if raw is None:
            return None
        try:
            return ResourceStatus.model_validate_json(raw)
        except ValueError:
            return None

    async def _publish_workloads(self, network: Network, workloads, allocations, problems,
                                 unaddressed: set[str] = frozenset()) -> None:
        for w in workloads:
            problem = problems.get(w.name)
            failed = "AddressUnavailable" if w.name in unaddressed else "AttachFailed"
            await self._publish_workload(w.name, Condition(
                type="Ready", status="False" if problem else "True",
                reason=failed if problem else "Attached",
                message=(problem or f"attached to network {network.name}")[:MAX_MESSAGE]),
                network=network.name, generation=w.metadata.generation or 0,
                ip=allocations.get(w.name))

    async def _publish_broken_workloads(self, broken: dict[str, str]) -> None:
        """A workload value that does not parse is attached nowhere; say so in its status."""
        for name, problem in broken.items():
            current = self._current_workload_status(name)
            await self._publish_workload(name, Condition(
                type="Ready", status="False", reason="InvalidSpec", message=problem[:MAX_MESSAGE]),
                network=current.network if current else None,
                generation=current.observedGeneration if current else 0,
                ip=current.ip if current else None)

    async def _publish_workload(self, name: str, condition: Condition, *, network: str | None,
                                generation: int, ip) -> None:
        current = self._current_workload_status(name)
        merged = set_condition(list(current.conditions) if current else [], condition)
        status = WorkloadStatus(workload=name, node=self.ctx.node_id, network=network,
                                observedGeneration=generation, conditions=merged, ip=ip)
        await self._put_own(self.store.layout.workload_status(self.ctx.node_id, name),
                            status.model_dump_json(exclude_none=True).encode())

    def _published_addresses(self, network: str, workloads) -> dict:
        """workload -> the address this node published for it in `network` (from the cache of
        its own keys, read under the record's lock with the allocation)."""
        out = {}
        for w in workloads:
            st = self._current_workload_status(w.name)
            if st is not None and st.ip is not None and st.network == network:
                out[w.name] = st.ip
        return out

    def _current_workload_status(self, name: str) -> WorkloadStatus | None:
        raw = self.scope.own.get(self.store.layout.workload_status(self.ctx.node_id, name))
        if raw is None:
            return None
        try:
            return WorkloadStatus.model_validate_json(raw)
        except ValueError:
            return None

    async def _forget_stale_workload_statuses(self, network: str, current: set[str]) -> None:
        record = self.state.networks.get(network)
        stale = set(record.workloads) - current if record else set()
        for name in stale:
            await self._delete_own(self.store.layout.workload_status(self.ctx.node_id, name))
        if stale:
            await self.state.release_workloads(network, stale)


def stale_own_keys(layout, node: str, own_keys: set[str], networks: set[str], workloads: set[str]) -> list[str]:
    """PURE: the keys this node published for objects it no longer has, whatever the order in
    which they went: the facts, verdicts and status of an NR of a network in neither `networks`
    (the index and the state record) nor being torn down, the status of a workload not in
    `workloads` (the index). Its registration, liveness and events are the node's own."""
    stale = []
    for key in sorted(own_keys):
        for kind, make, alive in (("facts", layout.facts, networks), ("verdicts", layout.verdicts, networks),
                                  ("nr_status", layout.nr_status, networks),
                                  ("workload_status", layout.workload_status, workloads)):
            prefix = make(node, "")
            name = key[len(prefix):]
            if key.startswith(prefix) and name and "/" not in name and name not in alive:
                stale.append(key)
    return stale


def degraded_message(issues, workload_problems: dict[str, str], named: int = 3) -> str:
    """One bounded line: nodes awaited are named (a few) and counted, never all listed, so the
    status of an NR of a 10,000-node network stays small while its peers come up."""
    parts = []
    pending = [i.subject for i in issues if i.reason == PEER_PENDING]
    if pending:
        shown = ", ".join(pending[:named]) + (f" and {len(pending) - named} more" if len(pending) > named else "")
        parts.append(f"waiting for the facts of {len(pending)} node(s): {shown}")
    others = [i.message for i in issues if i.reason != PEER_PENDING]
    others += [f"workload {w!r}: {p}" for w, p in sorted(workload_problems.items())]
    parts += others[:named]
    if len(others) > named:
        parts.append(f"and {len(others) - named} more problem(s)")
    return "; ".join(parts)[:MAX_MESSAGE]
