"""The XDP relay program, packet by packet, through bpf_prog_test_run.

Each case feeds crafted frames and compares the verdict, the whole output
frame (byte for byte, against scapy's independent rendering) and the exact
counter deltas. A pass or a drop must leave the frame untouched. Every drop
and pass reason of the C counter enum has at least one row; a meta-test keeps
it that way when a reason is added.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from ctl.bpfsys import XdpAction
from ctl.layout import Origin, TransceiverState
from ctl.maps import RelayAddresses

from .xdp_harness import (
    CLIENT_MAC,
    CLIENT_NARROW_V4,
    CLIENT_NO_ROUTE_V4,
    CLIENT_V4,
    CLIENT_V6,
    DC_IF,
    DC_MAC,
    LINK_MTU,
    NARROW_MTU,
    PUB_IF,
    PUB_MAC,
    PUBLIC_PORT,
    RELAY_V4,
    RELAY_V6,
    T1_MAC,
    T1_V4,
    T1_V6,
    T2_MAC,
    T2_V4,
    TID_DRAINING,
    TID_NO_NEIGH,
    TID_NO_ROUTE,
    TID_T1,
    TID_T1_V6,
    TID_T2,
    TID_UNKNOWN,
    TUNNEL_PORT,
    TUNNEL_V4,
    TUNNEL_V6,
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
TX = XdpAction.XDP_TX
BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
RELAY_C = (BPF_DIR / "relay.c").read_text()
# How far the kernel's STUN attribute walk looks (longer messages go up).
STUN_SCAN_MAX = int(re.search(r"#define STUN_SCAN_MAX (\d+)", RELAY_C).group(1))  # type: ignore[union-attr]
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
TID_PUBLIC_SIDE = 0xA010  # a transceiver reached through the public interface
EMPTY_UDP_CSUM = slice(14 + 20 + 6, 14 + 20 + 8)  # of an IPv4 frame


def stun_attr(attr_type: int, value: bytes, length: int | None = None) -> bytes:
    """One STUN attribute, padded to 4 bytes; `length` overrides the length field."""
    n = len(value) if length is None else length
    return attr_type.to_bytes(2, "big") + n.to_bytes(2, "big") + value + bytes(-len(value) % 4)


def raw_stun(body: bytes, msg_type: int = 1, length: int | None = None) -> bytes:
    """A STUN message built by hand (independent of ctl.wire)."""
    n = len(body) if length is None else length
    head = msg_type.to_bytes(2, "big") + n.to_bytes(2, "big") + b"\x21\x12\xa4\x42"
    return head + b"\x07" * 12 + body


def username(tid: int = TID_T1, client_ufrag: str = "cl1e") -> bytes:
    return stun_attr(0x0006, f"{token_ufrag(tid)}:{client_ufrag}".encode())


def username_at(offset: int, tid: int = TID_T1) -> bytes:
    """A Binding Request whose USERNAME starts `offset` bytes into the message,
    after one filler (SOFTWARE) attribute."""
    filler = offset - 20 - 4
    assert filler >= 0 and filler % 4 == 0
    return raw_stun(stun_attr(0x8022, b"s" * filler) + username(tid))


def opaque(n: int) -> bytes:
    """A DTLS-looking (opaque, not STUN) payload of exactly n bytes."""
    return (bytes([23, 0xFE, 0xFD]) + bytes(range(256)) * (n // 256 + 1))[:n]


def zero_udp_csum(frame: bytes) -> bytes:
    """An IPv4 frame whose UDP checksum says "none" (0)."""
    out = bytearray(frame)
    out[EMPTY_UDP_CSUM] = b"\x00\x00"
    return bytes(out)


def unconfigured(h: XdpHarness) -> None:
    h.maps.config.update((0).to_bytes(4, "little"), bytes(h.maps.config.value_size))


def addresses_without(family: str) -> Callable[[XdpHarness], None]:
    """Prepare: the relay has no tunnel address of that family ("v4"/"v6")."""

    def prepare(h: XdpHarness) -> None:
        h.maps.set_addresses(
            RelayAddresses(
                public_port=PUBLIC_PORT,
                tunnel_port=TUNNEL_PORT,
                public_v4=ipaddress.IPv4Address(RELAY_V4),
                public_v6=ipaddress.IPv6Address(RELAY_V6),
                tunnel_v4=None if family == "v4" else ipaddress.IPv4Address(TUNNEL_V4),
                tunnel_v6=None if family == "v6" else ipaddress.IPv6Address(TUNNEL_V6),
            )
        )

    return prepare


def t1_removed(h: XdpHarness) -> None:
    h.maps.remove_transceiver(TID_T1)


def transceiver_on_public_side(h: XdpHarness) -> None:
    h.maps.put_transceiver(TID_PUBLIC_SIDE, CLIENT_V4, 4010)


def fill_event_ring(h: XdpHarness) -> None:
    h.fill_event_ring()


# Largest payloads whose output still fits the egress MTU.
FIT_V4_TUNNEL = LINK_MTU - 20 - 8 - 24
FIT_V6_TUNNEL = LINK_MTU - 40 - 8 - 24
FIT_NARROW = NARROW_MTU - 20 - 8

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
    Case(
        "reply-for-session-on-a-foreign-relay-address",
        tunnel_frame(REPLY),
        PASS,
        {"pass_foreign_relay": 1},
        ingress=DC_IF,
        prepare=lambda h: h.maps.put_session(CLIENT_V4, 50000, TID_T1, "198.51.100.99", 3478),
    ),
    Case(
        "reply-for-session-on-a-foreign-relay-port",
        tunnel_frame(REPLY, relay_port=3470),
        PASS,
        {"pass_foreign_relay": 1},
        ingress=DC_IF,
        prepare=lambda h: h.maps.put_session(CLIENT_V4, 50000, TID_T1, RELAY_V4, 3470),
    ),
    # --- more ways to forward
    Case(
        "stun-non-binding-known-client",
        client_frame(raw_stun(b"", msg_type=0x0101)),
        REDIRECT,
        fwd_t(raw_stun(b"", msg_type=0x0101)),
        expected_encap(raw_stun(b"", msg_type=0x0101), T1_V4, 4001, T1_MAC),
        setup=est(),
    ),
    Case(
        "stun-username-after-15-attributes",
        client_frame(raw_stun(stun_attr(0x8022, b"") * 15 + username())),
        REDIRECT,
        {**NEW, **fwd_t(raw_stun(stun_attr(0x8022, b"") * 15 + username()))},
        expected_encap(raw_stun(stun_attr(0x8022, b"") * 15 + username()), T1_V4, 4001, T1_MAC),
    ),
    Case(
        "stun-client-ufrag-256",
        client_frame(raw_stun(username(client_ufrag="u" * 256))),
        REDIRECT,
        {**NEW, **fwd_t(raw_stun(username(client_ufrag="u" * 256)))},
        expected_encap(raw_stun(username(client_ufrag="u" * 256)), T1_V4, 4001, T1_MAC),
    ),
    Case(
        "stun-username-at-scan-window-edge",
        client_frame(username_at(STUN_SCAN_MAX)),
        REDIRECT,
        {**NEW, **fwd_t(username_at(STUN_SCAN_MAX))},
        expected_encap(username_at(STUN_SCAN_MAX), T1_V4, 4001, T1_MAC),
    ),
    Case(
        "encap-fills-v4-mtu",
        client_frame(opaque(FIT_V4_TUNNEL)),
        REDIRECT,
        fwd_t(opaque(FIT_V4_TUNNEL)),
        expected_encap(opaque(FIT_V4_TUNNEL), T1_V4, 4001, T1_MAC),
        setup=est(),
    ),
    Case(
        "encap-fills-v6-mtu",
        client_frame(opaque(FIT_V6_TUNNEL)),
        REDIRECT,
        fwd_t(opaque(FIT_V6_TUNNEL)),
        expected_encap(opaque(FIT_V6_TUNNEL), T1_V6, 4006, T1_MAC),
        setup=est(tid=TID_T1_V6),
    ),
    Case(
        "decap-fills-path-mtu",
        tunnel_frame(opaque(FIT_NARROW), CLIENT_NARROW_V4),
        REDIRECT,
        fwd_c(opaque(FIT_NARROW)),
        expected_decap(opaque(FIT_NARROW), CLIENT_NARROW_V4),
        ingress=DC_IF,
        setup=est(CLIENT_NARROW_V4),
    ),
    Case(
        "tx-to-transceiver-on-ingress-side",
        client_frame(stun(TID_PUBLIC_SIDE)),
        TX,
        {**NEW, **fwd_t(stun(TID_PUBLIC_SIDE))},
        expected_encap(stun(TID_PUBLIC_SIDE), CLIENT_V4, 4010, CLIENT_MAC, src_mac=PUB_MAC),
        prepare=transceiver_on_public_side,
    ),
    Case(
        "tx-reply-arriving-on-public-side",
        tunnel_frame(REPLY),
        TX,
        fwd_c(REPLY),
        expected_decap(REPLY),
        setup=est(),
    ),
    Case(
        "events-lost-when-ring-full",
        client_frame(stun(TID_T1)),
        REDIRECT,
        {**NEW, **fwd_t(stun(TID_T1)), "events_lost": 1},
        expected_encap(stun(TID_T1), T1_V4, 4001, T1_MAC),
        prepare=fill_event_ring,
    ),
    Case(
        "no-checksum-stays-none-over-ipv4",
        zero_udp_csum(client_frame(stun(TID_T1))),
        REDIRECT,
        {**NEW, **fwd_t(stun(TID_T1))},
        zero_udp_csum(expected_encap(stun(TID_T1), T1_V4, 4001, T1_MAC)),
    ),
    # --- more passes
    Case(
        "unconfigured",
        client_frame(stun(TID_T1)),
        PASS,
        {"pass_unconfigured": 1},
        prepare=unconfigured,
    ),
    Case(
        "icmpv6",
        bytes(
            Ether(src=CLIENT_MAC, dst=PUB_MAC)
            / IPv6(src=CLIENT_V6, dst=RELAY_V6)
            / ICMPv6EchoRequest()
        ),
        PASS,
        {"pass_not_udp": 1},
    ),
    Case(
        "ipv6-hop-by-hop",
        bytes(
            Ether(src=CLIENT_MAC, dst=PUB_MAC)
            / IPv6(src=CLIENT_V6, dst=RELAY_V6)
            / IPv6ExtHdrHopByHop()
            / UDP(sport=50000, dport=PUBLIC_PORT)
            / Raw(DTLS)
        ),
        PASS,
        {"pass_ip_options": 1},
        setup=est(CLIENT_V6),
    ),
    Case(
        "stun-non-binding-unknown-client",
        client_frame(raw_stun(b"", msg_type=0x0101)),
        PASS,
        {"pass_unknown_client": 1},
    ),
    Case(
        "session-of-removed-transceiver",
        client_frame(DTLS),
        PASS,
        {"pass_orphan_session": 1},
        setup=est(),
        prepare=t1_removed,
    ),
    Case(
        "stun-beyond-scan-window",
        client_frame(username_at(STUN_SCAN_MAX + 4)),
        PASS,
        {"pass_stun_too_long": 1},
    ),
    Case(
        "stun-beyond-scan-window-known-client",
        client_frame(username_at(STUN_SCAN_MAX + 4)),
        PASS,
        {"pass_stun_too_long": 1},
        setup=est(),
    ),
    Case(
        "no-checksum-cannot-leave-as-ipv6-toward-transceiver",
        zero_udp_csum(client_frame(stun(TID_T1_V6))),
        PASS,
        {"pass_no_checksum": 1},
    ),
    Case(
        "no-checksum-cannot-leave-as-ipv6-toward-client",
        zero_udp_csum(tunnel_frame(REPLY, CLIENT_V6)),
        PASS,
        {"pass_no_checksum": 1},
        ingress=DC_IF,
        setup=est(CLIENT_V6),
    ),
    Case(
        "transceiver-without-route",
        client_frame(stun(TID_NO_ROUTE)),
        PASS,
        {"pass_fib_failed": 1},
    ),
    Case(
        "reply-to-client-without-route",
        tunnel_frame(REPLY, CLIENT_NO_ROUTE_V4),
        PASS,
        {"pass_fib_failed": 1},
        ingress=DC_IF,
        setup=est(CLIENT_NO_ROUTE_V4),
    ),
    Case(
        "encap-exceeds-v4-mtu",
        client_frame(opaque(FIT_V4_TUNNEL + 1)),
        PASS,
        {"pass_fib_frag_needed": 1},
        setup=est(),
    ),
    Case(
        "encap-exceeds-v6-mtu",
        client_frame(opaque(FIT_V6_TUNNEL + 1)),
        PASS,
        {"pass_fib_frag_needed": 1},
        setup=est(tid=TID_T1_V6),
    ),
    Case(
        "first-stun-exceeds-mtu",
        client_frame(raw_stun(username() + stun_attr(0x8022, b"s" * (FIT_V4_TUNNEL - 48)))),
        PASS,
        {"pass_fib_frag_needed": 1},
    ),
    Case(
        "decap-exceeds-path-mtu",
        tunnel_frame(opaque(FIT_NARROW + 1), CLIENT_NARROW_V4),
        PASS,
        {"pass_fib_frag_needed": 1},
        ingress=DC_IF,
        setup=est(CLIENT_NARROW_V4),
    ),
    # --- more drops
    Case(
        "truncated-ipv6-header",
        client_frame(DTLS, CLIENT_V6)[: 14 + 30],
        DROP,
        {"drop_truncated": 1},
    ),
    Case("empty-datagram", client_frame(b""), DROP, {"drop_truncated": 1}, setup=est()),
    Case(
        "ipv6-length-beyond-frame",
        client_frame(DTLS, CLIENT_V6)[:-4],
        DROP,
        {"drop_bad_ip_length": 1},
    ),
    Case(
        "tunnel-udp-length-mismatch",
        bytes(
            Ether(src=T1_MAC, dst=DC_MAC)
            / IP(src=T1_V4, dst=TUNNEL_V4)
            / UDP(sport=4001, dport=TUNNEL_PORT, len=30)
            / Raw(tunnel_header(CLIENT_V4, 50000) + REPLY)
        ),
        DROP,
        {"drop_bad_udp_length": 1},
        ingress=DC_IF,
        setup=est(),
    ),
    Case(
        "stun-length-not-multiple-of-4",
        client_frame(raw_stun(b"\x00\x06\x00\x02ab")),
        DROP,
        {"drop_stun_malformed": 1},
    ),
    Case(
        "stun-attribute-overruns-message",
        client_frame(raw_stun(stun_attr(0x0006, b"1000a001", length=100))),
        DROP,
        {"drop_stun_malformed": 1},
    ),
    Case(
        "stun-attribute-padding-overruns-message",
        client_frame(raw_stun(stun_attr(0x0006, b"1000a001", length=9))),
        DROP,
        {"drop_stun_malformed": 1},
    ),
    Case(
        "stun-filler-overruns-before-username",
        client_frame(raw_stun(stun_attr(0x8022, b"abcd", length=40) + username())),
        DROP,
        {"drop_stun_malformed": 1},
        setup=est(),
    ),
    Case(
        "stun-integrity-before-username",
        client_frame(raw_stun(stun_attr(0x0008, b"\x00" * 20) + username())),
        DROP,
        {"drop_stun_no_username": 1},
    ),
    Case(
        "stun-fingerprint-before-username",
        client_frame(raw_stun(stun_attr(0x8028, b"\x00" * 4) + username())),
        DROP,
        {"drop_stun_no_username": 1},
    ),
    Case(
        "stun-username-after-16-attributes",
        client_frame(raw_stun(stun_attr(0x8022, b"") * 16 + username())),
        DROP,
        {"drop_stun_no_username": 1},
    ),
    Case(
        "token-id-zero",
        client_frame(raw_stun(stun_attr(0x0006, b"100000000AbCd+/12:cl1e"))),
        DROP,
        {"drop_bad_token": 1},
    ),
    Case(
        "token-random-part-not-ice",
        client_frame(raw_stun(stun_attr(0x0006, b"10000a001AbCd-/12:cl1e"))),
        DROP,
        {"drop_bad_token": 1},
    ),
    Case(
        "token-no-colon",
        client_frame(raw_stun(stun_attr(0x0006, f"{token_ufrag(TID_T1)}xcl1e".encode()))),
        DROP,
        {"drop_bad_token": 1},
    ),
    Case(
        "client-ufrag-257",
        client_frame(raw_stun(username(client_ufrag="u" * 257))),
        DROP,
        {"drop_bad_token": 1},
    ),
    Case(
        "no-ipv4-tunnel-source",
        client_frame(stun(TID_T1)),
        DROP,
        {"drop_no_tunnel_source": 1},
        prepare=addresses_without("v4"),
    ),
    Case(
        "no-ipv6-tunnel-source",
        client_frame(stun(TID_T1_V6)),
        DROP,
        {"drop_no_tunnel_source": 1},
        prepare=addresses_without("v6"),
    ),
    Case(
        "no-tunnel-source-established",
        client_frame(DTLS),
        DROP,
        {"drop_no_tunnel_source": 1},
        setup=est(),
        prepare=addresses_without("v4"),
    ),
    Case(
        "reply-after-transceiver-removed",
        tunnel_frame(REPLY),
        DROP,
        {"drop_reply_not_owner": 1},
        ingress=DC_IF,
        setup=est(),
        prepare=t1_removed,
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
    assert h.run(client_frame(stun(TID_T1), port=50123)).verdict == REDIRECT
    events = h.drain_events()
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


def test_output_ports_and_tunnel_source(h: XdpHarness) -> None:
    res = h.run(client_frame(stun(TID_T1)))
    out = Ether(res.packet)
    assert (out[UDP].sport, out[UDP].dport) == (TUNNEL_PORT, 4001)
    assert out[IP].src == "203.0.113.1"
    assert out.dst == T1_MAC
    back = Ether(h.run(tunnel_frame(REPLY), DC_IF).packet)
    assert (back[IP].src, back[UDP].sport, back.src) == (RELAY_V4, PUBLIC_PORT, PUB_MAC)


# ------------------------------------------------------------ the table covers every reason

REASON_PREFIXES = ("drop_", "pass_")
# Counters that are not reasons: they move with a forward, next to no reason.
OUTCOMES = {
    "fwd_to_transceiver_packets",
    "fwd_to_transceiver_bytes",
    "fwd_to_client_packets",
    "fwd_to_client_bytes",
    "sessions_created",
    "sessions_rerouted",
    "events_lost",
}
# Reasons no input can reach, with why; test_unreachable_reasons_stay_unreachable
# checks the why against the source.
UNREACHABLE = {
    # Counted only when bpf_xdp_adjust_head/adjust_tail fail inside rewrite().
    # Every frame has XDP_PACKET_HEADROOM (256) bytes of headroom (test_run,
    # native and generic XDP alike) and the program grows the head by at most
    # 44 bytes and only shrinks the tail to the datagram's verified end, so
    # neither helper can fail: not from test_run, not from real traffic.
    "drop_internal": r"if \(rewrite\([^;]*?\)\)\s*return verdict\(CTR_drop_internal, XDP_DROP\);",
}


def c_counters() -> list[str]:
    """The counter enum, read from the C header itself (not through ctl.layout)."""
    text = (BPF_DIR / "splitrelay.h").read_text()
    block = re.search(r"#define SPLITRELAY_COUNTERS\(X\)(.*?)\n\n", text, re.S)
    assert block is not None, "SPLITRELAY_COUNTERS not found in splitrelay.h"
    names = re.findall(r"X\((\w+)\)", block.group(1))
    assert len(names) == len(set(names)) > 0
    return names


def test_every_reason_has_a_row() -> None:
    names = c_counters()
    unclassified = [n for n in names if not n.startswith(REASON_PREFIXES) and n not in OUTCOMES]
    assert not unclassified, f"counters neither drop_/pass_ nor in OUTCOMES: {unclassified}"
    rows: dict[str, list[str]] = {}
    for case in CASES:
        for name in case.counters:
            rows.setdefault(name, []).append(case.name)
    missing = [n for n in names if n not in rows and n not in UNREACHABLE]
    assert not missing, f"counters with no row in CASES: {missing}"
    assert not set(rows) - set(names), "rows name counters the C enum does not have"
    assert not set(UNREACHABLE) & set(rows), "a reason listed unreachable has a row after all"
    assert set(UNREACHABLE) <= set(names)


def test_every_row_has_one_reason_matching_its_verdict() -> None:
    assert len({c.name for c in CASES}) == len(CASES), "row names must be unique"
    for case in CASES:
        reasons = [n for n in case.counters if n.startswith(REASON_PREFIXES)]
        if case.verdict in (TX, REDIRECT):
            assert not reasons and case.expect is not None, case.name
            assert case.counters.keys() & {"fwd_to_transceiver_packets", "fwd_to_client_packets"}
        else:
            assert case.expect is None, case.name
            prefix = "drop_" if case.verdict == DROP else "pass_"
            assert case.verdict in (DROP, PASS), case.name
            assert len(reasons) == 1 and reasons[0].startswith(prefix), case.name
            assert case.counters == {reasons[0]: 1}, case.name


def test_unreachable_reasons_stay_unreachable() -> None:
    """Each unreachable reason is counted only where the comment says."""
    for name, site in UNREACHABLE.items():
        uses = len(re.findall(rf"\bCTR_{name}\b", RELAY_C))
        assert uses == len(re.findall(site, RELAY_C)) > 0, f"{name} is counted somewhere new"
