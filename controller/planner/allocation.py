"""Pure, deterministic allocation of WireGuard listen ports and NR public-leg addresses (per
node) and workload addresses (per NR subnet). Existing allocations are kept whenever they are
still valid, so a resync, an agent restart or a later spec pinning the same address never
renumbers anything that works."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence

from controller.models.resources import PortRange, Workload, address_problems

from .ndmz import NDMZ_GATEWAY, NDMZ_RANGE


class PortsExhausted(ValueError):
    """Every port of the node's listen port range is taken by another network."""


def allocate_listen_port(port_range: PortRange, in_use: Mapping[str, int], network: str) -> int:
    """The listen port for `network`'s NR on this node.

    `in_use` maps network name -> port for the NRs the node already has (may include `network`).
    The network keeps its port while it lies in the range and no other network holds it (when
    two do, the lexicographically first keeps it); otherwise it gets the lowest free port.
    """
    current = in_use.get(network)
    others = {net: port for net, port in in_use.items() if net != network}
    if current is not None and port_range.min <= current <= port_range.max:
        holders = sorted(net for net, port in others.items() if port == current)
        if not holders or network < holders[0]:
            return current
    taken = set(others.values())
    for port in range(port_range.min, port_range.max + 1):
        if port not in taken:
            return port
    raise PortsExhausted(
        f"no free WireGuard listen port for network {network!r}: all "
        f"{port_range.max - port_range.min + 1} ports of {port_range.min}-{port_range.max} are in use"
    )


def allocate_workload_ips(
    subnet: ipaddress.IPv4Network,
    workloads: Sequence[Workload],
    previous: Mapping[str, ipaddress.IPv4Address],
    reserved: Mapping[str, ipaddress.IPv4Address] | None = None,
) -> tuple[dict[str, ipaddress.IPv4Address], dict[str, str]]:
    """Addresses for the workloads of one NR: (name -> ip, name -> problem).

    An address is never taken from the workload that holds it: bad or late input never hurts
    what runs. Order of precedence, each step deterministic:
    1. `reserved` (name -> ip): addresses still in use by workloads not in `workloads` (e.g. one
       whose spec became unreadable and stays attached as it was); nobody else gets them;
    2. a previous allocation is kept while still valid in `subnet`, unless the workload now pins
       another address (its own choice releases the old one); when two claim one (a damaged
       record), the first by name keeps it;
    3. a fixed `spec.ip` is honoured if valid and free; an address held by another workload
       (steps 1-2) or pinned by an earlier-named one is reported, not taken;
    4. everything else gets the lowest free host (never network, gateway or broadcast address).
    A workload that cannot get an address is reported in the problems, never raised.
    """
    allocated: dict[str, ipaddress.IPv4Address] = {}
    problems: dict[str, str] = {}
    owner: dict[ipaddress.IPv4Address, str] = {ip: name for name, ip in (reserved or {}).items()}
    by_name = sorted(workloads, key=lambda w: w.name)

    for w in by_name:
        ip = previous.get(w.name)
        if (ip is not None and w.spec.ip in (None, ip) and ip not in owner
                and not address_problems(ip, subnet)):
            owner[ip] = w.name
            allocated[w.name] = ip

    for w in by_name:
        ip = w.spec.ip
        if ip is None or w.name in allocated:
            continue
        bad = address_problems(ip, subnet)
        if bad:
            problems[w.name] = bad[0]
        elif ip in owner:
            problems[w.name] = f"ip {ip} is already used by workload {owner[ip]!r}"
        else:
            owner[ip] = w.name
            allocated[w.name] = ip

    free = _free_hosts(subnet, owner)
    for w in by_name:
        if w.name in allocated or w.spec.ip is not None:
            continue
        ip = next(free, None)
        if ip is None:
            problems[w.name] = f"no free address left in {subnet}"
            continue
        owner[ip] = w.name
        allocated[w.name] = ip
    return allocated, problems


def held_addresses(
    recorded: Mapping[str, ipaddress.IPv4Address],
    published: Mapping[str, ipaddress.IPv4Address],
) -> dict[str, ipaddress.IPv4Address]:
    """Who holds which address of an NR, as `previous` for `allocate_workload_ips`: the node's
    own record, and for a workload the record does not know (a lost or older state dir) the
    address its status says it was given. Either way a running workload keeps its address."""
    return {**published, **recorded}


def _free_hosts(subnet: ipaddress.IPv4Network, taken: Mapping[ipaddress.IPv4Address, str]):
    """Usable host addresses of `subnet` in ascending order, skipping the gateway and `taken`."""
    for ip in subnet.hosts():
        if ip not in taken and not address_problems(ip, subnet):
            yield ip


class PublicAddressesExhausted(ValueError):
    """Every address of the ndmz range is held by another NR of this node."""


def allocate_public_ip(in_use: Mapping[str, ipaddress.IPv4Address], network: str) -> ipaddress.IPv4Address:
    """The address of `network`'s public leg in the ndmz (100.64.0.0/16, never the gateway).

    `in_use` maps network -> address for the NRs the node already recorded (may include
    `network`). Like listen ports: a network keeps its address while it is valid and no other
    network holds it (of two holders the first by name keeps it); otherwise it gets the lowest
    free one. Callers record the result before using it, so it is stable across restarts.
    """
    current = in_use.get(network)
    others = {net: ip for net, ip in in_use.items() if net != network}
    if current is not None and _usable_leg(current):
        holders = sorted(net for net, ip in others.items() if ip == current)
        if not holders or network < holders[0]:
            return current
    taken = set(others.values())
    for ip in NDMZ_RANGE.hosts():
        if ip not in taken and _usable_leg(ip):
            return ip
    raise PublicAddressesExhausted(
        f"no free address for network {network!r}'s public leg: all of {NDMZ_RANGE} is in use")


def _usable_leg(ip: ipaddress.IPv4Address) -> bool:
    return ip in NDMZ_RANGE and ip != NDMZ_GATEWAY and ip not in (
        NDMZ_RANGE.network_address, NDMZ_RANGE.broadcast_address)
