"""Names of everything a node creates, derived from the node's name prefix and the
network/workload names. Pure and deterministic: the same inputs give the same names on every
run, so an agent that restarts recognises what it made before (garbage collection relies on it).

Why the prefix rules: several simulated nodes share one machine, and namespace names and
WireGuard UAPI socket names are global on a machine. A prefix is empty (one node per machine) or
1-5 of [a-z0-9-] (starting with a letter or digit) followed by '-', e.g. "n1-". Ending in '-' and
never being "zmnr-" make names parse back unambiguously: no name one node makes can be read as a
name of another node with a different prefix. Interface names use hex hashes (no '-'), so the
prefix of an interface name is everything up to its last '-'.
"""

from __future__ import annotations

import hashlib
import re

IFNAME_MAX = 15  # Linux IFNAMSIZ - 1
PREFIX_MAX = 6

NR_NETNS_MARK = "zmnr-"
NDMZ_NETNS_MARK = "zmndmz"
WG_MARK = "zw"
WORKLOAD_VETH_MARK = "zv"
NDMZ_PORT_MARK = "zp"
# Names inside an NR namespace (and inside the ndmz) are private to it, so they can be fixed.
NR_BRIDGE = "zmbr"
NR_PUBLIC_IFNAME = "public"  # the NR's veth into the node's ndmz (design.md section 1)
NDMZ_BRIDGE = "tonrs"  # the ndmz's bridge holding every NR's public leg (the seed's name)
NDMZ_UPLINK_IFNAME = "public"  # single NIC: the ndmz's veth towards the host namespace
# Zero-Mesh's nftables table in every namespace it manages (NRs, the ndmz).
NFT_TABLE = "zmesh"

_PREFIX_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,4}-$")
_NETWORK_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def prefix_problems(prefix: str) -> list[str]:
    """Why `prefix` cannot be a node's name prefix (empty list: it can)."""
    if prefix == "":
        return []
    if len(prefix) > PREFIX_MAX:
        return [f"name prefix {prefix!r} is longer than {PREFIX_MAX} characters"]
    if not _PREFIX_RE.match(prefix):
        return [f"name prefix {prefix!r} must be empty or 1-5 of a-z, 0-9, '-' (starting with a "
                "letter or digit) followed by '-', e.g. 'n1-'"]
    if prefix == NR_NETNS_MARK:
        return [f"name prefix {prefix!r} is reserved: it would make names ambiguous"]
    return []


def check_prefix(prefix: str) -> str:
    """`prefix` if valid, else ValueError with the reason."""
    problems = prefix_problems(prefix)
    if problems:
        raise ValueError(problems[0])
    return prefix


def short_hash(text: str, length: int) -> str:
    """A stable lowercase hex digest of `text`, `length` characters long (at most 32)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()[:length]


def _hashed_ifname(prefix: str, mark: str, key: str) -> str:
    # Use every character IFNAMSIZ leaves: 7 hex (28 bits) with the longest prefix, 13 with none.
    return prefix + mark + short_hash(key, IFNAME_MAX - len(prefix) - len(mark))


def nr_netns(prefix: str, network: str) -> str:
    """The NR namespace of `network` on the node with `prefix`, e.g. "n1-zmnr-blue"."""
    return f"{check_prefix(prefix)}{NR_NETNS_MARK}{network}"


def ndmz_netns(prefix: str) -> str:
    """The node's ndmz namespace (one per node), e.g. "n1-zmndmz"."""
    return f"{check_prefix(prefix)}{NDMZ_NETNS_MARK}"


def ndmz_host_ifname(prefix: str) -> str:
    """Single NIC: the host-namespace end of the veth to the ndmz, e.g. "n1-zmndmz"."""
    return f"{check_prefix(prefix)}{NDMZ_NETNS_MARK}"


def host_nft_table(prefix: str) -> str:
    """Zero-Mesh's nftables table in the node's host namespace, which other software shares (and
    on a test machine other nodes' agents too): "zmesh", or "zmesh-n1" for prefix "n1-"."""
    return NFT_TABLE + (f"-{check_prefix(prefix)[:-1]}" if prefix else "")


def ndmz_port(network: str) -> str:
    """The ndmz end of `network`'s public leg, on the ndmz bridge: "zp" + 13 hex digits (names
    inside the ndmz are private to the node, so no prefix)."""
    return _hashed_ifname("", NDMZ_PORT_MARK, network)


def wg_ifname(prefix: str, network: str) -> str:
    """The WireGuard interface of `network`'s NR: unique per machine because UAPI socket names
    are global; e.g. "n1-zw" + 7 hex digits."""
    return _hashed_ifname(check_prefix(prefix), WG_MARK, network)


def workload_veth(prefix: str, workload: str) -> str:
    """The NR-side name of the veth pair that attaches `workload` to the NR bridge."""
    return _hashed_ifname(check_prefix(prefix), WORKLOAD_VETH_MARK, workload)


def network_of_netns(prefix: str, netns: str) -> str | None:
    """The network whose NR namespace `netns` is, if the node with `prefix` made it; else None.
    Used by garbage collection: a namespace for which this returns None is never touched."""
    head = check_prefix(prefix) + NR_NETNS_MARK
    if not netns.startswith(head):
        return None
    network = netns[len(head):]
    return network if _NETWORK_RE.match(network) else None


def owns_wg_ifname(prefix: str, ifname: str) -> bool:
    """Whether `ifname` has the shape of a WireGuard interface made by the node with `prefix`."""
    return _owns_hashed(prefix, WG_MARK, ifname)


def owns_workload_veth(prefix: str, ifname: str) -> bool:
    """Whether `ifname` has the shape of a workload veth made by the node with `prefix`."""
    return _owns_hashed(prefix, WORKLOAD_VETH_MARK, ifname)


def _owns_hashed(prefix: str, mark: str, ifname: str) -> bool:
    head = check_prefix(prefix) + mark
    digest = ifname[len(head):]
    return (ifname.startswith(head) and len(ifname) == IFNAME_MAX
            and all(c in "0123456789abcdef" for c in digest))


def wg_ifname_collisions(prefix: str, networks: list[str] | tuple[str, ...]) -> dict[str, list[str]]:
    """Interface names that two or more of `networks` would share on one node (hash collisions,
    rare with >= 28 bits but checked so that one network never hijacks another's interface)."""
    by_name: dict[str, list[str]] = {}
    for network in sorted(set(networks)):
        by_name.setdefault(wg_ifname(prefix, network), []).append(network)
    return {name: nets for name, nets in by_name.items() if len(nets) > 1}
