"""The XDP relay program, packet by packet, through bpf_prog_test_run.

Each case feeds crafted frames and compares the verdict, the whole output
frame (byte for byte, against scapy's independent rendering) and the exact
counter deltas. A pass or a drop must leave the frame untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from ctl.bpfsys import XdpAction
from ctl.layout import Origin, TransceiverState

from .xdp_harness import (
    CLIENT_MAC,
    CLIENT_V4,
    CLIENT_V6,
    DC_IF,
    PUB_IF,
    PUB_MAC,
    PUBLIC_PORT,
    RELAY_V4,
    T1_MAC,
    T1_V4,
    T1_V6,
    T2_MAC,
    T2_V4,
    TID_DRAINING,
    TID_NO_NEIGH,
    TID_T1,
    TID_T1_V6,
    TID_T2,
    TID_UNKNOWN,
    TUNNEL_PORT,
    XdpHarness,
    binding_request,
    client_frame,
    expected_decap,
    expected_encap,
    token_ufrag,
    tunnel_frame,
    tunnel_header,
)

PASS, DROP, REDIRECT = XdpAction.XDP_PASS, XdpAction.XDP_DROP, XdpAction.XDP_REDIRECT
DTLS = bytes([22, 0xFE, 0xFD]) + b"\x00" * 10 + b"client hello"
SRTP = bytes([0x80, 111]) + b"\x00\x01" + b"\x00" * 8 + b"opus frame"
REPLY = bytes([0x80, 111]) + b"\x00\x02" + b"\x00" * 8 + b"server audio"


@dataclass
class Case:
    """One packet through the program, after optional setup packets."""

    name: str
    frame: bytes
    verdict: int
    counters: dict[str, int]
    expect: bytes | None = None  # None: the frame must come back unchanged
    ingress: str = PUB_IF
    setup: list[tuple[bytes, str]] = field(default_factory=list)
    prepare: Callable[[XdpHarness], None] | None = None

    def __str__(self) -> str:
        return self.name


def stun(tid: int) -> bytes:
    return binding_request(tid)


FWD_T = {"fwd_to_transceiver_packets": 1}
FWD_C = {"fwd_to_client_packets": 1}
NEW = {"sessions_created": 1}


def fwd_t(payload: bytes) -> dict[str, int]:
    return {**FWD_T, "fwd_to_transceiver_bytes": len(payload)}


def fwd_c(payload: bytes) -> dict[str, int]:
    return {**FWD_C, "fwd_to_client_bytes": len(payload)}


def est(client: str = CLIENT_V4, tid: int = TID_T1) -> list[tuple[bytes, str]]:
    """Setup: the client's first STUN request creates its session."""
    return [(client_frame(stun(tid), client), PUB_IF)]


def draining(h: XdpHarness) -> None:
    h.maps.put_transceiver(TID_T1, T1_V4, 4001, TransceiverState.DRAINING)


def padded(frame: bytes) -> bytes:
    return frame + b"\x00" * (60 - len(frame)) if len(frame) < 60 else frame


TINY = b"\x80\x00"

CASES = [
    # --- first packet routing
    Case(
        "stun-first-v4",
        client_frame(stun(TID_T1)),
        REDIRECT,
        {**NEW, **fwd_t(stun(TID_T1))},
        expected_encap(stun(TID_T1), T1_V4, 4001, T1_MAC),
    ),
    Case(
        "stun-first-v6-client",
        client_frame(stun(TID_T1), CLIENT_V6),
        REDIRECT,
        {**NEW, **fwd_t(stun(TID_T1))},
        expected_encap(stun(TID_T1), T1_V4, 4001, T1_MAC, client=CLIENT_V6),
    ),
    Case(
        "stun-first-v6-tunnel",
        client_frame(stun(TID_T1_V6)),
        REDIRECT,
        {**NEW, **fwd_t(stun(TID_T1_V6))},
        expected_encap(stun(TID_T1_V6), T1_V6, 4006, T1_MAC),
    ),
    Case(
        "stun-first-keeps-dscp",
        client_frame(stun(TID_T1), tos=0xB8),
        REDIRECT,
        {**NEW, **fwd_t(stun(TID_T1))},
        expected_encap(stun(TID_T1), T1_V4, 4001, T1_MAC, tos=0xB8),
    ),
    Case(
        "stun-reroute-known-client",
        client_frame(stun(TID_T2)),
        REDIRECT,
        {"sessions_rerouted": 1, **fwd_t(stun(TID_T2))},
        expected_encap(stun(TID_T2), T2_V4, 4002, T2_MAC),
        setup=est(),
    ),
    Case(
        "stun-consent-check-same-owner",
        client_frame(stun(TID_T1)),
        REDIRECT,
        fwd_t(stun(TID_T1)),
        expected_encap(stun(TID_T1), T1_V4, 4001, T1_MAC),
        setup=est(),
    ),
    # --- established, both ways
    Case(
        "established-dtls",
        client_frame(DTLS),
        REDIRECT,
        fwd_t(DTLS),
        expected_encap(DTLS, T1_V4, 4001, T1_MAC),
        setup=est(),
    ),
    Case(
        "established-srtp-v6-client",
        client_frame(SRTP, CLIENT_V6),
        REDIRECT,
        fwd_t(SRTP),
        expected_encap(SRTP, T1_V4, 4001, T1_MAC, client=CLIENT_V6),
        setup=est(CLIENT_V6),
    ),
    Case(
        "established-padded-frame",
        padded(client_frame(TINY)),
        REDIRECT,
        fwd_t(TINY),
        expected_encap(TINY, T1_V4, 4001, T1_MAC),
        setup=est(),
    ),
    Case(
        "reply-v4",
        tunnel_frame(REPLY),
        REDIRECT,
        fwd_c(REPLY),
        expected_decap(REPLY),
        ingress=DC_IF,
        setup=est(),
    ),
    Case(
        "reply-v6-client",
        tunnel_frame(REPLY, CLIENT_V6),
        REDIRECT,
        fwd_c(REPLY),
        expected_decap(REPLY, CLIENT_V6),
        ingress=DC_IF,
        setup=est(CLIENT_V6),
    ),
    Case(
        "reply-over-v6-tunnel",
        tunnel_frame(REPLY, src=T1_V6, sport=4006),
        REDIRECT,
        fwd_c(REPLY),
        expected_decap(REPLY),
        ingress=DC_IF,
        setup=est(tid=TID_T1_V6),
    ),
    Case(
        "established-on-draining-transceiver",
        client_frame(DTLS),
        REDIRECT,
        fwd_t(DTLS),
        expected_encap(DTLS, T1_V4, 4001, T1_MAC),
        setup=est(),
        prepare=draining,
    ),
    # --- what goes up to userspace
    Case("unknown-client-non-stun", client_frame(DTLS), PASS, {"pass_unknown_client": 1}),
    Case(
        "forged-token-unknown-transceiver",
        client_frame(stun(TID_UNKNOWN)),
        PASS,
        {"pass_unknown_transceiver": 1},
    ),
    Case(
        "reply-for-client-without-session",
        tunnel_frame(REPLY),
        PASS,
        {"pass_reply_unknown_client": 1},
        ingress=DC_IF,
    ),
    Case(
        "next-hop-unresolved",
        client_frame(stun(TID_NO_NEIGH)),
        PASS,
        {"pass_fib_no_neigh": 1},
    ),
    Case(
        "not-relay-port",
        bytes(
            Ether(src=CLIENT_MAC, dst=PUB_MAC)
            / IP(src=CLIENT_V4, dst=RELAY_V4)
            / UDP(sport=5, dport=53)
            / Raw(b"x")
        ),
        PASS,
        {"pass_not_relay": 1},
    ),
    Case(
        "tcp",
        bytes(
            Ether(src=CLIENT_MAC, dst=PUB_MAC)
            / IP(src=CLIENT_V4, dst=RELAY_V4)
            / TCP(sport=5, dport=8080)
        ),
        PASS,
        {"pass_not_udp": 1},
    ),
    Case("arp", bytes(Ether(src=CLIENT_MAC, dst=PUB_MAC) / ARP()), PASS, {"pass_not_ip": 1}),
    Case(
        "ipv4-options",
        client_frame(DTLS, options=b"\x01\x01\x01\x01"),
        PASS,
        {"pass_ip_options": 1},
        setup=est(),
    ),
    Case(
        "ipv4-fragment",
        client_frame(DTLS, flags="MF"),
        PASS,
        {"pass_ip_fragment": 1},
        setup=est(),
    ),
    Case(
        "ipv6-fragment",
        bytes(
            Ether(src=CLIENT_MAC, dst=PUB_MAC)
            / IPv6(src=CLIENT_V6, dst="2001:db8:c::1")
            / IPv6ExtHdrFragment()
            / UDP(sport=50000, dport=PUBLIC_PORT)
            / Raw(DTLS)
        ),
        PASS,
        {"pass_ip_fragment": 1},
    ),
    # --- drops, one per reason
    Case(
        "truncated-ip-header",
        client_frame(DTLS)[: 14 + 12],
        DROP,
        {"drop_truncated": 1},
    ),
    Case(
        "ip-length-beyond-frame",
        client_frame(DTLS)[:-4],
        DROP,
        {"drop_bad_ip_length": 1},
    ),
    Case(
        "udp-length-mismatch",
        bytes(
            Ether(src=CLIENT_MAC, dst=PUB_MAC)
            / IP(src=CLIENT_V4, dst=RELAY_V4)
            / UDP(sport=50000, dport=PUBLIC_PORT, len=12)
            / Raw(DTLS)
        ),
        DROP,
        {"drop_bad_udp_length": 1},
    ),
    Case(
        "stun-bad-cookie",
        client_frame(stun(TID_T1)[:4] + b"\x21\x12\xa4\x43" + stun(TID_T1)[8:]),
        DROP,
        {"drop_stun_malformed": 1},
    ),
    Case(
        "stun-bad-length",
        client_frame(stun(TID_T1)[:2] + b"\x00\x08" + stun(TID_T1)[4:]),
        DROP,
        {"drop_stun_malformed": 1},
    ),
    Case(
        "stun-short",
        client_frame(b"\x00\x01\x00\x00\x21\x12"),
        DROP,
        {"drop_stun_malformed": 1},
    ),
    Case(
        "stun-no-username",
        client_frame(b"\x00\x01\x00\x00\x21\x12\xa4\x42" + b"\x02" * 12),
        DROP,
        {"drop_stun_no_username": 1},
    ),
    Case(
        "malformed-token-uppercase-hex",
        client_frame(binding_request(username=b"10000A001AbCd+/12:cl1e")),
        DROP,
        {"drop_bad_token": 1},
    ),
    Case(
        "malformed-token-short-client-ufrag",
        client_frame(binding_request(username=f"{token_ufrag(TID_T1)}:abc".encode())),
        DROP,
        {"drop_bad_token": 1},
    ),
    Case(
        "draining-transceiver-gets-no-new-session",
        client_frame(stun(TID_DRAINING)),
        DROP,
        {"drop_transceiver_draining": 1},
    ),
    Case(
        "tunnel-truncated",
        bytes(
            Ether(src=T1_MAC, dst="02:00:00:00:02:01")
            / IP(src=T1_V4, dst="203.0.113.1")
            / UDP(sport=4001, dport=TUNNEL_PORT)
            / Raw(tunnel_header(CLIENT_V4, 50000)[:20])
        ),
        DROP,
        {"drop_tunnel_truncated": 1},
        ingress=DC_IF,
    ),
    Case(
        "tunnel-bad-magic",
        tunnel_frame(REPLY).replace(b"SR\x01\x00", b"XR\x01\x00"),
        DROP,
        {"drop_tunnel_bad_header": 1},
        ingress=DC_IF,
    ),
    Case(
        "tunnel-unknown-version",
        tunnel_frame(REPLY).replace(b"SR\x01\x00", b"SR\x02\x00"),
        DROP,
        {"drop_tunnel_bad_header": 1},
        ingress=DC_IF,
    ),
    Case(
        "tunnel-unknown-flag",
        tunnel_frame(REPLY).replace(b"SR\x01\x00", b"SR\x01\x80"),
        DROP,
        {"drop_tunnel_bad_header": 1},
        ingress=DC_IF,
    ),
    Case(
        "reply-from-non-owner",
        tunnel_frame(REPLY, src=T2_V4, sport=4002),
        DROP,
        {"drop_reply_not_owner": 1},
        ingress=DC_IF,
        setup=est(),
    ),
    Case(
        "reply-from-owner-address-wrong-port",
        tunnel_frame(REPLY, sport=4999),
        DROP,
        {"drop_reply_not_owner": 1},
        ingress=DC_IF,
        setup=est(),
    ),
    Case(
        "reply-wrong-relay-port",
        tunnel_frame(REPLY, relay_port=3000),
        DROP,
        {"drop_reply_port_mismatch": 1},
        ingress=DC_IF,
        setup=est(),
    ),
]


@pytest.fixture
def h(xdp: XdpHarness) -> XdpHarness:
    xdp.reset()
    return xdp


@pytest.mark.parametrize("case", CASES, ids=str)
def test_case(h: XdpHarness, case: Case) -> None:
    for frame, ingress in case.setup:
        assert h.run(frame, ingress).verdict == REDIRECT, "setup packet not forwarded"
    if case.prepare:
        case.prepare(h)
    res = h.run(case.frame, case.ingress)
    assert XdpAction(res.verdict).name == XdpAction(case.verdict).name
    assert res.counters == case.counters
    if case.expect is None:
        assert res.packet == case.frame, "a pass or drop must not touch the frame"
    else:
        assert res.packet.hex() == case.expect.hex()


def test_first_packet_creates_session_and_event(h: XdpHarness) -> None:
    events: list = []
    h.program.open_events(events.append)
    h.program.poll_events(0)  # drain what earlier tests left in the ring
    events.clear()
    assert h.run(client_frame(stun(TID_T1), port=50123)).verdict == REDIRECT
    h.program.poll_events(100)
    sess = h.maps.session(CLIENT_V4, 50123)
    assert sess is not None
    assert (sess.tid, str(sess.relay_addr), sess.relay_port) == (TID_T1, RELAY_V4, PUBLIC_PORT)
    assert sess.origin is Origin.XDP
    assert (sess.packets_to_transceiver, sess.bytes_to_transceiver) == (1, len(stun(TID_T1)))
    assert sess.created_ns == sess.last_seen_ns > 0
    assert [(e.tid, e.kind) for e in events] == [(TID_T1, 1)]
    assert bytes(events[0].client_addr)[-4:] == bytes([198, 51, 100, 10])


def test_session_counters_both_ways(h: XdpHarness) -> None:
    h.run(client_frame(stun(TID_T1)))
    for _ in range(3):
        assert h.run(client_frame(SRTP)).verdict == REDIRECT
    for _ in range(2):
        assert h.run(tunnel_frame(REPLY), DC_IF).verdict == REDIRECT
    sess = h.maps.session(CLIENT_V4, 50000)
    assert sess is not None
    assert sess.packets_to_transceiver == 4
    assert sess.bytes_to_transceiver == len(stun(TID_T1)) + 3 * len(SRTP)
    assert (sess.packets_to_client, sess.bytes_to_client) == (2, 2 * len(REPLY))


def test_reroute_moves_session(h: XdpHarness) -> None:
    h.run(client_frame(stun(TID_T1)))
    h.run(client_frame(stun(TID_T2)))
    sess = h.maps.session(CLIENT_V4, 50000)
    assert sess is not None and sess.tid == TID_T2
    # the old owner may no longer answer for this client
    assert h.run(tunnel_frame(REPLY), DC_IF).verdict == DROP


def test_unresolved_next_hop_creates_no_session(h: XdpHarness) -> None:
    h.run(client_frame(stun(TID_NO_NEIGH)))
    assert h.maps.session(CLIENT_V4, 50000) is None


def test_zero_checksum_v4_stays_zero(h: XdpHarness) -> None:
    frame = bytearray(client_frame(stun(TID_T1)))
    frame[14 + 20 + 6 : 14 + 20 + 8] = b"\x00\x00"
    res = h.run(bytes(frame))
    assert res.verdict == REDIRECT
    assert res.packet[14 + 20 + 6 : 14 + 20 + 8] == b"\x00\x00"
    want = bytearray(expected_encap(stun(TID_T1), T1_V4, 4001, T1_MAC))
    want[14 + 20 + 6 : 14 + 20 + 8] = b"\x00\x00"
    assert res.packet == bytes(want)


def test_zero_checksum_cannot_leave_as_ipv6(h: XdpHarness) -> None:
    frame = bytearray(client_frame(stun(TID_T1_V6)))
    frame[14 + 20 + 6 : 14 + 20 + 8] = b"\x00\x00"
    res = h.run(bytes(frame))
    assert (res.verdict, res.counters) == (PASS, {"pass_no_checksum": 1})


def test_corrupt_checksum_stays_corrupt(h: XdpHarness) -> None:
    """Incremental update keeps a bad checksum bad: the receiver still drops it."""
    h.run(client_frame(stun(TID_T1)))
    frame = bytearray(client_frame(DTLS))
    frame[-1] ^= 0xFF  # payload damaged in flight, checksum no longer matches
    res = h.run(bytes(frame))
    assert res.verdict == REDIRECT
    out = Ether(res.packet)
    recomputed = Ether(res.packet)
    del recomputed[UDP].chksum
    assert Ether(bytes(recomputed))[UDP].chksum != out[UDP].chksum


def test_unconfigured_program_passes_everything(h: XdpHarness) -> None:
    h.maps.config.update((0).to_bytes(4, "little"), bytes(h.maps.config.value_size))
    res = h.run(client_frame(stun(TID_T1)))
    assert (res.verdict, res.counters) == (PASS, {"pass_unconfigured": 1})


def test_output_ports_and_tunnel_source(h: XdpHarness) -> None:
    res = h.run(client_frame(stun(TID_T1)))
    out = Ether(res.packet)
    assert (out[UDP].sport, out[UDP].dport) == (TUNNEL_PORT, 4001)
    assert out[IP].src == "203.0.113.1"
    assert out.dst == T1_MAC
    back = Ether(h.run(tunnel_frame(REPLY), DC_IF).packet)
    assert (back[IP].src, back[UDP].sport, back.src) == (RELAY_V4, PUBLIC_PORT, PUB_MAC)
