"""ICMP echo through an NR's WireGuard tunnel: does the NR behind a peer answer?

One round sends one echo request to each target from a raw ICMP socket opened inside the NR
namespace (by a short-lived thread, netns.open_socket_in: no fork) and bound to the WireGuard
interface (SO_BINDTODEVICE), so a request can only leave through the tunnel, never through the
NR's uplink, and from the NR's gateway address, which every peer's AllowedIPs accept. The
target's kernel answers (a gateway is a local address of its NR); nothing has to run there.
The socket is closed after the round: a cached one would pin the namespace after a teardown.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Iterable
from ipaddress import IPv4Address

from .netns import open_socket_in

ECHO_REQUEST, ECHO_REPLY = 8, 0
_ids = iter(range(1, 1 << 62))


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int, payload: bytes = b"zmesh-probe") -> bytes:
    header = struct.pack("!BBHHH", ECHO_REQUEST, 0, 0, ident, seq)
    return struct.pack("!BBHHH", ECHO_REQUEST, 0, _checksum(header + payload), ident, seq) + payload


def parse_echo_reply(packet: bytes) -> tuple[IPv4Address, int, int] | None:
    """(source, identifier, sequence) of an IPv4 packet carrying an ICMP echo reply, else None."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    ihl = (packet[0] & 0x0F) * 4
    icmp = packet[ihl:ihl + 8]
    if len(icmp) < 8 or icmp[0] != ECHO_REPLY or icmp[1] != 0:
        return None
    _, _, _, ident, seq = struct.unpack("!BBHHH", icmp)
    return IPv4Address(packet[12:16]), ident, seq


def _open(netns: str, ifname: str, source: IPv4Address) -> socket.socket:
    sock = open_socket_in(netns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
        sock.bind((str(source), 0))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def echo(netns: str, ifname: str, source: IPv4Address, targets: Iterable[IPv4Address],
               timeout: float = 1.0) -> dict[IPv4Address, bool]:
    """Send one echo request to every target through `ifname` in `netns`; which answered within
    `timeout` seconds. OSError if the namespace, the interface or the source is gone."""
    targets = list(dict.fromkeys(targets))
    answered = {t: False for t in targets}
    if not targets:
        return answered
    loop = asyncio.get_running_loop()
    sock = await loop.run_in_executor(None, _open, netns, ifname, source)
    try:
        ident = (os.getpid() ^ next(_ids)) & 0xFFFF
        seq_of = {t: (i + next(_ids)) & 0xFFFF for i, t in enumerate(targets)}
        for t in targets:
            try:
                await loop.sock_sendto(sock, echo_request(ident, seq_of[t]), (str(t), 0))
            except OSError:
                pass  # no route, a full queue: that target simply does not answer
        deadline = time.monotonic() + timeout
        waiting = {(t, seq_of[t]) for t in targets}
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                packet = await asyncio.wait_for(loop.sock_recv(sock, 2048), left)
            except asyncio.TimeoutError:
                break
            reply = parse_echo_reply(packet)
            if reply is not None and reply[1] == ident and (reply[0], reply[2]) in waiting:
                waiting.discard((reply[0], reply[2]))
                answered[reply[0]] = True
    finally:
        sock.close()
    return answered
