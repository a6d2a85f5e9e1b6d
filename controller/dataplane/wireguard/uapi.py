"""Native asyncio client of the WireGuard UAPI text protocol (wireguard-go's unix socket).

One connection per request: `get=1` or `set=1`, then lines `key=value`, an empty line; the
answer ends with `errno=N` and an empty line. Keys are lowercase hex. A `set=1` is applied line
by line (not atomically) but in one request, so a peer move is one round trip. Debian's
wireguard-go 0.0.20220316 has no `allowed_ip=-CIDR`: a changed set is sent with
`replace_allowed_ips=true` followed by the full list, and prefixes a peer gains are plain
`allowed_ip=` lines (see base.peer_ops for why the order of a peer move matters).
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import struct
from ipaddress import ip_network

from .base import DeviceOps, DeviceState, PeerState, WireGuardError, b64_to_hex, hex_to_b64, public_key

SOCKET_DIR = "/var/run/wireguard"
_LIMIT = 256 << 20  # a get=1 of 10,000 peers is a few MB
# the same prefixes come back on every resync; ipaddress parsing is half the cost of a get
_network = functools.lru_cache(maxsize=1 << 16)(ip_network)


def socket_path(ifname: str) -> str:
    return os.path.join(SOCKET_DIR, f"{ifname}.sock")


class UAPITimeout(WireGuardError):
    """The daemon accepted the connection but did not answer in time: it hangs (stopped,
    wedged); its supervisor should restart it."""


class UAPIError(WireGuardError):
    """The daemon refused a request: `errno` is its (positive) errno value."""

    def __init__(self, ifname: str, op: str, errno_: int):
        self.ifname, self.op, self.errno = ifname, op, errno_
        super().__init__(f"wireguard {ifname}: {op} failed: {os.strerror(errno_)} (errno={errno_})")


def socket_owner(ifname: str) -> int | None:
    """PID of the process listening on IFNAME's UAPI socket (SO_PEERCRED); None if nobody is.

    A unix connect never blocks, so this is a cheap, synchronous liveness and ownership probe.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(socket_path(ifname))
        pid, _, _ = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return pid
    except OSError:
        return None
    finally:
        s.close()


_UNSAFE = frozenset("\n\r=\0")


def _checked(lines: list[str]) -> list[str]:
    """Defence in depth (values are validated long before): a value holding a newline, '=' or
    NUL would smuggle its own UAPI line into the request (e.g. `remove=true` for another peer),
    so a request with one is refused whole, before anything is sent."""
    for line in lines:
        key, _, value = line.partition("=")
        if not value or _UNSAFE & set(value) or _UNSAFE & set(key):
            raise WireGuardError(f"refusing a UAPI line for {key!r}: its value is not a plain token")
    return lines


def format_set(ops: DeviceOps) -> str:
    """The `set=1` request body for `ops` (without the leading `set=1`); WireGuardError if a
    value could inject a line."""
    lines: list[str] = []
    if ops.private_key is not None:
        lines.append(f"private_key={b64_to_hex(ops.private_key)}")
    if ops.listen_port is not None:
        lines.append(f"listen_port={ops.listen_port}")
    for p in ops.peers:
        lines.append(f"public_key={b64_to_hex(p.public_key)}")
        if p.remove:
            lines.append("remove=true")
            continue
        if p.endpoint is not None:
            lines.append(f"endpoint={p.endpoint}")
        if p.persistent_keepalive is not None:
            lines.append(f"persistent_keepalive_interval={p.persistent_keepalive}")
        if p.allowed_ips is not None:
            lines.append("replace_allowed_ips=true")
            lines.extend(f"allowed_ip={n}" for n in sorted(p.allowed_ips, key=str))
        if p.add_allowed_ips:
            lines.extend(f"allowed_ip={n}" for n in sorted(p.add_allowed_ips, key=str))
    return "".join(line + "\n" for line in _checked(lines))


def parse_get(text: str) -> DeviceState:
    """A `get=1` answer (without its `errno=0`) as a DeviceState."""
    port = 0
    pub = None
    has_priv = False
    peers: dict[str, dict] = {}
    cur: dict | None = None
    for line in text.splitlines():
        if not line:
            continue
        key, _, val = line.partition("=")
        if key == "public_key":
            cur = peers.setdefault(hex_to_b64(val), {"allowed_ips": set()})
        elif cur is None:
            if key == "private_key" and val.strip("0"):
                has_priv = True
                pub = public_key(hex_to_b64(val))
            elif key == "listen_port":
                port = int(val)
        elif key == "endpoint":
            cur["endpoint"] = val
        elif key == "allowed_ip":
            cur["allowed_ips"].add(_network(val))
        elif key == "persistent_keepalive_interval":
            cur["persistent_keepalive"] = int(val)
        elif key in ("rx_bytes", "tx_bytes"):
            cur[key] = int(val)
        elif key == "last_handshake_time_sec":
            cur["hs"] = cur.get("hs", 0.0) + int(val)
        elif key == "last_handshake_time_nsec":
            cur["hs"] = cur.get("hs", 0.0) + int(val) / 1e9
    return DeviceState(
        listen_port=port,
        public_key=pub,
        has_private_key=has_priv,
        peers={
            k: PeerState(
                endpoint=v.get("endpoint"),
                allowed_ips=frozenset(v["allowed_ips"]),
                persistent_keepalive=v.get("persistent_keepalive", 0),
                rx_bytes=v.get("rx_bytes", 0),
                tx_bytes=v.get("tx_bytes", 0),
                last_handshake=v.get("hs", 0.0),
            )
            for k, v in peers.items()
        },
    )


async def request(ifname: str, body: str, timeout: float = 5.0, path: str | None = None) -> str:
    """Send one UAPI request; return the answer's lines before `errno=`; raise UAPIError if != 0."""
    op = body.split("\n", 1)[0]
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(path or socket_path(ifname), limit=_LIMIT), timeout
        )
    except (OSError, asyncio.TimeoutError) as e:
        raise WireGuardError(f"wireguard {ifname}: UAPI socket not available ({e})") from e
    try:
        writer.write(body.encode() + b"\n")
        try:
            await asyncio.wait_for(writer.drain(), timeout)
            # the whole answer ends with "errno=N" and an empty line: read it in one go
            raw = await asyncio.wait_for(reader.readuntil(b"\n\n"), timeout)
        except asyncio.TimeoutError:
            raise UAPITimeout(f"wireguard {ifname}: {op}: no answer within {timeout:g}s") from None
        text = raw.decode()
        body_, _, last = text[:-2].rpartition("\n")
        if not last.startswith("errno="):
            raise WireGuardError(f"wireguard {ifname}: {op}: answer without errno")
        code = abs(int(last[6:]))  # wireguard-go answers negative values (errno=-22)
        if code:
            raise UAPIError(ifname, op, code)
        return body_
    except asyncio.IncompleteReadError as e:
        raise WireGuardError(f"wireguard {ifname}: {op}: connection closed without errno") from e
    except asyncio.LimitOverrunError as e:
        raise WireGuardError(f"wireguard {ifname}: {op}: answer too large") from e
    except (OSError, asyncio.TimeoutError) as e:  # the daemon died or hangs mid-request
        raise WireGuardError(f"wireguard {ifname}: {op}: {e or 'timed out'}") from e
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (OSError, asyncio.TimeoutError):
            pass


async def get(ifname: str, timeout: float = 5.0) -> DeviceState:
    return parse_get(await request(ifname, "get=1\n", timeout))


async def set_ops(ifname: str, ops: DeviceOps, timeout: float = 5.0) -> None:
    if ops:
        await request(ifname, "set=1\n" + format_set(ops), timeout)
