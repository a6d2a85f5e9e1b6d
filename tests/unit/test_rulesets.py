"""The nftables rulesets of an NR, the ndmz and the host, as the planner builds them (pure), in
the seed's own syntax; and the ndmz plan for both uplink modes."""

from ipaddress import IPv4Address, IPv4Interface, IPv4Network, ip_address

import pytest

from controller.models.nftables import DROP_REASONS, Match, Rule, Table, daddr, iifname, rule, saddr
from controller.planner import names
from controller.planner.ndmz import (
    DUAL_NIC,
    HOST_LINK,
    NDMZ_GATEWAY,
    SINGLE_NIC,
    UplinkConfig,
    plan_ndmz,
)
from controller.planner.plan import NodeContext
from controller.planner.rulesets import nr_ruleset


def test_nr_ruleset_is_the_seeds_diode_and_masquerade_plus_anti_spoofing():
    assert nr_ruleset(IPv4Network("10.1.1.0/24")).text() == """\
table inet zmesh {
\tchain prerouting {
\t\ttype filter hook prerouting priority filter; policy accept;
\t\tiifname "zmbr" ip saddr != 10.1.1.0/24 counter drop comment "anti-spoofing: workloads send from their subnet only"
\t\tiifname "zmbr" ip daddr 100.64.0.0/10 counter drop comment "workloads never reach the ndmz range"
\t}

\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname "public" ct state established,related accept
\t\tiifname "public" counter drop comment "diode: nothing new enters through public"
\t}

\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\toifname "public" counter comment "what the network sends to the Internet"
\t\tiifname "public" ct state established,related counter accept
\t\tiifname "public" counter drop comment "diode: nothing new enters through public"
\t}

\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\toifname "public" counter masquerade
\t}
}
"""


def ctx(endpoints=("198.51.100.11", "2001:db8::11"), prefix="n1-"):
    return NodeContext("n1", prefix, tuple(ip_address(a) for a in endpoints))


def test_single_nic_ndmz_reaches_the_internet_through_the_host_namespace():
    d = plan_ndmz(ctx(), UplinkConfig())
    assert d.netns == "n1-zmndmz" and d.bridge == "tonrs"
    assert d.gateway == IPv4Interface("100.64.0.1/16")
    up = d.uplink
    assert (up.mode, up.ifname, up.address, up.gateway) == (
        SINGLE_NIC, "public", IPv4Interface("100.127.255.254/30"), IPv4Address("100.127.255.253"))
    assert (up.host_ifname, up.host_address) == ("n1-zmndmz", IPv4Interface("100.127.255.253/30"))
    assert d.host_table == "zmesh-n1"
    assert d.ruleset.text() == """\
table inet zmesh {
\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname "public" ct state established,related accept
\t\tiifname "public" counter drop comment "diode: nothing new enters through public"
\t\tiifname "tonrs" ip daddr != 100.64.0.1 counter drop comment "NRs reach only the gateway of the ndmz"
\t}

\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tiifname "public" ct state established,related accept
\t\tiifname "public" counter drop comment "diode: nothing new enters through public"
\t\tiifname "tonrs" oifname "tonrs" counter drop comment "NRs never reach each other through the ndmz"
\t\tiifname "tonrs" ip saddr != 100.64.0.0/16 counter drop comment "anti-spoofing: only NR public legs"
\t\tiifname "tonrs" ip daddr { 100.127.255.253, 198.51.100.11 } counter drop comment "NRs never reach the node's own addresses"
\t}

\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\toifname "public" counter masquerade
\t}
}
"""
    assert d.host_ruleset.text() == """\
table inet zmesh-n1 {
\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname "n1-zmndmz" ct state established,related accept
\t\tiifname "n1-zmndmz" counter drop comment "diode: nothing new enters through n1-zmndmz"
\t\tiifname != "n1-zmndmz" iifname != "lo" ip daddr 100.127.255.253 counter drop comment "the ndmz link is not reachable from outside"
\t}

\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\toifname "n1-zmndmz" ct state established,related accept
\t\toifname "n1-zmndmz" counter drop comment "diode: nothing new enters the ndmz"
\t}

\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tip saddr 100.127.255.252/30 oifname != "n1-zmndmz" counter masquerade
\t}
}
"""


def test_dual_nic_ndmz_uses_its_own_nic_and_leaves_the_host_alone():
    d = plan_ndmz(ctx(), UplinkConfig("eth1", IPv4Interface("198.51.100.111/24"), IPv4Address("198.51.100.1")))
    up = d.uplink
    assert (up.mode, up.ifname, up.address, up.gateway, up.host_ifname) == (
        DUAL_NIC, "eth1", IPv4Interface("198.51.100.111/24"), IPv4Address("198.51.100.1"), None)
    assert d.host_ruleset is None and d.host_table == "zmesh-n1"  # to be removed if left over
    text = d.ruleset.text()
    assert 'oifname "eth1" counter masquerade' in text and 'iifname "eth1" counter drop' in text
    # NRs still never reach the node's own (other) address
    assert 'ip daddr 198.51.100.11 counter drop' in text


def test_a_hidden_node_blocks_only_the_host_link():
    d = plan_ndmz(ctx(endpoints=()), UplinkConfig())
    assert 'iifname "tonrs" ip daddr 100.127.255.253 counter drop' in d.ruleset.text()


def test_no_prefix_gives_plain_names():
    d = plan_ndmz(ctx(prefix=""), UplinkConfig())
    assert (d.netns, d.uplink.host_ifname, d.host_table) == ("zmndmz", "zmndmz", "zmesh")


@pytest.mark.parametrize("args, message", [
    (dict(address=IPv4Interface("198.51.100.111/24")), "needs --ndmz-nic"),
    (dict(nic="eth1"), "needs --ndmz-address"),
    (dict(nic="eth1", address=IPv4Interface("198.51.100.111/24"), gateway=IPv4Address("192.0.2.1")),
     "not another address"),
    (dict(nic="eth1", address=IPv4Interface("100.64.3.3/24"), gateway=IPv4Address("100.64.3.1")),
     "overlaps the ndmz"),
    (dict(nic="lo", address=IPv4Interface("198.51.100.111/24"), gateway=IPv4Address("198.51.100.1")),
     "can be moved"),
    (dict(nic="eth 1", address=IPv4Interface("198.51.100.111/24"), gateway=IPv4Address("198.51.100.1")),
     "not a valid interface name"),
])
def test_bad_uplink_configuration_is_refused_with_a_reason(args, message):
    with pytest.raises(ValueError, match=message):
        UplinkConfig(**args)


def test_addresses_stay_inside_the_reserved_range():
    from controller.models.resources import RESERVED_RANGE
    assert HOST_LINK.subnet_of(RESERVED_RANGE) and NDMZ_GATEWAY in RESERVED_RANGE


# --- the table model -------------------------------------------------------------------------


def test_objects_are_what_nft_lists_in_json():
    t = Table("inet", "zmesh", (nr_ruleset(IPv4Network("10.1.1.0/24")).chains[0],))
    objs = t.objects()
    assert objs[0] == {"table": {"family": "inet", "name": "zmesh"}}
    assert objs[1] == {"chain": {"family": "inet", "table": "zmesh", "name": "prerouting",
                                 "type": "filter", "hook": "prerouting", "prio": 0, "policy": "accept"}}
    assert objs[2]["rule"]["expr"] == [
        {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "zmbr"}},
        {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                   "right": {"prefix": {"addr": "10.1.1.0", "len": 24}}}},
        {"counter": None}, {"drop": None}]


def test_address_sets_are_sorted_and_single_hosts_are_plain_addresses():
    m = daddr(["198.51.100.11", "10.0.0.0/8"])
    assert m.text() == "ip daddr { 10.0.0.0/8, 198.51.100.11 }"
    assert m.json()["match"]["right"] == {"set": [{"prefix": {"addr": "10.0.0.0", "len": 8}}, "198.51.100.11"]}
    assert saddr("100.64.0.1").json()["match"]["right"] == "100.64.0.1"


@pytest.mark.parametrize("make", [
    lambda: Match("tcp dport", "80"),
    lambda: iifname('bad"name'),
    lambda: Match("ct state", ("bogus",)),
    lambda: rule(iifname("x"), "reject"),
    lambda: Rule((), comment='a "quoted" comment'),
    lambda: daddr([]),
])
def test_the_model_refuses_what_it_cannot_render_faithfully(make):
    with pytest.raises(ValueError):
        make()


def test_names_of_the_ndmz_parts():
    assert names.ndmz_port("blue") == names.ndmz_port("blue") != names.ndmz_port("red")
    assert len(names.ndmz_port("blue")) == 15 and names.ndmz_port("blue").startswith("zp")
    assert names.host_nft_table("") == "zmesh" and names.host_nft_table("1-") == "zmesh-1"


def test_the_rulesets_shown_in_the_docs_are_what_the_code_builds():
    import pathlib
    import re

    doc = (pathlib.Path(__file__).parents[2] / "docs" / "dataplane.md").read_text()
    shown = re.findall(r"```nft\n(.*?)```", doc, re.S)
    node = NodeContext("n1", "n1-", (ip_address("198.51.100.11"),))
    dual = UplinkConfig("eth1", IPv4Interface("198.51.100.111/24"), IPv4Address("198.51.100.1"))
    single = plan_ndmz(node, UplinkConfig())
    assert shown == [nr_ruleset(IPv4Network("10.1.1.0/24")).text(), single.ruleset.text(),
                     single.host_ruleset.text(), plan_ndmz(node, dual).ruleset.text()]


def counted(table) -> set[str]:
    return {r.counts for c in table.chains for r in c.rules if r.counts}


def test_every_drop_and_nat_rule_says_what_its_counter_counts_for_the_metrics():
    single, dual = plan_ndmz(ctx(), UplinkConfig()), plan_ndmz(ctx(), UplinkConfig(
        "eth1", IPv4Interface("198.51.100.111/24"), IPv4Address("198.51.100.1")))
    nr = nr_ruleset(IPv4Network("10.1.1.0/24"))
    assert counted(nr) == {"connections", "sent", "received", "inbound", "spoofed", "to_node"}
    assert counted(single.ruleset) == counted(dual.ruleset) == {
        "connections", "inbound", "spoofed", "to_node", "between_networks"}
    assert counted(single.host_ruleset) == {"inbound", "to_node"}
    for table in (nr, single.ruleset, single.host_ruleset, dual.ruleset):
        for c in table.chains:
            for r in c.rules:
                if "drop" in r.exprs:
                    assert r.counts in DROP_REASONS, r
    with pytest.raises(ValueError, match="needs a counter"):
        rule(iifname("public"), "drop", counts="inbound")
    with pytest.raises(ValueError):
        rule(iifname("public"), "counter", "drop", counts="whatever")
