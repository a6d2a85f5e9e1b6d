"""The kernel backend's netlink messages, encoded and decoded by pyroute2 (no kernel needed)."""

from __future__ import annotations

from ipaddress import ip_network

from pyroute2.netlink.generic.wireguard import WGPEER_F_REMOVE_ME, wgmsg

from controller.dataplane.wireguard.base import DeviceOps, PeerOp, generate_private_key, public_key
from controller.dataplane.wireguard.kernel import parse_device, set_message


def roundtrip(msg):
    msg.encode()
    out = wgmsg(msg.data)
    out.decode()
    return out


def test_one_message_carries_every_peer_and_parses_back():
    priv = generate_private_key()
    k1, k2, k3 = (public_key(generate_private_key()) for _ in range(3))
    ops = DeviceOps(
        private_key=priv,
        listen_port=51820,
        peers=(
            PeerOp(k3, remove=True),
            PeerOp(k1, endpoint="198.51.100.2:51821", persistent_keepalive=25,
                   allowed_ips=frozenset({ip_network("10.1.2.0/24"), ip_network("10.1.9.0/24")})),
            PeerOp(k2, endpoint="[2001:db8::2]:51822",
                   allowed_ips=frozenset({ip_network("fd00::/64")})),
        ),
    )
    m = roundtrip(set_message("zw1", ops))
    assert m.get_attr("WGDEVICE_A_IFNAME") == "zw1"
    assert len(m.get_attrs("WGDEVICE_A_PEERS")) == 1  # one nested list, not one attr per peer
    peers = m.get_attr("WGDEVICE_A_PEERS")
    assert peers[0].get_attr("WGPEER_A_FLAGS") == WGPEER_F_REMOVE_ME
    st = parse_device([m])
    assert st.listen_port == 51820 and st.has_private_key and st.public_key == public_key(priv)
    assert st.peers[k1].endpoint == "198.51.100.2:51821"
    assert st.peers[k1].persistent_keepalive == 25
    assert st.peers[k1].allowed_ips == {ip_network("10.1.2.0/24"), ip_network("10.1.9.0/24")}
    assert st.peers[k2].endpoint == "[2001:db8::2]:51822"
    assert st.peers[k2].allowed_ips == {ip_network("fd00::/64")}


def test_a_device_split_over_messages_is_merged():
    k1 = public_key(generate_private_key())
    a = set_message("zw1", DeviceOps(listen_port=51820, peers=(
        PeerOp(k1, allowed_ips=frozenset({ip_network("10.1.2.0/24")})),)))
    b = set_message("zw1", DeviceOps(peers=(
        PeerOp(k1, allowed_ips=frozenset({ip_network("10.1.3.0/24")})),)))
    st = parse_device([roundtrip(a), roundtrip(b)])
    assert st.listen_port == 51820 and not st.has_private_key
    assert st.peers[k1].allowed_ips == {ip_network("10.1.2.0/24"), ip_network("10.1.3.0/24")}


def test_inserted_prefixes_go_without_the_replace_flag():
    k1 = public_key(generate_private_key())
    m = roundtrip(set_message("zw1", DeviceOps(peers=(
        PeerOp(k1, add_allowed_ips=frozenset({ip_network("10.1.9.0/24")})),))))
    (peer,) = m.get_attr("WGDEVICE_A_PEERS")
    assert peer.get_attr("WGPEER_A_FLAGS") == 0  # no WGPEER_F_REPLACE_ALLOWEDIPS: an insert
    assert parse_device([m]).peers[k1].allowed_ips == {ip_network("10.1.9.0/24")}
