"""relayctl's parsing and formatting: the operator-facing surface, without root or maps."""

from __future__ import annotations

import errno
import ipaddress
import json
from pathlib import Path

import click
import pytest

from ctl import cliutil as cu
from ctl import layout
from ctl.bpfsys import BpfError
from ctl.layout import Origin, TransceiverState
from ctl.loader import LoadError
from ctl.maps import RelayAddresses, SessionEntry, TransceiverEntry
from ctl.xdp import XdpError

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address
PIN = Path("/sys/fs/bpf/splitrelay")

# ----------------------------------------------------------------- endpoints


@pytest.mark.parametrize(
    ("text", "addr", "port"),
    [
        ("198.51.100.10:50000", V4("198.51.100.10"), 50000),
        (" 198.51.100.10:1 ", V4("198.51.100.10"), 1),
        ("[2001:db8:c::10]:3478", V6("2001:db8:c::10"), 3478),
        ("[::1]:65535", V6("::1"), 65535),
        # the maps store both spellings identically; listings print IPv4
        ("[::ffff:198.51.100.10]:5", V4("198.51.100.10"), 5),
    ],
)
def test_parse_endpoint_accepts(text: str, addr: object, port: int) -> None:
    ep = cu.parse_endpoint(text)
    assert (ep.addr, ep.port) == (addr, port)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("198.51.100.10", "missing :port"),
        ("198.51.100.10:", "port must be"),
        ("198.51.100.10:0", "port must be"),
        ("198.51.100.10:65536", "port must be"),
        ("198.51.100.10:+80", "port must be"),
        ("198.51.100.10:8O", "port must be"),
        ("2001:db8::1:3478", "needs brackets"),
        ("[2001:db8::1]", "expected"),
        ("[2001:db8::1]3478", "expected"),
        ("[fe80::1%eth0]:5", "scoped"),
        ("relay.example:3478", "not an IP address"),
        ("[198.51.100.300]:5", "not an IP address"),
        ("", "missing :port"),
    ],
)
def test_parse_endpoint_rejects(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        cu.parse_endpoint(text)


@pytest.mark.parametrize("text", ["198.51.100.10:50000", "[2001:db8:c::10]:3478"])
def test_endpoint_round_trips(text: str) -> None:
    assert str(cu.parse_endpoint(text)) == text


# ----------------------------------------------------------------- transceiver ids


@pytest.mark.parametrize(
    ("text", "tid"),
    [
        ("0000a001", 0xA001),
        ("a001", 0xA001),
        ("0xa001", 0xA001),
        ("0XA001", 0xA001),
        ("A001", 0xA001),
        ("1", 1),
        ("ffffffff", 0xFFFFFFFF),
    ],
)
def test_parse_tid_accepts(text: str, tid: int) -> None:
    assert cu.parse_tid(text) == tid


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("0", "reserved"),
        ("00000000", "reserved"),
        ("1ffffffff", "1 to 8 hex digits"),
        ("zz", "1 to 8 hex digits"),
        ("0x", "1 to 8 hex digits"),
        ("", "1 to 8 hex digits"),
        ("-1", "1 to 8 hex digits"),
        ("a 01", "1 to 8 hex digits"),
    ],
)
def test_parse_tid_rejects(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        cu.parse_tid(text)


def test_format_tid_is_the_token_spelling() -> None:
    assert cu.format_tid(0xA001) == "0000a001"
    assert cu.format_tid(0xFFFFFFFF) == "ffffffff"


def test_param_types_turn_value_errors_into_usage_errors() -> None:
    with pytest.raises(click.BadParameter, match="bad transceiver id"):
        cu.TRANSCEIVER_ID.convert("xyz", None, None)
    with pytest.raises(click.BadParameter, match="bad endpoint"):
        cu.ENDPOINT.convert("nowhere", None, None)
    assert cu.TRANSCEIVER_ID.convert("a001", None, None) == 0xA001


# ----------------------------------------------------------------- numbers and tables


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-1, "0.0s"),
        (0.42, "0.4s"),
        (9.96, "9.9s"),
        (10.0, "10s"),
        (42.9, "42s"),
        (303, "5m03s"),
        (7500, "2h05m"),
        (3 * 86400 + 4 * 3600 + 59, "3d04h"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert cu.format_duration(seconds) == text


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0B"),
        (1023, "1023B"),
        (1536, "1.5KiB"),
        (20 * 1024**2, "20MiB"),
        (5 * 1024**5, "5120TiB"),
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert cu.format_bytes(n) == text


def test_format_rate() -> None:
    assert cu.format_rate(None) == "-"
    assert cu.format_rate(2.25) == "2.2/s"
    assert cu.format_rate(1234.5) == "1234/s"


def test_render_table_aligns_columns_and_right_aligns_numbers() -> None:
    out = cu.render_table(("NAME", "N"), [["a", "5"], ["longer", "123"]], right=(1,))
    assert out.splitlines() == ["NAME      N", "a         5", "longer  123"]


def test_render_table_with_no_rows_is_the_header() -> None:
    assert cu.render_table(("A", "B"), []) == "A  B"


def test_render_fields_aligns_values() -> None:
    assert cu.render_fields([("a", "1"), ("long", "2")]) == "a     1\nlong  2"


# ----------------------------------------------------------------- records


def _session(**kw: object) -> SessionEntry:
    base: dict[str, object] = {
        "client_addr": V4("198.51.100.10"),
        "client_port": 50000,
        "tid": 0xA001,
        "relay_addr": V4("198.51.100.1"),
        "relay_port": 3478,
        "origin": Origin.XDP,
        "created_ns": 1_000_000_000,
        "last_seen_ns": 3_000_000_000,
        "packets_to_transceiver": 7,
        "bytes_to_transceiver": 1536,
        "packets_to_client": 6,
        "bytes_to_client": 100,
    }
    base.update(kw)
    return SessionEntry(**base)  # type: ignore[arg-type]


def test_session_record_is_json_with_display_and_exact_fields() -> None:
    rec = cu.session_record(_session(), now_ns=11_000_000_000)
    assert json.loads(json.dumps(rec)) == rec
    assert rec["client"] == "198.51.100.10:50000"
    assert rec["transceiver"] == "0000a001"
    assert rec["tid"] == 0xA001
    assert rec["relay"] == "198.51.100.1:3478"
    assert rec["origin"] == "xdp"
    assert rec["age_seconds"] == 10.0
    assert rec["idle_seconds"] == 8.0
    assert rec["bytes_to_transceiver"] == 1536


def test_session_row_matches_headers() -> None:
    rec = cu.session_record(
        _session(client_addr=V6("2001:db8:c::10"), relay_addr=V6("2001:db8:c::1")),
        now_ns=11_000_000_000,
    )
    row = cu.session_row(rec)
    assert len(row) == len(cu.SESSION_HEADERS)
    assert row == [
        "[2001:db8:c::10]:50000",
        "0000a001",
        "[2001:db8:c::1]:3478",
        "xdp",
        "10s",
        "8.0s",
        "7",
        "1.5KiB",
        "6",
        "100B",
    ]


def test_session_sort_key_puts_ipv4_first_then_address_then_port() -> None:
    entries = [
        _session(client_addr=V6("::1"), client_port=1),
        _session(client_addr=V4("198.51.100.20"), client_port=1),
        _session(client_addr=V4("198.51.100.3"), client_port=9),
        _session(client_addr=V4("198.51.100.3"), client_port=2),
    ]
    ordered = sorted(entries, key=cu.session_sort_key)
    assert [(str(e.client_addr), e.client_port) for e in ordered] == [
        ("198.51.100.3", 2),
        ("198.51.100.3", 9),
        ("198.51.100.20", 1),
        ("::1", 1),
    ]


def test_render_session_shows_exact_bytes() -> None:
    text = cu.render_session(cu.session_record(_session(), now_ns=11_000_000_000))
    assert "0000a001" in text
    assert "7 packets, 1536 bytes (1.5KiB)" in text


def test_transceiver_record_and_row() -> None:
    entry = TransceiverEntry(0xA003, V6("2001:db8:1::11"), 4003, TransceiverState.DRAINING)
    rec = cu.transceiver_record(entry, sessions=2)
    assert rec == {
        "id": "0000a003",
        "tid": 0xA003,
        "address": "[2001:db8:1::11]:4003",
        "addr": "2001:db8:1::11",
        "port": 4003,
        "state": "draining",
        "sessions": 2,
    }
    assert cu.transceiver_row(rec) == ["0000a003", "[2001:db8:1::11]:4003", "draining", "2"]


def test_addresses_record_and_configured() -> None:
    empty = RelayAddresses()
    assert not cu.addresses_configured(empty)
    assert cu.addresses_record(empty)["public_v4"] is None
    addrs = RelayAddresses(public_v4=V4("198.51.100.1"), tunnel_v6=V6("2001:db8:1::1"))
    assert cu.addresses_configured(addrs)
    rec = cu.addresses_record(addrs)
    assert rec["public_v4"] == "198.51.100.1"
    assert rec["tunnel_v6"] == "2001:db8:1::1"
    assert rec["public_port"] == 3478


# ----------------------------------------------------------------- counters


def test_group_counters_covers_every_counter_of_the_header() -> None:
    names = layout.counter_names()
    groups = cu.group_counters({n: i for i, n in enumerate(names)})
    assert list(groups) == ["forwarded", "sessions", "drops", "passes"]
    assert sum(len(g) for g in groups.values()) == len(names)
    assert groups["forwarded"]["to_transceiver_packets"] == names.index(
        "fwd_to_transceiver_packets"
    )
    assert set(groups["sessions"]) == {"created", "rerouted", "events_lost"}
    assert "stun_malformed" in groups["drops"]
    assert "unknown_client" in groups["passes"]


def test_group_counters_shows_unknown_counters_under_other() -> None:
    groups = cu.group_counters({"drop_x": 1, "brand_new": 2})
    assert groups["other"] == {"brand_new": 2}
    assert groups["drops"] == {"x": 1}


def test_counter_rates() -> None:
    rates = cu.counter_rates({"a": 10, "b": 5}, {"a": 30, "b": 1, "c": 4}, 2.0)
    assert rates == {"a": 10.0, "b": None, "c": 0.0}


def test_render_stats_totals_drops_and_passes() -> None:
    groups = cu.group_counters({"fwd_x": 3, "drop_a": 1, "drop_b": 2, "pass_c": 0})
    lines = cu.render_stats(groups)
    assert "drops (total 3)" in lines
    assert "passes (total 0)" in lines
    assert any(line.split() == ["x", "3"] for line in lines)


def test_render_stats_with_rates() -> None:
    flat = {"fwd_x": 30, "drop_a": 1}
    first = cu.render_stats(cu.group_counters(flat), None, with_rates=True)
    assert any(line.split() == ["x", "30", "-"] for line in first)
    rates = cu.group_counters(cu.counter_rates({"fwd_x": 10, "drop_a": 1}, flat, 2.0))
    later = cu.render_stats(cu.group_counters(flat), rates, with_rates=True)
    assert any(line.split() == ["x", "30", "10.0/s"] for line in later)


def test_watch_frame_redraws_in_place() -> None:
    frame = cu.watch_frame(["one", "two"])
    assert frame.startswith(cu.HOME)
    assert frame.endswith(cu.CLEAR_EOS)
    assert frame.count(cu.CLEAR_EOL) == 2
    assert cu.CLEAR_SCREEN not in frame  # overwrite, not clear: no flicker


def test_stats_watch_lines_have_a_header_and_every_counter() -> None:
    snap = {n: 0 for n in layout.counter_names()}
    lines = cu.stats_watch_lines(PIN, 0.5, 2, 5, snap, cu.counter_rates(snap, snap, 0.5))
    assert "refresh 2/5" in lines[0]
    assert "every 0.5s" in lines[0]
    assert sum("/s" in line for line in lines[2:]) == len(snap)


# ----------------------------------------------------------------- status and testbed views


def test_render_status_without_anything_pinned() -> None:
    report = {
        "pin_dir": str(PIN),
        "pin_dir_exists": False,
        "program_pinned": False,
        "maps": {n: {"pinned": False} for n in ("config", "sessions")},
        "addresses": None,
        "daemon": None,
        "interfaces": {},
    }
    text = cu.render_status(report)
    assert "(missing)" in text
    assert "map sessions" in text and "not pinned" in text
    assert "no state recorded" in text


def test_render_status_with_a_daemon() -> None:
    report = {
        "pin_dir": str(PIN),
        "pin_dir_exists": True,
        "program_pinned": True,
        "maps": {
            "sessions": {
                "pinned": True,
                "type": "lru_hash",
                "max_entries": 100,
                "entries": 5,
                "fill": 0.05,
            }
        },
        "addresses": cu.addresses_record(RelayAddresses(public_v4=V4("198.51.100.1"))),
        "daemon": {
            "state": "stale",
            "pid": 4242,
            "started": 0.0,
            "xdp": False,
            "fallback_reason": "native XDP unsupported",
            "interfaces": {},
            "metrics": "0.0.0.0:9478",
        },
        "interfaces": {"pub0": {"error": "interface 'pub0' does not exist"}},
    }
    text = cu.render_status(report)
    assert "lru_hash, max 100, 5 used (5.0%)" in text
    assert "198.51.100.1 port 3478" in text
    assert "stale (pid 4242" in text
    assert "not attached: native XDP unsupported" in text
    assert "interface 'pub0' does not exist" in text


def test_render_testbed_summary() -> None:
    desc = {
        "prefix": "sr",
        "hosts": {
            "relay1": {
                "role": "relay",
                "netns": "sr-relay1",
                "relay_addr": ["198.51.100.1:3478", "[2001:db8:c::1]:3478"],
                "metrics_url": "http://198.51.100.1:9478/metrics",
            },
            "tx1": {
                "role": "transceiver",
                "netns": "sr-tx1",
                "ipv4": "203.0.113.11",
                "ipv6": "2001:db8:1::11",
                "signaling_url": "http://203.0.113.11:8080",
            },
        },
    }
    text = cu.render_testbed(desc)
    assert text.splitlines()[0] == "testbed sr is up"
    assert "http://203.0.113.11:8080" in text
    assert "198.51.100.1:3478, [2001:db8:c::1]:3478" in text


def test_render_testbed_status() -> None:
    st = {"state": "partial", "problems": ["missing netns sr-tx2"], "processes": []}
    assert cu.render_testbed_status("sr", st).splitlines() == [
        "testbed sr: partial",
        "  problem: missing netns sr-tx2",
    ]
    down = {"state": "down", "problems": ["create netns sr-sw"], "processes": []}
    assert cu.render_testbed_status("sr", down) == (
        "testbed sr: down (relayctl testbed up --prefix sr builds it)"
    )


# ----------------------------------------------------------------- errors


def test_one_line() -> None:
    assert cu.one_line("single") == "single"
    assert cu.one_line("\n  first\nsecond\n") == "first ..."
    assert cu.one_line("") == ""


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (
            BpfError(errno.ENOENT, "bpf_obj_get", "/x/sessions"),
            f"no relay maps at {PIN}: is the relay running? (relayctl run or relayctl attach)",
        ),
        (BpfError(errno.EPERM, "bpf_obj_get", "/x"), "permission denied: run as root"),
        (BpfError(errno.EACCES, "bpf_obj_get", "/x"), "permission denied: run as root"),
        (PermissionError(errno.EACCES, "Permission denied"), "permission denied: run as root"),
        (XdpError("interface 'x' does not exist"), "interface 'x' does not exist"),
        (LoadError("cannot load relay.c: error\nline 2\nline 3"), "cannot load relay.c: error ..."),
        (ValueError("bad endpoint 'x'"), "bad endpoint 'x'"),
        (FileNotFoundError(errno.ENOENT, "No such file", "/run/x"), "/run/x: No such file"),
    ],
)
def test_error_line_for_known_errors(exc: BaseException, message: str) -> None:
    assert cu.error_line(exc, PIN) == (message, True)


def test_error_line_for_unexpected_errors() -> None:
    text, known = cu.error_line(KeyError("boom"), PIN)
    assert not known
    assert text == "unexpected KeyError: 'boom'"
