"""`zmesh`, the command line of Zero-Mesh, and `zmeshd`, the node agent's entry point.

The error contract (docs/cli.md): results on stdout; every problem one line on stderr prefixed
`zmesh: `; exit 0 ok, 1 failed, 2 usage (argparse's errors included), 130 interrupted. Nothing
ends in a traceback (set ZMESH_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import difflib
import inspect
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from controller.models.resources import Network
from controller.planner.ndmz import UplinkConfig
from controller.store.access import ConfigError, EtcdAccess, read_password_file
from controller.reconciler.config import (
    DEFAULT_METRICS_ADDR,
    DEFAULT_OBSERVE_INTERVAL,
    DEFAULT_PEER_SERIES_LIMIT,
    DEFAULT_STALE_AFTER,
    DEFAULT_PREFIX,
    DEFAULT_STATE_DIR,
    LOG_LEVELS,
    AgentConfig,
    parse_endpoint,
    parse_count,
    parse_host_port,
    parse_interface_address,
    parse_interval,
    parse_ipv4,
    parse_node_id,
    split_endpoints,
)

from . import output
from .manifests import SPEC_KINDS, read_manifests
from .store import InvalidObject, StoreView, cannot_reach, is_store_error, open_store

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# kubectl-style singular, plural and short kind names.
KIND_ALIASES = {
    "network": "Network", "networks": "Network", "net": "Network", "nets": "Network",
    "workload": "Workload", "workloads": "Workload", "wl": "Workload",
    "node": "Node", "nodes": "Node",
}
APPLY_ATTEMPTS = 10  # rounds of review-then-write while other writers of a network keep winning


class CliError(Exception):
    """An error to print as one line (prefixed `zmesh: `), exit 1."""

    code = EXIT_ERROR


class UsageError(CliError):
    """The command line itself is wrong (a bad flag value, a kind that cannot be used): exit 2."""

    code = EXIT_USAGE


class Problems(Exception):
    """Several problems, each printed on its own line."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("\n".join(lines))


# --- argument parsing -----------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse with the error contract: a usage error is one `zmesh: ` line and exit 2. No
    abbreviations: `--etcd-password SECRET` must be an unknown flag, never an abbreviation of
    --etcd-password-file (whose error would echo the "path")."""

    # Values that followed a password-looking flag on this command line: an error message must
    # never repeat them (argparse echoes unknown arguments and invalid choices verbatim).
    _secrets: tuple[str, ...] = ()

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        if namespace is None:  # the top-level call, not a subparser's
            Parser._secrets = _password_values(sys.argv[1:] if args is None else list(args))
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        root = self.prog.split()[0]
        hint = f"see '{self.prog} --help'"
        if Parser._secrets:
            for secret in sorted(Parser._secrets, key=len, reverse=True):
                message = message.replace(secret, "***")
            hint = "a password is only ever read from a file: --etcd-password-file"
        self.exit(EXIT_USAGE, f"{root}: {message} ({hint})\n")


def _password_values(argv: Sequence[str]) -> tuple[str, ...]:
    """What was typed as a password: `--x-password VALUE` or `--x-password=VALUE` (a *-file flag
    names a path, not a secret)."""
    found = []
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if not flag.startswith("--") or "password" not in flag or flag.endswith("-file"):
            continue
        if eq:
            found.append(value)
        elif i + 1 < len(argv):
            found.append(argv[i + 1])
    return tuple(v for v in found if v)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("zero-mesh")
    except PackageNotFoundError:
        return "unknown"


def _connection_options(parser: argparse.ArgumentParser, top: bool) -> None:
    # Accepted before and after the command; SUPPRESS below the top keeps a value given before
    # the command from being overwritten by the command's default.
    d = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    parser.add_argument("--etcd", action="append", metavar="HOST:PORT[,HOST:PORT...]", default=d(None),
                        help="etcd endpoints, comma-separated or repeated "
                             "(default: $ZMESH_ETCD, else 127.0.0.1:2379)")
    parser.add_argument("--prefix", default=d(None), metavar="PREFIX",
                        help="etcd key prefix (default: $ZMESH_PREFIX, else /zmesh/)")
    parser.add_argument("--timeout", type=_seconds, default=d(5.0), metavar="SECONDS",
                        help="etcd request timeout (default: 5)")
    _etcd_security_options(parser, d)


# etcdctl's names; each flag's default is its environment variable.
ETCD_SECURITY_FLAGS = {
    "etcd_cacert": ("--etcd-cacert", "FILE", "ZMESH_ETCD_CACERT",
                    "CA certificate (PEM) that verifies etcd's server certificate; implies https "
                    "(https without it: the system's trust roots)"),
    "etcd_cert": ("--etcd-cert", "FILE", "ZMESH_ETCD_CERT", "client certificate (PEM) for etcd"),
    "etcd_key": ("--etcd-key", "FILE", "ZMESH_ETCD_KEY", "key of the client certificate (PEM)"),
    "etcd_user": ("--etcd-user", "NAME", "ZMESH_ETCD_USER", "etcd user name (with --etcd-password-file)"),
    "etcd_password_file": ("--etcd-password-file", "FILE", "ZMESH_ETCD_PASSWORD_FILE",
                           "file whose first line is the etcd user's password (never give it in argv)"),
}


def _etcd_security_options(parser: argparse.ArgumentParser, d) -> None:
    for dest, (flag, metavar, env, help_) in ETCD_SECURITY_FLAGS.items():
        parser.add_argument(flag, dest=dest, metavar=metavar, default=d(None), help=f"{help_} (default: ${env})")


def _seconds(text: str) -> float:
    # 0, a negative, nan or inf timeout used to end as "cannot reach etcd (DEADLINE_EXCEEDED)".
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


def _workers(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of workers from 1 to 64")
    return int(text)


def _kind(allowed: Sequence[str]):
    """An argparse type: a kind name or alias among `allowed`, with a suggestion for a typo."""
    def convert(text: str) -> str:
        kind = KIND_ALIASES.get(text.lower())
        if kind in allowed:
            return kind
        names = [k for k, v in KIND_ALIASES.items() if v in allowed]
        guess = difflib.get_close_matches(text.lower(), names, n=1, cutoff=0.75)
        hint = f" (did you mean {guess[0]}?)" if guess else ""
        raise argparse.ArgumentTypeError(
            f"unknown kind {text!r}{hint}: use {' | '.join(k.lower() + 's' for k in allowed)}")
    convert.__name__ = "kind"
    return convert


def _output_option(parser: argparse.ArgumentParser, choices=("table", "wide", "name", "json", "yaml")) -> None:
    parser.add_argument("-o", "--output", choices=choices, default=choices[0],
                        help=f"output format: {', '.join(choices)} (default: {choices[0]})")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="zmesh",
        description="Zero-Mesh: encrypted WireGuard overlay networks, desired state in etcd.",
        epilog="Run 'zmesh COMMAND --help' for the options of a command.",
    )
    p.add_argument("--version", action="version", version=f"zmesh {package_version()}")
    _connection_options(p, top=True)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    def add(name, help_, connection=True, **kw):
        sp = sub.add_parser(name, help=help_, description=help_, **kw)
        if connection:
            _connection_options(sp, top=False)
        return sp

    ap = add("apply", "Validate manifests (YAML or JSON) and write them to etcd; all or nothing.")
    ap.add_argument("-f", "--filename", action="append", required=True, metavar="FILE",
                    help="manifest file, several documents allowed; '-' reads stdin; repeatable")
    ap.add_argument("--dry-run", action="store_true", help="validate only, write nothing")

    gp = add("get", "List networks, workloads or nodes (or show one).")
    gp.add_argument("kind", type=_kind(("Network", "Workload", "Node")), metavar="KIND",
                    help="networks | workloads | nodes")
    gp.add_argument("name", nargs="?", help="only this object")
    gp.add_argument("--network", metavar="NETWORK", help="only workloads or nodes of this network")
    gp.add_argument("--node", metavar="NODE", help="only workloads or networks on this node")
    _output_option(gp)

    dp = add("describe", "Show one network, workload or node in detail, with what the nodes report.")
    dp.add_argument("kind", type=_kind((*SPEC_KINDS, "Node")), metavar="KIND", help="network | workload | node")
    dp.add_argument("name")
    _output_option(dp, ("text", "json", "yaml"))

    xp = add("delete", "Delete networks or workloads by name or by the manifests in files.")
    xp.add_argument("kind", nargs="?", type=_kind(SPEC_KINDS), metavar="KIND", help="network | workload")
    xp.add_argument("name", nargs="*", help="names to delete")
    xp.add_argument("-f", "--filename", action="append", metavar="FILE",
                    help="delete every object named in this manifest file ('-' for stdin); repeatable")
    xp.add_argument("--ignore-not-found", action="store_true", help="a missing object is not an error")

    sp = add("status", "Overview: which nodes are alive and which networks are ready.")
    _output_option(sp, ("table", "json", "yaml"))

    vp = add("version", "Print the version of zmesh.", connection=False)
    _output_option(vp, ("text", "json"))

    agent = add("agent", "Run the node agent (same as zmeshd).", connection=False)
    agent.description = "Run the node agent: reconcile this node's network resources."
    add_agent_options(agent, top=False)

    purge = add("purge", "Remove every network resource an agent made on this node (no etcd needed).",
                connection=False)
    purge.description = ("Remove every NR namespace, wireguard-go process, socket and private key that "
                         "the agent with this state dir and name prefix made, as recorded in its state "
                         "dir. Stop the agent first. For decommissioning a node; nothing else is touched.")
    purge.add_argument("--state-dir", required=True, metavar="DIR", help="the agent's --state-dir")
    purge.add_argument("--name-prefix", default="", metavar="PREFIX", help="the agent's --name-prefix")

    auth = add("auth", "Set up etcd users and roles: admins, one user per node.", connection=False)
    auth.description = ("Set up etcd authentication for Zero-Mesh (docs/operations.md, 'etcd: TLS and "
                    "roles'). Passwords are read from files, never from the command line.")
    auth_sub = auth.add_subparsers(dest="auth_command", metavar="COMMAND", parser_class=Parser)
    auth_sub.required = True

    def add_auth(name, help_):
        ap_ = auth_sub.add_parser(name, help=help_, description=help_)
        _connection_options(ap_, top=False)
        return ap_

    ai = add_auth("init", "Create the root user and the zmesh-admin role (read and write all of "
                          "Zero-Mesh's keys) and enable etcd authentication. Run it again to set "
                          "root's password; with auth already on it logs in as root.")
    ai.add_argument("--root-password-file", required=True, metavar="FILE", help="root's new password (first line)")
    an = add_auth("add-node", "Create (or update) user zmesh-node-NODE: reads everything of Zero-Mesh, "
                              "writes only its own node's keys. Needs root (--etcd-user root). Under a "
                              "--prefix other than /zmesh/, user and role names end in @PREFIX.")
    an.add_argument("node", metavar="NODE", help="the node's id, as its agent's --node-id")
    an.add_argument("--password-file", required=True, metavar="FILE", help="the user's password (first line)")
    au = add_auth("add-user", "Create (or update) a user with a role (default zmesh-admin). Needs root.")
    au.add_argument("name", metavar="NAME")
    au.add_argument("--password-file", required=True, metavar="FILE", help="the user's password (first line)")
    au.add_argument("--role", default="zmesh-admin", metavar="ROLE", help="role to grant (default: zmesh-admin)")

    ix = add("indexer", "Run the indexer: keeps the per-node index right for specs written with "
                        "etcdctl. Run it with admin credentials when etcd auth is on (agents then "
                        "may not write the index).")
    ix.add_argument("--identity", default=None, help="name in the leader key (default: the host name)")
    ix.add_argument("--log-level", default="info", type=str.lower, choices=LOG_LEVELS)

    demo = add("demo", "Build a simulated multi-node world and show the mesh working.", connection=False)
    demo.description = ("Run the demo on namespaces of this machine (needs root). "
                        "Without --etcd it starts a private etcd.")
    demo.add_argument("--etcd", action="append", default=argparse.SUPPRESS, metavar="HOST:PORT",
                      help="use this etcd instead of a private one (under a private prefix)")
    demo.add_argument("--world-prefix", metavar="ID", default=None,
                      help="the prefix of every namespace, link and socket name the demo makes "
                           "(1-3 lower-case letters or digits, starting with a letter; default: random)")
    demo.add_argument("--keep", action="store_true", help="keep the world running until Ctrl-C")
    return p


def add_agent_options(p: argparse.ArgumentParser, top: bool = True) -> None:
    p.add_argument("--node-id", required=True, help="this node's name (as in network manifests)")
    _connection_options(p, top=top)
    p.add_argument("--host-netns", default=None, metavar="NAME",
                   help="namespace playing the node's host (default: the agent's own)")
    p.add_argument("--name-prefix", default="", help="prefix of every name the agent creates (default: none)")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                   help=f"keys and records (default: {DEFAULT_STATE_DIR})")
    p.add_argument("--public-endpoint", action="append", default=[], metavar="ADDR",
                   help="address other nodes reach this node at; repeatable; none: hidden node")
    p.add_argument("--listen-port-range", default="51820-52819", metavar="MIN-MAX",
                   help="WireGuard listen ports to choose from (default: 51820-52819)")
    p.add_argument("--resync-interval", default="30", metavar="SECONDS",
                   help="full reconcile of every network this often (default: 30)")
    p.add_argument("--probe-interval", default="1", metavar="SECONDS",
                   help="probe the tunnels to candidate aggregators this often (default: 1)")
    p.add_argument("--probe-hold-down", default="30", metavar="SECONDS",
                   help="a tunnel that failed counts again only after working this long; damps "
                        "moving back to a recovered aggregator (default: 30)")
    p.add_argument("--metrics-addr", default=DEFAULT_METRICS_ADDR, metavar="HOST:PORT",
                   help=f"serve /metrics, /healthz, /readyz here (default: {DEFAULT_METRICS_ADDR})")
    p.add_argument("--observe-interval", default=f"{DEFAULT_OBSERVE_INTERVAL:g}", metavar="SECONDS",
                   help="read every NR's WireGuard counters and handshakes, and the nftables "
                        "counters, this often, apart from reconciles (default: %(default)s)")
    p.add_argument("--peer-stale-after", default=f"{DEFAULT_STALE_AFTER:g}", metavar="SECONDS",
                   help="a peer that should be talking and was not heard from for this long is "
                        "stale (default: %(default)s; see docs/observability.md)")
    p.add_argument("--metrics-peer-limit", default=str(DEFAULT_PEER_SERIES_LIMIT), metavar="N",
                   help="per-peer metric series for at most N peers of this node (default: "
                        "%(default)s; per-network totals always count every peer)")
    p.add_argument("--ndmz-nic", default=None, metavar="IFNAME",
                   help="dual NIC: move this NIC into the ndmz, where it carries the NRs' Internet "
                        "traffic alone (default: single NIC, through the host namespace)")
    p.add_argument("--ndmz-address", default=None, metavar="ADDR/PREFIX",
                   help="with --ndmz-nic: the NIC's IPv4 address, e.g. 198.51.100.111/24")
    p.add_argument("--ndmz-gateway", default=None, metavar="ADDR",
                   help="with --ndmz-nic: the default gateway on that NIC's network")
    p.add_argument("--log-level", default="info", type=str.lower, choices=LOG_LEVELS)
    p.add_argument("--reconcile-workers", type=_workers, default=4, metavar="N",
                   help="networks reconciled at the same time (default: 4)")
    p.add_argument("--indexer", default="auto", choices=("auto", "on", "off"),
                   help="run the index repairer inside the agent: auto (default) = only when the agent "
                        "has no etcd user (with auth on, run `zmesh indexer` with admin credentials)")


def agent_config(args: argparse.Namespace) -> AgentConfig:
    """Flags → AgentConfig; a bad value raises UsageError naming the flag."""
    from controller.models.resources import PortRange

    def conv(flag, fn, value):
        try:
            return fn(value)
        except ValueError as e:
            raise UsageError(f"{flag}: {e}") from None

    host, port = conv("--metrics-addr", parse_host_port, args.metrics_addr)
    _endpoints, prefix, timeout = connection(args)
    access = etcd_access(args)
    address = conv("--ndmz-address", parse_interface_address, args.ndmz_address) if args.ndmz_address else None
    gateway = conv("--ndmz-gateway", parse_ipv4, args.ndmz_gateway) if args.ndmz_gateway else None
    uplink = conv("--ndmz-nic", lambda nic: UplinkConfig(nic, address, gateway), args.ndmz_nic)
    fields = dict(
        node_id=conv("--node-id", parse_node_id, args.node_id),
        etcd=access.endpoints,
        etcd_cacert=access.cacert, etcd_cert=access.cert, etcd_key=access.key,
        etcd_user=access.user, etcd_password_file=access.password_file,
        prefix=prefix,
        host_netns=args.host_netns,
        name_prefix=args.name_prefix,
        state_dir=args.state_dir,
        public_endpoints=[conv("--public-endpoint", parse_endpoint, e) for e in args.public_endpoint],
        listen_port_range=conv("--listen-port-range", PortRange.parse, args.listen_port_range),
        resync_interval=conv("--resync-interval", parse_interval, args.resync_interval),
        probe_interval=conv("--probe-interval", parse_interval, args.probe_interval),
        probe_hold_down=conv("--probe-hold-down", parse_interval, args.probe_hold_down),
        metrics_host=host,
        metrics_port=port,
        log_level=args.log_level,
        etcd_timeout=timeout,
        indexer=args.indexer,
        reconcile_workers=args.reconcile_workers,
        observe_interval=conv("--observe-interval", parse_interval, args.observe_interval),
        peer_stale_after=conv("--peer-stale-after", parse_interval, args.peer_stale_after),
        metrics_peer_limit=conv("--metrics-peer-limit", parse_count, args.metrics_peer_limit),
        uplink=uplink,
    )
    try:
        return AgentConfig(**fields)
    except ValueError as e:  # settings that are only wrong together (CliError is no ValueError)
        raise UsageError(str(e)) from None


def _prefix(value: str | None) -> str:
    prefix = value or os.environ.get("ZMESH_PREFIX") or DEFAULT_PREFIX
    if not prefix.startswith("/"):
        raise UsageError(f"--prefix: {prefix!r} must start with '/'")
    return prefix


def connection(args: argparse.Namespace) -> tuple[list[str], str, float]:
    try:
        endpoints = split_endpoints(getattr(args, "etcd", None))
    except ValueError as e:
        raise UsageError(f"--etcd: {e}") from None
    return endpoints, _prefix(getattr(args, "prefix", None)), getattr(args, "timeout", 5.0)


def etcd_access(args: argparse.Namespace) -> EtcdAccess:
    """Endpoints, TLS files and credentials from the flags, else their environment variables."""
    try:
        endpoints = split_endpoints(getattr(args, "etcd", None))
    except ValueError as e:
        raise UsageError(f"--etcd: {e}") from None
    values = {dest: getattr(args, dest, None) or os.environ.get(env) or None
              for dest, (_flag, _m, env, _h) in ETCD_SECURITY_FLAGS.items()}
    try:
        return EtcdAccess(endpoints, cacert=values["etcd_cacert"], cert=values["etcd_cert"],
                          key=values["etcd_key"], user=values["etcd_user"],
                          password_file=values["etcd_password_file"])
    except ConfigError as e:  # flags that do not go together
        raise UsageError(str(e)) from None


# --- commands -------------------------------------------------------------------------------


async def cmd_apply(args, store: StoreView) -> int:
    from controller.admission import changed_items, review
    from controller.store.client import StaleView, StoreError  # lazy: gRPC only where needed

    read = args.manifests
    # Networks first: a workload is only valid once its network exists.
    items = sorted(read.items, key=lambda it: SPEC_KINDS.index(it.obj.kind))
    results: dict[tuple[str, str], str] = {}  # what each object's apply did, across rounds
    written: set[tuple[str, str]] = set()
    succeeded = False
    try:
        for _attempt in range(APPLY_ATTEMPTS):
            snap = await store.snapshot(items)
            found = read.problems + [str(p) for p in review(items, snap, read.broken)]
            if found:
                done = (f"stopped after writing {len(written)} object(s)" if written
                        else "nothing applied")
                raise Problems(found + [f"{done}: {len(found)} problem(s)"])
            todo = changed_items(items, snap)
            for it in todo:
                results[it.key] = "configured" if snap.stored(it.key).exists else "created"
            if args.dry_run:
                succeeded = True
                return EXIT_OK
            try:
                await store.write(todo, snap, lambda it, _rev: written.add(it.key))
            except StaleView:
                continue  # what we wrote stays (it was valid) and reads as unchanged next round
            except StoreError as e:
                if not written:
                    raise
                raise CliError(f"{' '.join(str(e).split())} (stopped after writing {len(written)} "
                               "object(s); applying the same files again completes it)") from None
            succeeded = True
            return EXIT_OK
        raise CliError(f"the specs kept changing while applying ({APPLY_ATTEMPTS} attempts); try again")
    finally:
        # Each object once, in input order: what was written, and at success what needed nothing.
        for key in dict.fromkeys(it.key for it in items):
            if key in written or (succeeded and not args.dry_run):
                print(f"{key[0].lower()}/{key[1]} {results[key] if key in written else 'unchanged'}")
            elif succeeded:
                result = results.get(key, "unchanged")
                print(f"{key[0].lower()}/{key[1]} {result}" + (" (dry run)" if result != "unchanged" else ""))


async def cmd_get(args, store: StoreView) -> int:
    kind = args.kind
    if args.network and kind == "Network":
        raise UsageError("get networks: --network does not apply (give the NAME instead)")
    if args.node and kind == "Node":
        raise UsageError("get nodes: --node does not apply (give the NAME instead)")
    wide = args.output == "wide"

    def wanted(name: str, network: str | None = None, nodes=()) -> bool:
        return ((not args.name or name == args.name) and (not args.network or network == args.network)
                and (not args.node or args.node in nodes))

    if kind == "Network":
        networks, invalid = await store.listing("Network")
        views = await store.network_views([n for n in networks if wanted(n.name, nodes=n.spec.nodes)])
        invalid = [o for o in invalid if wanted(o.name, nodes=o.nodes)]
        objs = [v.network for v in views]

        def render():
            return output.networks_table(views, invalid, wide=wide)
    elif kind == "Workload":
        workloads, invalid = await store.listing("Workload")
        views = await store.workload_views([w for w in workloads if wanted(w.name, w.spec.network, [w.spec.node])])
        invalid = [o for o in invalid if wanted(o.name, o.network, o.nodes)]
        objs = [v.workload for v in views]

        def render():
            return output.workloads_table(views, invalid, wide=wide)
    else:
        members = None
        if args.network:
            net = await store.lookup("Network", args.network)
            members = set(net.spec.nodes) if isinstance(net, Network) else set()
        every = await store.nodes()
        views = [v for v in every if (not args.name or v.node.name == args.name)
                 and (members is None or v.node.name in members)]
        unreadable = [n for n in await store.invalid_nodes(every)
                      if (not args.name or n == args.name) and (members is None or n in members)]
        if unreadable:
            store.warnings.append(f"{len(unreadable)} node registration(s) in etcd cannot be read: "
                                  f"{', '.join(unreadable)}")
        invalid = []
        objs = [v.node for v in views]

        def render():
            return output.nodes_table(views, wide=wide)
    store.warn_invalid(kind, invalid)
    if args.name and not objs and not invalid:
        raise CliError(f"{kind.lower()}/{args.name} not found")
    if args.output in ("table", "wide"):
        if objs or invalid:
            print(render())
        else:
            print(f"No {kind.lower()}s found.", file=sys.stderr)
    elif args.output == "name":
        for name in sorted([o.name for o in objs] + [o.name for o in invalid]):
            print(f"{kind.lower()}/{name}")
    else:
        items = [output.manifest(o) for o in objs] + [output.invalid_manifest(o) for o in invalid]
        if kind == "Node":  # written by agents, never applied: liveness can ride along
            for item, v in zip(items, views):
                item["status"] = {"alive": v.alive}
        print(output.dump(items[0] if args.name else output.as_list(items), args.output))
    return EXIT_OK


async def cmd_describe(args, store: StoreView) -> int:
    if args.kind == "Node":
        return await _describe_node(args, store)
    found = await store.lookup(args.kind, args.name)
    if found is None:
        raise CliError(f"{args.kind.lower()}/{args.name} not found")
    if isinstance(found, InvalidObject):
        return await _describe_invalid(args, store, found)
    if args.kind == "Network":
        view = await store.network_view(found)
        workloads = await store.workload_views([w for w in await store.workloads() if w.spec.network == found.name])
        events = await store.events(found)
        if args.output == "text":
            nodes = {v.node.name: v for v in await store.nodes()}
            print(output.describe_network(view, nodes, workloads, events))
            return EXIT_OK
        data = output.manifest(view.network)
        choice = view.choice()
        data["status"] = {"readyResources": view.ready_count, "ready": view.ready,
                          "hiddenNodes": view.hidden,
                          "aggregator": {"node": choice.node, "reason": choice.reason,
                                         "message": choice.message},
                          "resources": [output.manifest(s) for s in view.statuses.values()],
                          "verdicts": [output.manifest(v) for v in view.verdicts.values()],
                          "workloads": [{"name": v.workload.name, "node": v.workload.spec.node,
                                         "ready": v.ready_text, "reason": v.reason} for v in workloads],
                          "events": [e.model_dump(mode="json", exclude_none=True) for e in events]}
    else:
        view = (await store.workload_views([found]))[0]
        if args.output == "text":
            print(output.describe_workload(view))
            return EXIT_OK
        data = output.manifest(view.workload)
        data["status"] = output.manifest(view.status) if view.status else None
    print(output.dump(data, args.output))
    return EXIT_OK


async def _describe_node(args, store: StoreView) -> int:
    """A node: its registration, liveness, the networks naming it with what its NR reports,
    and the events it recorded about itself."""
    view = next((v for v in await store.nodes() if v.node.name == args.name), None)
    if view is None:
        if args.name in await store.registered_nodes():
            raise CliError(f"node/{args.name}: its registration cannot be read")
        raise CliError(f"node/{args.name} not found")
    networks = await store.network_views([n for n in await store.networks() if args.name in n.spec.nodes])
    events = await store.node_events(args.name)
    if args.output == "text":
        print(output.describe_node(view, networks, events))
        return EXIT_OK
    data = output.manifest(view.node)
    data["status"] = {"alive": view.alive,
                      "networks": [{"name": v.network.name, "ready": v.nr_reason(args.name) is None,
                                    "reason": v.nr_reason(args.name)} for v in networks],
                      "events": [e.model_dump(mode="json", exclude_none=True) for e in events]}
    print(output.dump(data, args.output))
    return EXIT_OK


async def _describe_invalid(args, store: StoreView, obj: InvalidObject) -> int:
    """An invalid value is shown with its problems and what its nodes report about it."""
    if args.kind == "Network":
        reports = {n: st.conditions for n, st in (await store.nr_statuses(obj.name, obj.nodes)).items()}
    else:
        reports = {n: st.conditions for n in obj.nodes for st in (await store.statuses_on([(n, obj.name)])).values()}
    if args.output == "text":
        print(output.describe_invalid(obj, reports))
    else:
        print(output.dump(output.invalid_manifest(obj), args.output))
    return EXIT_OK


async def cmd_delete(args, store: StoreView) -> int:
    if args.filename:
        targets = args.targets
    else:
        if not args.kind or not args.name:
            raise UsageError("delete: give KIND NAME... (e.g. 'zmesh delete network blue') or -f FILE")
        targets = [(args.kind, n) for n in args.name]
    # Each object once, however often the files name it; workloads before networks, so that
    # nothing is left pointing at a deleted network if the deletion is split.
    targets = sorted(dict.fromkeys(targets), key=lambda t: -SPEC_KINDS.index(t[0]))
    deleted = await store.delete(targets, lambda key: print(f"{key[0].lower()}/{key[1]} deleted"))
    missing = [f"{kind.lower()}/{name} not found" for kind, name in targets if (kind, name) not in deleted]
    deleted_nets = {n for k, n in deleted if k == "Network"}
    if deleted_nets:
        for w in await store.workloads():
            if w.spec.network in deleted_nets:
                print(f"zmesh: warning: workload/{w.name} still refers to deleted network/{w.spec.network}",
                      file=sys.stderr)
    if missing and not args.ignore_not_found:
        raise Problems(missing)
    return EXIT_OK


def _names_in_files(files: Sequence[str]) -> list[tuple[str, str]]:
    """(kind, name) of every document; specs need not be valid to be deleted."""
    read = read_manifests(files)
    problems = read.unreadable + [f"{where}: no kind (Network or Workload) and metadata.name to delete"
                                  for where in read.unnamed]
    if problems:
        raise Problems(problems)
    return read.named


async def cmd_status(args, store: StoreView) -> int:
    nodes = await store.nodes()
    networks, bad_networks = await store.listing("Network")
    workloads, bad_workloads = await store.listing("Workload")
    invalid = {"Node": await store.invalid_nodes(nodes), "Network": bad_networks, "Workload": bad_workloads}
    views, wl_views = await store.network_views(networks), await store.workload_views(workloads)
    if args.output == "table":
        print(output.status_text(nodes, views, wl_views, invalid))
    else:
        print(output.dump(output.status_dict(nodes, views, wl_views, invalid), args.output))
    return EXIT_OK


STORE_COMMANDS = {"apply": cmd_apply, "get": cmd_get, "describe": cmd_describe,
                  "delete": cmd_delete, "status": cmd_status}


async def _run_store_command(args) -> int:
    _endpoints, prefix, timeout = connection(args)
    async with open_store(etcd_access(args), prefix, timeout) as store:
        try:
            return await STORE_COMMANDS[args.command](args, store)
        finally:
            for w in store.warnings:
                print(f"zmesh: warning: {w}", file=sys.stderr)


def _call(fn, *args):
    """Run a function that may be a coroutine function (the agent and demo are asyncio)."""
    result = fn(*args)
    if inspect.isawaitable(result):
        result = asyncio.run(result)
    return result if isinstance(result, int) else EXIT_OK


def _run_agent(args) -> int:
    config = agent_config(args)
    from controller.reconciler.agent import run_agent  # lazy: pulls in the dataplane
    return _call(run_agent, config)


def _run_demo(args) -> int:
    from controller.sim.world import world_id_problem

    # Only an explicit --etcd means "use that etcd"; otherwise the demo starts its own.
    etcd = getattr(args, "etcd", None)
    try:
        args.etcd = split_endpoints(etcd) if etcd else None
    except ValueError as e:
        raise UsageError(f"--etcd: {e}") from None
    if args.world_prefix is not None and (problem := world_id_problem(args.world_prefix)):
        raise UsageError(f"--world-prefix: {problem}")
    from controller.sim.demo import run_demo  # lazy: needs root and the simulator
    return _call(run_demo, args)


def _run_purge(args) -> int:
    from controller.planner.names import prefix_problems
    from controller.reconciler.purge import purge_node  # lazy: pulls in the dataplane

    problems = prefix_problems(args.name_prefix)
    if problems:
        raise UsageError(f"--name-prefix: {problems[0]}")
    if not os.path.isdir(args.state_dir):
        raise CliError(f"--state-dir {args.state_dir}: no such directory")
    removed = asyncio.run(purge_node(state_dir=args.state_dir, name_prefix=args.name_prefix))
    for item in removed:
        print(f"removed {item}")
    if not removed:
        print("nothing to remove")
    return EXIT_OK


async def _run_auth(args) -> int:
    from controller.store import auth
    from controller.store.client import AuthError, PermissionDenied

    _endpoints, prefix, timeout = connection(args)
    access = etcd_access(args)
    logging_quiet()
    if args.auth_command == "init":
        root_password = read_password_file(args.root_password_file, "--root-password-file")
        try:
            async with access.open_store(prefix, timeout, retry_for=min(timeout, 1.0)) as store:
                lines = await auth.init(store, root_password)
        except (AuthError, PermissionDenied):
            if access.user is not None:
                raise
            # Auth is on already: do it again as root, with the password given.
            root = dataclasses.replace(access, user=auth.ROOT, password_file=args.root_password_file)
            async with root.open_store(prefix, timeout, retry_for=min(timeout, 1.0)) as store:
                lines = await auth.init(store, root_password)
    else:
        password = read_password_file(args.password_file, "--password-file")
        async with access.open_store(prefix, timeout, retry_for=min(timeout, 1.0)) as store:
            if args.auth_command == "add-node":
                lines = await auth.add_node(store, conv_node_id(args.node), password)
            else:
                lines = await auth.add_user(store, args.name, password, args.role)
    for line in lines:
        print(line)
    return EXIT_OK


def conv_node_id(text: str) -> str:
    try:
        return parse_node_id(text)
    except ValueError as e:
        raise UsageError(str(e)) from None


def logging_quiet() -> None:
    import logging

    # The store logs each endpoint failover; the CLI reports the outcome in one line instead.
    logging.getLogger("controller.store").setLevel(logging.ERROR)


def _run_indexer(args) -> int:
    from controller.store.indexer import run_indexer  # lazy: gRPC only for commands that need it

    _endpoints, prefix, timeout = connection(args)
    return _call(run_indexer, etcd_access(args), prefix, args.identity or socket.gethostname(),
                 args.log_level, timeout)


def _run_version(args) -> int:
    if args.output == "json":
        print(output.dump({"zmesh": package_version()}, "json"))
    else:
        print(f"zmesh {package_version()}")
    return EXIT_OK


def _dispatch(args) -> int:
    run = {"agent": _run_agent, "purge": _run_purge, "demo": _run_demo, "version": _run_version,
           "auth": lambda a: asyncio.run(_run_auth(a)), "indexer": _run_indexer}.get(args.command)
    if run is not None:
        return run(args)
    connection(args)  # a bad flag is a usage error before anything is read
    # Files (and stdin) are read before etcd is: a slow pipe or Ctrl-C then waits for nobody.
    if args.command == "apply":
        args.manifests = read_manifests(args.filename)
    elif args.command == "delete" and args.filename:
        if args.kind or args.name:
            raise UsageError("delete: give either KIND NAME... or -f FILE, not both")
        args.targets = _names_in_files(args.filename)
    return asyncio.run(_run_store_command(args))


def _guard(fn, args, endpoints_hint: str, prog: str = "zmesh") -> int:
    """Run a command; turn every error into one line on stderr and an exit code."""
    try:
        return fn(args)
    except Problems as e:
        for line in e.lines:
            print(f"{prog}: {line}", file=sys.stderr)
        return EXIT_ERROR
    except CliError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return e.code
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # `zmesh get ... | head`: the reader left; say nothing more (stdout is gone too).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # the one place that keeps tracebacks away from users
        if os.environ.get("ZMESH_DEBUG"):
            raise
        reason = cannot_reach(e)
        if reason is not None:
            print(f"{prog}: cannot reach etcd at {endpoints_hint} ({reason})", file=sys.stderr)
        elif is_store_error(e):
            print(f"{prog}: {' '.join(str(e).split())}", file=sys.stderr)
        else:
            print(f"{prog}: error: {type(e).__name__}: {' '.join(str(e).split()) or 'no details'}",
                  file=sys.stderr)
        return EXIT_ERROR


def _endpoints_hint(args) -> str:
    try:
        return ",".join(split_endpoints(getattr(args, "etcd", None)))
    except ValueError:
        return "?"


def _quiet_grpc() -> None:
    # gRPC's C core writes its own log lines to stderr (a TLS handshake failure is a dozen);
    # the CLI and the agent report the outcome themselves, in one line / their own log.
    if not os.environ.get("ZMESH_DEBUG"):
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_grpc()
    args = build_parser().parse_args(argv)
    return _guard(_dispatch, args, _endpoints_hint(args))


def agent_main(argv: Sequence[str] | None = None) -> int:
    p = Parser(prog="zmeshd", description="Zero-Mesh node agent.")
    p.add_argument("--version", action="version", version=f"zmeshd {package_version()}")
    add_agent_options(p)
    _quiet_grpc()
    args = p.parse_args(argv)
    return _guard(_run_agent, args, _endpoints_hint(args), prog="zmeshd")


if __name__ == "__main__":
    sys.exit(main())
