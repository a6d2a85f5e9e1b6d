"""The resource model: Kubernetes-style manifests for every kind Zero-Mesh stores.

Specs are written by users (CLI or plain `etcdctl put`); `Node` registrations and the
`*Status` documents are written by node agents. Every model forbids unknown fields so that a
typo in a hand-written manifest is an error, not a silently ignored setting.

Rules that need only one object live here as pydantic validators; rules that relate objects to
each other (workload vs. its network, network vs. registered nodes) are admission's
(`controller/admission/`).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from datetime import datetime, timezone
from typing import Annotated, Literal, Union

from pydantic import (
    AfterValidator,
    BeforeValidator,
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

API_VERSION = "zmesh.io/v1"

# 100.64.0.0/10 is the carrier-grade NAT range; the ndmz of every node lives in it.
RESERVED_RANGE = ipaddress.IPv4Network("100.64.0.0/10")
# Ranges that can never carry a routed overlay: the kernel treats them as martians (loopback,
# "this network") or they are not unicast at all (multicast, reserved and limited broadcast).
UNROUTABLE_RANGES = {
    ipaddress.IPv4Network("0.0.0.0/8"): "\"this network\"",
    ipaddress.IPv4Network("127.0.0.0/8"): "loopback",
    ipaddress.IPv4Network("169.254.0.0/16"): "link-local",
    ipaddress.IPv4Network("224.0.0.0/4"): "multicast",
    ipaddress.IPv4Network("240.0.0.0/4"): "reserved",
}

NAME_MAX = 40
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


def _check_name(value: str) -> str:
    if len(value) > NAME_MAX:
        raise ValueError(f"{value!r} is longer than {NAME_MAX} characters")
    if not _NAME_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid name: use lower-case letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return value


def name_problem(value: str) -> str | None:
    """Why `value` is not a valid object name (None: it is one)."""
    try:
        _check_name(value)
    except ValueError as e:
        return str(e)
    return None


def _check_ifname(value: str) -> str:
    if not _IFNAME_RE.match(value) or value in (".", ".."):
        raise ValueError(f"{value!r} is not a valid interface name (1-15 of A-Z a-z 0-9 _ . -)")
    return value


def _check_netns(value: str) -> str:
    # A name under /var/run/netns or an absolute path such as /proc/PID/ns/net.
    if value.startswith("/"):
        if "\0" in value or ".." in value.split("/"):
            raise ValueError(f"{value!r} is not a valid namespace path")
        return value
    if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", value) or value in (".", ".."):
        raise ValueError(f"{value!r} is not a valid network namespace name or absolute path")
    return value


MAX_ENDPOINTS = 16  # more public addresses than any real node has: a bound for hostile values


def parse_public_address(v):
    """An address other nodes can send WireGuard packets to: IPv4 or IPv6 unicast, written as
    text, without a zone index (`fe80::1%eth0`: a zone is meaningless to another node, and its
    text would reach the WireGuard configuration), and never loopback, link-local, multicast,
    unspecified, reserved or IPv4-mapped."""
    if isinstance(v, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        address = v
    elif isinstance(v, str) and "%" not in v and v.isascii() and v.strip() == v:
        try:
            address = ipaddress.ip_address(v)
        except ValueError:
            raise ValueError(f"{v[:64]!r} is not an IPv4 or IPv6 address") from None
    else:
        raise ValueError(f"{str(v)[:64]!r} is not an IPv4 or IPv6 address without a zone index")
    why = _not_public(address)
    if why:
        raise ValueError(f"{address} is {why}, not an address other nodes can reach")
    return address


def _not_public(a: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    if a.is_unspecified:
        return "unspecified"
    if a.is_loopback:
        return "a loopback address"
    if a.is_link_local:
        return "link-local"
    if a.is_multicast:
        return "multicast"
    if a.version == 4 and (a.is_reserved or a in ipaddress.IPv4Network("0.0.0.0/8")):
        return "reserved"
    if a.version == 6 and a.ipv4_mapped is not None:
        return "an IPv4-mapped IPv6 address"
    return None


def _wireguard_key(v):
    """A WireGuard public key as published: standard base64 of exactly 32 bytes."""
    if not isinstance(v, str) or len(v) != 44:
        raise ValueError("not a WireGuard public key (44 characters of base64)")
    try:
        raw = base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ValueError("not a WireGuard public key (base64 of 32 bytes)")
    return v


# The JSON Schemas in crds/ say the same as the validators, so editors can check manifests early.
_NAME_SCHEMA = {"type": "string", "pattern": _NAME_RE.pattern, "minLength": 1, "maxLength": NAME_MAX}
Name = Annotated[str, AfterValidator(_check_name), WithJsonSchema(_NAME_SCHEMA)]
NodeId = Annotated[str, AfterValidator(_check_name), WithJsonSchema(_NAME_SCHEMA)]
IfName = Annotated[str, AfterValidator(_check_ifname),
                   WithJsonSchema({"type": "string", "pattern": _IFNAME_RE.pattern})]
NetnsRef = Annotated[str, AfterValidator(_check_netns), WithJsonSchema({"type": "string", "minLength": 1})]
PublicAddress = Annotated[ipaddress.IPv4Address | ipaddress.IPv6Address, BeforeValidator(parse_public_address),
                          WithJsonSchema({"type": "string", "format": "ip-address"})]
WireGuardKey = Annotated[str, AfterValidator(_wireguard_key),
                         WithJsonSchema({"type": "string", "pattern": "^[A-Za-z0-9+/]{43}=$"})]
ListenPort = Annotated[int, Field(ge=1, le=65535, strict=True)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Metadata(_Strict):
    name: Name
    # Set from etcd's mod_revision of the spec key when read; ignored when written, so a value
    # written with plain etcdctl gets a generation exactly like one written by the CLI.
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)


# --- Network ------------------------------------------------------------------------------


class NetworkResourceSpec(_Strict):
    """One node's part of a network: the node and the NR subnet its workloads live in."""

    node: NodeId
    subnet: ipaddress.IPv4Network

    @field_validator("subnet", mode="before")
    @classmethod
    def _strict_subnet(cls, v):
        return _parse_network(v)

    @field_validator("subnet")
    @classmethod
    def _subnet_usable(cls, v: ipaddress.IPv4Network):
        if v.prefixlen > 30:
            raise ValueError(f"subnet {v} is too small: a /30 or larger holds a gateway and hosts")
        if v.overlaps(RESERVED_RANGE):
            raise ValueError(f"subnet {v} overlaps {RESERVED_RANGE}, reserved for the node's ndmz")
        _check_routable("subnet", v)
        return v

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return gateway_of(self.subnet)


def gateway_of(subnet: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    """The NR's own address in its subnet (and in the mesh): the first host."""
    return subnet.network_address + 1


def address_problems(ip: ipaddress.IPv4Address, subnet: ipaddress.IPv4Network) -> list[str]:
    """Why `ip` cannot be a workload's address in the NR subnet `subnet` (empty: it can)."""
    if ip not in subnet:
        return [f"ip {ip} is outside the node's subnet {subnet}"]
    if ip == subnet.network_address:
        return [f"ip {ip} is the network address of {subnet}"]
    if ip == subnet.broadcast_address:
        return [f"ip {ip} is the broadcast address of {subnet}"]
    if ip == gateway_of(subnet):
        return [f"ip {ip} is the gateway of {subnet}, held by the network resource"]
    return []


def _check_routable(what: str, v: ipaddress.IPv4Network) -> None:
    for bad, why in UNROUTABLE_RANGES.items():
        if v.overlaps(bad):
            raise ValueError(f"{what} {v} overlaps {bad} ({why}), which cannot be routed over the mesh")


def _parse_network(v):
    if isinstance(v, ipaddress.IPv4Network):
        return v
    # Only text: pydantic would otherwise turn an integer into a /32 without complaint.
    # A bare address would silently become a /32: make the prefix length explicit.
    if not isinstance(v, str) or "/" not in v:
        raise ValueError(f"{v!r} is not an IPv4 prefix such as \"10.1.0.0/16\"")
    try:
        return ipaddress.IPv4Network(v, strict=True)
    except ValueError as e:
        if ":" in v:  # say so plainly rather than "Expected 4 octets in 'fd00::'"
            raise ValueError(f"{v!r} is an IPv6 prefix, but networks are IPv4 (such as \"10.1.0.0/16\")") from None
        try:
            loose = ipaddress.IPv4Network(v, strict=False)
        except ValueError:
            raise ValueError(f"{v!r} is not an IPv4 prefix ({e})") from None
        raise ValueError(f"{v!r} has host bits set (did you mean {loose}?)") from None


def _parse_address(v):
    if v is None or isinstance(v, ipaddress.IPv4Address):
        return v
    if not isinstance(v, str):
        raise ValueError(f"{v!r} is not an IPv4 address such as \"10.1.1.10\"")
    try:
        return ipaddress.IPv4Address(v)
    except ValueError:
        raise ValueError(f"{v!r} is not an IPv4 address") from None


class NetworkSpec(_Strict):
    ipRange: ipaddress.IPv4Network
    resources: list[NetworkResourceSpec] = Field(default_factory=list)
    # Ordered preference of public nodes that relay for hidden nodes; the first live one wins.
    aggregators: list[NodeId] = Field(default_factory=list)
    # Node whose NR is the network's sole Internet exit (None: every NR exits locally).
    egress: NodeId | None = None

    @field_validator("ipRange", mode="before")
    @classmethod
    def _strict_range(cls, v):
        return _parse_network(v)

    @field_validator("ipRange")
    @classmethod
    def _range_not_reserved(cls, v: ipaddress.IPv4Network):
        if v.overlaps(RESERVED_RANGE):
            raise ValueError(f"ipRange {v} overlaps {RESERVED_RANGE}, reserved for the node's ndmz")
        _check_routable("ipRange", v)
        return v

    @model_validator(mode="after")
    def _consistent(self):
        problems = network_spec_problems(self)
        if problems:
            raise FieldProblems(problems)
        return self

    def resource_for(self, node: str) -> NetworkResourceSpec | None:
        for r in self.resources:
            if r.node == node:
                return r
        return None

    @property
    def nodes(self) -> list[str]:
        return [r.node for r in self.resources]


class FieldProblems(ValueError):
    """Several problems of one model, each at a field path relative to it, e.g.
    ("resources[1].subnet", "subnet ... overlaps ..."): reported one line each, at full path."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{path}: {message}" if path else message for path, message in problems))


def network_spec_problems(spec: NetworkSpec) -> list[tuple[str, str]]:
    """Every problem of one network spec that needs more than one field: (path, message)."""
    problems: list[tuple[str, str]] = []
    seen_nodes: set[str] = set()
    for i, r in enumerate(spec.resources):
        if r.node in seen_nodes:
            problems.append((f"resources[{i}].node", f"node {r.node!r} appears more than once"))
        seen_nodes.add(r.node)
        if not r.subnet.subnet_of(spec.ipRange):
            problems.append((f"resources[{i}].subnet", f"subnet {r.subnet} is outside ipRange {spec.ipRange}"))
    problems += _overlap_problems(spec.resources)
    for i, agg in enumerate(spec.aggregators):
        if agg not in seen_nodes:
            problems.append((f"aggregators[{i}]", f"{agg!r} is not a node of this network"))
    if len(set(spec.aggregators)) != len(spec.aggregators):
        problems.append(("aggregators", "a node is listed more than once"))
    if spec.egress is not None and spec.egress not in seen_nodes:
        problems.append(("egress", f"{spec.egress!r} is not a node of this network"))
    return problems


def _overlap_problems(resources: list[NetworkResourceSpec]) -> list[tuple[str, str]]:
    """Overlapping subnets, in O(n log n): a sweep over the subnets sorted by start address,
    each compared with the widest-reaching one before it (a pairwise check is quadratic and took
    minutes on a 1 MB spec written by hand, in every reader of it, agents included)."""
    found: set[tuple[int, int]] = set()
    order = sorted(range(len(resources)), key=lambda i: (int(resources[i].subnet.network_address), i))
    reach = None  # index of the subnet reaching furthest so far
    for i in order:
        if reach is not None and resources[i].subnet.overlaps(resources[reach].subnet):
            found.add((min(i, reach), max(i, reach)))
        if reach is None or resources[i].subnet.broadcast_address > resources[reach].subnet.broadcast_address:
            reach = i
    problems = []
    for i, j in sorted(found, key=lambda p: (p[1], p[0])):
        a, b = resources[i], resources[j]
        problems.append((f"resources[{j}].subnet",
                         f"subnet {b.subnet} (node {b.node}) overlaps {a.subnet} (node {a.node})"))
    return problems


class _Object(_Strict):
    """What every stored kind shares: the API version, the metadata and its name."""

    apiVersion: Literal["zmesh.io/v1"] = API_VERSION
    metadata: Metadata

    @property
    def name(self) -> str:
        return self.metadata.name


class Network(_Object):
    kind: Literal["Network"] = "Network"
    spec: NetworkSpec


# --- Workload -----------------------------------------------------------------------------


class WorkloadSpec(_Strict):
    """A container's network namespace joined to a network on one node."""

    network: Name
    node: NodeId
    netns: NetnsRef
    # A fixed address in the node's subnet; when absent the node's agent allocates one.
    ip: ipaddress.IPv4Address | None = None
    interface: IfName = "eth0"

    @field_validator("ip", mode="before")
    @classmethod
    def _strict_ip(cls, v):
        return _parse_address(v)


class Workload(_Object):
    kind: Literal["Workload"] = "Workload"
    spec: WorkloadSpec


# --- Node ---------------------------------------------------------------------------------


class PortRange(_Strict):
    min: int = Field(51820, ge=1, le=65535)
    max: int = Field(52819, ge=1, le=65535)

    @model_validator(mode="after")
    def _ordered(self):
        if self.min > self.max:
            raise ValueError(f"listen port range {self.min}-{self.max} is empty")
        return self

    @classmethod
    def parse(cls, text: str) -> "PortRange":
        lo, sep, hi = text.partition("-")
        try:
            lo_, hi_ = int(lo), int(hi if sep else lo)
        except ValueError:
            raise ValueError(f"bad port range {text!r}: expected MIN-MAX") from None
        if not 1 <= lo_ <= hi_ <= 65535:
            raise ValueError(f"bad port range {text!r}: need 1 <= MIN <= MAX <= 65535")
        return cls(min=lo_, max=hi_)


class NodeSpec(_Strict):
    # Public addresses (IPv4 and/or IPv6) other nodes can reach; none means the node is hidden.
    endpoints: list[PublicAddress] = Field(default_factory=list, max_length=MAX_ENDPOINTS)
    listenPortRange: PortRange = Field(default_factory=PortRange)
    version: str = ""
    capabilities: list[str] = Field(default_factory=list)

    @property
    def hidden(self) -> bool:
        return not self.endpoints


class Node(_Object):
    kind: Literal["Node"] = "Node"
    spec: NodeSpec


# --- Status -------------------------------------------------------------------------------


ConditionStatus = Literal["True", "False", "Unknown"]


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


MAX_CONDITIONS = 16
MAX_MESSAGE = 1024  # a condition message names a few subjects and a count, never all of them


class Condition(_Strict):
    type: str = Field(max_length=64)
    status: ConditionStatus
    reason: str = Field("", max_length=64)
    message: str = Field("", max_length=MAX_MESSAGE)
    lastTransitionTime: datetime = Field(default_factory=utcnow)


def set_condition(conditions: list[Condition], new: Condition) -> list[Condition]:
    """Replace the condition of the same type, keeping its transition time if status is unchanged."""
    out = []
    replaced = False
    for c in conditions:
        if c.type == new.type:
            if c.status == new.status:
                new = new.model_copy(update={"lastTransitionTime": c.lastTransitionTime})
            out.append(new)
            replaced = True
        else:
            out.append(c)
    if not replaced:
        out.append(new)
    return out


class AggregatorStatus(_Strict):
    """The aggregator this node derived for the network (planner.aggregator), why, and when its
    choice last changed. Every node derives it from the same etcd data, so all say the same."""

    node: NodeId | None = None  # None: no aggregator is usable
    reason: str = Field(max_length=64)  # Preferred | FailedOver | NoneForwarding | NoAggregator
    message: str = Field("", max_length=MAX_MESSAGE)
    lastSwitchTime: datetime  # when this node's choice last changed (or was first made)
    switches: int = Field(0, ge=0)  # how often it changed since this node's NR was created


class ResourceStatus(_Strict):
    """How one node's NR of one network is doing: conditions for people and tools. Peers never
    read it (they read `NetworkResourceFacts`), so a condition change wakes no other node."""

    apiVersion: Literal["zmesh.io/v1"] = API_VERSION
    kind: Literal["NetworkResourceStatus"] = "NetworkResourceStatus"
    network: Name
    node: NodeId
    observedGeneration: int = 0
    conditions: list[Condition] = Field(default_factory=list, max_length=MAX_CONDITIONS)
    aggregator: AggregatorStatus | None = None
    # Where the NR's Internet traffic leaves, for `zmesh describe`: the address of its public
    # leg in the node's ndmz, and the node whose WireGuard peer carries it instead when the
    # network has an egress NR elsewhere (None: through its own leg).
    publicAddress: ipaddress.IPv4Address | None = None
    internetVia: NodeId | None = None


class NetworkResourceFacts(_Strict):
    """What the other NRs of a network need to peer with one node's NR, and nothing else (never
    a private key). Written by that node's agent; read by every peer, so strictly validated:
    a value that fails here is reported and that one peer is not peered."""

    apiVersion: Literal["zmesh.io/v1"] = API_VERSION
    kind: Literal["NetworkResourceFacts"] = "NetworkResourceFacts"
    network: Name
    node: NodeId
    publicKey: WireGuardKey
    listenPort: ListenPort
    # None: the node is hidden (behind NAT); it dials out and peers learn its address.
    endpoints: list[PublicAddress] = Field(default_factory=list, max_length=MAX_ENDPOINTS)
    subnet: ipaddress.IPv4Network

    @field_validator("subnet", mode="before")
    @classmethod
    def _strict_subnet(cls, v):
        return _parse_network(v)

    @property
    def public(self) -> bool:
        return bool(self.endpoints)


# Probe verdicts: how the tunnels this node probes are doing (the states of
# controller.planner.aggregator). Peers of the network read them to agree on the aggregator.
VerdictState = Literal["Forwarding", "Failing", "Recovering"]
MAX_VERDICTS = 64  # the candidate aggregators a node probes per network, at most


class TunnelVerdict(_Strict):
    node: NodeId  # the node whose NR is probed
    state: VerdictState
    since: datetime  # when this prober's verdict took this state


class NetworkResourceVerdicts(_Strict):
    """One node's verdicts about the tunnels of its NR of a network to the candidate aggregators
    it probes. Written by that node's agent only when a verdict changes (never per probe), read
    by every peer of the network, so validated as strictly as facts."""

    apiVersion: Literal["zmesh.io/v1"] = API_VERSION
    kind: Literal["NetworkResourceVerdicts"] = "NetworkResourceVerdicts"
    network: Name
    node: NodeId  # the prober
    verdicts: list[TunnelVerdict] = Field(default_factory=list, max_length=MAX_VERDICTS)

    @model_validator(mode="after")
    def _one_per_node(self):
        seen = set()
        for v in self.verdicts:
            if v.node == self.node:
                raise ValueError(f"verdicts: node {v.node!r} cannot judge its own tunnel")
            if v.node in seen:
                raise ValueError(f"verdicts: node {v.node!r} appears more than once")
            seen.add(v.node)
        return self

    def states(self) -> dict[str, str]:
        return {v.node: v.state for v in self.verdicts}


class WorkloadStatus(_Strict):
    apiVersion: Literal["zmesh.io/v1"] = API_VERSION
    kind: Literal["WorkloadStatus"] = "WorkloadStatus"
    workload: Name
    node: NodeId
    network: Name | None = None  # the network it is attached to (None: its spec is unreadable)
    observedGeneration: int = 0
    conditions: list[Condition] = Field(default_factory=list, max_length=MAX_CONDITIONS)
    # The address in use: the spec's fixed ip, or the one the node allocated (kept stable).
    ip: ipaddress.IPv4Address | None = None


EVENT_REASON = r"^[A-Z][A-Za-z0-9]{0,63}$"


class NodeEvent(_Strict):
    """Something that happened on one node, about its NR of a network (or the node itself):
    kept for a while under the node's own prefix (docs/observability.md, "Events") and shown by
    `zmesh describe`. Repeats of one event update it (count, lastTimestamp) instead of adding."""

    apiVersion: Literal["zmesh.io/v1"] = API_VERSION
    kind: Literal["Event"] = "Event"
    node: NodeId
    network: Name | None = None  # None: about the node itself
    type: Literal["Normal", "Warning"]
    reason: str = Field(pattern=EVENT_REASON)
    message: str = Field("", max_length=MAX_MESSAGE)
    count: int = Field(1, ge=1)
    firstTimestamp: datetime
    lastTimestamp: datetime


SpecObject = Union[Network, Workload]
AnyObject = Union[Network, Workload, Node]
KINDS: dict[str, type[BaseModel]] = {
    "Network": Network,
    "Workload": Workload,
    "Node": Node,
}
# Documents written by agents; parse_object accepts them only when asked for by kind.
STATUS_KINDS: dict[str, type[BaseModel]] = {
    "NetworkResourceStatus": ResourceStatus,
    "NetworkResourceFacts": NetworkResourceFacts,
    "NetworkResourceVerdicts": NetworkResourceVerdicts,
    "WorkloadStatus": WorkloadStatus,
    "Event": NodeEvent,
}
