"""nftables: Zero-Mesh's one table per namespace, observed, diffed and replaced atomically.

Built the way kube-proxy's nftables mode uses knftables:
- one table owned by Zero-Mesh in each namespace it manages, recognised by its name; no other
  table is ever read, changed or deleted;
- the whole desired table is data (`controller.models.nftables.Table`, built by the pure planner);
- observe: `nft -j list table FAMILY NAME`, normalised (no handles, no counter values);
- pure diff (`table_commands`): nothing when the kernel already has exactly the desired table,
  else one transaction that replaces our table: add (so that delete cannot fail), delete, and
  the whole table again, all in ONE `nft -j -f -` run. nft applies a file as one netlink batch,
  so there is never a moment without rules, and a converged namespace costs one read;
- counters: `counters()` reads the values of the rules the desired table marks as counted
  (`Rule.counts`), with the rule's handle and the table's generation (namespace inode, table
  handle: a replaced table starts again at the same rule handles, but gets a new table handle),
  for the observer's monotonic totals;
- `nft` runs inside the namespace with `nsenter --net=PATH -- nft ...` (exec: nothing forks
  beside aetcd's gRPC threads, design.md 5b), every call with a timeout.

`FakeNft` stands in for the nft binary in root-free unit tests: it keeps tables per namespace,
applies the same JSON commands and lists them back like nft does.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from controller.models.nftables import Table

from .accounting import count
from .netns import netns_exists, netns_path

TIMEOUT = 10.0  # seconds for one nft run (a listing takes milliseconds)

Runner = Callable[[str | None, list[str], str | None, float], Awaitable[tuple[int, str, str]]]
UNOBSERVED = object()  # `ensure(observed=...)` default: observe first


class NftError(RuntimeError):
    """nft failed (its message says why) or did not answer in time."""


def _nft_binary() -> str:
    return shutil.which("nft") or "/usr/sbin/nft"


async def exec_nft(netns: str | None, args: list[str], stdin: str | None,
                   timeout: float) -> tuple[int, str, str]:
    """Run nft inside `netns` (None: our own namespace): (returncode, stdout, stderr)."""
    argv = [_nft_binary(), *args]
    if netns is not None:
        argv = ["nsenter", f"--net={netns_path(netns)}", "--", *argv]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin else None), timeout)
    except asyncio.TimeoutError:
        await _stop(proc)
        raise NftError(f"nft {' '.join(args[:3])} in {netns or 'own netns'} did not finish "
                       f"within {timeout:g} s") from None
    except asyncio.CancelledError:
        # Our caller gave up (a stopping agent, the observer's read timeout): a cancellation,
        # not an nft failure that a reconcile would publish as its status.
        await _stop(proc)
        raise
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def _stop(proc) -> None:
    with contextlib.suppress(ProcessLookupError):  # it may have exited meanwhile
        proc.kill()
    await proc.wait()


# --- pure: normalise a listing, decide what to run ----------------------------------------------


def normalize(listing: str | dict) -> list[dict]:
    """`nft -j list table` output → the objects of the table in `Table.objects()` form."""
    doc = json.loads(listing) if isinstance(listing, str) else listing
    out = []
    for item in doc.get("nftables", []):
        if not isinstance(item, dict) or len(item) != 1 or "metainfo" in item:
            continue
        (kind, obj), = item.items()
        obj = {k: v for k, v in obj.items() if k != "handle"}
        if kind == "rule":
            obj["expr"] = [{"counter": None} if isinstance(e, dict) and isinstance(e.get("counter"), dict)
                           and set(e["counter"]) <= {"packets", "bytes"} else e
                           for e in obj.get("expr", [])]
        out.append({kind: obj})
    return out


@dataclass(frozen=True)
class RuleCounter:
    counts: str  # what the rule counts (Rule.counts)
    handle: int
    packets: int
    bytes: int


@dataclass(frozen=True)
class TableCounters:
    """The counted rules of one table as read once. `generation` changes whenever the kernel's
    table was made anew (its counters then start again at zero)."""

    generation: tuple[int, int]  # (namespace inode, table handle)
    rules: tuple[RuleCounter, ...]


def rule_counters(desired: Table, listing: str | dict, namespace: int = 0) -> TableCounters:
    """The counters of the rules of `listing` (`nft -j list table`) that are exactly one of
    `desired`'s counted rules; rules that differ (drift) are not read. Pure."""
    doc = json.loads(listing) if isinstance(listing, str) else listing
    counted = {_rule_key(r.json(desired.family, desired.name, c.name)["rule"]): r.counts
               for c in desired.chains for r in c.rules if r.counts}
    table_handle, out = 0, []
    for item in doc.get("nftables", []):
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("table"), dict):
            table_handle = int(item["table"].get("handle", 0))
        found = item.get("rule")
        if not isinstance(found, dict):
            continue
        (norm,) = normalize({"nftables": [item]})
        counts = counted.get(_rule_key(norm["rule"]))
        if counts is None:
            continue
        value = next(e["counter"] for e in found["expr"] if isinstance(e, dict) and "counter" in e)
        out.append(RuleCounter(counts, int(found["handle"]), int(value["packets"]), int(value["bytes"])))
    return TableCounters((namespace, table_handle), tuple(out))


def _rule_key(rule: dict) -> str:
    return json.dumps(rule, sort_keys=True)


def _ref(family: str, name: str) -> dict:
    return {"table": {"family": family, "name": name}}


def table_commands(desired: Table | None, observed: list[dict] | None,
                   family: str | None = None, name: str | None = None) -> dict | None:
    """The one transaction that makes the kernel's table equal to `desired` (None: our table
    must not exist), or None when nothing is to be done. `observed` None: the table is absent."""
    if desired is None:
        if observed is None:
            return None
        return {"nftables": [{"delete": _ref(family, name)}]}
    objects = desired.objects()
    if observed == objects:
        return None
    ref = _ref(desired.family, desired.name)
    # add first so that delete cannot fail on a missing table; then the whole table again
    return {"nftables": [{"add": ref}, {"delete": ref}, *({"add": o} for o in objects)]}


# --- the backend ------------------------------------------------------------------------------


class Nftables:
    """Observe and converge Zero-Mesh's tables; `writes` counts transactions run (0 when
    converged), `calls` every nft process (one per observe and one per write)."""

    def __init__(self, run: Runner | None = None, timeout: float = TIMEOUT):
        self._run = run or exec_nft
        self.timeout = timeout
        self.writes = 0
        self.calls = 0

    async def _nft(self, netns: str | None, args: list[str], stdin: str | None = None):
        if netns is not None and not netns_exists(netns):
            raise FileNotFoundError(f"network namespace {netns} does not exist")
        self.calls += 1
        return await self._run(netns, args, stdin, self.timeout)

    async def _list(self, netns: str | None, family: str, name: str) -> str | None:
        rc, out, err = await self._nft(netns, ["-j", "list", "table", family, name])
        if rc != 0:
            if "No such file or directory" in err:
                return None
            raise NftError(f"nft list table {family} {name} in {netns or 'own netns'}: {_first_line(err)}")
        return out

    async def observe(self, netns: str | None, family: str, name: str) -> list[dict] | None:
        """Our table in `netns` as normalised objects; None if it does not exist."""
        out = await self._list(netns, family, name)
        if out is None:
            return None
        try:
            return normalize(out)
        except (ValueError, TypeError, AttributeError) as e:
            raise NftError(f"unreadable nft listing of {family} {name} in {netns}: {e}") from None

    async def counters(self, netns: str | None, desired: Table) -> TableCounters | None:
        """The counters of `desired`'s counted rules as the kernel has them in `netns` (None: our
        table does not exist). Reads only."""
        namespace = namespace_id(netns)
        out = await self._list(netns, desired.family, desired.name)
        if out is None:
            return None
        try:
            return rule_counters(desired, out, namespace)
        except (ValueError, TypeError, AttributeError, KeyError, StopIteration) as e:
            raise NftError(f"unreadable nft counters of {desired.family} {desired.name} in {netns}: {e}") from None

    async def ensure(self, netns: str | None, desired: Table, observed=UNOBSERVED) -> int:
        """Our table in `netns` is exactly `desired`; returns the transactions run (0 or 1).
        Pass `observed` (from `observe`) when it was just read."""
        if observed is UNOBSERVED:
            observed = await self.observe(netns, desired.family, desired.name)
        return await self._apply(netns, table_commands(desired, observed))

    async def remove(self, netns: str | None, family: str, name: str) -> bool:
        """Delete our table `family name` in `netns` if it exists (nothing else)."""
        if netns is not None and not netns_exists(netns):
            return False
        observed = await self.observe(netns, family, name)
        return bool(await self._apply(netns, table_commands(None, observed, family, name)))

    async def _apply(self, netns: str | None, commands: dict | None) -> int:
        if commands is None:
            return 0
        rc, _, err = await self._nft(netns, ["-j", "-f", "-"], json.dumps(commands))
        if rc != 0:
            raise NftError(f"nft -f in {netns or 'own netns'} failed: {_first_line(err)}")
        self.writes += 1
        count("nftables")  # for the reconcile that made it (accounting.counting)
        return 1


def namespace_id(netns: str | None) -> int:
    """The namespace's inode: a namespace deleted and made again under the same name is another."""
    return os.stat(netns_path(netns) if netns is not None else "/proc/self/ns/net").st_ino


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "(no message)"


# --- a fake nft for root-free tests -------------------------------------------------------------


class FakeNft:
    """In-memory nft: `Nftables(run=FakeNft())`. Tables per namespace, each a list of objects
    as nft lists them (with handles, and counters that count), so observe/diff/apply run
    exactly as against the real binary. Transactions are all-or-nothing like nft's."""

    def __init__(self):
        self.tables: dict[str | None, dict[tuple[str, str], list[dict]]] = {}
        self.runs: list[tuple[str | None, list[str]]] = []
        self.stdins: list[str] = []  # every transaction it was given
        self._handle = 0

    async def __call__(self, netns, args, stdin, timeout):
        self.runs.append((netns, list(args)))
        if args[:3] == ["-j", "list", "table"]:
            family, name = args[3], args[4]
            objects = self.tables.get(netns, {}).get((family, name))
            if objects is None:
                return 1, "", f"Error: No such file or directory\nlist table {family} {name}\n"
            return 0, json.dumps({"nftables": [{"metainfo": {"json_schema_version": 1}}, *objects]}), ""
        if args == ["-j", "-f", "-"]:
            self.stdins.append(stdin)
            tables = copy.deepcopy(self.tables.get(netns, {}))
            try:
                for cmd in json.loads(stdin)["nftables"]:
                    self._command(tables, cmd)
            except (KeyError, ValueError) as e:
                return 1, "", f"Error: {e}\n"
            self.tables[netns] = tables
            return 0, "", ""
        return 1, "", f"Error: FakeNft does not know {args}\n"

    def _next(self) -> int:
        self._handle += 1
        return self._handle

    def _command(self, tables, cmd: dict) -> None:
        (verb, item), = cmd.items()
        (kind, obj), = item.items()
        if kind == "table":
            key = (obj["family"], obj["name"])
            if verb == "add":
                tables.setdefault(key, [{"table": {**obj, "handle": self._next()}}])
            elif verb == "delete":
                if key not in tables:
                    raise KeyError(f"No such file or directory: table {key}")
                del tables[key]
            return
        key = (obj["family"], obj["table"])
        if verb != "add" or key not in tables:
            raise KeyError(f"No such file or directory: {verb} {kind} in {key}")
        objects = tables[key]
        if kind == "chain":
            objects.insert(1 + sum("chain" in o for o in objects), {"chain": {**obj, "handle": self._next()}})
        elif kind == "rule":
            if not any("chain" in o and o["chain"]["name"] == obj["chain"] for o in objects):
                raise KeyError(f"No such file or directory: chain {obj['chain']}")
            rule = {**obj, "handle": self._next(),
                    "expr": [{"counter": {"packets": 0, "bytes": 0}} if e == {"counter": None} else e
                             for e in obj["expr"]]}
            chains = [o["chain"]["name"] for o in objects if "chain" in o]
            # rules are listed chain by chain, in chain order
            pos = len(objects)
            for i, o in enumerate(objects):
                if "rule" in o and chains.index(o["rule"]["chain"]) > chains.index(obj["chain"]):
                    pos = i
                    break
            objects.insert(pos, {"rule": rule})
        else:
            raise ValueError(f"FakeNft does not support {kind}")
