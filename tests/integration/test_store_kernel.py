"""KernelState against the real pinned maps of a loaded relay program.

The point of KernelState is that userspace and XDP share one truth: a
session userspace installs is forwarded by the program on the client's very
next packet, and a session the program creates is visible to userspace at
once. Both directions are checked here with the program itself (through
bpf_prog_test_run), not with a model of it.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest

from ctl.bpfsys import XdpAction
from ctl.layout import Origin, TransceiverState
from ctl.store import KernelState, RelayState
from tests.bpf.xdp_harness import (
    CLIENT_V4,
    CLIENT_V6,
    DC_IF,
    PUBLIC_PORT,
    RELAY_V4,
    RELAY_V6,
    T1_MAC,
    T1_V4,
    T2_MAC,
    T2_V4,
    TID_T1,
    TID_T2,
    TID_UNKNOWN,
    XdpHarness,
    binding_request,
    client_frame,
    expected_decap,
    expected_encap,
    tunnel_frame,
)

DTLS = bytes([22, 0xFE, 0xFD]) + bytes(10) + b"client hello"
REPLY = bytes([0x80, 111, 0, 2]) + bytes(8) + b"server audio"
REDIRECT, PASS, DROP = XdpAction.XDP_REDIRECT, XdpAction.XDP_PASS, XdpAction.XDP_DROP


@pytest.fixture
def h(xdp: XdpHarness) -> XdpHarness:
    xdp.reset()
    return xdp


@pytest.fixture
def state(h: XdpHarness) -> KernelState:
    return KernelState(h.maps)


def test_is_a_relay_state(state: KernelState) -> None:
    assert isinstance(state, RelayState)


def test_userspace_session_takes_the_xdp_fast_path(h: XdpHarness, state: KernelState) -> None:
    assert h.run(client_frame(DTLS, port=50700)).counters == {"pass_unknown_client": 1}
    entry = state.put_session(CLIENT_V4, 50700, TID_T1, RELAY_V4, PUBLIC_PORT, Origin.USERSPACE)
    assert (entry.tid, entry.relay_addr, entry.origin) == (
        TID_T1,
        IPv4Address(RELAY_V4),
        Origin.USERSPACE,
    )
    res = h.run(client_frame(DTLS, port=50700))
    assert res.verdict == REDIRECT
    assert res.packet.hex() == expected_encap(DTLS, T1_V4, 4001, T1_MAC, client_port=50700).hex()
    res = h.run(tunnel_frame(REPLY, client_port=50700), DC_IF)
    assert res.verdict == REDIRECT
    assert res.packet.hex() == expected_decap(REPLY, client_port=50700).hex()
    got = state.get_session(CLIENT_V4, 50700)
    assert got is not None and got.origin is Origin.USERSPACE
    assert (got.packets_to_transceiver, got.bytes_to_transceiver) == (1, len(DTLS))
    assert (got.packets_to_client, got.bytes_to_client) == (1, len(REPLY))


def test_kernel_sessions_are_visible_at_once(h: XdpHarness, state: KernelState) -> None:
    assert state.get_session(CLIENT_V6, 50701) is None
    assert h.run(client_frame(binding_request(TID_T2), CLIENT_V6, port=50701)).verdict == REDIRECT
    entry = state.get_session(CLIENT_V6, 50701)
    assert entry is not None
    assert (entry.client_addr, entry.tid, entry.relay_addr, entry.relay_port, entry.origin) == (
        IPv6Address(CLIENT_V6),
        TID_T2,
        IPv6Address(RELAY_V6),
        PUBLIC_PORT,
        Origin.XDP,
    )
    assert entry.packets_to_transceiver == 1
    assert [(e.client_addr, e.client_port) for e in state.iter_sessions()] == [
        (IPv6Address(CLIENT_V6), 50701)
    ]
    assert state.session_count() == 1


def test_reroute_written_by_userspace_is_followed(h: XdpHarness, state: KernelState) -> None:
    h.run(client_frame(binding_request(TID_T1), port=50702))
    state.put_session(CLIENT_V4, 50702, TID_T2, RELAY_V4, PUBLIC_PORT, Origin.USERSPACE)
    res = h.run(client_frame(DTLS, port=50702))
    assert res.packet.hex() == expected_encap(DTLS, T2_V4, 4002, T2_MAC, client_port=50702).hex()
    assert h.run(tunnel_frame(REPLY, client_port=50702), DC_IF).counters == {
        "drop_reply_not_owner": 1
    }


def test_touch_updates_the_kernel_entry(h: XdpHarness, state: KernelState) -> None:
    first = state.put_session(CLIENT_V4, 50703, TID_T1, RELAY_V4, PUBLIC_PORT, Origin.USERSPACE)
    assert state.touch(CLIENT_V4, 50703, True, 100)
    assert state.touch(IPv4Address(CLIENT_V4), 50703, False, 40)
    h.run(client_frame(DTLS, port=50703))  # the kernel's own count adds up with ours
    e = state.get_session(CLIENT_V4, 50703)
    assert e is not None
    assert (e.packets_to_transceiver, e.bytes_to_transceiver) == (2, 100 + len(DTLS))
    assert (e.packets_to_client, e.bytes_to_client) == (1, 40)
    assert e.last_seen_ns >= first.last_seen_ns and e.created_ns == first.created_ns
    assert (e.tid, e.origin) == (TID_T1, Origin.USERSPACE)


def test_touch_never_resurrects_a_session(state: KernelState) -> None:
    assert not state.touch(CLIENT_V4, 50704, True, 1)
    assert state.get_session(CLIENT_V4, 50704) is None


def test_ipv4_mapped_names_the_same_session(state: KernelState) -> None:
    state.put_session(f"::ffff:{CLIENT_V4}", 50705, TID_T1, f"::ffff:{RELAY_V4}", PUBLIC_PORT)
    entry = state.get_session(CLIENT_V4, 50705)
    assert entry is not None and entry.relay_addr == IPv4Address(RELAY_V4)
    assert state.get_session(IPv6Address(f"::ffff:{CLIENT_V4}"), 50705) == entry


def test_remove_session_sends_the_client_back_up(h: XdpHarness, state: KernelState) -> None:
    h.run(client_frame(binding_request(TID_T1), port=50706))
    assert state.remove_session(CLIENT_V4, 50706)
    assert not state.remove_session(CLIENT_V4, 50706)
    assert h.run(client_frame(DTLS, port=50706)).counters == {"pass_unknown_client": 1}
    assert state.session_count() == 0


def test_transceivers_are_the_kernel_registry(h: XdpHarness, state: KernelState) -> None:
    assert state.get_transceiver(TID_UNKNOWN) is None
    assert h.run(client_frame(binding_request(TID_UNKNOWN), port=50707)).counters == {
        "pass_unknown_transceiver": 1
    }
    state.put_transceiver(TID_UNKNOWN, T2_V4, 4009)
    t = state.get_transceiver(TID_UNKNOWN)
    assert t is not None
    assert (t.addr, t.port, t.state) == (IPv4Address(T2_V4), 4009, TransceiverState.ACTIVE)
    assert TID_UNKNOWN in [x.tid for x in state.list_transceivers()]
    assert h.run(client_frame(binding_request(TID_UNKNOWN), port=50707)).verdict == REDIRECT

    state.put_transceiver(TID_UNKNOWN, T2_V4, 4009, TransceiverState.DRAINING)
    res = h.run(client_frame(binding_request(TID_UNKNOWN), port=50708))
    assert res.counters == {"drop_transceiver_draining": 1}
    assert h.run(client_frame(DTLS, port=50707)).verdict == REDIRECT  # existing session stays

    assert state.remove_transceiver(TID_UNKNOWN)
    assert not state.remove_transceiver(TID_UNKNOWN)
    assert h.run(client_frame(DTLS, port=50707)).counters == {"pass_orphan_session": 1}
    assert state.get_transceiver(0xFFFFFFFF + 1) is None
