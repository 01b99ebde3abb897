"""The BPF map layouts, mirrored from bpf/splitrelay.h with ctypes.

The controller and the CLI read and write the pinned maps through these
structures without compiling anything. A test compares each of them with the
types bcc derives from the C header, so the two cannot drift apart silently.
The counter names are parsed from the header's X-macro list, which is the
single source of truth for their order.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import ipaddress
import re
from pathlib import Path

from ctl import wire

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
HEADER = BPF_DIR / "splitrelay.h"

Addr16 = ctypes.c_uint8 * 16


class TransceiverState(enum.IntEnum):
    """States of a transceiver in the registry and the BPF map."""

    ACTIVE = 1
    DRAINING = 2


class Origin(enum.IntEnum):
    """Which part of the relay created a session."""

    XDP = 1
    USERSPACE = 2
    REDIS = 3
    OPERATOR = 4


class EventKind(enum.IntEnum):
    """Kinds of session event the XDP program reports."""

    CREATED = 1
    REROUTED = 2


class ConfigFlag(enum.IntFlag):
    """relay_config.flags: which addresses are set and which families served."""

    PUBLIC_V4 = 1 << 0
    PUBLIC_V6 = 1 << 1
    PUBLIC_V4_ANY = 1 << 2
    PUBLIC_V6_ANY = 1 << 3
    TUNNEL_V4 = 1 << 4
    TUNNEL_V6 = 1 << 5


class RelayConfig(ctypes.Structure):
    """struct relay_config: the relay's own addresses and ports."""

    _fields_ = (
        ("public_v4", ctypes.c_uint8 * 4),
        ("tunnel_v4", ctypes.c_uint8 * 4),
        ("public_v6", Addr16),
        ("tunnel_v6", Addr16),
        ("public_port", ctypes.c_uint16),
        ("tunnel_port", ctypes.c_uint16),
        ("flags", ctypes.c_uint32),
    )


class Transceiver(ctypes.Structure):
    """struct transceiver: tunnel address and state of one transceiver."""

    _fields_ = (
        ("addr", Addr16),
        ("port", ctypes.c_uint16),
        ("state", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    )


class SessionKey(ctypes.Structure):
    """struct session_key: the client address and port."""

    _fields_ = (
        ("addr", Addr16),
        ("port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
    )


class Session(ctypes.Structure):
    """struct session: owner, public address the client used, and counters."""

    _fields_ = (
        ("tid", ctypes.c_uint32),
        ("relay_port", ctypes.c_uint16),
        ("origin", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("relay_addr", Addr16),
        ("created_ns", ctypes.c_uint64),
        ("last_seen_ns", ctypes.c_uint64),
        ("packets_to_transceiver", ctypes.c_uint64),
        ("bytes_to_transceiver", ctypes.c_uint64),
        ("packets_to_client", ctypes.c_uint64),
        ("bytes_to_client", ctypes.c_uint64),
    )


class SessionEvent(ctypes.Structure):
    """struct session_event: what the ring buffer carries per new session."""

    _fields_ = (
        ("client_addr", Addr16),
        ("client_port", ctypes.c_uint16),
        ("relay_port", ctypes.c_uint16),
        ("relay_addr", Addr16),
        ("tid", ctypes.c_uint32),
        ("kind", ctypes.c_uint32),
        ("ts_ns", ctypes.c_uint64),
    )


STRUCTS: dict[str, type[ctypes.Structure]] = {
    "relay_config": RelayConfig,
    "transceiver": Transceiver,
    "session_key": SessionKey,
    "session": Session,
    "session_event": SessionEvent,
}


@functools.cache
def counter_names() -> tuple[str, ...]:
    """The counter names, in the order of the C enum."""
    text = HEADER.read_text()
    block = text.split("#define SPLITRELAY_COUNTERS(X)", 1)[1].split("\n\n", 1)[0]
    return tuple(re.findall(r"X\((\w+)\)", block))


def counter_index(name: str) -> int:
    """The per-CPU array slot of a counter; KeyError names the bad counter."""
    try:
        return counter_names().index(name)
    except ValueError:
        raise KeyError(f"no such counter: {name}") from None


def port_be(port: int) -> int:
    """A port as the maps hold it: network byte order in a native u16."""
    return int.from_bytes(port.to_bytes(2, "big"), "little")


def port_host(raw: int) -> int:
    """The inverse of port_be."""
    return int.from_bytes(raw.to_bytes(2, "little"), "big")


def addr16(addr: ipaddress.IPv4Address | ipaddress.IPv6Address | str) -> Addr16:
    """A 16-byte map address (IPv4 mapped)."""
    return Addr16.from_buffer_copy(wire.to_mapped(addr))


def addr_of(raw: Addr16) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address a 16-byte map field holds."""
    return wire.from_mapped(bytes(raw))


def session_key(addr: ipaddress.IPv4Address | ipaddress.IPv6Address | str, port: int) -> SessionKey:
    """The session map key for a client address and port."""
    return SessionKey(addr=addr16(addr), port=port_be(port))


def transceiver_value(
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address | str,
    port: int,
    state: TransceiverState = TransceiverState.ACTIVE,
) -> Transceiver:
    """The transceiver map value for a tunnel address."""
    return Transceiver(addr=addr16(addr), port=port_be(port), state=int(state))
