"""The ctypes mirrors in ctl/layout.py match the C structs bcc compiled."""

from __future__ import annotations

import ctypes

import pytest

from ctl import layout

from .xdp_harness import XdpHarness

# table name -> (key struct or size, value struct)
TABLES = {
    "config": (4, layout.RelayConfig),
    "transceivers": (4, layout.Transceiver),
    "sessions": (layout.SessionKey, layout.Session),
}


def _flat(ct: type) -> list[tuple[str, int, int]]:
    """(name, offset, size) of each field, as ctypes lays it out."""
    return [
        (name, getattr(ct, name).offset, getattr(ct, name).size)
        for name, *_ in ct._fields_  # type: ignore[attr-defined]
    ]


@pytest.mark.parametrize("table", sorted(TABLES))
def test_map_types_match_bcc(xdp: XdpHarness, table: str) -> None:
    key, value = TABLES[table]
    bcc_table = xdp.program.bpf[table.encode()]
    if isinstance(key, int):
        assert ctypes.sizeof(bcc_table.Key) == key
    else:
        assert _flat(bcc_table.Key) == _flat(key)
    assert _flat(bcc_table.Leaf) == _flat(value)
    assert ctypes.sizeof(bcc_table.Leaf) == ctypes.sizeof(value)


def test_counter_names_cover_the_map(xdp: XdpHarness) -> None:
    names = layout.counter_names()
    assert xdp.maps.counters.max_entries == len(names)
    assert names[0] == "fwd_to_transceiver_packets"
    assert len(set(names)) == len(names)
    assert all(n.startswith(("fwd_", "sessions_", "events_", "drop_", "pass_")) for n in names)


def test_session_event_size_matches_program(xdp: XdpHarness) -> None:
    """The ring buffer records are struct session_event: 56 bytes."""
    assert ctypes.sizeof(layout.SessionEvent) == 56


def test_ports_are_network_order() -> None:
    assert layout.port_host(layout.port_be(3478)) == 3478
    assert bytes(layout.session_key("198.51.100.10", 0x1234))[16:18] == b"\x12\x34"
