"""An nftables table as data: what the planner builds and the dataplane applies and compares.

The planner (pure) builds a `Table` for every namespace Zero-Mesh manages; the dataplane's
nftables backend applies it with one `nft -j -f -` transaction and compares it with what
`nft -j list table` reports. Both sides use the forms here, so there is one definition of the
format: `Table.objects()` is the table exactly as nft lists it in JSON (minus handles and
counter values), `Table.text()` the same table in nft's own syntax (docs, logs, the benchmark).

Only the vocabulary the rulesets need exists (interface names, IPv4 addresses and prefixes,
conntrack state, counter, accept/drop/masquerade); an integration test applies every ruleset
to a real namespace and checks that nft lists it back exactly as `objects()` says, so "nothing
changed" is a plain comparison and a converged node never rewrites a table.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

IPv4Net = ipaddress.IPv4Network

# Base chain priorities as nft names them (nft lists them as numbers in JSON).
PRIORITY_NAMES = {-300: "raw", -150: "mangle", -100: "dstnat", 0: "filter", 50: "security", 100: "srcnat"}
FILTER, SRCNAT = 0, 100

_LEFT = {
    "iifname": {"meta": {"key": "iifname"}},
    "oifname": {"meta": {"key": "oifname"}},
    "ip saddr": {"payload": {"protocol": "ip", "field": "saddr"}},
    "ip daddr": {"payload": {"protocol": "ip", "field": "daddr"}},
    "ct state": {"ct": {"key": "state"}},
}
_STATEMENTS = ("counter", "accept", "drop", "masquerade")
# What a rule's counter counts, for the agent's metrics (docs/observability.md, "Internet access"):
# not part of the rule in the kernel, only how the observer reads its counter back.
COUNTS = ("connections", "sent", "received", "inbound", "spoofed", "to_node", "between_networks")
DROP_REASONS = ("inbound", "spoofed", "to_node", "between_networks")
_CT_STATES = ("established", "related", "new", "invalid", "untracked")


def _json_address(net: IPv4Net):
    # nft lists a /32 as a plain address and anything wider as a prefix
    if net.prefixlen == 32:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _text_address(net: IPv4Net) -> str:
    return str(net.network_address) if net.prefixlen == 32 else str(net)


@dataclass(frozen=True)
class Match:
    """`key [!=] value`: an interface name, one or more IPv4 prefixes, or conntrack states."""

    key: str
    value: str | tuple[IPv4Net, ...] | tuple[str, ...]
    negate: bool = False

    def __post_init__(self):
        if self.key not in _LEFT:
            raise ValueError(f"unsupported match {self.key!r}")
        if self.key.startswith("ip "):
            nets = tuple(sorted({ipaddress.IPv4Network(v) for v in self.value}))
            if not nets:
                raise ValueError(f"{self.key}: no address")
            object.__setattr__(self, "value", nets)
        elif self.key == "ct state":
            if not self.value or any(s not in _CT_STATES for s in self.value) or self.negate:
                raise ValueError(f"bad ct state match {self.value!r}")
            # nft lists the states in its own (bit) order
            object.__setattr__(self, "value", tuple(s for s in _CT_STATES if s in self.value))
        elif not isinstance(self.value, str) or not self.value or '"' in self.value:
            raise ValueError(f"bad interface name {self.value!r}")

    def json(self) -> dict:
        op = "!=" if self.negate else "=="
        if self.key == "ct state":
            return {"match": {"op": "in", "left": _LEFT[self.key], "right": list(self.value)}}
        if self.key.startswith("ip "):
            right = (_json_address(self.value[0]) if len(self.value) == 1
                     else {"set": [_json_address(n) for n in self.value]})
        else:
            right = self.value
        return {"match": {"op": op, "left": _LEFT[self.key], "right": right}}

    def text(self) -> str:
        neg = "!= " if self.negate else ""
        if self.key == "ct state":
            return f"ct state {','.join(self.value)}"
        if self.key.startswith("ip "):
            items = [_text_address(n) for n in self.value]
            value = items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"
        else:
            value = f'"{self.value}"'
        return f"{self.key} {neg}{value}"


@dataclass(frozen=True)
class Rule:
    """Matches, then statements ("counter", then a verdict or "masquerade"), and a comment.
    `counts` names what its counter counts for the metrics (one of COUNTS; "": not read)."""

    exprs: tuple[Match | str, ...]
    comment: str = ""
    counts: str = ""

    def __post_init__(self):
        for e in self.exprs:
            if isinstance(e, str) and e not in _STATEMENTS:
                raise ValueError(f"unsupported statement {e!r}")
        if self.counts and (self.counts not in COUNTS or "counter" not in self.exprs):
            raise ValueError(f"a rule that counts {self.counts!r} needs a counter and one of {COUNTS}")
        if '"' in self.comment or len(self.comment) > 128:
            raise ValueError("a rule comment has no double quote and at most 128 characters")

    def json(self, family: str, table: str, chain: str) -> dict:
        exprs = [e.json() if isinstance(e, Match) else {e: None} for e in self.exprs]
        rule = {"family": family, "table": table, "chain": chain}
        if self.comment:
            rule["comment"] = self.comment
        rule["expr"] = exprs
        return {"rule": rule}

    def text(self) -> str:
        words = [e.text() if isinstance(e, Match) else e for e in self.exprs]
        if self.comment:
            words.append(f'comment "{self.comment}"')
        return " ".join(words)


@dataclass(frozen=True)
class Chain:
    """A base chain (type, hook, priority, policy) and its rules in order."""

    name: str
    type: str  # filter | nat
    hook: str  # prerouting | input | forward | output | postrouting
    priority: int
    rules: tuple[Rule, ...]
    policy: str = "accept"

    def json(self, family: str, table: str) -> dict:
        return {"chain": {"family": family, "table": table, "name": self.name, "type": self.type,
                          "hook": self.hook, "prio": self.priority, "policy": self.policy}}

    def text(self) -> list[str]:
        prio = PRIORITY_NAMES.get(self.priority, str(self.priority))
        return ([f"\tchain {self.name} {{",
                 f"\t\ttype {self.type} hook {self.hook} priority {prio}; policy {self.policy};"]
                + [f"\t\t{r.text()}" for r in self.rules] + ["\t}"])


@dataclass(frozen=True)
class Table:
    """One table owned by Zero-Mesh in one namespace: the whole desired ruleset there."""

    family: str
    name: str
    chains: tuple[Chain, ...] = field(default=())

    def objects(self) -> list[dict]:
        """The table as `nft -j list table` lists it: table, chains, then rules chain by chain
        (no handles; counters without values)."""
        out: list[dict] = [{"table": {"family": self.family, "name": self.name}}]
        out += [c.json(self.family, self.name) for c in self.chains]
        for c in self.chains:
            out += [r.json(self.family, self.name, c.name) for r in c.rules]
        return out

    def text(self) -> str:
        """The table in nft syntax (what `nft list table` prints, counters aside)."""
        body: list[str] = []
        for i, c in enumerate(self.chains):
            body += ([""] if i else []) + c.text()
        return "\n".join([f"table {self.family} {self.name} {{", *body, "}"]) + "\n"

    def rule_count(self) -> int:
        return sum(len(c.rules) for c in self.chains)


# --- constructors that make the rulesets read like nft --------------------------------------


def iifname(name: str, negate: bool = False) -> Match:
    return Match("iifname", name, negate)


def oifname(name: str, negate: bool = False) -> Match:
    return Match("oifname", name, negate)


def saddr(nets: Iterable, negate: bool = False) -> Match:
    return Match("ip saddr", tuple(_as_nets(nets)), negate)


def daddr(nets: Iterable, negate: bool = False) -> Match:
    return Match("ip daddr", tuple(_as_nets(nets)), negate)


def ct_state(*states: str) -> Match:
    return Match("ct state", states)


def rule(*exprs: Match | str, comment: str = "", counts: str = "") -> Rule:
    return Rule(tuple(exprs), comment, counts)


def _as_nets(values) -> list[IPv4Net]:
    if isinstance(values, (str, ipaddress.IPv4Address, ipaddress.IPv4Network)):
        values = [values]
    return [ipaddress.IPv4Network(v) for v in values]
