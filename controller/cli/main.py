"""`zmesh`, the command line of Zero-Mesh, and `zmeshd`, the node agent's entry point.

Every command prints results on stdout and problems on stderr, one line each, and exits
non-zero on error; nothing ends in a traceback (set ZMESH_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import inspect
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from controller.models.manifest import ManifestError, parse_object, split_documents, to_json
from controller.models.resources import Network, PortRange, Workload
from controller.models.validation import unknown_nodes, workload_problems
from controller.store.access import ConfigError, EtcdAccess, read_password_file
from controller.reconciler.config import (
    DEFAULT_METRICS_ADDR,
    DEFAULT_PREFIX,
    DEFAULT_STATE_DIR,
    LOG_LEVELS,
    AgentConfig,
    parse_endpoint,
    parse_host_port,
    parse_interval,
    parse_node_id,
    split_endpoints,
)

from . import output
from .store import StoreView, cannot_reach, is_store_error, open_store

EXIT_OK, EXIT_ERROR = 0, 1  # argparse exits 2 on usage errors

# `get`/`delete` accept kubectl-style singular, plural and short kind names.
KIND_ALIASES = {
    "network": "Network", "networks": "Network", "net": "Network", "nets": "Network",
    "workload": "Workload", "workloads": "Workload", "wl": "Workload",
    "node": "Node", "nodes": "Node",
}
APPLY_KINDS = ("Network", "Workload")
APPLY_ATTEMPTS = 10  # passes of validate-then-write while other applies keep winning the race


class CliError(Exception):
    """An error to print as one line (prefixed `zmesh: `) with a non-zero exit."""


class Problems(Exception):
    """Several problems, each printed on its own line."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("\n".join(lines))


# --- argument parsing -----------------------------------------------------------------------


def _connection_options(parser: argparse.ArgumentParser, top: bool) -> None:
    # Accepted before and after the subcommand; SUPPRESS below the top keeps a value given
    # before the subcommand from being overwritten by the subparser's default.
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


def _output_option(parser: argparse.ArgumentParser, choices=("table", "json", "yaml")) -> None:
    parser.add_argument("-o", "--output", choices=choices, default=choices[0],
                        help=f"output format (default: {choices[0]})")


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False everywhere: `--etcd-password SECRET` must be an unknown flag, never an
    # abbreviation of --etcd-password-file (whose error would echo the "path").
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="zmesh",
        description="Zero-Mesh: encrypted WireGuard overlay networks, desired state in etcd.",
        epilog="Run 'zmesh COMMAND --help' for the options of a command.",
    )
    _connection_options(p, top=True)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name, help_, **kw):
        sp = sub.add_parser(name, help=help_, description=help_, allow_abbrev=False, **kw)
        _connection_options(sp, top=False)
        return sp

    ap = add("apply", "Validate manifests (YAML or JSON) and write them to etcd; all or nothing.")
    ap.add_argument("-f", "--filename", action="append", required=True, metavar="FILE",
                    help="manifest file, several documents allowed; '-' reads stdin; repeatable")
    ap.add_argument("--dry-run", action="store_true", help="validate only, write nothing")

    gp = add("get", "List networks, workloads or nodes (or show one).")
    gp.add_argument("kind", choices=sorted(KIND_ALIASES), metavar="KIND",
                    help="networks | workloads | nodes")
    gp.add_argument("name", nargs="?", help="only this object")
    _output_option(gp)

    dp = add("describe", "Show one network or workload in detail, with the status of every node.")
    dp.add_argument("kind", choices=sorted(k for k, v in KIND_ALIASES.items() if v != "Node"),
                    metavar="KIND", help="network | workload")
    dp.add_argument("name")
    _output_option(dp, ("text", "json", "yaml"))

    xp = add("delete", "Delete networks or workloads by name or by the manifests in files.")
    xp.add_argument("kind", nargs="?", metavar="KIND", help="network | workload")
    xp.add_argument("name", nargs="*", help="names to delete")
    xp.add_argument("-f", "--filename", action="append", metavar="FILE",
                    help="delete every object named in this manifest file ('-' for stdin)")
    xp.add_argument("--ignore-not-found", action="store_true", help="a missing object is not an error")

    sp = add("status", "Overview: which nodes are alive and which networks are ready.")
    _output_option(sp)

    agent = sub.add_parser("agent", allow_abbrev=False, help="Run the node agent (same as zmeshd).",
                           description="Run the node agent: reconcile this node's network resources.")
    add_agent_options(agent)

    purge = sub.add_parser(
        "purge", allow_abbrev=False, help="Remove every network resource an agent made on this node (no etcd needed).",
        description="Remove every NR namespace, wireguard-go process, socket and private key that "
                    "the agent with this state dir and name prefix made, as recorded in its state "
                    "dir. Stop the agent first. For decommissioning a node; nothing else is touched.")
    purge.add_argument("--state-dir", required=True, metavar="DIR", help="the agent's --state-dir")
    purge.add_argument("--name-prefix", default="", metavar="PREFIX", help="the agent's --name-prefix")

    auth = sub.add_parser(
        "auth", allow_abbrev=False, help="Set up etcd users and roles: admins, one user per node.",
        description="Set up etcd authentication for Zero-Mesh (docs/operations.md, 'etcd: TLS and "
                    "roles'). Passwords are read from files, never from the command line.")
    auth_sub = auth.add_subparsers(dest="auth_command", metavar="COMMAND")
    auth_sub.required = True

    def add_auth(name, help_):
        ap_ = auth_sub.add_parser(name, help=help_, description=help_, allow_abbrev=False)
        _connection_options(ap_, top=False)
        return ap_

    ai = add_auth("init", "Create the root user and the zmesh-admin role (read and write all of "
                          "Zero-Mesh's keys) and enable etcd authentication. Run it again to set "
                          "root's password; with auth already on it logs in as root.")
    ai.add_argument("--root-password-file", required=True, metavar="FILE", help="root's new password (first line)")
    an = add_auth("add-node", "Create (or update) user zmesh-node-NODE: reads everything of Zero-Mesh, "
                              "writes only its own node's keys. Needs root (--etcd-user root).")
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

    demo = sub.add_parser("demo", allow_abbrev=False, help="Build a simulated multi-node world and show the mesh working.",
                          description="Run the demo on namespaces of this machine (needs root). "
                                      "Without --etcd it starts a private etcd.")
    demo.add_argument("--etcd", action="append", default=argparse.SUPPRESS, metavar="HOST:PORT",
                      help="use this etcd instead of a private one")
    demo.add_argument("--keep", action="store_true", help="keep the world running until Ctrl-C")
    return p


def add_agent_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--node-id", required=True, help="this node's name (as in network manifests)")
    p.add_argument("--etcd", action="append", metavar="HOST:PORT[,HOST:PORT...]",
                   help="etcd endpoints, comma-separated or repeated (default: $ZMESH_ETCD, else 127.0.0.1:2379)")
    _etcd_security_options(p, lambda v: v)
    p.add_argument("--prefix", default=None, help="etcd key prefix (default: $ZMESH_PREFIX, else /zmesh/)")
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
    p.add_argument("--metrics-addr", default=DEFAULT_METRICS_ADDR, metavar="HOST:PORT",
                   help=f"serve /metrics, /healthz, /readyz here (default: {DEFAULT_METRICS_ADDR})")
    p.add_argument("--log-level", default="info", type=str.lower, choices=LOG_LEVELS)
    p.add_argument("--reconcile-workers", type=_workers, default=4, metavar="N",
                   help="networks reconciled at the same time (default: 4)")
    p.add_argument("--indexer", default="auto", choices=("auto", "on", "off"),
                   help="run the index repairer inside the agent: auto (default) = only when the agent "
                        "has no etcd user (with auth on, run `zmesh indexer` with admin credentials)")


def agent_config(args: argparse.Namespace) -> AgentConfig:
    """Flags → AgentConfig; a bad value raises CliError naming the flag."""
    def conv(flag, fn, value):
        try:
            return fn(value)
        except ValueError as e:
            raise CliError(f"{flag}: {e}") from None

    host, port = conv("--metrics-addr", parse_host_port, args.metrics_addr)
    access = etcd_access(args)
    return AgentConfig(
        node_id=conv("--node-id", parse_node_id, args.node_id),
        etcd=access.endpoints,
        etcd_cacert=access.cacert, etcd_cert=access.cert, etcd_key=access.key,
        etcd_user=access.user, etcd_password_file=access.password_file,
        prefix=_prefix(args.prefix),
        host_netns=args.host_netns,
        name_prefix=args.name_prefix,
        state_dir=args.state_dir,
        public_endpoints=[conv("--public-endpoint", parse_endpoint, e) for e in args.public_endpoint],
        listen_port_range=conv("--listen-port-range", PortRange.parse, args.listen_port_range),
        resync_interval=conv("--resync-interval", parse_interval, args.resync_interval),
        metrics_host=host,
        metrics_port=port,
        log_level=args.log_level,
        indexer=args.indexer,
        reconcile_workers=args.reconcile_workers,
    )


def _prefix(value: str | None) -> str:
    prefix = value or os.environ.get("ZMESH_PREFIX") or DEFAULT_PREFIX
    if not prefix.startswith("/"):
        raise CliError(f"--prefix: {prefix!r} must start with '/'")
    return prefix


def connection(args: argparse.Namespace) -> tuple[list[str], str, float]:
    try:
        endpoints = split_endpoints(args.etcd)
    except ValueError as e:
        raise CliError(f"--etcd: {e}") from None
    return endpoints, _prefix(args.prefix), args.timeout


def etcd_access(args: argparse.Namespace) -> EtcdAccess:
    """Endpoints, TLS files and credentials from the flags, else their environment variables."""
    try:
        endpoints = split_endpoints(args.etcd)
    except ValueError as e:
        raise CliError(f"--etcd: {e}") from None
    values = {dest: getattr(args, dest, None) or os.environ.get(env) or None
              for dest, (_flag, _m, env, _h) in ETCD_SECURITY_FLAGS.items()}
    try:
        return EtcdAccess(endpoints, cacert=values["etcd_cacert"], cert=values["etcd_cert"],
                          key=values["etcd_key"], user=values["etcd_user"],
                          password_file=values["etcd_password_file"])
    except ConfigError as e:
        raise CliError(str(e)) from None


# --- reading manifests ----------------------------------------------------------------------


def read_manifests(files: Sequence[str], stdin=None) -> tuple[list, list[str], set[tuple[str, str]]]:
    """Parse every document of every file: (objects, problems, broken), each problem one line;
    `broken` holds (kind, name) of documents that name an object but are invalid."""
    objects, problems, broken = [], [], set()
    for f in files:
        if f == "-":
            source, text = "<stdin>", (stdin or sys.stdin).read()
        else:
            source = f
            try:
                text = Path(f).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                problems.append(f"{f}: cannot read: {getattr(e, 'strerror', None) or e}")
                continue
        try:
            docs = split_documents(text, source)
        except ManifestError as e:
            problems += str(e).splitlines()
            continue
        if not docs:
            problems.append(f"{source}: no documents")
        for d in docs:
            try:
                objects.append(parse_object(d.data, d.where, APPLY_KINDS))
            except ManifestError as e:
                problems += str(e).splitlines()
                ref = _kind_and_name(d.data)
                if ref:
                    broken.add(ref)
    return objects, problems, broken


def _kind_and_name(data: object) -> tuple[str, str] | None:
    """(kind, metadata.name) of a decoded document, even an invalid one."""
    if not isinstance(data, dict) or data.get("kind") not in APPLY_KINDS:
        return None
    meta = data.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    return (data["kind"], name) if isinstance(name, str) else None


def _ref(obj) -> str:
    return f"{obj.kind.lower()}/{obj.name}"


def cross_problems(objects: list, networks: dict[str, Network], workloads: dict[str, Workload],
                   registered: set[str], broken: set[tuple[str, str]] = frozenset()) -> list[str]:
    """Rules between objects: the new ones against each other and against what etcd holds.
    `networks`/`workloads` are the current contents of etcd by name; workloads of a network
    whose new document is `broken` are not judged (its own problems are reported already)."""
    problems: list[str] = []
    seen: set[tuple[str, str]] = set()
    for o in objects:
        if (o.kind, o.name) in seen:
            problems.append(f"{_ref(o)}: defined more than once in the input")
        seen.add((o.kind, o.name))
    new_nets = {o.name: o for o in objects if isinstance(o, Network)}
    new_wls = {o.name: o for o in objects if isinstance(o, Workload)}
    after_nets = {**networks, **new_nets}
    after_wls = {**workloads, **new_wls}
    for net in new_nets.values():
        problems += [f"{_ref(net)}: {p}" for p in unknown_nodes(net, registered)]
    # New workloads, and workloads already in etcd whose network changes, must fit the result.
    for w in after_wls.values():
        if w.name not in new_wls and w.spec.network not in new_nets:
            continue
        if ("Network", w.spec.network) in broken:
            continue
        ps = workload_problems(w, after_nets.get(w.spec.network), after_wls.values())
        if w.name in new_wls:
            problems += [f"{_ref(w)}: {p}" for p in ps]
        else:
            problems += [f"network/{w.spec.network}: existing workload/{w.name} would become invalid: {p}"
                         for p in ps]
    return problems


# --- commands -------------------------------------------------------------------------------


async def cmd_apply(args, store: StoreView) -> int:
    from controller.store.client import StaleView  # lazy: gRPC only for commands that need it

    objects, problems, broken = read_manifests(args.filename)
    results: dict[tuple[str, str], str] = {}  # what each object's apply did, across passes
    try:
        for _attempt in range(APPLY_ATTEMPTS):
            # The guard is read before the specs and compared by every write: if another apply
            # wrote in between, our validation is stale and is done again on fresh data.
            guard = await store.specs_revision()
            networks, workloads = await store.networks(), await store.workloads()
            found = problems + cross_problems(objects, {n.name: n for n in networks},
                                              {w.name: w for w in workloads},
                                              await store.registered_nodes(), broken)
            if found:
                raise Problems(found + [f"nothing applied: {len(found)} problem(s)"])
            current = {("Network", n.name): n for n in networks} | {("Workload", w.name): w for w in workloads}
            try:
                # Networks first: a workload is only valid once its network exists.
                for obj in sorted(objects, key=lambda o: APPLY_KINDS.index(o.kind)):
                    key = (obj.kind, obj.name)
                    old = current.get(key)
                    if old is not None and to_json(old) == to_json(obj):
                        results.setdefault(key, "unchanged")  # or what an earlier pass did
                        continue
                    if not args.dry_run:
                        guard = await store.apply(obj, guard)
                    results[key] = "created" if old is None else "configured"
            except StaleView:
                continue  # what we wrote stays (it was valid) and reads as unchanged next pass
            return EXIT_OK
        raise CliError(f"the specs kept changing while applying ({APPLY_ATTEMPTS} attempts); try again")
    finally:
        for obj in sorted(objects, key=lambda o: APPLY_KINDS.index(o.kind)):
            result = results.get((obj.kind, obj.name))
            if result is not None:
                dry = " (dry run)" if args.dry_run and result != "unchanged" else ""
                print(f"{_ref(obj)} {result}{dry}")


async def cmd_get(args, store: StoreView) -> int:
    kind = KIND_ALIASES[args.kind]
    if kind == "Network":
        views = [v for v in await store.network_views() if not args.name or v.network.name == args.name]
        objs, render = [v.network for v in views], lambda: output.networks_table(views)
    elif kind == "Workload":
        views = [v for v in await store.workload_views() if not args.name or v.workload.name == args.name]
        objs, render = [v.workload for v in views], lambda: output.workloads_table(views)
    else:
        views = [v for v in await store.nodes() if not args.name or v.node.name == args.name]
        objs, render = [v.node for v in views], lambda: output.nodes_table(views)
    if args.name and not objs:
        raise CliError(f"{kind.lower()}/{args.name} not found")
    if args.output == "table":
        if objs:
            print(render())
        else:
            print(f"No {kind.lower()}s found.", file=sys.stderr)
    else:
        items = [output.manifest(o) for o in objs]
        if kind == "Node":  # written by agents, never applied: liveness can ride along
            for item, v in zip(items, views):
                item["status"] = {"alive": v.alive}
        print(output.dump(items[0] if args.name else output.as_list(items), args.output))
    return EXIT_OK


async def cmd_describe(args, store: StoreView) -> int:
    kind = KIND_ALIASES[args.kind]
    if kind == "Network":
        view = await store.network_view(args.name)
        if view is None:
            raise CliError(f"network/{args.name} not found")
        if args.output == "text":
            nodes = {v.node.name: v for v in await store.nodes()}
            print(output.describe_network(view, nodes))
            return EXIT_OK
        data = output.manifest(view.network)
        data["status"] = {"readyResources": view.ready_count, "ready": view.ready,
                          "resources": [output.manifest(s) for s in view.statuses.values()],
                          "facts": [output.manifest(f) for f in view.facts.values()]}
    else:
        view = await store.workload_view(args.name)
        if view is None:
            raise CliError(f"workload/{args.name} not found")
        if args.output == "text":
            print(output.describe_workload(view))
            return EXIT_OK
        data = output.manifest(view.workload)
        data["status"] = output.manifest(view.status) if view.status else None
    print(output.dump(data, args.output))
    return EXIT_OK


async def cmd_delete(args, store: StoreView) -> int:
    targets: list[tuple[str, str]] = []
    if args.filename:
        if args.kind or args.name:
            raise CliError("delete: give either KIND NAME... or -f FILE, not both")
        targets = _names_in_files(args.filename)
    else:
        if not args.kind or not args.name:
            raise CliError("delete: give KIND NAME... (e.g. 'zmesh delete network blue') or -f FILE")
        kind = KIND_ALIASES.get(args.kind.lower())
        if kind not in APPLY_KINDS:
            raise CliError(f"delete: cannot delete {args.kind!r}: use network or workload")
        targets = [(kind, n) for n in args.name]
    # Workloads before networks, so nothing is left pointing at a deleted network.
    targets.sort(key=lambda t: -APPLY_KINDS.index(t[0]))
    missing = []
    for kind, name in targets:
        if await store.delete(kind, name):
            print(f"{kind.lower()}/{name} deleted")
        elif not args.ignore_not_found:
            missing.append(f"{kind.lower()}/{name} not found")
    deleted_nets = {n for k, n in targets if k == "Network"}
    if deleted_nets:
        for w in await store.workloads():
            if w.spec.network in deleted_nets:
                print(f"zmesh: warning: workload/{w.name} still refers to deleted network/{w.spec.network}",
                      file=sys.stderr)
    if missing:
        raise Problems(missing)
    return EXIT_OK


def _names_in_files(files: Sequence[str]) -> list[tuple[str, str]]:
    """(kind, name) of every document; specs need not be valid to be deleted."""
    out, problems = [], []
    for f in files:
        try:
            text = sys.stdin.read() if f == "-" else Path(f).read_text(encoding="utf-8")
            docs = split_documents(text, "<stdin>" if f == "-" else f)
        except OSError as e:
            problems.append(f"{f}: cannot read: {e.strerror or e}")
            continue
        except ManifestError as e:
            problems += str(e).splitlines()
            continue
        for d in docs:
            ref = _kind_and_name(d.data)
            if ref:
                out.append(ref)
            else:
                problems.append(f"{d.where}: no kind (Network or Workload) and metadata.name to delete")
    if problems:
        raise Problems(problems)
    return out


async def cmd_status(args, store: StoreView) -> int:
    nodes, networks = await store.nodes(), await store.network_views()
    if args.output == "table":
        print(output.status_text(nodes, networks))
    else:
        print(output.dump(output.status_dict(nodes, networks), args.output))
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
    # Only an explicit --etcd means "use that etcd"; otherwise the demo starts its own.
    etcd = getattr(args, "etcd", None)
    try:
        args.etcd = split_endpoints(etcd) if etcd else None
    except ValueError as e:
        raise CliError(f"--etcd: {e}") from None
    from controller.sim.demo import run_demo  # lazy: needs root and the simulator
    return _call(run_demo, args)


def _run_purge(args) -> int:
    from controller.planner.names import prefix_problems
    from controller.reconciler.purge import purge_node  # lazy: pulls in the dataplane

    problems = prefix_problems(args.name_prefix)
    if problems:
        raise CliError(f"--name-prefix: {problems[0]}")
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
        raise CliError(str(e)) from None


def logging_quiet() -> None:
    import logging

    # The store logs each endpoint failover; the CLI reports the outcome in one line instead.
    logging.getLogger("controller.store").setLevel(logging.ERROR)


def _run_indexer(args) -> int:
    from controller.store.indexer import run_indexer  # lazy: gRPC only for commands that need it

    _endpoints, prefix, timeout = connection(args)
    return _call(run_indexer, etcd_access(args), prefix, args.identity or socket.gethostname(),
                 args.log_level, timeout)


def _dispatch(args) -> int:
    if args.command == "agent":
        return _run_agent(args)
    if args.command == "auth":
        return asyncio.run(_run_auth(args))
    if args.command == "indexer":
        return _run_indexer(args)
    if args.command == "purge":
        return _run_purge(args)
    if args.command == "demo":
        return _run_demo(args)
    return asyncio.run(_run_store_command(args))


def _guard(fn, args, endpoints_hint: str, prog: str = "zmesh") -> int:
    """Run a command; turn every error into one line on stderr and an exit code."""
    try:
        return fn(args)
    except Problems as e:
        for line in e.lines:
            print(f"{prog}: {line}", file=sys.stderr)
        return EXIT_ERROR
    except (CliError, ConfigError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # `zmesh get ... | head`: the reader left; say nothing more (stdout is gone too).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
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
    p = argparse.ArgumentParser(prog="zmeshd", allow_abbrev=False, description="Zero-Mesh node agent.")
    add_agent_options(p)
    _quiet_grpc()
    args = p.parse_args(argv)
    return _guard(_run_agent, args, _endpoints_hint(args), prog="zmeshd")


if __name__ == "__main__":
    sys.exit(main())
