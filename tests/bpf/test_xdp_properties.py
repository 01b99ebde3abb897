"""Properties of the XDP relay program over thousands of random and mutated packets.

Whatever arrives, the program answers with an allowed verdict, leaves the
frames it passes or drops untouched, and never sends a packet anywhere but
to a registered transceiver (from the relay's tunnel address) or to a client
that has a session (from the relay's public address). Outputs of intact
inputs carry valid IP and UDP checksums.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from ctl import wire
from ctl.bpfsys import XdpAction
from ctl.layout import TransceiverState

from .xdp_harness import (
    CLIENT_MAC,
    DC_IF,
    DC_MAC,
    LINK_MTU,
    PUB_IF,
    PUB_MAC,
    PUBLIC_PORT,
    RELAY_V4,
    RELAY_V6,
    T1_V4,
    T1_V6,
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
    tunnel_header,
)

ALLOWED = {XdpAction.XDP_PASS, XdpAction.XDP_DROP, XdpAction.XDP_REDIRECT, XdpAction.XDP_TX}
CLIENTS = ["198.51.100.10", "198.51.100.77", "2001:db8:c::10", "2001:db8:c::77"]
SENDERS = [(T1_V4, 4001), (T2_V4, 4002), (T1_V6, 4006), ("203.0.113.99", 4001), (T1_V4, 9)]
TIDS = [TID_T1, TID_T2, TID_DRAINING, TID_T1_V6, TID_NO_NEIGH, TID_NO_ROUTE]
TIDS += [0xDEAD0001, 0, 0xFFFFFFFF]
RELAY_C = (Path(__file__).resolve().parents[2] / "bpf" / "relay.c").read_text()
# How far the kernel's STUN attribute walk looks; beyond it, userspace decides.
STUN_SCAN_MAX = int(re.search(r"#define STUN_SCAN_MAX (\d+)", RELAY_C).group(1))  # type: ignore[union-attr]
# Attribute values this long put what follows them around the scan window's edge.
LONG_VALUE = st.binary(min_size=STUN_SCAN_MAX - 40, max_size=STUN_SCAN_MAX + 20)


def _l3(src: str, dst: str) -> IP | IPv6:
    return IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)


@st.composite
def stun_payloads(draw: st.DrawFn) -> bytes:
    """Binding Requests: USERNAME after 0-2 other attributes (short, or long enough
    to push it near or past the kernel's scan window), then 0-3 more."""
    tid = draw(st.sampled_from(TIDS))
    ufrag = f"1{tid:08x}" + draw(st.text(alphabet=wire.ICE_CHARS, min_size=8, max_size=8))
    client = draw(st.text(alphabet=wire.ICE_CHARS, min_size=0, max_size=8))
    username = draw(st.sampled_from([f"{ufrag}:{client}", ufrag, f"{ufrag.upper()}:{client}"]))
    attr_type = st.one_of(st.sampled_from([0x8022, 0x0024, 0x8029]), st.integers(0, 0xFFFF))
    value = st.one_of(st.binary(max_size=12), st.binary(max_size=12), LONG_VALUE)
    before = draw(st.lists(st.tuples(attr_type, value), max_size=2))
    extras = draw(st.lists(st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=12)), max_size=3))
    attributes = [*before, (wire.ATTR_USERNAME, username.encode()), *extras]
    return wire.build_stun_message(wire.STUN_BINDING_REQUEST, attributes)


@st.composite
def client_frames(draw: st.DrawFn) -> tuple[bytes, str]:
    client = draw(st.sampled_from(CLIENTS))
    payload = draw(
        st.one_of(stun_payloads(), st.binary(min_size=0, max_size=64), st.just(b"\x16\xfe\xfd"))
    )
    dst = RELAY_V6 if ":" in client else RELAY_V4
    dport = draw(st.sampled_from([PUBLIC_PORT, PUBLIC_PORT, TUNNEL_PORT, 53]))
    frame = Ether(src=CLIENT_MAC, dst=PUB_MAC) / _l3(client, dst)
    frame = frame / UDP(sport=draw(st.sampled_from([50000, 50001])), dport=dport) / Raw(payload)
    return bytes(frame), PUB_IF


@st.composite
def tunnel_frames(draw: st.DrawFn) -> tuple[bytes, str]:
    src, sport = draw(st.sampled_from(SENDERS))
    client = draw(st.sampled_from(CLIENTS))
    cport = draw(st.sampled_from([50000, 50001]))
    relay_port = draw(st.sampled_from([PUBLIC_PORT, PUBLIC_PORT, 1]))
    payload = tunnel_header(client, cport, relay_port) + draw(st.binary(max_size=48))
    dst = TUNNEL_V6 if ":" in src else TUNNEL_V4
    frame = Ether(src=CLIENT_MAC, dst=DC_MAC) / _l3(src, dst)
    frame = frame / UDP(sport=sport, dport=TUNNEL_PORT) / Raw(payload)
    return bytes(frame), DC_IF


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, str, bool]:
    """A frame, its ingress, and whether it is still intact."""
    frame, ingress = draw(st.one_of(client_frames(), tunnel_frames()))
    how = draw(st.sampled_from(["none", "none", "flip", "truncate", "extend", "random"]))
    data = bytearray(frame)
    if how == "flip":
        for _ in range(draw(st.integers(1, 3))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    elif how == "truncate":
        data = data[: draw(st.integers(14, len(data) - 1))]  # test_run needs 14+
    elif how == "extend":
        data += draw(st.binary(min_size=1, max_size=16))
    elif how == "random":
        data = bytearray(draw(st.binary(min_size=14, max_size=128)))
    return bytes(data), ingress, how == "none"


@pytest.fixture
def h(xdp: XdpHarness) -> XdpHarness:
    """The standard map state, once per test (not per example: state may build up)."""
    xdp.reset()
    return xdp


def _registered(h: XdpHarness) -> set[tuple[str, int]]:
    return {(str(t.addr), t.port) for t in h.maps.list_transceivers()}


def _check_output(h: XdpHarness, out: bytes, intact: bool) -> None:
    pkt = Ether(out)
    ip = pkt.getlayer(IP) or pkt.getlayer(IPv6)
    assert ip is not None and pkt.haslayer(UDP), "forwarded frame is not IP/UDP"
    udp = pkt[UDP]
    dst = (str(ipaddress.ip_address(ip.dst)), udp.dport)
    src = (str(ipaddress.ip_address(ip.src)), udp.sport)
    if src[1] == TUNNEL_PORT and src[0] in (TUNNEL_V4, TUNNEL_V6):
        assert dst in _registered(h), f"sent to {dst}, not a registered transceiver"
        header = wire.TunnelHeader.unpack(bytes(udp.payload)[: wire.TUNNEL_HEADER_LEN])
        assert header.relay_port == PUBLIC_PORT
    else:
        assert src in {(RELAY_V4, PUBLIC_PORT), (RELAY_V6, PUBLIC_PORT)}, f"bad source {src}"
        assert h.maps.session(dst[0], dst[1]) is not None, f"sent to {dst}, which has no session"
    if intact:
        again = Ether(out)
        if again.haslayer(IP):
            del again[IP].chksum
        if udp.chksum != 0:
            del again[UDP].chksum
        assert bytes(Ether(bytes(again))) == out, "checksum of an intact packet is wrong"


@settings(
    max_examples=3000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)
@given(case=mutated())
def test_never_an_open_relay(h: XdpHarness, case: tuple[bytes, str, bool]) -> None:
    frame, ingress, intact = case
    res = h.run(frame, ingress)
    assert res.verdict in ALLOWED
    if res.verdict in (XdpAction.XDP_PASS, XdpAction.XDP_DROP):
        assert res.packet == frame
    else:
        _check_output(h, res.packet, intact)


def _beyond_scan_window(payload: bytes) -> bool:
    """Whether the kernel's bounded walk of a Binding Request reaches an attribute
    starting past STUN_SCAN_MAX before it finds USERNAME, a stop attribute, the
    end, the attribute bound or a malformed attribute (the spec, independently)."""
    try:
        msg_type, _ = wire.parse_stun_header(payload)
    except wire.WireError:
        return False
    if msg_type != wire.STUN_BINDING_REQUEST:
        return False
    off = wire.STUN_HEADER_LEN
    for _ in range(wire.STUN_MAX_ATTRIBUTES):
        if off == len(payload):
            return False
        if off > STUN_SCAN_MAX:
            return True
        attr_type, attr_len = struct.unpack_from("!HH", payload, off)
        off += 4 + (attr_len + 3) // 4 * 4
        if off > len(payload) or attr_type in (0x0006, 0x0008, 0x001C, 0x8028):
            return False
    return False


def _python_verdict(h: XdpHarness, payload: bytes) -> tuple[int, str]:
    """What the userspace rules (ctl.wire) say an IPv4 client with no session gets."""
    try:
        tid = wire.route_binding_request(payload)
    except wire.WireError as exc:
        return XdpAction.XDP_DROP, f"drop_{exc.reason}"
    if tid is None:
        return XdpAction.XDP_PASS, "pass_unknown_client"
    entry = h.maps.transceiver(tid)
    if entry is None:
        return XdpAction.XDP_PASS, "pass_unknown_transceiver"
    if entry.state is not TransceiverState.ACTIVE:
        return XdpAction.XDP_DROP, "drop_transceiver_draining"
    if tid == TID_NO_NEIGH:
        return XdpAction.XDP_PASS, "pass_fib_no_neigh"
    if tid == TID_NO_ROUTE:
        return XdpAction.XDP_PASS, "pass_fib_failed"
    ip_header = 40 if ":" in str(entry.addr) else 20
    if ip_header + 8 + wire.TUNNEL_HEADER_LEN + len(payload) > LINK_MTU:
        return XdpAction.XDP_PASS, "pass_fib_frag_needed"
    return XdpAction.XDP_REDIRECT, "sessions_created"


def _big_request() -> bytes:
    """A Binding Request with USERNAME first, too big to encapsulate within the MTU."""
    username = f"{wire.make_server_ufrag(TID_T1, 'AbCd+/12')}:cl1e".encode()
    filler = (0x8022, b"s" * (LINK_MTU - 100))
    return wire.build_binding_request(username, b"\x05" * 12, [filler])


def _long_request(username_offset: int, tid: int = TID_T1) -> bytes:
    """A Binding Request with USERNAME at username_offset, after one filler."""
    filler = (0x8022, b"s" * (username_offset - wire.STUN_HEADER_LEN - 4))
    username = f"{wire.make_server_ufrag(tid, 'AbCd+/12')}:cl1e".encode()
    return wire.build_stun_message(
        wire.STUN_BINDING_REQUEST, [filler, (wire.ATTR_USERNAME, username)], b"\x05" * 12
    )


@st.composite
def stun_like(draw: st.DrawFn) -> bytes:
    """STUN messages, well-formed or not, and other first bytes."""
    payload = bytearray(draw(stun_payloads()))
    how = draw(st.sampled_from(["none", "flip", "truncate", "random"]))
    if how == "flip":
        payload[draw(st.integers(0, len(payload) - 1))] ^= draw(st.integers(1, 255))
    elif how == "truncate":
        payload = payload[: draw(st.integers(1, len(payload) - 1))]
    elif how == "random":
        payload = bytearray(draw(st.binary(min_size=1, max_size=80)))
    return bytes(payload)


@settings(
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)
@given(payload=stun_like())
@example(payload=_long_request(STUN_SCAN_MAX))  # the last offset the kernel walks
@example(payload=_long_request(STUN_SCAN_MAX + 4))  # the first one it leaves to userspace
@example(payload=_long_request(STUN_SCAN_MAX + 4, TID_UNKNOWN))
@example(payload=_long_request(wire.STUN_HEADER_LEN + 4 + 1400))  # long, and too big to encap
@example(payload=_big_request())  # routable in the kernel, but too big to encapsulate there
def test_xdp_and_userspace_rules_agree(h: XdpHarness, payload: bytes) -> None:
    """The kernel and ctl.wire judge every first packet the same way, except that
    the kernel passes up, and only then, a request it cannot walk to the end of."""
    xdp = h
    xdp.maps.flush_sessions()
    frame = Ether(src=CLIENT_MAC, dst=PUB_MAC) / IP(src="198.51.100.10", dst=RELAY_V4)
    frame = bytes(frame / UDP(sport=50000, dport=PUBLIC_PORT) / Raw(payload))
    res = xdp.run(frame, PUB_IF)
    reasons = [k for k in res.counters if k.startswith(("drop_", "pass_", "sessions_"))]
    if _beyond_scan_window(payload):
        assert (XdpAction(res.verdict), reasons) == (XdpAction.XDP_PASS, ["pass_stun_too_long"])
        assert res.packet == frame
        return  # userspace decides alone, by the rules ctl.wire's own tests check
    verdict, reason = _python_verdict(xdp, payload)
    assert (XdpAction(res.verdict), reasons) == (verdict, [reason])
