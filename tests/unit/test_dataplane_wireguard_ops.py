"""Pure WireGuard pieces: the peer diff, the UAPI text format, keys."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from ipaddress import ip_network

import pytest

from controller.dataplane.wireguard.base import (
    DesiredPeer,
    DeviceOps,
    DeviceState,
    KeyStore,
    PeerOp,
    PeerState,
    _x25519,
    b64_to_hex,
    device_ops,
    generate_private_key,
    hex_to_b64,
    key_bytes,
    peer_ops,
    public_key,
    redial_ops,
)
from controller.dataplane.wireguard.uapi import UAPIError, format_set, parse_get

K = [public_key(generate_private_key()) for _ in range(4)]


def nets(*cidrs):
    return frozenset(ip_network(c) for c in cidrs)


def observed(key, ips, endpoint="198.51.100.2:51820", ka=0):
    return {key: PeerState(endpoint, nets(*ips), ka, rx_bytes=10, tx_bytes=20)}


def test_converged_peers_make_no_ops():
    obs = observed(K[0], ["10.1.2.0/24"])
    assert peer_ops(obs, [DesiredPeer.make(K[0], ["10.1.2.0/24"], "198.51.100.2:51820")]) == ()


def test_add_remove_and_order():
    obs = observed(K[0], ["10.1.2.0/24"])
    ops = peer_ops(obs, [DesiredPeer.make(K[1], ["10.1.3.0/24"], "203.0.113.5:51820", 25)])
    assert ops == (
        PeerOp(K[1], endpoint="203.0.113.5:51820", persistent_keepalive=25, add_allowed_ips=nets("10.1.3.0/24")),
        PeerOp(K[0], remove=True),
    )


def test_update_touches_only_what_differs():
    obs = observed(K[0], ["10.1.2.0/24"])
    (op,) = peer_ops(obs, [DesiredPeer.make(K[0], ["10.1.2.0/24", "10.1.4.0/24"], "198.51.100.2:51820")])
    assert op == PeerOp(K[0], add_allowed_ips=nets("10.1.4.0/24")), "a gain is an insert, not a replace"
    (op,) = peer_ops(obs, [DesiredPeer.make(K[0], [], "198.51.100.2:51820")])
    assert op == PeerOp(K[0], allowed_ips=nets()), "a loss nobody takes over needs a replace"
    (op,) = peer_ops(obs, [DesiredPeer.make(K[0], ["10.1.2.0/24"], "198.51.100.9:51820")])
    assert op == PeerOp(K[0], endpoint="198.51.100.9:51820")
    (op,) = peer_ops(obs, [DesiredPeer.make(K[0], ["10.1.2.0/24"], None, 25)])
    assert op == PeerOp(K[0], persistent_keepalive=25)


def test_endpoint_none_means_learned_not_changed():
    # the aggregator does not know a hidden peer's NAT address: whatever it learned stays
    obs = observed(K[0], ["10.1.9.0/24"], endpoint="203.0.113.77:40000")
    assert peer_ops(obs, [DesiredPeer.make(K[0], ["10.1.9.0/24"])]) == ()


def replay(observed_peers, body):
    """Apply a `set=1` body line by line the way wireguard-go does (one owner per prefix:
    inserting a prefix another peer holds moves it; replace_allowed_ips drops all of the
    peer's; remove=true drops the peer) and return the owner of every prefix after each line."""
    owner = {ip: k for k, p in observed_peers.items() for ip in p.allowed_ips}
    peer, states = None, []
    for line in body.splitlines():
        key, _, value = line.partition("=")
        if key == "public_key":
            peer = hex_to_b64(value)
        elif key == "remove":
            owner = {ip: k for ip, k in owner.items() if k != peer}
        elif key == "replace_allowed_ips":
            owner = {ip: k for ip, k in owner.items() if k != peer}
        elif key == "allowed_ip":
            owner[ip_network(value)] = peer
        states.append(dict(owner))
    return states


MOVES = {
    # Aggregator K[0] -> K[1] on a public NR: hidden subnets 10.1.9/24, 10.1.10/24 move.
    "public NR": (
        {**observed(K[0], ["10.1.2.0/24", "10.1.9.0/24", "10.1.10.0/24"]), **observed(K[1], ["10.1.3.0/24"])},
        [DesiredPeer.make(K[0], ["10.1.2.0/24"], "198.51.100.2:51820"),
         DesiredPeer.make(K[1], ["10.1.3.0/24", "10.1.9.0/24", "10.1.10.0/24"], "198.51.100.2:51820")]),
    # A hidden NR re-points its only peer: the whole range moves to a new peer.
    "hidden NR": (
        observed(K[0], ["10.1.0.0/16"], ka=25),
        [DesiredPeer.make(K[1], ["10.1.0.0/16"], "198.51.100.3:51820", 25)]),
    # The old aggregator: its hidden peers go, their subnets go to the new aggregator's peer.
    "old aggregator": (
        {**observed(K[1], ["10.1.3.0/24"]), K[2]: PeerState("203.0.113.9:4000", nets("10.1.9.0/24")),
         K[3]: PeerState("203.0.113.9:4001", nets("10.1.10.0/24"))},
        [DesiredPeer.make(K[1], ["10.1.3.0/24", "10.1.9.0/24", "10.1.10.0/24"], "198.51.100.3:51820")]),
    # Two peers swap prefixes (no order of replaces could do this without a gap).
    "swap": (
        {**observed(K[0], ["10.1.2.0/24", "10.1.9.0/24"]), **observed(K[1], ["10.1.3.0/24", "10.1.10.0/24"])},
        [DesiredPeer.make(K[0], ["10.1.2.0/24", "10.1.10.0/24"], "198.51.100.2:51820"),
         DesiredPeer.make(K[1], ["10.1.3.0/24", "10.1.9.0/24"], "198.51.100.2:51820")]),
}


@pytest.mark.parametrize("case", MOVES)
def test_a_moving_prefix_has_exactly_one_owner_after_every_line_of_the_transaction(case):
    obs, desired = MOVES[case]
    ops = peer_ops(obs, desired)
    body = format_set(DeviceOps(peers=ops))
    wanted = {ip: d.public_key for d in desired for ip in d.allowed_ips}
    states = replay(obs, body)
    # Every prefix that is wanted before and after is owned at every moment: never a gap.
    for ip in wanted:
        if any(ip in p.allowed_ips for p in obs.values()):
            assert all(ip in s for s in states), f"{ip} had no owner for a moment:\n{body}"
    assert states[-1] == wanted, "the transaction ends exactly at the desired state"
    assert "replace_allowed_ips" not in body, "moves are inserts: nothing is dropped and re-added"


def test_aggregator_move_is_one_transaction():
    obs, desired = MOVES["public NR"]
    obs = {K[3]: PeerState(None, nets("10.1.8.0/24")), **obs}
    ops = peer_ops(obs, [*desired, DesiredPeer.make(K[2], ["10.1.5.0/24"], "198.51.100.3:51820")])
    # inserts (the new peer, the new aggregator's gains) first, the removal last
    assert [(o.public_key, o.remove) for o in ops] == [*((k, False) for k in sorted([K[1], K[2]])), (K[3], True)]
    assert ops[[o.public_key for o in ops].index(K[1])].add_allowed_ips == nets("10.1.9.0/24", "10.1.10.0/24")
    assert DeviceOps(peers=ops), "one DeviceOps: one set request, one round trip"


def test_device_ops_key_and_port():
    priv = generate_private_key()
    fresh = device_ops(None, priv, 51820, [])
    assert fresh.private_key == priv and fresh.listen_port == 51820 and fresh
    done = DeviceState(51820, public_key(priv), True, {})
    assert not device_ops(done, priv, 51820, [])
    assert device_ops(done, priv, 51821, []).listen_port == 51821
    other = generate_private_key()
    assert device_ops(done, other, 51820, []).private_key == other


def test_a_redial_removes_and_adds_the_peer_again_in_one_transaction():
    peer = DesiredPeer.make(K[0], ["10.1.0.0/16"], "198.51.100.2:51820", 25)
    ops = redial_ops(peer)
    assert ops.private_key is None and ops.listen_port is None
    assert ops.peers == (PeerOp(K[0], remove=True),
                         PeerOp(K[0], endpoint="198.51.100.2:51820", persistent_keepalive=25,
                                add_allowed_ips=nets("10.1.0.0/16")))
    hx = b64_to_hex(K[0])
    assert format_set(ops) == (f"public_key={hx}\nremove=true\npublic_key={hx}\nendpoint=198.51.100.2:51820\n"
                               "persistent_keepalive_interval=25\nallowed_ip=10.1.0.0/16\n")


def test_format_set_and_parse_get_round_trip():
    priv = generate_private_key()
    ops = DeviceOps(
        private_key=priv,
        listen_port=51820,
        peers=(
            PeerOp(K[0], endpoint="[2001:db8::1]:51820", persistent_keepalive=25,
                   allowed_ips=nets("10.1.2.0/24", "10.1.3.0/24")),
            PeerOp(K[1], remove=True),
        ),
    )
    body = format_set(ops)
    assert body.splitlines() == [
        f"private_key={b64_to_hex(priv)}",
        "listen_port=51820",
        f"public_key={b64_to_hex(K[0])}",
        "endpoint=[2001:db8::1]:51820",
        "persistent_keepalive_interval=25",
        "replace_allowed_ips=true",
        "allowed_ip=10.1.2.0/24",
        "allowed_ip=10.1.3.0/24",
        f"public_key={b64_to_hex(K[1])}",
        "remove=true",
    ]
    answer = (
        f"private_key={b64_to_hex(priv)}\nlisten_port=51820\n"
        f"public_key={b64_to_hex(K[0])}\npreshared_key={'0' * 64}\nprotocol_version=1\n"
        "endpoint=[2001:db8::1]:51820\nlast_handshake_time_sec=1700000000\n"
        "last_handshake_time_nsec=500000000\ntx_bytes=92\nrx_bytes=180\n"
        "persistent_keepalive_interval=25\nallowed_ip=10.1.2.0/24\nallowed_ip=10.1.3.0/24\n"
    )
    st = parse_get(answer)
    assert st.listen_port == 51820 and st.has_private_key and st.public_key == public_key(priv)
    p = st.peers[K[0]]
    assert p.endpoint == "[2001:db8::1]:51820" and p.allowed_ips == nets("10.1.2.0/24", "10.1.3.0/24")
    assert (p.rx_bytes, p.tx_bytes, p.persistent_keepalive, p.last_handshake) == (180, 92, 25, 1700000000.5)
    empty = parse_get(f"private_key={'0' * 64}\nlisten_port=0\n")
    assert not empty.has_private_key and empty.public_key is None and empty.peers == {}


def test_uapi_error_message():
    e = UAPIError("zw1", "set=1", 22)
    assert e.errno == 22 and "zw1" in str(e) and "Invalid argument" in str(e)


def test_x25519_rfc7748_vectors():
    k = bytes.fromhex("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4")
    u = bytes.fromhex("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c")
    assert _x25519(k, u).hex() == "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"
    # Alice's key pair from RFC 7748 section 6.1
    a = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    assert _x25519(a, (9).to_bytes(32, "little")).hex() == (
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    )


@pytest.mark.skipif(not shutil.which("wg"), reason="wireguard-tools not installed")
def test_public_key_matches_wg_pubkey():
    priv = generate_private_key()
    out = subprocess.run(["wg", "pubkey"], input=priv.encode(), capture_output=True, check=True)
    assert public_key(priv) == out.stdout.decode().strip()


def test_key_helpers_reject_garbage_without_echoing_it():
    priv = generate_private_key()
    assert hex_to_b64(b64_to_hex(priv)) == priv and len(key_bytes(priv)) == 32
    with pytest.raises(ValueError) as e:
        key_bytes("c2VjcmV0")
    assert "c2VjcmV0" not in str(e.value)
    with pytest.raises(ValueError):
        hex_to_b64("00")


def test_keystore_file_is_private_and_stable(tmp_path):
    ks = KeyStore(str(tmp_path))
    priv, pub = ks.load_or_create("zw1")
    assert ks.load_or_create("zw1") == (priv, pub)
    assert stat.S_IMODE(os.stat(ks.path("zw1")).st_mode) == 0o600
    assert public_key(priv) == pub
    ks.remove("zw1")
    assert ks.load_or_create("zw1")[0] != priv


@pytest.mark.parametrize("endpoint", ["198.51.100.2:51820\nremove=true", "[fe80::1%x\n]:1", "a=b:1", "1.2.3.4:1\r"])
def test_the_uapi_writer_refuses_a_value_that_could_inject_a_line(endpoint):
    from controller.dataplane.wireguard.base import PeerOp, WireGuardError

    with pytest.raises(WireGuardError, match="not a plain token"):
        format_set(DeviceOps(peers=(PeerOp(K[0], endpoint=endpoint),)))
    assert format_set(DeviceOps(peers=(PeerOp(K[0], endpoint="[2001:db8::1]:51820"),)))
