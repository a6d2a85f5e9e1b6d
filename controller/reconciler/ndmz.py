"""Reconcile the node-level desired state: the ndmz, which gives every NR of the node Internet
access. It has its own key in the work queue (`NDMZ_KEY`, which no network name can be), is
planned purely (`planner.ndmz.plan_ndmz`), observed and diffed like an NR, and needs nothing
from etcd: it is built at agent start even while etcd is unreachable.

Order of a pass: record -> namespace -> bridge -> firewalls (the ndmz's, and the host's in
single-NIC mode) -> uplink (veth to the host, or the dedicated NIC moved in) -> default route.
The firewalls come before the uplink, so the ndmz is a diode before it carries a packet.
When the namespace or its bridge had to be (re)made, every NR's public leg went with it, and
when a pass starts or stops failing, every NR's status should say so: `on_change()` asks for
every network to be looked at again. What a pass found (made, repaired, failed, recovered) is
told to telemetry, which makes node events of it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from controller.dataplane.accounting import counting
from controller.dataplane.links import DEFAULT_ROUTE, Links, Observation
from controller.dataplane.netns import netns_exists, sysctl_get
from controller.dataplane.nftables import Nftables
from controller.models.nftables import Table
from controller.planner import names
from controller.planner.ndmz import DUAL_NIC, DesiredNdmz, UplinkConfig, plan_ndmz
from controller.planner.plan import NodeContext

from .state import LocalState, NdmzRecord
from .telemetry import Telemetry

log = logging.getLogger(__name__)

NDMZ_KEY = "/ndmz"  # the ndmz's key in the work queue: no network name contains '/'
# Bound on one pass, as for a network's reconcile: whatever hangs in it delays only the ndmz.
NDMZ_TIMEOUT = 120.0
FORWARDING = "net.ipv4.ip_forward"


class NdmzReconciler:
    def __init__(self, *, ctx: NodeContext, uplink: UplinkConfig, links: Links, nftables: Nftables,
                 state: LocalState, host_netns: str | None,
                 on_change: Callable[[], None], telemetry: Telemetry | None = None):
        self.ctx = ctx
        self.uplink = uplink
        self.links = links
        self.nft = nftables
        self.state = state
        self.host_netns = host_netns
        self.on_change = on_change
        self.telemetry = telemetry
        self.desired: DesiredNdmz = plan_ndmz(ctx, uplink)
        # Why the last pass failed (None: it converged or has not run yet); NRs report it as the
        # reason they have no Internet access.
        self.problem: str | None = None
        self.passes = 0  # passes that converged (the agent's readiness waits for the first)

    @property
    def netns(self) -> str:
        return self.desired.netns

    def counted_tables(self) -> list[tuple[str, str | None, Table]]:
        """The tables whose counters the observer reads: (source, namespace, desired table);
        none before the first pass made them."""
        if not self.passes:
            return []
        d = self.desired
        tables = [("ndmz", d.netns, d.ruleset)]
        if d.host_ruleset is not None:
            tables.append(("host", self.host_netns, d.host_ruleset))
        return tables

    async def reconcile(self) -> float | None:
        started = time.perf_counter()
        before = self.problem
        # This pass's own writes (networks are reconciled concurrently).
        with counting() as writes:
            try:
                existed, rebuilt = await self._bounded_pass()
                self.problem = None
                baseline = before is None and self.passes > 0  # the last pass converged too
                self.passes += 1
                if rebuilt or before is not None:
                    self.on_change()
                if self.telemetry is not None:
                    self.telemetry.ndmz_passed(self.netns, created=not existed, writes=writes.total,
                                               baseline=baseline, rebuilt=rebuilt, failed=before)
            except Exception as e:
                self.problem = " ".join(str(e).split())[:300] or type(e).__name__
                if before is None:
                    self.on_change()
                if self.telemetry is not None:
                    self.telemetry.ndmz_failed(self.netns, self.problem, failed=before)
                raise  # logged and retried with backoff by the queue
            finally:
                log.debug("ndmz pass: %.1f ms, %d writes", (time.perf_counter() - started) * 1e3,
                          writes.total)
        return None

    async def _bounded_pass(self) -> tuple[bool, bool]:
        try:
            return await asyncio.wait_for(self._converge(self.desired), NDMZ_TIMEOUT)
        except asyncio.TimeoutError:
            raise TimeoutError(f"the ndmz pass did not finish within {NDMZ_TIMEOUT:g}s; "
                               "cancelled, will retry") from None

    async def _converge(self, d: DesiredNdmz) -> tuple[bool, bool]:
        """One pass: (whether the namespace existed before, whether the bridge had to be made:
        NRs' legs must be made again)."""
        up = d.uplink
        await self._undo_other_mode(d)
        # Recorded before it is made, so `zmesh purge` finds (and undoes) it after a crash at any
        # point; the host's forwarding as it was before we first turned it on.
        old = self.state.ndmz
        forwarding = old.host_forwarding if old and old.host_forwarding is not None else None
        if up.mode != DUAL_NIC and forwarding is None:
            forwarding = await sysctl_get(self.host_netns, FORWARDING)
        await self.state.record_ndmz(NdmzRecord(d.netns, self.host_netns, d.host_table,
                                          up.ifname if up.mode == DUAL_NIC else None, forwarding))
        seen = await Observation.of(self.links, d.netns)
        existed, fresh = seen.state is not None, seen.fresh
        had_bridge = existed and seen.state.link(d.bridge) is not None
        await self.links.ensure_nr(d.netns, observed=seen.state)
        await self.links.ensure_bridge(d.netns, d.bridge, d.gateway, observed=await fresh())
        if not had_bridge and existed:
            log.warning("ndmz %s had lost its bridge; rebuilt it (every NR's public leg is re-made)", d.netns)
        # The diodes first: nothing is connected before the rules are in place.
        await self.nft.ensure(d.netns, d.ruleset)
        if d.host_ruleset is not None:
            await self.nft.ensure(self.host_netns, d.host_ruleset)
        else:
            await self.nft.remove(self.host_netns, "inet", d.host_table)
        if up.mode == DUAL_NIC:
            await self._ensure_nic(d, await fresh())
        else:
            # The host forwards the ndmz's traffic (and masquerades it, host_ruleset).
            await self.links.ensure_sysctl(self.host_netns, FORWARDING, "1")
            await self.links.ensure_uplink_veth(d.netns, up.ifname, up.address, self.host_netns,
                                                up.host_ifname, up.host_address, observed=await fresh())
        await self.links.ensure_routes(d.netns, up.ifname, [DEFAULT_ROUTE], observed=await fresh(),
                                       via=up.gateway)
        return existed, not had_bridge

    async def _ensure_nic(self, d: DesiredNdmz, st) -> None:
        """Dual NIC: the NIC is moved from the host namespace into the ndmz (once), addressed, up."""
        nic = d.uplink.ifname
        if st.link(nic) is None:
            host = await self.links.pool.get(self.host_netns)
            if not await host.link_lookup(ifname=nic):
                raise FileNotFoundError(f"--ndmz-nic {nic}: no such interface in the host "
                                        f"namespace ({self.host_netns or 'own'}) or in the ndmz")
            await self.links.move_link(self.host_netns, nic, d.netns)
            log.info("moved NIC %s into the ndmz %s", nic, d.netns)
            st = await self.links.observe(d.netns, sysctls=False)
        await self.links.ensure_addresses(d.netns, nic, {d.uplink.address}, observed=st)
        await self.links.ensure_link(d.netns, nic, up=True, observed=st)

    async def _undo_other_mode(self, d: DesiredNdmz) -> None:
        """After a change of uplink mode (an agent restarted with other flags): the NIC of the
        old dual-NIC mode goes back to the host; the old single-NIC veth goes."""
        old = self.state.ndmz
        if old is None or not netns_exists(d.netns):
            return
        st = await self.links.observe(d.netns, sysctls=False)
        if old.nic and old.nic != (d.uplink.ifname if d.uplink.mode == DUAL_NIC else None) \
                and st.link(old.nic) is not None:
            await self.links.move_link(d.netns, old.nic, self.host_netns)
            log.info("moved NIC %s back from the ndmz to the host namespace", old.nic)
        veth = st.link(names.NDMZ_UPLINK_IFNAME)
        if d.uplink.mode == DUAL_NIC and d.uplink.ifname != names.NDMZ_UPLINK_IFNAME \
                and veth is not None and veth.kind == "veth":
            await self.links.remove_veth(d.netns, names.NDMZ_UPLINK_IFNAME)  # both ends go
