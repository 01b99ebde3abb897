"""Real traffic through the XDP program attached to a relay in the netns testbed.

A real UDP socket in a client namespace sends a STUN Binding Request and then
data to the relay's public address; a real socket on a transceiver host gets
the tunnel packets and answers; the client gets the answers from the relay's
public address. Nothing but the XDP program forwards here (no userspace
relay runs), so every delivered packet went through it, in generic and in
native mode. Sessions and counters read back from the pinned maps match.
"""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctl import wire
from ctl.layout import Origin
from ctl.loader import RelayProgram, remove_pins
from ctl.maps import RelayAddresses, RelayMaps
from ctl.netns import in_netns
from ctl.testbed import Testbed
from ctl.xdp import AttachMode, detach, info

PUBLIC_PORT, TUNNEL_PORT = 3478, 3479
TID_TX1, TID_TX2, TID_TX1_V6 = 0x11, 0x12, 0x611
TX_PORT = 4001


def _udp(ns: str, family: int, bind: tuple[str, int]) -> socket.socket:
    with in_netns(ns):
        sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind(bind)
    sock.settimeout(2.0)
    return sock


@pytest.fixture(scope="module")
def relay(testbed: Testbed) -> Iterator[RelayMaps]:
    """The program loaded with a private pin dir, configured for relay1."""
    pin_dir = Path(tempfile.mkdtemp(prefix="splitrelay-traffic-", dir="/sys/fs/bpf"))
    program = RelayProgram(pin_dir).load()
    maps = RelayMaps(pin_dir)
    maps.set_addresses(
        RelayAddresses(
            public_port=PUBLIC_PORT,
            tunnel_port=TUNNEL_PORT,
            public_v4=ipaddress.IPv4Address("198.51.100.1"),
            public_v6=ipaddress.IPv6Address("2001:db8:c::1"),
            tunnel_v4=ipaddress.IPv4Address("203.0.113.1"),
            tunnel_v6=ipaddress.IPv6Address("2001:db8:1::1"),
        )
    )
    maps.put_transceiver(TID_TX1, "203.0.113.11", TX_PORT)
    maps.put_transceiver(TID_TX2, "203.0.113.12", TX_PORT)
    maps.put_transceiver(TID_TX1_V6, "2001:db8:1::11", TX_PORT + 1)
    relay_ns = testbed.netns("relay1")
    # The program forwards only to resolved neighbours (else it passes the
    # packet up); with no userspace relay here, resolve them first.
    for addr in (
        "203.0.113.11",
        "203.0.113.12",
        "2001:db8:1::11",
        "198.51.100.11",
        "2001:db8:c::11",
    ):
        subprocess.run(
            ["ip", "netns", "exec", relay_ns, "ping", "-c1", "-W1", addr],
            check=True,
            capture_output=True,
        )
    maps.program = program  # type: ignore[attr-defined]
    try:
        yield maps
    finally:
        with in_netns(relay_ns):
            for ifname in ("pub0", "dc0"):
                detach(ifname)
        maps.close()
        program.close()
        remove_pins(pin_dir)


@pytest.fixture(params=[AttachMode.GENERIC, AttachMode.NATIVE], ids=str)
def attached(request: pytest.FixtureRequest, relay: RelayMaps, testbed: Testbed) -> RelayMaps:
    mode = request.param
    with in_netns(testbed.netns("relay1")):
        for ifname in ("pub0", "dc0"):
            detach(ifname)
            assert relay.program.attach(ifname, mode) == mode  # type: ignore[attr-defined]
            assert info(ifname).mode == mode
    relay.flush_sessions()
    relay.reset_counters()
    return relay


def _stun(tid: int) -> bytes:
    return wire.build_binding_request(f"{wire.make_server_ufrag(tid)}:abcd".encode())


@pytest.mark.parametrize(
    ("client_addr", "tid", "tx_bind"),
    [
        ("198.51.100.11", TID_TX1, ("203.0.113.11", TX_PORT)),
        ("2001:db8:c::11", TID_TX1, ("203.0.113.11", TX_PORT)),
        ("198.51.100.11", TID_TX1_V6, ("2001:db8:1::11", TX_PORT + 1)),
    ],
    ids=["v4-client", "v6-client", "v6-tunnel"],
)
def test_call_flows_through_xdp(
    attached: RelayMaps, testbed: Testbed, client_addr: str, tid: int, tx_bind: tuple[str, int]
) -> None:
    v6_client = ":" in client_addr
    relay_public = ("2001:db8:c::1" if v6_client else "198.51.100.1", PUBLIC_PORT)
    relay_tunnel = ("2001:db8:1::1" if ":" in tx_bind[0] else "203.0.113.1", TUNNEL_PORT)
    client = _udp(
        testbed.netns("c1"), socket.AF_INET6 if v6_client else socket.AF_INET, (client_addr, 0)
    )
    tx = _udp(
        testbed.netns("tx1"), socket.AF_INET6 if ":" in tx_bind[0] else socket.AF_INET, tx_bind
    )
    client_port = client.getsockname()[1]
    try:
        payloads = [_stun(tid)] + [
            bytes([0x80, 111]) + i.to_bytes(2, "big") + b"rtp" * 20 for i in range(20)
        ]
        replies = 0
        for payload in payloads:
            client.sendto(payload, relay_public)
            data, src = tx.recvfrom(2048)
            assert src[:2] == relay_tunnel
            header, inner = wire.decap(data)
            assert inner == payload
            assert (str(header.client_addr), header.client_port) == (client_addr, client_port)
            assert header.relay_port == PUBLIC_PORT
            tx.sendto(wire.encap(header, b"echo:" + inner), src[:2])
            back, back_src = client.recvfrom(2048)
            assert back == b"echo:" + payload
            assert back_src[:2] == relay_public
            replies += 1
        assert replies == len(payloads)

        sess = attached.session(client_addr, client_port)
        assert sess is not None
        assert (sess.tid, sess.origin) == (tid, Origin.XDP)
        assert (str(sess.relay_addr), sess.relay_port) == relay_public
        assert sess.packets_to_transceiver == sess.packets_to_client == len(payloads)
        assert sess.bytes_to_transceiver == sum(len(p) for p in payloads)
        assert sess.bytes_to_client == sum(len(p) + 5 for p in payloads)
        counters = attached.counters_snapshot()
        assert counters["sessions_created"] == 1
        assert counters["fwd_to_transceiver_packets"] == len(payloads)
        assert counters["fwd_to_client_packets"] == len(payloads)
        assert counters["fwd_to_client_bytes"] == sess.bytes_to_client
        assert not {k: v for k, v in counters.items() if k.startswith("drop_") and v}
    finally:
        client.close()
        tx.close()


def test_reply_from_non_owner_never_reaches_client(attached: RelayMaps, testbed: Testbed) -> None:
    client = _udp(testbed.netns("c1"), socket.AF_INET, ("198.51.100.11", 0))
    tx1 = _udp(testbed.netns("tx1"), socket.AF_INET, ("203.0.113.11", TX_PORT))
    tx2 = _udp(testbed.netns("tx2"), socket.AF_INET, ("203.0.113.12", TX_PORT))
    try:
        client.sendto(_stun(TID_TX1), ("198.51.100.1", PUBLIC_PORT))
        data, _ = tx1.recvfrom(2048)
        header, _inner = wire.decap(data)
        tx2.sendto(wire.encap(header, b"hijack"), ("203.0.113.1", TUNNEL_PORT))
        client.settimeout(0.5)
        with pytest.raises(TimeoutError):
            client.recvfrom(2048)
        assert attached.counters_snapshot()["drop_reply_not_owner"] == 1
    finally:
        for s in (client, tx1, tx2):
            s.close()
