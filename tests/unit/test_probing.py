"""The prober (controller/reconciler/probing.py) with a fake echo, a fake WireGuard device and a
fake clock: what it publishes, when, and what it remembers."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from controller.dataplane.wireguard.base import DeviceState, PeerState, WireGuardError
from controller.planner.aggregator import FAILING, FORWARDING, RECOVERING
from controller.planner.plan import ProbeTarget
from controller.reconciler import probing
from controller.reconciler.probing import Prober

KEYS = {"n1": "A" * 43 + "=", "n2": "B" * 43 + "=", "n3": "C" * 43 + "="}
GW = {"n1": IPv4Address("10.1.1.1"), "n2": IPv4Address("10.1.2.1"), "n3": IPv4Address("10.1.3.1")}


def target(node):
    return ProbeTarget(node, KEYS[node], GW[node])


class Fakes:
    def __init__(self, monkeypatch):
        self.now = 1_000_000.0
        self.up = {n: True for n in GW}  # does the NR behind the tunnel answer
        self.handshake_age = 5.0
        self.alive = {n: True for n in GW}
        self.published = {}
        self.writes = 0
        self.wg_broken = False

        async def echo(netns, ifname, source, targets, timeout=1.0):
            return {t: self.up[next(n for n, a in GW.items() if a == t)] for t in targets}
        monkeypatch.setattr(probing.probe, "echo", echo)

    async def get(self, ifname, netns):
        if self.wg_broken:
            raise WireGuardError("gone")
        peers = {k: PeerState("198.51.100.1:51820", frozenset(), 0, last_handshake=self.now - self.handshake_age)
                 for k in KEYS.values()}
        return DeviceState(51820, None, True, peers)

    async def publish(self, verdicts):
        self.published[verdicts.network] = verdicts
        self.writes += 1

    def prober(self, **kw):
        return Prober(node_id="h1", wireguard=self, publish=self.publish,
                      published=self.published.get, alive=self.alive.get, clock=lambda: self.now, **kw)

    def states(self, network="blue"):
        v = self.published.get(network)
        return {x.node: x.state for x in v.verdicts} if v else {}


@pytest.fixture
def fakes(monkeypatch):
    return Fakes(monkeypatch)


async def rounds(prober, fakes, n, step=1.0):
    for _ in range(n):
        await prober.probe_once()
        fakes.now += step


async def test_verdicts_are_published_when_they_change_never_per_probe(fakes):
    p = fakes.prober(hold_down=5)
    p.track("blue", "ns", "wg", IPv4Address("10.1.11.1"), [target("n1"), target("n2")])
    await rounds(p, fakes, 10)
    assert fakes.states() == {"n1": FORWARDING, "n2": FORWARDING} and fakes.writes == 1
    fakes.up["n1"] = False
    await rounds(p, fakes, 10)
    assert fakes.states()["n1"] == FAILING and fakes.writes == 2
    fakes.up["n1"] = True
    await rounds(p, fakes, 1)
    assert fakes.states()["n1"] == RECOVERING
    await rounds(p, fakes, 10)
    assert fakes.states()["n1"] == FORWARDING and fakes.writes == 4


async def test_a_stale_handshake_fails_the_probe_even_when_the_echo_answers(fakes):
    p = fakes.prober()
    p.track("blue", "ns", "wg", IPv4Address("10.1.11.1"), [target("n1")])
    await rounds(p, fakes, 1)
    fakes.handshake_age = probing.REJECT_AFTER_TIME + 1
    await rounds(p, fakes, 5)
    assert fakes.states() == {"n1": FAILING}


async def test_without_the_device_state_the_echo_alone_decides(fakes):
    fakes.wg_broken = True
    p = fakes.prober()
    p.track("blue", "ns", "wg", IPv4Address("10.1.11.1"), [target("n1")])
    await rounds(p, fakes, 2)
    assert fakes.states() == {"n1": FORWARDING}


async def test_a_failed_over_tunnel_stays_blamed_for_the_hold_down_then_is_dropped(fakes):
    p = fakes.prober(hold_down=8)
    p.track("blue", "ns", "wg", IPv4Address("10.1.11.1"), [target("n1")])
    await rounds(p, fakes, 1)
    fakes.up["n1"] = False
    await rounds(p, fakes, 4)
    assert fakes.states() == {"n1": FAILING}
    # The hidden NR re-points to n2: its evidence against n1 is kept, unchanged, for a while.
    p.track("blue", "ns", "wg", IPv4Address("10.1.11.1"), [target("n2")])
    await rounds(p, fakes, 3)
    assert fakes.states() == {"n1": FAILING, "n2": FORWARDING}
    await rounds(p, fakes, 6)
    assert fakes.states() == {"n2": FORWARDING}


async def test_a_tunnel_that_was_forwarding_is_dropped_at_once_when_no_longer_probed(fakes):
    p = fakes.prober()
    p.track("blue", "ns", "wg", IPv4Address("10.1.11.1"), [target("n1")])
    await rounds(p, fakes, 2)
    p.track("blue", "ns", "wg", IPv4Address("10.1.11.1"), [target("n2")])
    await rounds(p, fakes, 1)
    assert fakes.states() == {"n2": FORWARDING}


async def test_a_target_whose_lease_comes_back_is_held_down(fakes):
    p = fakes.prober(hold_down=5)
    p.track("blue", "ns", "wg", IPv4Address("10.1.2.1"), [target("n1")])
    await rounds(p, fakes, 2)
    fakes.alive["n1"] = False  # its agent is gone long enough for the lease to expire
    await rounds(p, fakes, 2)
    assert fakes.states() == {"n1": FORWARDING}, "its dataplane still answers"
    fakes.alive["n1"] = True
    await rounds(p, fakes, 1)
    assert fakes.states() == {"n1": RECOVERING}
    await rounds(p, fakes, 6)
    assert fakes.states() == {"n1": FORWARDING}


async def test_a_restarted_prober_carries_on_from_what_it_published(fakes):
    first = fakes.prober(hold_down=5)
    first.track("blue", "ns", "wg", IPv4Address("10.1.11.1"), [target("n1")])
    fakes.up["n1"] = False
    await rounds(first, fakes, 15)  # past the grace of a tunnel that never worked
    assert fakes.states() == {"n1": FAILING}
    fakes.up["n1"] = True
    second = fakes.prober(hold_down=5)  # the agent restarted; etcd still holds the verdicts
    second.track("blue", "ns", "wg", IPv4Address("10.1.11.1"), [target("n1")])
    await rounds(second, fakes, 1)
    assert fakes.states() == {"n1": RECOVERING}, "not Forwarding at the first working probe"


async def test_a_forgotten_network_is_not_published_again(fakes):
    p = fakes.prober()
    p.track("blue", "ns", "wg", IPv4Address("10.1.11.1"), [target("n1")])
    await rounds(p, fakes, 1)
    writes = fakes.writes
    p.forget("blue")
    fakes.up["n1"] = False
    await rounds(p, fakes, 5)
    assert fakes.writes == writes


async def test_an_nr_with_nothing_to_probe_publishes_nothing(fakes):
    p = fakes.prober()
    p.track("blue", "ns", "wg", IPv4Address("10.1.1.1"), [])
    await rounds(p, fakes, 3)
    assert fakes.writes == 0
