"""nftables: the agent's way (the whole table of a namespace as data, compared with one
`nft -j list`, replaced with one atomic `nft -j -f`) against the seed's way (one `nft add`
process per table, chain and rule), on the NR's and the ndmz's rulesets, in the same run.

  sudo .venv/bin/python bench/bench_nftables.py [--namespaces 20] [--rounds 3]

For every fresh namespace (half of them get the NR ruleset, half the ndmz's):
1. apply from empty: `Nftables.ensure()` (one listing that finds nothing, one transaction) vs the
   same rules as per-object `nft add` commands, one process each (the seed's "rules NR" style);
2. converged pass: `ensure()` again (one listing, zero writes) — the baseline has no way to know
   it is converged short of listing and parsing too, so only ours is shown;
3. one rule changed by hand: `ensure()` (listing, one transaction replacing the table) vs the
   baseline deleting and re-adding that one rule (two processes, knowing which one changed);
4. reading the counters of the table's counted rules: `Nftables.counters()` (what the observer
   does every interval) vs `nft -j list table` alone, its output parsed as JSON (no matching).
Also the seed's literal "rules NR" (three rules, plus the two tables and chains they need).

Prints medians and ratios (baseline / ours: > 1 means ours is faster). Not part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from ipaddress import IPv4Network, ip_address

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from controller.dataplane.netns import create_netns, delete_netns, netns_path  # noqa: E402
from controller.dataplane.nftables import Nftables  # noqa: E402
from controller.models.nftables import PRIORITY_NAMES, Table  # noqa: E402
from controller.planner.ndmz import UplinkConfig, plan_ndmz  # noqa: E402
from controller.planner.plan import NodeContext  # noqa: E402
from controller.planner.rulesets import nr_ruleset  # noqa: E402

SEED_NR = [  # the seed's "rules NR", with the tables and chains they need
    "add table inet nat",
    "add chain inet nat postrouting { type nat hook postrouting priority 100 ; }",
    "add table inet filter",
    "add chain inet filter input { type filter hook input priority 0 ; }",
    "add rule inet nat postrouting oifname public masquerade",
    "add rule inet filter input iifname public ct state { established, related } accept",
    "add rule inet filter input iifname public drop",
]


def per_object_commands(table: Table) -> list[str]:
    """`table` as the seed would type it: one nft command per table, chain and rule."""
    ref = f"{table.family} {table.name}"
    out = [f"add table {ref}"]
    for c in table.chains:
        prio = PRIORITY_NAMES.get(c.priority, str(c.priority))
        out.append(f"add chain {ref} {c.name} {{ type {c.type} hook {c.hook} priority {prio} ; "
                   f"policy {c.policy} ; }}")
    for c in table.chains:
        out += [f"add rule {ref} {c.name} {r.text()}" for r in c.rules]
    return out


def nft_each(netns: str, commands: list[str]) -> None:
    """One `nft` process per command, inside `netns` (what a shell script does)."""
    for cmd in commands:
        subprocess.run(["nsenter", f"--net={netns_path(netns)}", "--", "nft", cmd], check=True,
                       capture_output=True)


def nft_once(netns: str, *args: str) -> str:
    return subprocess.run(["nsenter", f"--net={netns_path(netns)}", "--", "nft", *args], check=True,
                          capture_output=True, text=True).stdout


def row(name: str, ours: float, base: float | None) -> None:
    tail = f"   baseline {base * 1e3:8.2f} ms   ratio {base / ours:5.1f}x" if base is not None else ""
    print(f"  {name:<58} ours {ours * 1e3:8.2f} ms{tail}")


async def measure(n: int, rounds: int) -> None:
    ctx = NodeContext("n1", "b-", (ip_address("198.51.100.11"),))
    tables = [nr_ruleset(IPv4Network(f"10.1.{i}.0/24")) if i % 2 == 0 else plan_ndmz(ctx, UplinkConfig()).ruleset
              for i in range(n)]
    rules = statistics.mean(t.rule_count() for t in tables)
    sfx = secrets.token_hex(3)
    samples: dict[str, list[float]] = {k: [] for k in ("apply", "apply-base", "converged", "change",
                                                       "change-base", "seed", "counters",
                                                       "counters-base")}
    backend = Nftables()
    for r in range(rounds):
        ours_ns = [f"zbn{sfx}o{r}-{i}" for i in range(n)]
        base_ns = [f"zbn{sfx}b{r}-{i}" for i in range(n)]
        seed_ns = [f"zbn{sfx}s{r}-{i}" for i in range(n)]
        for ns in ours_ns + base_ns + seed_ns:
            await create_netns(ns)
        try:
            for i in range(n):  # interleaved, so load from others hits both sides alike
                t = time.perf_counter()
                assert await backend.ensure(ours_ns[i], tables[i]) == 1
                samples["apply"].append(time.perf_counter() - t)
                t = time.perf_counter()
                nft_each(base_ns[i], per_object_commands(tables[i]))
                samples["apply-base"].append(time.perf_counter() - t)
                t = time.perf_counter()
                nft_each(seed_ns[i], SEED_NR)
                samples["seed"].append(time.perf_counter() - t)
            for i in range(n):
                t = time.perf_counter()
                assert await backend.ensure(ours_ns[i], tables[i]) == 0
                samples["converged"].append(time.perf_counter() - t)
            for i in range(n):
                chain = tables[i].chains[1]  # input: replace its last rule by hand in both
                for ns in (ours_ns[i], base_ns[i]):
                    handle = nft_once(ns, "-a", "list", "chain", "inet", "zmesh", chain.name).split("# handle ")[-1].split()[0]
                    nft_once(ns, "replace", "rule", "inet", "zmesh", chain.name, "handle", handle, "accept")
                t = time.perf_counter()
                assert await backend.ensure(ours_ns[i], tables[i]) == 1
                samples["change"].append(time.perf_counter() - t)
                t = time.perf_counter()
                handle = nft_once(base_ns[i], "-a", "list", "chain", "inet", "zmesh", chain.name).split("# handle ")[-1].split()[0]
                nft_each(base_ns[i], [f"delete rule inet zmesh {chain.name} handle {handle}",
                                      f"add rule inet zmesh {chain.name} {chain.rules[-1].text()}"])
                samples["change-base"].append(time.perf_counter() - t)
            for i in range(n):  # the table as it is now in both (the change repaired)
                t = time.perf_counter()
                assert await backend.counters(ours_ns[i], tables[i]) is not None
                samples["counters"].append(time.perf_counter() - t)
                t = time.perf_counter()
                json.loads(nft_once(base_ns[i], "-j", "list", "table", "inet", "zmesh"))
                samples["counters-base"].append(time.perf_counter() - t)
        finally:
            for ns in ours_ns + base_ns + seed_ns:
                await delete_netns(ns)
    med = {k: statistics.median(v) for k, v in samples.items()}
    print(f"{n} namespaces x {rounds} rounds; NR and ndmz rulesets, {rules:.1f} rules each on average; medians per namespace")
    row("apply a whole ruleset to an empty namespace", med["apply"], med["apply-base"])
    row("  vs the seed's 'rules NR' alone (3 rules, 2 tables+chains)", med["apply"], med["seed"])
    row("converged pass (one listing, zero writes)", med["converged"], None)
    row("one rule changed by hand, repaired", med["change"], med["change-base"])
    row("read the counters of the counted rules", med["counters"], med["counters-base"])
    print("  baseline: one `nsenter ... nft add ...` process per table, chain and rule (the seed's way);")
    print("  the change baseline is told which rule changed and only lists the chain, deletes and re-adds it;")
    print("  the counters baseline is `nsenter ... nft -j list table inet zmesh` and json.loads, no matching")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--namespaces", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (creates network namespaces)")
    asyncio.run(measure(args.namespaces, args.rounds))


if __name__ == "__main__":
    main()
