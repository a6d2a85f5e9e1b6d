"""The echo probe through a WireGuard tunnel (controller/dataplane/probe.py), on two nodes with
real wireguard-go: it answers through the tunnel, and only through the tunnel."""

from __future__ import annotations

import subprocess
from ipaddress import IPv4Address

import pytest
from dataplane_world import world  # noqa: F401 (fixture)
from dataplane_world import needs_root

from controller.dataplane import probe

pytestmark = [pytest.mark.root, needs_root]


async def test_the_peer_nr_gateway_answers_through_the_tunnel_until_its_udp_is_dropped(world):
    a, b, _, _ = await world.two_nodes()
    answers = await probe.echo(a.nr_ns, a.wg, a.gateway.ip, [b.gateway.ip], timeout=2)
    assert answers == {b.gateway.ip: True}
    device = await a.backend.get(a.wg, a.nr_ns)
    assert device.peers[b.keys[1]].last_handshake > 0, "the probe went through WireGuard"

    # A foreign table in b's node namespace drops its WireGuard UDP: b's NR no longer answers.
    subprocess.run(["ip", "netns", "exec", b.node_ns, "nft", "-f", "-"], check=True, text=True, input=f"""
table inet zmtest-blackhole {{
  chain input {{ type filter hook input priority -10; udp dport {b.port} drop; }}
  chain output {{ type filter hook output priority -10; udp sport {b.port} drop; }}
}}""")
    assert await probe.echo(a.nr_ns, a.wg, a.gateway.ip, [b.gateway.ip], timeout=1) == {b.gateway.ip: False}
    subprocess.run(["ip", "netns", "exec", b.node_ns, "nft", "delete", "table", "inet", "zmtest-blackhole"],
                   check=True)
    assert (await probe.echo(a.nr_ns, a.wg, a.gateway.ip, [b.gateway.ip], timeout=2))[b.gateway.ip]


async def test_an_address_the_tunnel_does_not_carry_never_answers(world):
    a, b, _, _ = await world.two_nodes()
    # b's underlay address answers pings on the underlay, but a probe from the NR is bound to the
    # WireGuard interface, whose AllowedIPs do not cover it; the other target still answers.
    outside = IPv4Address(str(b.underlay.ip))
    answers = await probe.echo(a.nr_ns, a.wg, a.gateway.ip, [outside, b.gateway.ip], timeout=1)
    assert answers == {outside: False, b.gateway.ip: True}


async def test_a_vanished_namespace_is_an_oserror(world):
    a, _, _, _ = await world.two_nodes()
    with pytest.raises(OSError):
        await probe.echo(f"{a.nr_ns}-gone", a.wg, a.gateway.ip, [IPv4Address("10.1.2.1")])


def test_echo_packets_round_trip():
    request = probe.echo_request(0x1234, 7)
    assert probe._checksum(request) == 0
    ip_header = bytes([0x45, 0, 0, 28 + 11, 0, 0, 0, 0, 64, 1, 0, 0, 10, 1, 2, 1, 10, 1, 1, 1])
    reply = bytes([probe.ECHO_REPLY]) + request[1:]
    assert probe.parse_echo_reply(ip_header + reply) == (IPv4Address("10.1.2.1"), 0x1234, 7)
    assert probe.parse_echo_reply(ip_header + request) is None
    assert probe.parse_echo_reply(b"\x45" + bytes(5)) is None
