"""The nftables backend on real namespaces with the real nft: every planned ruleset is listed
back exactly as planned (so a converged namespace is never rewritten), drift made by hand is
replaced in one transaction, and foreign tables are never touched."""

from __future__ import annotations

import json
import subprocess
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, ip_address

import pytest
from dataplane_world import world  # noqa: F401 (fixture)
from dataplane_world import needs_root

from controller.dataplane.nftables import Nftables, normalize
from controller.planner.ndmz import UplinkConfig, plan_ndmz
from controller.planner.plan import NodeContext
from controller.planner.rulesets import nr_ruleset

pytestmark = [pytest.mark.root, needs_root]

CTX = NodeContext("n1", "n1-", (ip_address("198.51.100.11"), ip_address("2001:db8::11")))
SINGLE = plan_ndmz(CTX, UplinkConfig())
DUAL = plan_ndmz(CTX, UplinkConfig("eth1", IPv4Interface("198.51.100.111/24"), IPv4Address("198.51.100.1")))
RULESETS = {
    "nr": nr_ruleset(IPv4Network("10.1.1.0/24")),
    "ndmz-single-nic": SINGLE.ruleset,
    "ndmz-dual-nic": DUAL.ruleset,
    "host": SINGLE.host_ruleset,
}


def nft(netns: str, *args: str, input: str | None = None) -> str:
    return subprocess.run(["ip", "netns", "exec", netns, "nft", *args], input=input, text=True,
                          capture_output=True, check=True).stdout


def listing(netns: str, family: str, name: str) -> list[dict]:
    return json.loads(nft(netns, "-j", "list", "table", family, name))["nftables"]


@pytest.mark.parametrize("which", sorted(RULESETS))
async def test_a_planned_ruleset_is_listed_back_exactly_and_then_never_rewritten(world, which):
    ns = await world.netns("nft")
    table = RULESETS[which]
    backend = Nftables()
    assert await backend.ensure(ns, table) == 1
    assert await backend.observe(ns, table.family, table.name) == table.objects()
    for _ in range(3):
        assert await backend.ensure(ns, table) == 0
    assert backend.writes == 1
    # The text form (docs, logs) is the same table: loaded by nft it lists identically.
    other = await world.netns("nfttext")
    nft(other, "-f", "-", input=table.text())
    assert normalize({"nftables": listing(other, table.family, table.name)}) == table.objects()


def handle_of(netns: str, chain: str, index: int = 0) -> int:
    rules = [o["rule"] for o in listing(netns, "inet", "zmesh") if "rule" in o and o["rule"]["chain"] == chain]
    return rules[index]["handle"]


@pytest.mark.parametrize("drift", [
    lambda ns: nft(ns, "delete", "rule", "inet", "zmesh", "input", "handle", str(handle_of(ns, "input", 1))),
    lambda ns: nft(ns, "insert", "rule", "inet", "zmesh", "forward", "accept"),
    lambda ns: nft(ns, "replace", "rule", "inet", "zmesh", "forward", "handle", str(handle_of(ns, "forward", 1)),
                   "iifname", "public", "accept"),
    lambda ns: nft(ns, "flush", "chain", "inet", "zmesh", "postrouting"),
    lambda ns: nft(ns, "delete", "chain", "inet", "zmesh", "prerouting"),
    lambda ns: nft(ns, "add", "chain", "inet", "zmesh", "extra"),
    lambda ns: nft(ns, "delete", "table", "inet", "zmesh"),
    lambda ns: nft(ns, "flush", "ruleset"),
], ids=["rule deleted", "rule inserted", "rule replaced", "chain flushed", "chain deleted",
        "chain added", "table deleted", "ruleset flushed"])
async def test_drift_made_by_hand_is_replaced_in_one_transaction(world, drift):
    ns = await world.netns("nft")
    table = RULESETS["nr"]
    backend = Nftables()
    await backend.ensure(ns, table)
    drift(ns)
    assert await backend.observe(ns, "inet", "zmesh") != table.objects()
    calls = backend.calls
    assert await backend.ensure(ns, table) == 1
    assert backend.calls == calls + 2  # one listing, one `nft -f`
    assert await backend.observe(ns, "inet", "zmesh") == table.objects()


FOREIGN = """
table ip foreign {
  chain post { type nat hook postrouting priority srcnat; policy accept; counter masquerade; }
}
table inet zmesh-n2 {
  chain input { type filter hook input priority filter; policy accept; iifname "x" counter drop; }
}
table inet filter {
  chain forward { type filter hook forward priority filter; policy accept; counter; }
}
"""


async def test_foreign_tables_in_the_namespace_are_never_touched(world):
    ns = await world.netns("nft")
    nft(ns, "-f", "-", input=FOREIGN)
    before = {t: listing(ns, *t.split()) for t in ("ip foreign", "inet zmesh-n2", "inet filter")}
    backend = Nftables()
    await backend.ensure(ns, RULESETS["host"])  # our own table in a shared namespace: zmesh-n1
    await backend.ensure(ns, RULESETS["nr"])
    await backend.ensure(ns, nr_ruleset(IPv4Network("10.1.9.0/24")))  # replaced
    assert await backend.remove(ns, "inet", "zmesh")
    assert await backend.remove(ns, "inet", "zmesh-n1")
    assert not await backend.remove(ns, "inet", "zmesh")
    after = {t: listing(ns, *t.split()) for t in before}
    assert after == before  # same objects, same handles
    tables = {(o["table"]["family"], o["table"]["name"]) for o in json.loads(nft(ns, "-j", "list", "tables"))["nftables"]
              if "table" in o}
    assert tables == {("ip", "foreign"), ("inet", "zmesh-n2"), ("inet", "filter")}
