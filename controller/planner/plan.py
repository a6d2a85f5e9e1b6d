"""plan_network(): the desired state of one node's NR of one network, from the network spec, the
facts other nodes published (NetworkResourceFacts), node liveness and this node's own facts.

Pure: no I/O, no clock, no randomness. The result is frozen, hashable and comparable, with every
collection sorted, so equal inputs give equal plans and "nothing changed" is a plain `==`.
Rules (docs/planner.md has the full list with reasons):
- a public NR peers with every other public NR whose facts are published;
- a hidden NR peers only with the effective aggregator (aggregator.choose_aggregator: the first
  candidate that is public, published, alive and not blamed by the probe verdicts);
  AllowedIPs = the whole ipRange, keepalive 25 s;
- the aggregator peers with each hidden NR (no endpoint: the hidden side initiates); the other
  candidates hold them as standby peers without AllowedIPs, ready for a failover;
- other public NRs route the hidden subnets through the aggregator's peer;
- one route via the WireGuard interface per AllowedIPs prefix;
- probes: a public NR probes every candidate aggregator it peers with, a hidden NR its aggregator;
- Internet: the NR's `public` leg into the ndmz, default route via the ndmz gateway, unless the
  network has an egress NR elsewhere: then the peer towards it carries 0.0.0.0/0 (a hidden NR's
  only peer, the aggregator, relays it); the NR's nftables ruleset (rulesets.nr_ruleset).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from controller.models.nftables import Table
from controller.models.resources import MAX_VERDICTS, Network, NetworkResourceFacts, Workload

from . import names
from .aggregator import AggregatorChoice, choose_aggregator
from .ndmz import NDMZ_GATEWAY, NDMZ_RANGE
from .rulesets import nr_ruleset

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Outer IP header + UDP (8) + WireGuard data header (16) + auth tag (16): 60 bytes over IPv4,
# 80 over IPv6. The NR's MTU subtracts the overhead of the families its tunnels actually use, so
# tunnelled packets never fragment or black-hole, and an IPv4-only mesh keeps 20 more bytes.
IPV4_OVERHEAD = 60
IPV6_OVERHEAD = 80
WG_OVERHEAD = IPV6_OVERHEAD  # the worst case
MIN_UNDERLAY_MTU = 1280  # IPv6's minimum; WireGuard over IPv6 needs at least this
HIDDEN_KEEPALIVE = 25  # seconds; keeps the NAT mapping of a hidden node open

# Reasons of plan issues; the reconciler turns them into status conditions.
PEER_PENDING = "PeerPending"  # a peer's facts (key, port, endpoints) are not published yet
NO_COMMON_FAMILY = "NoCommonAddressFamily"  # a public peer has no address family we have
NO_AGGREGATOR = "NoAggregator"  # hidden NRs exist but no aggregator is usable
WORKLOAD_PENDING = "WorkloadAddressPending"  # a workload has no allocated address
INVALID_FACTS = "InvalidPeerFacts"  # published facts are malformed, or their key is another NR's
SUBNET_PENDING = "PeerSubnetPending"  # a peer publishes another subnet than the spec gives it
INVALID_VERDICTS = "InvalidPeerVerdicts"  # published probe verdicts are malformed: ignored
EGRESS_UNREACHABLE = "EgressUnreachable"  # the network's egress NR cannot be reached: no Internet

INTERNET = ipaddress.IPv4Network("0.0.0.0/0")


@dataclass(frozen=True)
class NodeContext:
    """What this node knows about itself. `endpoints` empty means the node is hidden."""

    node_id: str
    name_prefix: str = ""
    endpoints: tuple[IPAddress, ...] = ()
    underlay_mtu: int = 1500

    def __post_init__(self):
        names.check_prefix(self.name_prefix)
        # Accept any iterable of addresses or strings; keep a tuple so the context stays hashable.
        object.__setattr__(self, "endpoints", tuple(ipaddress.ip_address(a) for a in self.endpoints))
        if self.underlay_mtu < MIN_UNDERLAY_MTU:
            raise ValueError(f"underlay MTU {self.underlay_mtu} is below {MIN_UNDERLAY_MTU}")

    @property
    def hidden(self) -> bool:
        return not self.endpoints


@dataclass(frozen=True)
class LocalFacts:
    """This node's own NR facts: its public key (base64), allocated listen port and the
    allocated address of its public leg in the ndmz (None: no Internet leg planned)."""

    public_key: str
    listen_port: int
    public_ip: ipaddress.IPv4Address | None = None


@dataclass(frozen=True, order=True)
class DesiredPeer:
    public_key: str  # base64, as published
    endpoint: str | None  # "ip:port" or "[v6]:port"; None: the peer initiates
    allowed_ips: tuple[ipaddress.IPv4Network, ...]
    persistent_keepalive: int | None = None
    node: str = field(default="", compare=False)  # for messages and metrics only


@dataclass(frozen=True, order=True)
class WorkloadAttachment:
    workload: str
    veth: str  # NR-side name, attached to the bridge
    netns: str  # the workload's namespace (name or /proc path)
    interface: str  # name inside the workload namespace
    address: ipaddress.IPv4Interface  # ip/prefix
    gateway: ipaddress.IPv4Address
    mtu: int


@dataclass(frozen=True)
class PublicLeg:
    """The NR's veth into the ndmz: `ifname` inside the NR, `ndmz_port` on the ndmz bridge."""

    ifname: str
    ndmz_port: str
    address: ipaddress.IPv4Interface  # e.g. 100.64.0.2/16
    gateway: ipaddress.IPv4Address  # the ndmz gateway
    default_route: bool  # False: the network exits through an egress NR elsewhere


@dataclass(frozen=True, order=True)
class ProbeTarget:
    """A tunnel this NR probes: the echo goes to `address` (the gateway of the peer's NR)."""

    node: str
    public_key: str
    address: ipaddress.IPv4Address


@dataclass(frozen=True, order=True)
class Issue:
    reason: str
    message: str
    subject: str = ""  # the node or workload concerned


@dataclass(frozen=True)
class DesiredNR:
    network: str
    netns: str
    wg_ifname: str
    listen_port: int
    public_key: str
    bridge: str
    gateway: ipaddress.IPv4Interface  # e.g. 10.1.1.1/24, on the bridge
    mtu: int  # of the WireGuard interface, the bridge and the workload veths
    hidden: bool
    aggregator: str | None  # the node relaying for hidden NRs, None when none is usable
    peers: tuple[DesiredPeer, ...]
    routes: tuple[ipaddress.IPv4Network, ...]  # each via wg_ifname
    workloads: tuple[WorkloadAttachment, ...]
    issues: tuple[Issue, ...]
    public: PublicLeg | None = None
    # Where Internet traffic leaves: None through this NR's own public leg, else the node of
    # the peer carrying 0.0.0.0/0 (the egress NR, or the aggregator relaying towards it).
    internet_via: str | None = None
    ruleset: Table | None = None
    probes: tuple[ProbeTarget, ...] = ()  # the tunnels whose verdicts this node publishes
    # The aggregator choice behind `aggregator`: why, and every candidate's state (plan_network
    # always sets it).
    choice: AggregatorChoice | None = None

    @property
    def pending(self) -> tuple[str, ...]:
        """Nodes whose facts are still awaited."""
        return tuple(i.subject for i in self.issues if i.reason == PEER_PENDING)


def format_endpoint(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def choose_endpoint(ours: Sequence[IPAddress], theirs: Sequence[IPAddress]) -> IPAddress | None:
    """Their address in the family both sides have, IPv4 first (cheaper headers, and NAT/IPv6
    firewalls are more often a problem for v6); the first such address they published. None
    when there is no common family. A hidden side (`ours` empty) connects out over IPv4 if the
    peer has it, else IPv6."""
    families = (4, 6) if not ours else [v for v in (4, 6) if any(a.version == v for a in ours)]
    for version in families:
        for address in theirs:
            if address.version == version:
                return address
    return None


@dataclass(frozen=True)
class _Remote:
    node: str
    subnet: ipaddress.IPv4Network
    facts: NetworkResourceFacts

    @property
    def public(self) -> bool:
        return self.facts.public


def plan_network(
    ctx: NodeContext,
    network: Network,
    facts: Mapping[str, NetworkResourceFacts],
    alive: set[str] | frozenset[str] | None,
    workloads: Sequence[Workload],
    local: LocalFacts,
    ip_allocations: Mapping[str, ipaddress.IPv4Address],
    bad_facts: Mapping[str, str] | None = None,
    verdicts: Mapping[str, Mapping[str, str]] | None = None,
    bad_verdicts: Mapping[str, str] | None = None,
) -> DesiredNR | None:
    """The desired NR of `network` on `ctx.node_id`, or None if the node takes no part in it.

    `facts`: node -> the facts that node published for this network (entries of nodes not in
    the network are ignored; facts naming another network or node are not trusted; this node's
    own entry only tells whether it has published, which it must have to be a candidate
    aggregator, as for everyone). `bad_facts`: node -> why what it published is not valid facts
    (reported, not peered); valid facts naming another subnet than the spec gives that node
    are reported (`PeerSubnetPending`) and peered by the spec's subnet. `alive`: nodes with a live lease, this one included, None when
    liveness is unknown (then every node counts as alive). `verdicts`: prober -> probed node ->
    verdict state, as published (aggregator.py); `bad_verdicts`: node -> why what it published
    is not valid verdicts (reported; that node's verdicts count as none). `workloads`: any
    workloads; those of this node and network are attached, with addresses from `ip_allocations`.
    """
    spec = network.spec
    own = spec.resource_for(ctx.node_id)
    if own is None:
        return None
    issues: list[Issue] = []
    bad_facts = bad_facts or {}

    remotes: list[_Remote] = []
    key_owner = {local.public_key: ctx.node_id}
    for r in sorted(spec.resources, key=lambda r: r.node):
        if r.node == ctx.node_id:
            continue
        published = facts.get(r.node)
        if r.node in bad_facts:
            issues.append(Issue(INVALID_FACTS, f"node {r.node!r} published invalid facts "
                                f"({bad_facts[r.node]}); not peering with it", r.node))
        elif published is None or (published.network, published.node) != (network.name, r.node):
            issues.append(Issue(PEER_PENDING, f"node {r.node!r} has not published its facts for "
                                f"network {network.name!r} yet", r.node))
        elif published.publicKey in key_owner:
            # WireGuard identifies peers by key: two NRs with one key would steal each other's
            # AllowedIPs. The first by node name keeps it (deterministic on every node).
            issues.append(Issue(INVALID_FACTS, f"node {r.node!r} published the same public key "
                                f"as node {key_owner[published.publicKey]!r}; not peering with it",
                                r.node))
        else:
            key_owner[published.publicKey] = r.node
            remotes.append(_Remote(r.node, r.subnet, published))  # AllowedIPs: the spec's subnet
            if published.subnet != r.subnet:
                # Usually a subnet change the peer has not applied yet (it clears when it has);
                # else a peer that is wrong. Either way the spec decides, and it stays peered.
                issues.append(Issue(SUBNET_PENDING, f"waiting for node {r.node!r} to apply subnet "
                                    f"{r.subnet} (it publishes {published.subnet})", r.node))
    hidden_remotes = [r for r in remotes if not r.public]
    for node, why in sorted((bad_verdicts or {}).items()):
        if spec.resource_for(node) is not None:
            issues.append(Issue(INVALID_VERDICTS, f"node {node!r} published invalid probe verdicts "
                                f"({why}); they are ignored", node))

    choice = _choose_aggregator(ctx, network, facts, remotes, alive, verdicts or {})
    aggregator = choice.node
    peers: list[DesiredPeer] = []
    if ctx.hidden:
        peers += _hidden_peers(ctx, network, remotes, choice, issues)
    else:
        standby = any(c.node == ctx.node_id for c in choice.candidates)
        peers += _public_peers(ctx, remotes, hidden_remotes, aggregator, standby, issues)
        if hidden_remotes and aggregator is None:
            issues.append(Issue(NO_AGGREGATOR, choice.message + "; hidden subnets "
                                + ", ".join(str(r.subnet) for r in hidden_remotes)
                                + " are unreachable from this node"))

    internet_via = None
    if spec.egress is not None and spec.egress != ctx.node_id:
        internet_via = _egress_via(ctx, network, aggregator, hidden_remotes, peers, issues)
        if internet_via is not None:
            peers = [p if p.node != internet_via else DesiredPeer(
                p.public_key, p.endpoint, tuple(sorted({*p.allowed_ips, INTERNET})),
                p.persistent_keepalive, p.node) for p in peers]
    public = None  # no address allocated: no public leg planned (the reconciler always has one)
    if local.public_ip is not None:
        public = PublicLeg(
            ifname=names.NR_PUBLIC_IFNAME, ndmz_port=names.ndmz_port(network.name),
            address=ipaddress.IPv4Interface(f"{local.public_ip}/{NDMZ_RANGE.prefixlen}"),
            gateway=NDMZ_GATEWAY, default_route=spec.egress in (None, ctx.node_id))

    mtu = ctx.underlay_mtu - tunnel_overhead(ctx, peers)
    gateway = ipaddress.IPv4Interface(f"{own.gateway}/{own.subnet.prefixlen}")
    attachments = []
    for w in sorted(workloads, key=lambda w: w.name):
        if w.spec.node != ctx.node_id or w.spec.network != network.name:
            continue
        ip = ip_allocations.get(w.name)
        if ip is None:
            issues.append(Issue(WORKLOAD_PENDING, f"workload {w.name!r} has no address yet", w.name))
            continue
        attachments.append(WorkloadAttachment(
            workload=w.name,
            veth=names.workload_veth(ctx.name_prefix, w.name),
            netns=w.spec.netns,
            interface=w.spec.interface,
            address=ipaddress.IPv4Interface(f"{ip}/{own.subnet.prefixlen}"),
            gateway=own.gateway,
            mtu=mtu,
        ))

    return DesiredNR(
        network=network.name,
        netns=names.nr_netns(ctx.name_prefix, network.name),
        wg_ifname=names.wg_ifname(ctx.name_prefix, network.name),
        listen_port=local.listen_port,
        public_key=local.public_key,
        bridge=names.NR_BRIDGE,
        gateway=gateway,
        mtu=mtu,
        hidden=ctx.hidden,
        aggregator=aggregator,
        choice=choice,
        peers=tuple(sorted(peers)),
        routes=tuple(sorted({prefix for p in peers for prefix in p.allowed_ips})),
        workloads=tuple(attachments),
        issues=tuple(sorted(issues)),
        public=public,
        internet_via=internet_via,
        ruleset=nr_ruleset(own.subnet),
        probes=_probes(ctx, network, choice, remotes, peers),
    )


def _egress_via(ctx: NodeContext, network: Network, aggregator: str | None,
                hidden_remotes: Sequence[_Remote], peers: Sequence[DesiredPeer],
                issues: list[Issue]) -> str | None:
    """The node whose peer carries 0.0.0.0/0 towards the network's egress NR (not this node):
    the egress itself when we peer with it; else, when this NR or the egress is hidden, the
    aggregator that relays between them (the egress accepts the relayed traffic because the
    aggregator's peer there carries the hidden subnets). None, with an issue, when there is no
    such path: the NR then has no Internet at all rather than leaving locally."""
    egress = network.spec.egress
    peered = {p.node for p in peers if p.allowed_ips}  # not standby peers
    if egress in peered:
        return egress
    relayed = ctx.hidden or egress in {r.node for r in hidden_remotes}
    if relayed and aggregator in peered:
        return aggregator
    issues.append(Issue(EGRESS_UNREACHABLE, f"network {network.name!r} leaves to the Internet "
                        f"through node {egress!r}, which this NR has no path to (yet); "
                        "no Internet access meanwhile", egress))
    return None


def tunnel_overhead(ctx: NodeContext, peers: Sequence[DesiredPeer]) -> int:
    """Bytes the tunnel adds to an overlay packet: IPv6's if any tunnel of this NR runs over
    IPv6, else IPv4's. Peers without an endpoint (hidden NRs calling in) and an NR with no peers
    yet use the family others reach this node by (IPv4 first, as choose_endpoint does)."""
    families = {6 if p.endpoint.startswith("[") else 4 for p in peers if p.endpoint}
    if not peers or any(p.endpoint is None for p in peers):
        families.add(4 if ctx.hidden or any(a.version == 4 for a in ctx.endpoints) else 6)
    return IPV6_OVERHEAD if 6 in families else IPV4_OVERHEAD


def _choose_aggregator(ctx: NodeContext, network: Network, facts: Mapping[str, NetworkResourceFacts],
                       remotes: Sequence[_Remote], alive: set[str] | frozenset[str] | None,
                       verdicts: Mapping[str, Mapping[str, str]]) -> AggregatorChoice:
    """aggregator.choose_aggregator over what every node reads alike: the peers whose facts are
    usable, and this node only once it has published its own (what the others judge it by)."""
    mine = facts.get(ctx.node_id)
    published = {r.node for r in remotes}
    public = {r.node for r in remotes if r.public}
    if mine is not None and (mine.network, mine.node) == (network.name, ctx.node_id):
        published.add(ctx.node_id)
        if not ctx.hidden:
            public.add(ctx.node_id)
    return choose_aggregator(network.name, network.spec.aggregators, network.spec.nodes, public,
                             published, alive, verdicts)


def _probes(ctx: NodeContext, network: Network, choice: AggregatorChoice, remotes: Sequence[_Remote],
            peers: Sequence[DesiredPeer]) -> tuple[ProbeTarget, ...]:
    """The tunnels whose verdicts decide the aggregator, as far as this NR has them: a public NR
    probes every candidate it peers with (so a failed-over one is still watched and can
    recover), a hidden NR its one peer, the aggregator in effect."""
    peered = {p.node for p in peers if p.allowed_ips}
    by_node = {r.node: r for r in remotes}
    nodes = ([choice.node] if ctx.hidden and choice.node else
             [c.node for c in choice.candidates] if not ctx.hidden else [])
    targets = [ProbeTarget(n, by_node[n].facts.publicKey, by_node[n].subnet.network_address + 1)
               for n in nodes if n in peered and n in by_node]
    return tuple(sorted(targets[:MAX_VERDICTS]))


def _hidden_peers(ctx: NodeContext, network: Network, remotes: Sequence[_Remote],
                  choice: AggregatorChoice, issues: list[Issue]) -> list[DesiredPeer]:
    """A hidden NR reaches the whole network through the aggregator, and only through it."""
    if choice.node is None:
        issues.append(Issue(NO_AGGREGATOR, choice.message + "; this hidden NR has no peers"))
        return []
    agg = next(r for r in remotes if r.node == choice.node)
    address = choose_endpoint(ctx.endpoints, agg.facts.endpoints)
    return [DesiredPeer(
        public_key=agg.facts.publicKey,
        endpoint=format_endpoint(address, agg.facts.listenPort),
        allowed_ips=(network.spec.ipRange,),
        persistent_keepalive=HIDDEN_KEEPALIVE,
        node=agg.node,
    )]


def _public_peers(ctx: NodeContext, remotes: Sequence[_Remote], hidden_remotes: Sequence[_Remote],
                  aggregator: str | None, standby: bool, issues: list[Issue]) -> list[DesiredPeer]:
    peers = []
    hidden_subnets = tuple(sorted(r.subnet for r in hidden_remotes))
    if aggregator == ctx.node_id:
        # The hidden side initiates (it is behind NAT) and keeps the path open.
        peers += [DesiredPeer(r.facts.publicKey, None, (r.subnet,), None, r.node)
                  for r in hidden_remotes]
    elif standby:
        # A candidate that is not in effect knows the hidden NRs already, without a subnet: a
        # hidden NR failing over to it completes its handshake at once, whichever of the two
        # applies the move first (else a lost race costs WireGuard's 5 s retry). Its packets
        # are dropped until the subnet moves here (no AllowedIPs, no route).
        peers += [DesiredPeer(r.facts.publicKey, None, (), None, r.node) for r in hidden_remotes]
    for r in remotes:
        if not r.public:
            continue
        address = choose_endpoint(ctx.endpoints, r.facts.endpoints)
        if address is None:
            message = (f"node {r.node!r} publishes only {_families(r.facts.endpoints)} endpoints "
                       f"and this node has only {_families(ctx.endpoints)}: it is unreachable")
            if r.node == aggregator and hidden_subnets:
                message += (", and so are the hidden subnets it relays ("
                            + ", ".join(map(str, hidden_subnets)) + ")")
            issues.append(Issue(NO_COMMON_FAMILY, message, r.node))
            continue
        allowed = (r.subnet,) + (hidden_subnets if r.node == aggregator else ())
        peers.append(DesiredPeer(r.facts.publicKey, format_endpoint(address, r.facts.listenPort),
                                 tuple(sorted(allowed)), None, r.node))
    return peers


def _families(addresses: Sequence[IPAddress]) -> str:
    return "/".join(f"IPv{v}" for v in sorted({a.version for a in addresses}))
