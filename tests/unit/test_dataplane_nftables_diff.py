"""The nftables backend against FakeNft (no root): observe -> pure diff -> one transaction,
nothing written when converged, drift replaced, foreign tables never touched."""

import json
from ipaddress import IPv4Network

import pytest

from controller.dataplane import nftables
from controller.dataplane.nftables import FakeNft, Nftables, NftError, normalize, table_commands
from controller.planner.rulesets import nr_ruleset

SUBNET = IPv4Network("10.1.1.0/24")
FOREIGN = [{"table": {"family": "ip", "name": "nat", "handle": 900}},
           {"chain": {"family": "ip", "table": "nat", "name": "post", "handle": 901, "type": "nat",
                      "hook": "postrouting", "prio": 100, "policy": "accept"}}]


@pytest.fixture(autouse=True)
def no_namespace_check(monkeypatch):
    monkeypatch.setattr(nftables, "netns_exists", lambda ref: True)


def backend():
    fake = FakeNft()
    return fake, Nftables(run=fake)


async def test_a_missing_table_is_created_in_one_nft_run_and_then_left_alone():
    fake, nft = backend()
    table = nr_ruleset(SUBNET)
    assert await nft.observe("nr", "inet", "zmesh") is None
    assert await nft.ensure("nr", table) == 1
    assert [args for _, args in fake.runs] == [["-j", "list", "table", "inet", "zmesh"]] * 2 + [["-j", "-f", "-"]]
    assert await nft.observe("nr", "inet", "zmesh") == table.objects()
    runs = len(fake.runs)
    for _ in range(3):
        assert await nft.ensure("nr", table) == 0
    assert nft.writes == 1
    assert len(fake.runs) == runs + 3  # one listing per converged pass, no write


async def test_counter_values_and_handles_do_not_count_as_drift():
    fake, nft = backend()
    table = nr_ruleset(SUBNET)
    await nft.ensure("nr", table)
    for obj in fake.tables["nr"][("inet", "zmesh")]:
        for e in obj.get("rule", {}).get("expr", []):
            if "counter" in e:
                e["counter"] = {"packets": 42, "bytes": 4200}
    assert await nft.ensure("nr", table) == 0


@pytest.mark.parametrize("drift", ["delete a rule", "change a rule", "add a rule", "drop a chain", "policy drop"])
async def test_drift_is_replaced_by_the_whole_table_in_one_transaction(drift):
    fake, nft = backend()
    table = nr_ruleset(SUBNET)
    await nft.ensure("nr", table)
    objects = fake.tables["nr"][("inet", "zmesh")]
    rules = [o for o in objects if "rule" in o]
    if drift == "delete a rule":
        objects.remove(rules[0])
    elif drift == "change a rule":
        rules[0]["rule"]["expr"][-1] = {"accept": None}
    elif drift == "add a rule":
        objects.append({"rule": {**rules[0]["rule"], "handle": 999, "expr": [{"accept": None}]}})
    elif drift == "drop a chain":
        objects[:] = [o for o in objects if not ("chain" in o and o["chain"]["name"] == "forward")
                      and not ("rule" in o and o["rule"]["chain"] == "forward")]
    else:
        next(o for o in objects if "chain" in o)["chain"]["policy"] = "drop"
    runs = len(fake.runs)
    assert await nft.ensure("nr", table) == 1
    assert len(fake.runs) == runs + 2  # one listing, one transaction
    assert await nft.observe("nr", "inet", "zmesh") == table.objects()


async def test_foreign_tables_in_the_namespace_are_never_touched():
    fake, nft = backend()
    fake.tables["nr"] = {("ip", "nat"): json.loads(json.dumps(FOREIGN)),
                         ("inet", "zmesh-other"): [{"table": {"family": "inet", "name": "zmesh-other", "handle": 7}}]}
    def foreign():
        return json.dumps({f"{f} {n}": objs for (f, n), objs in fake.tables["nr"].items() if n != "zmesh"},
                          sort_keys=True)
    before = foreign()
    await nft.ensure("nr", nr_ruleset(SUBNET))
    await nft.ensure("nr", nr_ruleset(IPv4Network("10.1.2.0/24")))  # a change: replaced
    assert await nft.remove("nr", "inet", "zmesh")
    assert foreign() == before and ("inet", "zmesh") not in fake.tables["nr"]
    commands = [json.loads(r) for r in fake.stdins]
    for doc in commands:
        for cmd in doc["nftables"]:
            (_, item), = cmd.items()
            (kind, obj), = item.items()
            assert (obj["family"], obj.get("table", obj.get("name"))) == ("inet", "zmesh"), cmd


async def test_remove_is_a_no_op_when_the_table_is_absent():
    fake, nft = backend()
    assert not await nft.remove("nr", "inet", "zmesh")
    assert nft.writes == 0


async def test_an_nft_error_is_raised_with_its_message_and_nothing_is_counted():
    async def failing(netns, args, stdin, timeout):
        if args[1] == "list":
            return 1, "", "Error: No such file or directory\n"
        return 1, "", "Error: Could not process rule: Operation not supported\nadd rule ...\n"
    nft = Nftables(run=failing)
    with pytest.raises(NftError, match="Operation not supported"):
        await nft.ensure("nr", nr_ruleset(SUBNET))
    assert nft.writes == 0


async def test_an_unreadable_listing_is_an_error_not_a_crash():
    async def garbage(netns, args, stdin, timeout):
        return 0, "{not json", ""
    with pytest.raises(NftError, match="unreadable"):
        await Nftables(run=garbage).observe("nr", "inet", "zmesh")


async def test_a_missing_namespace_is_refused_before_running_nft(monkeypatch):
    monkeypatch.setattr(nftables, "netns_exists", lambda ref: False)
    fake, nft = backend()
    with pytest.raises(FileNotFoundError):
        await nft.observe("gone", "inet", "zmesh")
    assert fake.runs == [] and not await nft.remove("gone", "inet", "zmesh")


def test_the_diff_is_pure_and_replaces_only_our_table():
    table = nr_ruleset(SUBNET)
    assert table_commands(table, table.objects()) is None
    assert table_commands(None, None, "inet", "zmesh") is None
    cmds = table_commands(table, None)["nftables"]
    ref = {"table": {"family": "inet", "name": "zmesh"}}
    assert cmds[:3] == [{"add": ref}, {"delete": ref}, {"add": ref}]
    assert [c["add"] for c in cmds[2:]] == table.objects()
    assert table_commands(None, table.objects(), "inet", "zmesh") == {"nftables": [{"delete": ref}]}


def test_normalize_drops_metainfo_handles_and_counter_values():
    listing = {"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"table": {"family": "inet", "name": "zmesh", "handle": 3}},
        {"rule": {"family": "inet", "table": "zmesh", "chain": "input", "handle": 9,
                  "expr": [{"counter": {"packets": 5, "bytes": 500}}, {"counter": "named"}, {"drop": None}]}},
    ]}
    assert normalize(json.dumps(listing)) == [
        {"table": {"family": "inet", "name": "zmesh"}},
        {"rule": {"family": "inet", "table": "zmesh", "chain": "input",
                  "expr": [{"counter": None}, {"counter": "named"}, {"drop": None}]}},
    ]


# --- counters read back for the metrics -------------------------------------------------------

def set_counter(fake, comment_or_chain: str, packets: int, netns=None) -> None:
    """Give the rules whose comment (or chain, for uncommented rules) matches a counter value."""
    for obj in fake.tables[netns][("inet", "zmesh")]:
        rule = obj.get("rule")
        if rule and comment_or_chain in (rule.get("comment"), rule["chain"]):
            for e in rule["expr"]:
                if "counter" in e:
                    e["counter"] = {"packets": packets, "bytes": 100 * packets}


async def test_counters_are_read_for_the_counted_rules_by_what_they_count():
    fake, nft = backend()
    table = nr_ruleset(SUBNET)
    assert await nft.counters(None, table) is None  # no table yet
    await nft.ensure(None, table)
    set_counter(fake, "anti-spoofing: workloads send from their subnet only", 3)
    set_counter(fake, "postrouting", 5)
    read = await nft.counters(None, table)
    got = {(c.counts, c.packets, c.bytes) for c in read.rules}
    assert got == {("spoofed", 3, 300), ("connections", 5, 500), ("to_node", 0, 0), ("inbound", 0, 0),
                   ("sent", 0, 0), ("received", 0, 0)}
    assert sum(c.counts == "inbound" for c in read.rules) == 2  # the diodes of input and forward
    assert len({c.handle for c in read.rules}) == len(read.rules)
    assert nft.writes == 1  # reading writes nothing


async def test_a_rule_changed_by_hand_is_not_read_and_a_replaced_table_is_a_new_generation():
    fake, nft = backend()
    table = nr_ruleset(SUBNET)
    await nft.ensure(None, table)
    before = await nft.counters(None, table)
    spoof = next(o["rule"] for o in fake.tables[None][("inet", "zmesh")]
                 if o.get("rule", {}).get("comment", "").startswith("anti-spoofing"))
    spoof["comment"] = "changed by hand"
    assert "spoofed" not in {c.counts for c in (await nft.counters(None, table)).rules}
    assert await nft.ensure(None, table) == 1  # the drift repaired: the table made anew
    after = await nft.counters(None, table)
    assert after.generation != before.generation
    assert {c.counts for c in after.rules} == {c.counts for c in before.rules}


def test_an_unreadable_counter_listing_is_an_error():
    table = nr_ruleset(SUBNET)
    bad = {"nftables": [{"table": {"family": "inet", "name": "zmesh", "handle": 1}},
                        {"rule": {**table.objects()[5]["rule"], "handle": 7}}]}  # a counted rule
    bad["nftables"][1]["rule"]["expr"] = [
        e if e != {"counter": None} else {"counter": {"packets": "many", "bytes": 0}}
        for e in bad["nftables"][1]["rule"]["expr"]]
    with pytest.raises(ValueError):
        nftables.rule_counters(table, bad)


async def test_an_nft_run_that_is_cancelled_stays_a_cancellation_and_one_past_its_timeout_is_an_error(monkeypatch):
    import asyncio
    import shutil

    # `sleep` stands in for an nft that does not answer (root-free); no namespace: our own.
    monkeypatch.setattr(nftables, "_nft_binary", lambda: shutil.which("sleep"))
    with pytest.raises(NftError, match="did not finish within 0.2 s"):
        await nftables.exec_nft(None, ["30"], None, 0.2)
    task = asyncio.create_task(nftables.exec_nft(None, ["30"], None, 30))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task  # a stopping agent's reconcile is not an nft failure it would publish
    # The observer's read timeout cancels the run too: a timeout, never a misleading NftError.
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(nftables.exec_nft(None, ["30"], None, 30), 0.2)
