"""Kernel WireGuard through rtnetlink (links) and generic netlink (configuration), via pyroute2.

The link is created by a request sent on a socket in the host namespace carrying IFLA_NET_NS_FD
of the NR: the kernel creates it directly in the NR but binds its UDP socket in the requester's
namespace (wg_newlink's src_net), so no 20 ms move is needed.

NOT exercised on the build machine (no wireguard module); `select_backend` only picks it when
the module is there. Written against pyroute2 0.9.7's wgmsg definitions.
"""

from __future__ import annotations

import asyncio
import errno
import os
import platform
import socket
from ipaddress import ip_network

from pyroute2 import AsyncWireGuard
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic.wireguard import (
    WG_CMD_SET_DEVICE,
    WG_GENL_VERSION,
    WGPEER_F_REMOVE_ME,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    wgmsg,
)

from ..links import Links, NRState
from ..netns import NETLINK_GENERIC, netns_exists, netns_path, open_socket_in
from .base import DeviceOps, DeviceState, PeerState, WireGuardBackend, WireGuardError, key_bytes, public_key


def kernel_available() -> bool:
    """The wireguard module is loaded or loadable (creating a link autoloads it)."""
    if os.path.isdir("/sys/module/wireguard"):
        return True
    try:
        with open(f"/lib/modules/{platform.release()}/modules.dep") as f:
            return any("/wireguard.ko" in line.split(":", 1)[0] for line in f)
    except OSError:
        return False


def _endpoint(ep: dict | None) -> str | None:
    if not ep or not ep.get("port"):
        return None
    addr = ep["addr"]
    return f"[{addr}]:{ep['port']}" if ":" in addr else f"{addr}:{ep['port']}"


def parse_device(msgs) -> DeviceState:
    """WG_CMD_GET_DEVICE answers as a DeviceState (a large device spans several messages)."""
    port, pub, has_priv = 0, None, False
    peers: dict[str, PeerState] = {}
    # a large device is dumped over several messages: merge them
    for m in msgs:
        port = m.get_attr("WGDEVICE_A_LISTEN_PORT") or port
        priv = m.get_attr("WGDEVICE_A_PRIVATE_KEY")
        # pyroute2 decodes key attributes to base64 bytes
        if priv is not None and any(key_bytes(priv.decode())):
            has_priv = True
            pubattr = m.get_attr("WGDEVICE_A_PUBLIC_KEY")
            pub = pubattr.decode() if pubattr else public_key(priv.decode())
        for p in m.get_attr("WGDEVICE_A_PEERS") or []:
            key = p.get_attr("WGPEER_A_PUBLIC_KEY").decode()
            hs = p.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
            ips = frozenset(ip_network(a["addr"]) for a in p.get_attr("WGPEER_A_ALLOWEDIPS") or [])
            prev = peers.get(key)
            peers[key] = PeerState(
                endpoint=_endpoint(p.get_attr("WGPEER_A_ENDPOINT")),
                allowed_ips=ips | (prev.allowed_ips if prev else frozenset()),
                persistent_keepalive=p.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0,
                rx_bytes=p.get_attr("WGPEER_A_RX_BYTES") or 0,
                tx_bytes=p.get_attr("WGPEER_A_TX_BYTES") or 0,
                last_handshake=(hs["tv_sec"] + hs["tv_nsec"] / 1e9) if hs else 0.0,
            )
    return DeviceState(listen_port=port, public_key=pub, has_private_key=has_priv, peers=peers)


def set_message(ifname: str, ops: DeviceOps) -> wgmsg:
    """The WG_CMD_SET_DEVICE message for `ops` (pure; header type/pid are the caller's).

    pyroute2's AsyncWireGuard.set() takes one peer per call; a peer move must be one message.
    """
    msg = wgmsg()
    msg["attrs"].append(["WGDEVICE_A_IFNAME", ifname])
    if ops.private_key is not None:
        msg["attrs"].append(["WGDEVICE_A_PRIVATE_KEY", ops.private_key])
    if ops.listen_port is not None:
        msg["attrs"].append(["WGDEVICE_A_LISTEN_PORT", ops.listen_port])
    peers = []
    for op in ops.peers:
        attrs: list = [["WGPEER_A_PUBLIC_KEY", op.public_key]]
        flags = 0
        if op.remove:
            flags |= WGPEER_F_REMOVE_ME
        else:
            if op.endpoint is not None:
                host, _, port = op.endpoint.rpartition(":")
                attrs.append(["WGPEER_A_ENDPOINT", {"addr": host.strip("[]"), "port": int(port)}])
            if op.persistent_keepalive is not None:
                attrs.append(["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", op.persistent_keepalive])
            if op.allowed_ips is not None:
                flags |= WGPEER_F_REPLACE_ALLOWEDIPS
                attrs.append(["WGPEER_A_ALLOWEDIPS", [_allowed_ip(n) for n in sorted(op.allowed_ips, key=str)]])
            elif op.add_allowed_ips:  # without the replace flag the kernel inserts (moves) them
                attrs.append(["WGPEER_A_ALLOWEDIPS", [_allowed_ip(n) for n in sorted(op.add_allowed_ips, key=str)]])
        attrs.append(["WGPEER_A_FLAGS", flags])
        peers.append({"attrs": attrs})
    if peers:
        msg["attrs"].append(["WGDEVICE_A_PEERS", peers])
    msg["cmd"] = WG_CMD_SET_DEVICE
    msg["version"] = WG_GENL_VERSION
    return msg


def _allowed_ip(net) -> dict:
    family = socket.AF_INET6 if net.version == 6 else socket.AF_INET
    return {
        "attrs": [
            ["WGALLOWEDIP_A_FAMILY", family],
            ["WGALLOWEDIP_A_IPADDR", socket.inet_pton(family, str(net.network_address))],
            ["WGALLOWEDIP_A_CIDR_MASK", net.prefixlen],
        ]
    }


class KernelBackend(WireGuardBackend):
    kind = "kernel"

    def __init__(self, state_dir: str, host_netns: str | None = None, links: Links | None = None):
        self.state_dir = state_dir
        self.host_netns = host_netns
        self.links = links or Links()
        self._own_links = links is None
        self._genl: dict[str, AsyncWireGuard] = {}
        # one request at a time per socket (a concurrent dump fails with EBUSY)
        self._locks: dict[str, asyncio.Lock] = {}

    async def _wg(self, netns: str) -> AsyncWireGuard:
        # a generic netlink socket resolves ifnames in its own namespace: one per NR
        sock = self._genl.get(netns)
        if sock is None:
            raw = await asyncio.get_running_loop().run_in_executor(
                None, open_socket_in, netns, socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_GENERIC
            )
            sock = AsyncWireGuard(fileno=raw.detach())
            await sock.setup_endpoint()
            self._genl[netns] = sock
        return sock

    def _forget(self, netns: str) -> None:
        self._locks.pop(netns, None)
        s = self._genl.pop(netns, None)
        if s is not None:
            s.close()

    async def device_alive(self, ifname: str, netns: str, observed: NRState | None = None) -> bool:
        st = observed or await self.links.observe(netns, sysctls=False)
        link = st.link(ifname) if st else None
        return link is not None and link.kind == "wireguard"

    async def ensure_device(self, ifname: str, netns: str, observed: NRState | None = None) -> bool:
        if await self.device_alive(ifname, netns, observed):
            return False
        ipr = await self.links.pool.get(self.host_netns)
        fd = os.open(netns_path(netns), os.O_RDONLY)
        try:
            self.links.writes += 1
            await ipr.link("add", ifname=ifname, kind="wireguard", net_ns_fd=fd)
        finally:
            os.close(fd)
        return True

    async def delete_device(self, ifname: str, netns: str) -> bool:
        self._forget(netns)
        if not netns_exists(netns):
            return False
        ipr = await self.links.pool.get(netns)
        idx = await ipr.link_lookup(ifname=ifname)
        if not idx:
            return False
        self.links.writes += 1
        await ipr.link("del", index=idx[0])
        return True

    def owned_devices(self) -> list[str]:
        return []  # kernel devices live and die with their NR namespace: GC the namespaces

    async def get(self, ifname: str, netns: str) -> DeviceState:
        async with self._locks.setdefault(netns, asyncio.Lock()):
            return await self._get(ifname, netns)

    async def _get(self, ifname: str, netns: str) -> DeviceState:
        try:
            msgs = await (await self._wg(netns)).info(ifname)
            msgs = [m async for m in msgs] if hasattr(msgs, "__aiter__") else list(msgs)
        except NetlinkError as e:
            self._forget(netns)
            raise WireGuardError(f"wireguard {ifname}: {os.strerror(e.code)}") from e
        return parse_device(msgs)

    async def apply(self, ifname: str, netns: str, ops: DeviceOps) -> None:
        """All of `ops` in one WG_CMD_SET_DEVICE message."""
        if not ops:
            return
        async with self._locks.setdefault(netns, asyncio.Lock()):
            await self._apply(ifname, netns, ops)

    async def _apply(self, ifname: str, netns: str, ops: DeviceOps) -> None:
        wg = await self._wg(netns)
        msg = set_message(ifname, ops)
        msg["header"]["type"] = wg.prid
        msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK
        msg["header"]["pid"] = wg.pid
        msg.encode()
        wg.sendto(msg.data, (0, 0))
        (reply,) = [x async for x in wg.get()]
        err = reply["header"].get("error")
        if err is not None:
            code = getattr(err, "code", errno.EIO)
            error = WireGuardError(f"wireguard {ifname}: set failed: {os.strerror(code)}")
            error.errno = code
            raise error

    async def close(self) -> None:
        for ns in list(self._genl):
            self._forget(ns)
        if self._own_links:
            self.links.close()
