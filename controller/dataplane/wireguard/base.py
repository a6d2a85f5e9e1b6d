"""WireGuard: the backend interface, observed/desired dataclasses, the pure diff, and keys.

Keys are base64 (as in `wg`, etcd and status) everywhere outside the backends; the UAPI wants
lowercase hex, netlink raw bytes — conversion happens at that edge only.

X25519 is implemented here in pure Python (RFC 7748): one scalar multiplication per NR, about a
millisecond, no new dependency and no `wg` subprocess; checked against RFC 7748's vectors and
`wg pubkey` in tests/unit.
"""

from __future__ import annotations

import base64
import binascii
import functools
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_network

from ..links import NRState

IPNetwork = IPv4Network | IPv6Network


# --- keys ---------------------------------------------------------------------------------

_P = 2**255 - 19
_A24 = 121665


def _x25519(k: bytes, u: bytes) -> bytes:
    """RFC 7748 X25519 (Montgomery ladder). Not constant-time: fine for keys made once, locally."""
    kb = bytearray(k)
    kb[0] &= 248
    kb[31] &= 127
    kb[31] |= 64
    scalar = int.from_bytes(kb, "little")
    x1 = int.from_bytes(u, "little") & ((1 << 255) - 1)
    x2, z2, x3, z3, swap = 1, 0, x1, 1, 0
    for t in reversed(range(255)):
        bit = (scalar >> t) & 1
        swap ^= bit
        if swap:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = bit
        a, b = (x2 + z2) % _P, (x2 - z2) % _P
        aa, bb = a * a % _P, b * b % _P
        e = (aa - bb) % _P
        c, d = (x3 + z3) % _P, (x3 - z3) % _P
        da, cb = d * a % _P, c * b % _P
        x3 = (da + cb) ** 2 % _P
        z3 = x1 * (da - cb) ** 2 % _P
        x2 = aa * bb % _P
        z2 = e * (aa + _A24 * e) % _P
    if swap:
        x2, z2 = x3, z3
    return (x2 * pow(z2, _P - 2, _P) % _P).to_bytes(32, "little")


@functools.lru_cache(maxsize=4096)  # the diff derives it on every resync
def public_key(private_b64: str) -> str:
    """The base64 public key of a base64 private key (what `wg pubkey` prints)."""
    return base64.b64encode(_x25519(key_bytes(private_b64), (9).to_bytes(32, "little"))).decode()


def generate_private_key() -> str:
    """A new base64 private key, clamped like `wg genkey`."""
    k = bytearray(os.urandom(32))
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return base64.b64encode(bytes(k)).decode()


def key_bytes(b64: str) -> bytes:
    try:
        raw = base64.b64decode(b64, validate=True)
    except binascii.Error:
        raw = b""
    if len(raw) != 32:
        raise ValueError("not a base64 WireGuard key (32 bytes)")  # never echo the value
    return raw


def b64_to_hex(b64: str) -> str:
    return key_bytes(b64).hex()


def hex_to_b64(hx: str) -> str:
    raw = bytes.fromhex(hx)
    if len(raw) != 32:
        raise ValueError("not a hex WireGuard key (32 bytes)")
    return base64.b64encode(raw).decode()


class KeyStore:
    """Private keys in the state dir, one file per interface, mode 0600, never logged."""

    def __init__(self, state_dir: str) -> None:
        self.dir = os.path.join(state_dir, "keys")

    def path(self, ifname: str) -> str:
        return os.path.join(self.dir, f"{ifname}.key")

    def load_or_create(self, ifname: str) -> tuple[str, str]:
        """(private, public) base64 keys of `ifname`, created on first use."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        p = self.path(ifname)
        try:
            with open(p) as f:
                priv = f.read().strip()
        except FileNotFoundError:
            priv = generate_private_key()
            tmp = f"{p}.{os.getpid()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(priv + "\n")
            os.replace(tmp, p)  # atomic: a crash never leaves half a key
        return priv, public_key(priv)

    def remove(self, ifname: str) -> None:
        try:
            os.unlink(self.path(ifname))
        except FileNotFoundError:
            pass


# --- state --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerState:
    endpoint: str | None  # "198.51.100.1:51820" or "[2001:db8::1]:51820"
    allowed_ips: frozenset[IPNetwork]
    persistent_keepalive: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0
    last_handshake: float = 0.0  # unix time, 0 = never


@dataclass(frozen=True)
class DeviceState:
    listen_port: int
    public_key: str | None  # base64; None without a private key
    has_private_key: bool
    peers: dict[str, PeerState] = field(default_factory=dict)  # base64 public key → state


@dataclass(frozen=True)
class DesiredPeer:
    public_key: str
    allowed_ips: frozenset[IPNetwork]
    endpoint: str | None = None  # None: learn it from the peer (hidden node behind NAT)
    persistent_keepalive: int = 0

    @classmethod
    def make(cls, public_key: str, allowed_ips: Iterable, endpoint=None, keepalive: int = 0):
        return cls(public_key, frozenset(ip_network(a) for a in allowed_ips), endpoint, keepalive)


@dataclass(frozen=True)
class PeerOp:
    """One peer's change. remove=True deletes it; otherwise None fields are left alone.

    `add_allowed_ips` inserts prefixes without touching the peer's others; `allowed_ips`
    replaces the whole set (the only way to drop a prefix: Debian's wireguard-go has no
    `allowed_ip=-CIDR`)."""

    public_key: str
    remove: bool = False
    endpoint: str | None = None
    persistent_keepalive: int | None = None
    allowed_ips: frozenset[IPNetwork] | None = None  # replace the whole set when not None
    add_allowed_ips: frozenset[IPNetwork] | None = None  # insert these, keep the rest


@dataclass(frozen=True)
class DeviceOps:
    """The minimal change to a device: empty (falsy) when converged."""

    private_key: str | None = None  # base64; set only when it differs
    listen_port: int | None = None
    peers: tuple[PeerOp, ...] = ()

    def __bool__(self) -> bool:
        return self.private_key is not None or self.listen_port is not None or bool(self.peers)


def peer_ops(observed: Mapping[str, PeerState], desired: Iterable[DesiredPeer]) -> tuple[PeerOp, ...]:
    """The minimal peer changes turning `observed` into `desired` (pure), ordered so that a
    prefix moving between peers always has exactly one owner.

    WireGuard (wireguard-go and the kernel alike) keeps one owner per prefix: inserting a prefix
    another peer holds *moves* it, in one step of its lookup table. A configuration transaction
    is applied op by op, with packets flowing in between, so the order is:
      1. new peers, and every prefix a peer gains, inserted without replacing anything (a
         prefix moving from the old aggregator's peer to the new one moves right here);
      2. a replaced set only for peers still holding a prefix nobody took over (a subnet that
         left the network): the one case the protocol cannot do without a moment's gap, and
         there is nobody to hand that prefix to anyway;
      3. removed peers, which by now own nothing that is still wanted.
    An endpoint of None in `desired` means "don't care" (the peer roams / is behind NAT).
    """
    want = {p.public_key: p for p in desired}
    gained = {k: d.allowed_ips - (observed[k].allowed_ips if k in observed else frozenset())
              for k, d in want.items()}
    taken_over = frozenset().union(*gained.values())
    inserts, replaces = [], []
    for k in sorted(want):
        d = want[k]
        o = observed.get(k)
        if o is None:
            inserts.append(PeerOp(k, endpoint=d.endpoint, persistent_keepalive=d.persistent_keepalive,
                                  add_allowed_ips=d.allowed_ips))
            continue
        ep = d.endpoint if d.endpoint is not None and d.endpoint != o.endpoint else None
        ka = d.persistent_keepalive if d.persistent_keepalive != o.persistent_keepalive else None
        if ep is not None or ka is not None or gained[k]:
            inserts.append(PeerOp(k, endpoint=ep, persistent_keepalive=ka,
                                  add_allowed_ips=gained[k] or None))
        # What the peer holds after step 1: its own set, minus what others took, plus its gains.
        held = (o.allowed_ips - taken_over) | gained[k]
        if held != d.allowed_ips:
            replaces.append(PeerOp(k, allowed_ips=d.allowed_ips))
    removes = [PeerOp(k, remove=True) for k in sorted(observed) if k not in want]
    return tuple(inserts + replaces + removes)


def device_ops(
    observed: DeviceState | None,
    private_key: str,
    listen_port: int,
    peers: Iterable[DesiredPeer],
) -> DeviceOps:
    """The minimal change to a device (pure); observed None = a fresh device."""
    if observed is None:
        observed = DeviceState(listen_port=0, public_key=None, has_private_key=False)
    pk = None
    if not observed.has_private_key or observed.public_key != public_key(private_key):
        pk = private_key
    port = listen_port if observed.listen_port != listen_port else None
    return DeviceOps(private_key=pk, listen_port=port, peers=peer_ops(observed.peers, peers))


def redial_ops(peer: DesiredPeer) -> DeviceOps:
    """`peer` removed and added again in one transaction (pure): a fresh peer has no handshake
    history, so WireGuard dials it at once (with persistent keepalive on) instead of waiting
    out the REKEY_TIMEOUT (5 s) that follows an initiation nobody answered."""
    return DeviceOps(peers=(PeerOp(peer.public_key, remove=True),
                            PeerOp(peer.public_key, endpoint=peer.endpoint,
                                   persistent_keepalive=peer.persistent_keepalive,
                                   add_allowed_ips=peer.allowed_ips)))


# --- backend interface --------------------------------------------------------------------


class WireGuardError(RuntimeError):
    """A WireGuard device could not be read or configured; `errno` is set when the backend
    reported one (EADDRINUSE: the listen port is taken on this host)."""

    errno: int | None = None


class WireGuardBackend(ABC):
    """One WireGuard implementation. `ifname` is unique per machine; `netns` is the NR namespace.

    The device is created in the backend's host namespace (where its UDP socket lives) and ends
    up in `netns`. Every method is idempotent.
    """

    kind: str = "abstract"

    @abstractmethod
    async def ensure_device(self, ifname: str, netns: str, observed: NRState | None = None) -> bool:
        """The device exists in `netns` and answers; (re)creates it. True if it did.
        `observed`: a fresh observation of `netns`, to spare a netlink dump."""

    @abstractmethod
    async def device_alive(self, ifname: str, netns: str, observed: NRState | None = None) -> bool:
        """The device exists in `netns` and answers (for userspace: its process runs)."""

    @abstractmethod
    async def delete_device(self, ifname: str, netns: str) -> bool:
        """Remove the device (and its process/socket). True if something was removed."""

    @abstractmethod
    async def get(self, ifname: str, netns: str) -> DeviceState:
        """The device's configuration and peer counters."""

    @abstractmethod
    async def apply(self, ifname: str, netns: str, ops: DeviceOps) -> None:
        """Write `ops` in one transaction."""

    @abstractmethod
    def owned_devices(self) -> list[str]:
        """Interface names this backend has records of (for garbage collection)."""

    async def configure(
        self,
        ifname: str,
        netns: str,
        private_key: str,
        listen_port: int,
        peers: Iterable[DesiredPeer],
        observed: DeviceState | None = None,
    ) -> DeviceOps:
        """Converge key, port and peers, writing only the difference. Returns what it wrote."""
        if observed is None:
            observed = await self.get(ifname, netns)
        ops = device_ops(observed, private_key, listen_port, peers)
        if ops:
            await self.apply(ifname, netns, ops)
        return ops

    async def close(self) -> None:
        """Release sockets; the devices (and userspace processes) stay up."""
