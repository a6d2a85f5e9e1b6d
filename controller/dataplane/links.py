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

import dataclasses
import errno
import os
from collections import Counter
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from pyroute2.netlink.exceptions import NetlinkError

from .accounting import active, count
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
    isolated: bool | None = None  # a bridge port's isolation flag; None: not a bridge port


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
    info = m.get("IFLA_LINKINFO")
    isolated = None
    if info is not None and info.get("IFLA_INFO_SLAVE_KIND") == "bridge":
        isolated = bool(info.get_nested("IFLA_INFO_SLAVE_DATA", "IFLA_BRPORT_ISOLATED"))
    return LinkState(
        index=m["index"],
        name=m.get("IFLA_IFNAME"),
        kind=m.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND"),
        master=m.get("IFLA_MASTER"),
        mtu=m.get("IFLA_MTU"),
        up=bool(m["flags"] & IFF_UP),
        peer_index=m.get("IFLA_LINK"),
        addresses=frozenset(addresses),
        isolated=isolated,
    )


async def _get_link(ipr, name: str) -> LinkState:
    """One link by name (cheaper than a dump right after creating it; it has no addresses)."""
    (m,) = await ipr.link("get", ifname=name)
    return _link_state(m)


async def _get_link_or_none(ipr, name: str) -> LinkState | None:
    try:
        return await _get_link(ipr, name)
    except NetlinkError as e:
        if e.code != errno.ENODEV:
            raise
        return None


async def _with_addresses(ipr, link: LinkState) -> LinkState:
    """`link` with its IPv4 addresses (one address dump filtered to the link)."""
    addresses = {IPv4Interface(f"{m.get('IFA_ADDRESS')}/{m['prefixlen']}")
                 for m in await _dump(ipr, "addr", family=2, index=link.index)}
    return dataclasses.replace(link, addresses=frozenset(addresses))


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


class Observation:
    """One observation of a namespace serving every step of a reconcile, read again only after
    this reconcile wrote to the kernel (inside `accounting.counting()`: other reconciles run
    concurrently; outside it, any write through `links`) or `stale()` was called: a converged
    namespace costs a single netlink dump."""

    def __init__(self, links: "Links", netns: str, state: NRState | None):
        self.links, self.netns, self.state = links, netns, state
        mine = active()
        self._written = (lambda: mine.link) if mine is not None else (lambda: links.writes)
        self._seen = self._written()

    @classmethod
    async def of(cls, links: "Links", netns: str) -> "Observation":
        """Observe `netns` now (None state if it does not exist)."""
        return cls(links, netns, await links.observe(netns) if netns_exists(netns) else None)

    def stale(self) -> None:
        """Something outside `Links` changed the namespace (e.g. a WireGuard device appeared)."""
        self._seen = -1

    async def fresh(self) -> NRState | None:
        if self._written() != self._seen:
            self.state = await self.links.observe(self.netns)
            self._seen = self._written()
        return self.state


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

    async def ensure_sysctl(self, netns: str | None, key: str, value: str) -> int:
        """A net.* sysctl of a namespace has `value` (e.g. the host's IPv4 forwarding)."""
        wrote = int(await sysctl_set(netns, key, value))
        self._wrote("sysctl", wrote)
        return wrote

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

    async def _ensure_link_attrs(self, ipr, link: LinkState, mtu=None, up=True, master=None,
                                 isolated: bool | None = None) -> int:
        kw = {}
        if mtu and link.mtu != mtu:
            kw["mtu"] = mtu
        if master is not None and link.master != master:
            kw["master"] = master
        if up and not link.up:
            kw["state"] = "up"
        n = 0
        if kw:
            await self._w("link", ipr.link("set", index=link.index, **kw))
            n += 1
        # A port's flags are bridge-port attributes: set once it is enslaved, in a message of its own.
        if isolated is not None and (link.isolated != isolated or "master" in kw):
            await self._w("link", ipr.link("set", index=link.index, kind="bridge_slave", isolated=int(isolated)))
            n += 1
        return n

    async def ensure_addresses(self, netns: str | None, name: str, want, observed: NRState | None = None) -> int:
        """An existing link holds exactly the addresses `want` (IPv4)."""
        _, link = await self._existing_link(netns, name, observed)
        return await self._ensure_addresses(await self.pool.get(netns), link, set(want))

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
        self, netns: str, dev: str, dsts, observed: NRState | None = None,
        via: IPv4Address | None = None,
    ) -> int:
        """The routes via `dev` are exactly `dsts` (e.g. other NRs' subnets via the wg link),
        through gateway `via` if given (e.g. the default route via the ndmz gateway).

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
        gateway = {"gateway": str(via)} if via is not None else {}
        for dst in sorted(want):
            r = have.get(dst)
            if r is not None and r.gateway == via:
                continue
            # replace: also takes over a destination that currently points elsewhere
            await self._w("route", ipr.route("replace", dst=str(dst), oif=link.index, table=RT_TABLE_MAIN,
                                             **gateway))
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
        wst = await observe_netns(None, wl.netns, sysctls=False, ipr=wipr)
        n, host, inner = await self._ensure_veth_pair(
            ipr, st.link(wl.host_ifname), wl.host_ifname, nr_netns,
            wipr, wst.link(wl.ifname), wl.ifname, wl.netns, owned=False, mtu=wl.mtu, master=br.index)
        n += await self._ensure_link_attrs(ipr, host, mtu=wl.mtu, up=True, master=br.index)
        n += await self._ensure_addresses(wipr, inner, {wl.address})
        n += await self._ensure_link_attrs(wipr, inner, mtu=wl.mtu, up=True)
        # wst's routes stay valid when eth0 is new: a new link has none
        dflt = wst.route(DEFAULT_ROUTE)
        if dflt is None or dflt.gateway != wl.gateway or dflt.oif != inner.index:
            await self._w(
                "route", wipr.route("replace", dst="0.0.0.0/0", gateway=str(wl.gateway), oif=inner.index)
            )
            n += 1
        return n

    async def _ensure_veth_pair(self, ipr, link: LinkState | None, name: str, netns: str | None,
                                peer_ipr, peer: LinkState | None, peer_name: str, peer_netns: str,
                                *, owned: bool, mtu: int | None = None, master: int | None = None):
        """A veth `name` in `netns` whose peer is `peer_name` in `peer_netns`, created from this
        side with the peer directly in the other namespace (no 20 ms move). `link`/`peer`: what
        each namespace has under those names (None: nothing). Our end whose peer is gone or
        renamed is recreated. A link named `peer_name` that is not our peer is deleted when the
        other namespace is ours (`owned`), else refused: we never delete what is not ours.
        Returns (writes, our end, the peer)."""
        n = 0
        if link is not None and link.kind != "veth":
            raise RuntimeError(f"{netns or 'own netns'}: {name} exists but is a {link.kind}, not a veth")
        if link is not None and (peer is None or peer.peer_index != link.index):
            # our end lost its peer (namespace recreated, peer renamed): start over
            await self._w("link", ipr.link("del", index=link.index))
            n += 1
            link = None
        if link is None:
            if peer is not None:
                if not owned:
                    raise RuntimeError(
                        f"{peer_netns} already has a link {peer_name} that is not attached to {netns}")
                await self._w("link", peer_ipr.link("del", index=peer.index))
                n += 1
            fd = os.open(netns_path(peer_netns), os.O_RDONLY)
            try:
                mtus = {"mtu": mtu} if mtu else {}
                masters = {"master": master} if master is not None else {}
                await self._w("link", ipr.link("add", ifname=name, kind="veth", **mtus, **masters,
                                               peer={"ifname": peer_name, "net_ns_fd": fd, **mtus}))
            finally:
                os.close(fd)
            n += 1
            link = await _get_link(ipr, name)
            peer = await _get_link(peer_ipr, peer_name)
        return n, link, peer

    # --- the ndmz: NR public legs and the uplink veth ------------------------------------

    async def ensure_public_leg(self, ndmz_netns: str, bridge: str, port: str, nr_netns: str,
                                ifname: str, address: IPv4Interface,
                                nr_observed: NRState | None = None) -> int:
        """The NR's veth `ifname` (e.g. "public") with `address`, up, whose peer `port` sits on
        the ndmz's `bridge`, isolated from the other ports (NRs never talk to each other at
        layer 2) and up. Reads one link in the ndmz, not the whole namespace."""
        ipr, nr_ipr = await self.pool.get(ndmz_netns), await self.pool.get(nr_netns)
        br = await _get_link_or_none(ipr, bridge)
        if br is None:
            raise FileNotFoundError(errno.ENODEV, f"no bridge {bridge} in {ndmz_netns}")
        nr_st = nr_observed if nr_observed is not None else await self.observe(nr_netns, sysctls=False)
        n, ours, leg = await self._ensure_veth_pair(
            ipr, await _get_link_or_none(ipr, port), port, ndmz_netns,
            nr_ipr, nr_st.link(ifname), ifname, nr_netns, owned=True, master=br.index)
        n += await self._ensure_link_attrs(ipr, ours, up=True, master=br.index, isolated=True)
        n += await self._ensure_addresses(nr_ipr, leg, {address})  # a new leg has none
        n += await self._ensure_link_attrs(nr_ipr, leg, up=True)
        return n

    async def ensure_uplink_veth(self, ndmz_netns: str, ifname: str, address: IPv4Interface,
                                 host_netns: str | None, host_ifname: str,
                                 host_address: IPv4Interface, observed: NRState | None = None) -> int:
        """Single NIC: the veth between the ndmz (`ifname`, `address`) and the node's host
        namespace (`host_ifname`, `host_address`), both ends up. A link of that name in the
        host that is not our peer is never touched (refused)."""
        ipr, host_ipr = await self.pool.get(ndmz_netns), await self.pool.get(host_netns)
        st = observed if observed is not None else await self.observe(ndmz_netns, sysctls=False)
        host = await _get_link_or_none(host_ipr, host_ifname)
        if host is not None:
            host = await _with_addresses(host_ipr, host)
        n, ours, peer = await self._ensure_veth_pair(
            ipr, st.link(ifname), ifname, ndmz_netns, host_ipr, host, host_ifname,
            host_netns or "/proc/self/ns/net", owned=False)
        if n:  # created: no addresses yet
            ours, peer = await _with_addresses(ipr, ours), await _with_addresses(host_ipr, peer)
        n += await self._ensure_addresses(ipr, ours, {address})
        n += await self._ensure_link_attrs(ipr, ours, up=True)
        n += await self._ensure_addresses(host_ipr, peer, {host_address})
        n += await self._ensure_link_attrs(host_ipr, peer, up=True)
        return n

    async def remove_veth(self, netns: str, ifname: str) -> bool:
        """Delete a veth of ours (both ends: a workload's, the ndmz's old uplink) and nothing
        else. True if it existed."""
        if not netns_exists(netns):
            return False
        ipr = await self.pool.get(netns)
        idx = await ipr.link_lookup(ifname=ifname)
        if not idx:
            return False
        try:
            await self._w("link", ipr.link("del", index=idx[0]))
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise
            return False
        return True
