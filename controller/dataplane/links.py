"""Links, addresses, routes and sysctls of NRs and workload attachments: observe and apply.

Every `ensure_*` observes first and writes only the difference, so a converged NR costs reads
only. Pass `observed=` (one `observe()` of the NR per reconcile) to skip their own reads: a
pyroute2 dump costs 0.5-1 ms. A stale `observed` is safe: links it lacks are re-read, and a write
the kernel refuses raises (the reconciler retries with a fresh observe).

Each returns the number of kernel writes it made (`Links.writes` keeps the running total), which
is how tests and the reconciler's metrics tell "converged" from "changed".

IPv4 only: NR subnets and workload addresses are IPv4 (models.resources).
"""

from __future__ import annotations

import errno
import os
from collections import Counter
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from pyroute2.netlink.exceptions import NetlinkError

from .accounting import count
from .netns import (
    NetlinkPool,
    create_netns,
    delete_netns,
    netns_exists,
    netns_path,
    transient_iproute,
    sysctl_get,
    sysctl_set,
)

IFF_UP = 0x1
RTPROT_KERNEL = 2
RT_TABLE_MAIN = 254
DEFAULT_ROUTE = IPv4Network("0.0.0.0/0")


@dataclass(frozen=True)
class LinkState:
    index: int
    name: str
    kind: str | None  # "bridge", "veth", "tun", "wireguard", None for lo
    master: int | None  # ifindex of the bridge it is enslaved to
    mtu: int
    up: bool  # administratively up (IFF_UP)
    peer_index: int | None  # IFLA_LINK: a veth's peer ifindex (in the peer's namespace)
    addresses: frozenset[IPv4Interface] = frozenset()


@dataclass(frozen=True)
class RouteState:
    dst: IPv4Network
    oif: int | None
    gateway: IPv4Address | None
    proto: int


@dataclass(frozen=True)
class NRState:
    """What the kernel has in one namespace (main table, IPv4)."""

    netns: str
    links: dict[str, LinkState]
    routes: tuple[RouteState, ...]
    ip_forward: bool | None = None  # None: not read (observe(..., sysctls=False))

    def link(self, name: str) -> LinkState | None:
        return self.links.get(name)

    def routes_via(self, dev: str) -> dict[IPv4Network, RouteState]:
        """Non-kernel routes whose output device is `dev`, by destination."""
        link = self.links.get(dev)
        if link is None:
            return {}
        return {r.dst: r for r in self.routes if r.oif == link.index and r.proto != RTPROT_KERNEL}

    def route(self, dst: IPv4Network) -> RouteState | None:
        for r in self.routes:
            if r.dst == dst and r.proto != RTPROT_KERNEL:
                return r
        return None


@dataclass(frozen=True)
class VethAttachment:
    """A workload attachment as the dataplane needs it."""

    host_ifname: str  # veth end inside the NR, enslaved to the bridge
    netns: str  # the workload's namespace: a name under /var/run/netns or an absolute path
    ifname: str  # the end inside the workload's namespace, e.g. "eth0"
    address: IPv4Interface  # e.g. 10.1.1.5/24
    gateway: IPv4Address  # the NR's bridge address
    mtu: int = 1420


def _link_state(m, addresses=()) -> LinkState:
    return LinkState(
        index=m["index"],
        name=m.get("IFLA_IFNAME"),
        kind=m.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND"),
        master=m.get("IFLA_MASTER"),
        mtu=m.get("IFLA_MTU"),
        up=bool(m["flags"] & IFF_UP),
        peer_index=m.get("IFLA_LINK"),
        addresses=frozenset(addresses),
    )


async def _get_link(ipr, name: str) -> LinkState:
    """One link by name (cheaper than a dump right after creating it; it has no addresses)."""
    (m,) = await ipr.link("get", ifname=name)
    return _link_state(m)


async def _dump(ipr, what: str, **kw) -> list:
    return await getattr(ipr, what)("dump", **kw)


async def observe_netns(
    pool: NetlinkPool | None, netns: str, sysctls: bool = True, ipr=None
) -> NRState | None:
    """Links (with IPv4 addresses) and main-table IPv4 routes of a namespace; None if absent.

    Uses `ipr` if given, else the pool's cached socket.
    """
    if ipr is None:
        try:
            ipr = await pool.get(netns)
        except FileNotFoundError:
            return None
    addrs: dict[int, set[IPv4Interface]] = {}
    for m in await _dump(ipr, "addr", family=2):
        addrs.setdefault(m["index"], set()).add(
            IPv4Interface(f"{m.get('IFA_ADDRESS')}/{m['prefixlen']}")
        )
    links = {}
    for m in await _dump(ipr, "link"):
        link = _link_state(m, addrs.get(m["index"], ()))
        links[link.name] = link
    routes = []
    for m in await _dump(ipr, "route", family=2, table=RT_TABLE_MAIN):
        if m.get("RTA_TABLE", m["table"]) != RT_TABLE_MAIN or m["type"] != 1:  # unicast only
            continue
        dst = m.get("RTA_DST") or "0.0.0.0"
        gw = m.get("RTA_GATEWAY")
        routes.append(
            RouteState(
                dst=IPv4Network(f"{dst}/{m['dst_len']}"),
                oif=m.get("RTA_OIF"),
                gateway=IPv4Address(gw) if gw else None,
                proto=m["proto"],
            )
        )
    fwd = None
    if sysctls:
        fwd = (await sysctl_get(netns, "net.ipv4.ip_forward")) == "1"
    return NRState(netns=netns, links=links, routes=tuple(routes), ip_forward=fwd)


class Links:
    """Apply side for NR namespaces and workload veths; one per agent (owns a NetlinkPool)."""

    def __init__(self, pool: NetlinkPool | None = None) -> None:
        self.pool = pool or NetlinkPool()
        # Kernel writes made so far, by kind (netns, link, address, route, sysctl): all zero on
        # a converged resync.
        self.writes_by_kind: Counter[str] = Counter()

    @property
    def writes(self) -> int:
        return sum(self.writes_by_kind.values())

    def _wrote(self, kind: str, n: int = 1) -> None:
        self.writes_by_kind[kind] += n
        count("link", n)  # also for the reconcile that made them (accounting.counting)

    def close(self) -> None:
        self.pool.close()

    async def observe(self, netns: str, sysctls: bool = True) -> NRState | None:
        return await observe_netns(self.pool, netns, sysctls)

    async def _w(self, kind: str, coro):
        self._wrote(kind)
        return await coro

    # --- NR namespace ---------------------------------------------------------------------

    async def ensure_nr(self, netns: str, observed: NRState | None = None) -> int:
        """The namespace exists, its lo is up and it forwards IPv4."""
        n = 0
        fresh = await create_netns(netns)
        if fresh:
            self._wrote("netns")
            n += 1
        st = observed if observed is not None and observed.ip_forward is not None else None
        if st is None and not fresh:
            st = await self.observe(netns)
        lo = st.link("lo") if st else None
        if st is None or (lo and not lo.up):  # a fresh namespace: lo (always index 1) is down
            await self._w("link", (await self.pool.get(netns)).link("set", index=lo.index if lo else 1, state="up"))
            n += 1
        if st is None or not st.ip_forward:
            wrote = await sysctl_set(netns, "net.ipv4.ip_forward", "1")
            self._wrote("sysctl", int(wrote))
            n += int(wrote)
        return n

    async def delete_nr(self, netns: str) -> bool:
        """Delete the NR namespace with everything in it (veths to workloads die with it)."""
        self.pool.forget(netns)  # an open socket would keep the namespace (and veths) alive
        gone = await delete_netns(netns)
        self._wrote("netns", int(gone))
        return gone

    # --- links ----------------------------------------------------------------------------

    async def ensure_bridge(
        self,
        netns: str,
        name: str,
        gateway: IPv4Interface,
        mtu: int | None = None,
        observed: NRState | None = None,
    ) -> int:
        """Bridge `name` exists, holds exactly `gateway` (e.g. 10.1.1.1/24) and is up."""
        ipr = await self.pool.get(netns)
        st = observed or await self.observe(netns, sysctls=False)
        n = 0
        br = st.link(name)
        if br is not None and br.kind != "bridge":
            raise RuntimeError(f"{netns}: {name} exists but is a {br.kind}, not a bridge")
        if br is None:
            kw = {"mtu": mtu} if mtu else {}
            await self._w("link", ipr.link("add", ifname=name, kind="bridge", **kw))
            n += 1
            br = await _get_link(ipr, name)
        n += await self._ensure_addresses(ipr, br, {gateway})
        n += await self._ensure_link_attrs(ipr, br, mtu=mtu, up=True)
        return n

    async def ensure_link(
        self,
        netns: str,
        name: str,
        mtu: int | None = None,
        up: bool = True,
        observed: NRState | None = None,
    ) -> int:
        """An existing link (e.g. the wg interface) has this MTU and is up."""
        ipr = await self.pool.get(netns)
        _, link = await self._existing_link(netns, name, observed)
        return await self._ensure_link_attrs(ipr, link, mtu=mtu, up=up)

    async def _existing_link(self, netns: str, name: str, observed: NRState | None):
        """(state, link) for a link that must exist; `observed` is used if it has the link."""
        st = observed if observed is not None and observed.link(name) else None
        st = st or await self.observe(netns, sysctls=False)
        link = st.link(name)
        if link is None:
            raise FileNotFoundError(errno.ENODEV, f"no link {name} in {netns}")
        return st, link

    async def move_link(self, src_netns: str | None, name: str, dst_netns: str) -> None:
        """Move a link between namespaces (about 20 ms: only for links made elsewhere, e.g. TUN)."""
        ipr = await self.pool.get(src_netns)
        idx = await ipr.link_lookup(ifname=name)
        if not idx:
            raise FileNotFoundError(errno.ENODEV, f"no link {name} in {src_netns or 'own netns'}")
        fd = os.open(netns_path(dst_netns), os.O_RDONLY)
        try:
            await self._w("link", ipr.link("set", index=idx[0], net_ns_fd=fd))
        finally:
            os.close(fd)

    async def _ensure_link_attrs(self, ipr, link: LinkState, mtu=None, up=True, master=None) -> int:
        kw = {}
        if mtu and link.mtu != mtu:
            kw["mtu"] = mtu
        if master is not None and link.master != master:
            kw["master"] = master
        if up and not link.up:
            kw["state"] = "up"
        if not kw:
            return 0
        await self._w("link", ipr.link("set", index=link.index, **kw))
        return 1

    async def _ensure_addresses(self, ipr, link: LinkState, want: set[IPv4Interface]) -> int:
        n = 0
        for a in link.addresses - want:
            await self._w("address", ipr.addr("del", index=link.index, address=str(a.ip), prefixlen=a.network.prefixlen))
            n += 1
        for a in want - link.addresses:
            await self._w("address", ipr.addr("add", index=link.index, address=str(a.ip), prefixlen=a.network.prefixlen))
            n += 1
        return n

    # --- routes ---------------------------------------------------------------------------

    async def ensure_routes(
        self, netns: str, dev: str, dsts, observed: NRState | None = None
    ) -> int:
        """The routes via `dev` are exactly `dsts` (e.g. other NRs' subnets via the wg link).

        A destination routed elsewhere is moved to `dev`; routes via `dev` not wanted are removed.
        """
        want = {IPv4Network(d) for d in dsts}
        ipr = await self.pool.get(netns)
        st, link = await self._existing_link(netns, dev, observed)
        have = st.routes_via(dev)
        n = 0
        for dst in sorted(set(have) - want):
            await self._w("route", ipr.route("del", dst=str(dst), oif=link.index, table=RT_TABLE_MAIN))
            n += 1
        for dst in sorted(want):
            r = have.get(dst)
            if r is not None and r.gateway is None:
                continue
            # replace: also takes over a destination that currently points elsewhere
            await self._w("route", ipr.route("replace", dst=str(dst), oif=link.index, table=RT_TABLE_MAIN))
            n += 1
        return n

    # --- workloads ------------------------------------------------------------------------

    async def observe_workload(self, netns: str) -> NRState | None:
        """The workload namespace's state (None if the namespace is gone)."""
        if not os.path.exists(netns_path(netns)):
            return None
        async with transient_iproute(netns) as wipr:
            return await observe_netns(None, netns, sysctls=False, ipr=wipr)

    async def ensure_workload(
        self, nr_netns: str, bridge: str, wl: VethAttachment, observed: NRState | None = None
    ) -> int:
        """A veth from the NR's bridge into the workload's namespace, addressed and routed.

        The peer is created directly inside the workload namespace (no 20 ms move). The socket
        into the workload namespace is not cached: it would keep a dead container's namespace.
        """
        if not os.path.exists(netns_path(wl.netns)):
            raise FileNotFoundError(errno.ENOENT, f"workload namespace {wl.netns} does not exist")
        async with transient_iproute(wl.netns) as wipr:
            return await self._ensure_workload(nr_netns, bridge, wl, wipr, observed)

    async def _ensure_workload(self, nr_netns, bridge, wl: VethAttachment, wipr, observed) -> int:
        ipr = await self.pool.get(nr_netns)
        st = observed if observed is not None and observed.link(bridge) else None
        st = st or await self.observe(nr_netns, sysctls=False)
        br = st.link(bridge)
        if br is None:
            raise FileNotFoundError(errno.ENODEV, f"no bridge {bridge} in {nr_netns}")
        n = 0
        host = st.link(wl.host_ifname)
        wst = await observe_netns(None, wl.netns, sysctls=False, ipr=wipr)
        inner = wst.link(wl.ifname)
        if host is not None and (inner is None or inner.peer_index != host.index):
            # our host end lost its peer (namespace recreated, peer renamed): start over
            await self._w("link", ipr.link("del", index=host.index))
            n += 1
            host = None
        if host is None:
            if inner is not None:
                raise RuntimeError(
                    f"{wl.netns} already has a link {wl.ifname} that is not attached to {nr_netns}"
                )
            fd = os.open(netns_path(wl.netns), os.O_RDONLY)
            try:
                await self._w(
                    "link",
                    ipr.link(
                        "add",
                        ifname=wl.host_ifname,
                        kind="veth",
                        mtu=wl.mtu,
                        master=br.index,
                        peer={"ifname": wl.ifname, "net_ns_fd": fd, "mtu": wl.mtu},
                    ),
                )
            finally:
                os.close(fd)
            n += 1
            host = await _get_link(ipr, wl.host_ifname)
            inner = await _get_link(wipr, wl.ifname)  # wst's routes stay valid: eth0 is new
        n += await self._ensure_link_attrs(ipr, host, mtu=wl.mtu, up=True, master=br.index)
        n += await self._ensure_addresses(wipr, inner, {wl.address})
        n += await self._ensure_link_attrs(wipr, inner, mtu=wl.mtu, up=True)
        dflt = wst.route(DEFAULT_ROUTE)
        if dflt is None or dflt.gateway != wl.gateway or dflt.oif != inner.index:
            await self._w(
                "route", wipr.route("replace", dst="0.0.0.0/0", gateway=str(wl.gateway), oif=inner.index)
            )
            n += 1
        return n

    async def remove_workload(self, nr_netns: str, host_ifname: str) -> bool:
        """Delete the workload's veth (both ends) and nothing else. True if it existed."""
        if not netns_exists(nr_netns):
            return False
        ipr = await self.pool.get(nr_netns)
        idx = await ipr.link_lookup(ifname=host_ifname)
        if not idx:
            return False
        try:
            await self._w("link", ipr.link("del", index=idx[0]))
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise
            return False
        return True
