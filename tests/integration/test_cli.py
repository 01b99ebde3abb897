"""`relayctl` against real pinned maps: through click's CliRunner and as a real process.

The maps are the ones the session's XDP harness pinned (the program is
compiled once per test session), reset before every test. Whatever the CLI
prints is checked against what the maps hold, and every failure must be one
`relayctl: error: ...` line on stderr with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from ctl import cli, runstate
from ctl import cliutil as cu
from ctl.layout import Origin, TransceiverState
from ctl.runstate import RunState
from tests.bpf.xdp_harness import (
    CLIENT_V4,
    RELAY_V4,
    T1_V4,
    TID_DRAINING,
    TID_T1,
    TID_T2,
    XdpHarness,
    binding_request,
    client_frame,
)

REPO = Path(__file__).resolve().parents[2]
RELAYCTL = Path(sys.executable).with_name("relayctl")
ERROR = "relayctl: error: "


@pytest.fixture
def relay(xdp: XdpHarness) -> XdpHarness:
    """The shared harness in its standard state: five transceivers, no sessions."""
    xdp.reset()
    return xdp


@pytest.fixture
def missing_pin_dir(xdp: XdpHarness) -> Path:
    """A pin dir on bpffs that does not exist."""
    return Path(f"{xdp.pin_dir}-missing")


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # click 8.1 mixes stderr into stdout by default
    except TypeError:  # click >= 8.2 always keeps them apart
        return CliRunner()


def invoke(pin_dir: Path, *args: str, **kw: Any) -> Result:
    """Run relayctl in-process with a pin dir."""
    return _runner().invoke(cli.relayctl, ["--pin-dir", str(pin_dir), *args], **kw)


def _env() -> dict[str, str]:
    """The caller's environment without SPLITRELAY_* options that would change results."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SPLITRELAY_")}


def _argv(*args: str) -> list[str]:
    """The installed console script, or the module when the package is not installed."""
    if RELAYCTL.exists():
        return [str(RELAYCTL), *args]
    return [sys.executable, "-m", "ctl.cli", *args]


def run(pin_dir: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
    """Run relayctl as a separate process, as an operator would."""
    pin = ["--pin-dir", str(pin_dir)] if pin_dir is not None else []
    return subprocess.run(
        _argv(*pin, *args), capture_output=True, text=True, cwd=REPO, env=_env(), timeout=60
    )


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    """Exactly one stderr line, the relayctl error prefix, no traceback."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(ERROR), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0]


# ------------------------------------------------------------------ transceivers


def test_transceivers_ls_json_matches_the_map(relay: XdpHarness) -> None:
    res = run(relay.pin_dir, "transceivers", "ls", "--json")
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    listed = json.loads(res.stdout)
    expected = [
        (e.tid, str(e.addr), e.port, e.state.name.lower()) for e in relay.maps.list_transceivers()
    ]
    assert [(t["tid"], t["addr"], t["port"], t["state"]) for t in listed] == expected
    assert {t["id"] for t in listed} >= {"0000a001", "0000a003"}
    assert all(t["sessions"] == 0 for t in listed)


def test_transceiver_add_drain_reactivate_rm(relay: XdpHarness) -> None:
    res = invoke(relay.pin_dir, "transceivers", "add", "0xBEEF", "[2001:db8:1::42]:4100")
    assert res.exit_code == 0, res.stderr
    assert "added transceiver 0000beef at [2001:db8:1::42]:4100 (active)" in res.stdout
    entry = relay.maps.transceiver(0xBEEF)
    assert entry is not None
    assert (str(entry.addr), entry.port, entry.state) == (
        "2001:db8:1::42",
        4100,
        TransceiverState.ACTIVE,
    )

    ls = invoke(relay.pin_dir, "transceivers", "ls")
    assert ls.exit_code == 0
    assert ls.stdout.splitlines()[0].split() == ["ID", "ADDRESS", "STATE", "SESSIONS"]
    row = next(line for line in ls.stdout.splitlines() if line.startswith("0000beef"))
    assert row.split() == ["0000beef", "[2001:db8:1::42]:4100", "active", "0"]

    assert invoke(relay.pin_dir, "transceivers", "drain", "beef").exit_code == 0
    drained = relay.maps.transceiver(0xBEEF)
    assert drained is not None and drained.state is TransceiverState.DRAINING
    assert drained.port == 4100  # draining keeps the address

    res = invoke(relay.pin_dir, "transceivers", "add", "0000beef", "203.0.113.42:4101")
    assert "updated transceiver 0000beef" in res.stdout
    updated = relay.maps.transceiver(0xBEEF)
    assert updated is not None and updated.state is TransceiverState.ACTIVE
    assert (str(updated.addr), updated.port) == ("203.0.113.42", 4101)

    res = invoke(relay.pin_dir, "transceivers", "rm", "beef")
    assert res.exit_code == 0
    assert relay.maps.transceiver(0xBEEF) is None

    again = invoke(relay.pin_dir, "transceivers", "rm", "beef")
    assert again.exit_code == 1
    assert_one_line_error(again.stderr, "no transceiver 0000beef")


def test_transceiver_add_draining_as_a_process(relay: XdpHarness) -> None:
    res = run(relay.pin_dir, "transceivers", "add", "a00f", "203.0.113.15:4015", "--draining")
    assert res.returncode == 0, res.stderr
    entry = relay.maps.transceiver(0xA00F)
    assert entry is not None and entry.state is TransceiverState.DRAINING
    listed = json.loads(run(relay.pin_dir, "transceivers", "ls", "--json").stdout)
    assert {"id": "0000a00f", "state": "draining"}.items() <= next(
        t for t in listed if t["tid"] == 0xA00F
    ).items()


# ------------------------------------------------------------------ sessions


def test_session_add_show_ls_rm(relay: XdpHarness) -> None:
    client = "198.51.100.77:40000"
    res = invoke(
        relay.pin_dir,
        "sessions",
        "add",
        client,
        "--transceiver",
        "a001",
        "--relay",
        "198.51.100.1:3478",
    )
    assert res.exit_code == 0, res.stderr
    assert res.stdout.strip() == f"added session {client} -> 0000a001 via 198.51.100.1:3478"
    entry = relay.maps.session("198.51.100.77", 40000)
    assert entry is not None
    assert (entry.tid, str(entry.relay_addr), entry.relay_port, entry.origin) == (
        TID_T1,
        "198.51.100.1",
        3478,
        Origin.OPERATOR,
    )

    shown = json.loads(invoke(relay.pin_dir, "sessions", "show", client, "--json").stdout)
    assert shown["client"] == client
    assert shown["transceiver"] == "0000a001"
    assert shown["relay"] == "198.51.100.1:3478"
    assert shown["origin"] == "operator"
    assert shown["created_ns"] == entry.created_ns
    assert shown["packets_to_transceiver"] == 0
    assert 0 <= shown["age_seconds"] < 60

    text = invoke(relay.pin_dir, "sessions", "show", client).stdout
    assert "0000a001" in text and "operator" in text

    listed = json.loads(invoke(relay.pin_dir, "sessions", "ls", "--json").stdout)
    assert [s["client"] for s in listed] == [client]
    assert (
        json.loads(
            invoke(relay.pin_dir, "sessions", "ls", "--json", "--transceiver", "a002").stdout
        )
        == []
    )

    table = invoke(relay.pin_dir, "sessions", "ls").stdout.splitlines()
    assert table[0].split() == list(cu.SESSION_HEADERS)
    assert table[1].split()[:4] == [client, "0000a001", "198.51.100.1:3478", "operator"]

    res = invoke(relay.pin_dir, "sessions", "rm", client)
    assert res.exit_code == 0
    assert relay.maps.session("198.51.100.77", 40000) is None
    gone = invoke(relay.pin_dir, "sessions", "show", client)
    assert gone.exit_code == 1
    assert_one_line_error(gone.stderr, f"no session for {client}")


def test_ipv6_session_as_a_process(relay: XdpHarness) -> None:
    client = "[2001:db8:c::77]:40001"
    res = run(
        relay.pin_dir,
        "sessions",
        "add",
        client,
        "--transceiver",
        "0000a002",
        "--relay",
        "[2001:db8:c::1]:3478",
    )
    assert res.returncode == 0, res.stderr
    entry = relay.maps.session("2001:db8:c::77", 40001)
    assert entry is not None and entry.tid == TID_T2
    shown = json.loads(run(relay.pin_dir, "sessions", "show", client, "--json").stdout)
    assert (shown["client"], shown["relay"]) == (client, "[2001:db8:c::1]:3478")
    assert run(relay.pin_dir, "sessions", "rm", client).returncode == 0
    assert relay.maps.session("2001:db8:c::77", 40001) is None


def test_session_add_refuses_unknown_transceiver_and_mixed_families(relay: XdpHarness) -> None:
    res = invoke(
        relay.pin_dir,
        "sessions",
        "add",
        "198.51.100.7:1",
        "--transceiver",
        "dead",
        "--relay",
        "198.51.100.1:3478",
    )
    assert res.exit_code == 1
    assert_one_line_error(res.stderr, "no transceiver 0000dead")
    res = invoke(
        relay.pin_dir,
        "sessions",
        "add",
        "198.51.100.7:1",
        "--transceiver",
        "a001",
        "--relay",
        "[2001:db8:c::1]:3478",
    )
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "same address family")
    assert list(relay.maps.iter_sessions()) == []


def test_kernel_created_session_shows_in_listings_and_stats(relay: XdpHarness) -> None:
    result = relay.run(client_frame(binding_request(TID_T1), port=50123))
    assert result.counters.get("sessions_created") == 1

    listed = json.loads(run(relay.pin_dir, "sessions", "ls", "--json").stdout)
    assert len(listed) == 1
    (session,) = listed
    assert session["client"] == f"{CLIENT_V4}:50123"
    assert session["relay"] == f"{RELAY_V4}:3478"
    assert session["origin"] == "xdp"
    assert session["packets_to_transceiver"] == 1
    assert session["bytes_to_transceiver"] > 0

    txs = json.loads(run(relay.pin_dir, "transceivers", "ls", "--json").stdout)
    assert {t["id"]: t["sessions"] for t in txs}["0000a001"] == 1
    assert f"{T1_V4}:4001" in {t["address"] for t in txs}

    stats = json.loads(run(relay.pin_dir, "stats", "--json").stdout)["xdp"]
    assert stats["forwarded"]["to_transceiver_packets"] == 1
    assert stats["forwarded"]["to_transceiver_bytes"] == session["bytes_to_transceiver"]
    assert stats["sessions"]["created"] == 1
    assert sum(stats["drops"].values()) == 0

    rm = invoke(relay.pin_dir, "transceivers", "rm", "a001")
    assert "1 of its sessions remain" in rm.stdout


def test_sessions_flush_asks_first(relay: XdpHarness) -> None:
    relay.maps.put_session("198.51.100.8", 1, TID_T1, RELAY_V4, 3478)
    relay.maps.put_session("198.51.100.9", 1, TID_DRAINING, RELAY_V4, 3478)

    declined = invoke(relay.pin_dir, "sessions", "flush", input="n\n")
    assert declined.exit_code == 1
    assert declined.stderr.endswith(f"{ERROR}aborted\n")  # after the prompt
    assert len(list(relay.maps.iter_sessions())) == 2

    confirmed = invoke(relay.pin_dir, "sessions", "flush", input="y\n")
    assert confirmed.exit_code == 0
    assert confirmed.stdout.splitlines()[-1] == "flushed 2 sessions"
    assert list(relay.maps.iter_sessions()) == []

    relay.maps.put_session("198.51.100.8", 1, TID_T1, RELAY_V4, 3478)
    res = run(relay.pin_dir, "sessions", "flush", "--yes")
    assert (res.returncode, res.stdout.strip()) == (0, "flushed 1 session")
    assert list(relay.maps.iter_sessions()) == []


# ------------------------------------------------------------------ stats


def test_stats_json_groups_every_counter(relay: XdpHarness) -> None:
    res = invoke(relay.pin_dir, "stats", "--json")
    assert res.exit_code == 0
    report = json.loads(res.stdout)
    assert report == {"xdp": report["xdp"], "userspace": None, "daemon": None}
    groups = report["xdp"]
    assert list(groups) == ["forwarded", "sessions", "drops", "passes"]
    snapshot = relay.maps.counters_snapshot()
    assert sum(len(g) for g in groups.values()) == len(snapshot)
    assert all(v == 0 for g in groups.values() for v in g.values())

    text = invoke(relay.pin_dir, "stats").stdout
    assert "drops (total 0)" in text and "stun_malformed" in text
    assert text.startswith("no daemon state recorded (relayctl run): kernel counters only")


USERSPACE_COUNTERS = {
    "fwd_to_transceiver_packets": 12,
    "fwd_to_transceiver_bytes": 3400,
    "fwd_to_client_packets": 9,
    "fwd_to_client_bytes": 900,
    "sessions_created": 2,
    "drop_truncated": 3,
    "drop_unknown_client": 1,
}


@pytest.fixture
def userspace_daemon(relay: XdpHarness) -> Iterator[RunState]:
    """A run state as a --no-xdp daemon records it (this process stands in for the pid)."""
    state = RunState(
        pid=os.getpid(),
        pin_dir=str(relay.pin_dir),
        fallback_reason="XDP disabled by --no-xdp",
        userspace_counters=dict(USERSPACE_COUNTERS),
        counters_updated=time.time(),
    )
    runstate.save(state)
    yield state
    runstate.remove(relay.pin_dir)


def test_stats_shows_the_userspace_path_of_a_running_daemon(
    relay: XdpHarness, userspace_daemon: RunState
) -> None:
    report = json.loads(run(relay.pin_dir, "stats", "--json").stdout)
    assert report["userspace"]["forwarded"] == {
        "to_transceiver_packets": 12,
        "to_transceiver_bytes": 3400,
        "to_client_packets": 9,
        "to_client_bytes": 900,
    }
    assert report["userspace"]["sessions"] == {"created": 2}
    assert report["userspace"]["drops"] == {"truncated": 3, "unknown_client": 1}
    assert report["daemon"] == {
        "pid": os.getpid(),
        "state": "running",
        "xdp_attached": False,
        "interfaces": {},
        "fallback_reason": "XDP disabled by --no-xdp",
        "counters_updated": userspace_daemon.counters_updated,
    }
    text = run(relay.pin_dir, "stats").stdout
    assert text.splitlines()[0] == (
        "XDP not in use (XDP disabled by --no-xdp): the userspace path relays everything, "
        "so the kernel counters stay at zero"
    )
    assert f"[userspace] counters of daemon pid {os.getpid()}" in text
    assert "drops (total 4)" in text  # the userspace block's drops


def test_stats_of_a_stopped_daemon_leave_out_its_old_counters(relay: XdpHarness) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    runstate.save(
        RunState(
            pid=gone.pid,
            pin_dir=str(relay.pin_dir),
            userspace_counters=dict(USERSPACE_COUNTERS),
            counters_updated=time.time(),
        )
    )
    try:
        report = json.loads(invoke(relay.pin_dir, "stats", "--json").stdout)
        assert report["userspace"] is None
        assert report["daemon"]["state"] == "stale"
        assert "is not running: kernel counters only" in invoke(relay.pin_dir, "stats").stdout
    finally:
        runstate.remove(relay.pin_dir)


def test_stats_without_maps_but_with_a_running_daemon(missing_pin_dir: Path) -> None:
    """XDP could not load (no maps pinned): the userspace counters are all there is."""
    runstate.save(
        RunState(
            pid=os.getpid(),
            pin_dir=str(missing_pin_dir),
            fallback_reason="cannot load the XDP program: bcc is not importable",
            userspace_counters={"fwd_to_client_packets": 4},
            counters_updated=time.time(),
        )
    )
    try:
        res = invoke(missing_pin_dir, "stats", "--json")
        assert res.exit_code == 0, res.stderr
        report = json.loads(res.stdout)
        assert report["xdp"] is None
        assert report["userspace"]["forwarded"] == {"to_client_packets": 4}
        text = invoke(missing_pin_dir, "stats").stdout
        assert "[xdp] no maps pinned" in text
    finally:
        runstate.remove(missing_pin_dir)


def test_stats_watch_shows_both_paths(relay: XdpHarness, userspace_daemon: RunState) -> None:
    res = invoke(relay.pin_dir, "stats", "--watch", "--count", "2", "--interval", "0.1")
    assert res.exit_code == 0, res.stderr
    first, second = res.stdout.split(cu.HOME)[1:]
    for frame in (first, second):
        assert "XDP not in use" in frame
        assert cu.XDP_TITLE in frame and "[userspace] counters of daemon pid" in frame
    # one copy of the daemon's counters so far: a rate needs two
    assert "to_client_packets" in second and "/s" in second


def test_stats_watch_redraws_in_place(relay: XdpHarness) -> None:
    res = invoke(relay.pin_dir, "stats", "--watch", "--count", "2", "--interval", "0.1")
    assert res.exit_code == 0, res.stderr
    out = res.stdout
    assert out.count(cu.HOME) == 2  # two frames, each drawn from the top
    assert out.count(cu.CLEAR_SCREEN) == 1
    assert out.endswith(cu.SHOW_CURSOR)
    first, second = out.split(cu.HOME)[1:]
    assert "refresh 1/2" in first and "refresh 2/2" in second
    assert "0.0/s" not in first  # no rate before a second sample
    assert "0.0/s" in second


def test_stats_watch_as_a_process(relay: XdpHarness) -> None:
    res = run(relay.pin_dir, "stats", "--watch", "--count", "2", "--interval", "0.1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count(cu.HOME) == 2
    assert res.stderr == ""


def test_stats_watch_exits_zero_on_ctrl_c(relay: XdpHarness) -> None:
    proc = subprocess.Popen(
        _argv("--pin-dir", str(relay.pin_dir), "stats", "--watch", "--interval", "0.1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=_env(),
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "no frame within 30 s"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert err == b""
    assert out.endswith(cu.SHOW_CURSOR.encode())


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--watch", "--json"), "do not mix"),
        (("--count", "2"), "--count needs --watch"),
        (("--watch", "--interval", "0"), "--interval"),
    ],
)
def test_stats_option_errors(relay: XdpHarness, args: tuple[str, ...], fragment: str) -> None:
    res = invoke(relay.pin_dir, "stats", *args)
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, fragment)


# ------------------------------------------------------------------ status


def test_status_json_on_the_pin_dir(relay: XdpHarness) -> None:
    res = run(relay.pin_dir, "status", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["pin_dir"] == str(relay.pin_dir)
    assert report["pin_dir_exists"] is True
    assert report["program_pinned"] is False  # the harness pins maps only
    assert set(report["maps"]) == {"config", "transceivers", "sessions", "counters"}
    assert all(m["pinned"] for m in report["maps"].values())
    assert report["maps"]["sessions"]["type"] == "lru_hash"
    assert report["maps"]["sessions"]["max_entries"] == relay.maps.sessions.max_entries
    assert report["sessions"] == 0
    assert report["transceivers"] == len(relay.maps.list_transceivers())
    assert report["addresses"]["public_v4"] == RELAY_V4
    assert report["daemon"] is None


def test_status_reports_a_daemon_and_its_interfaces(relay: XdpHarness) -> None:
    state = RunState(
        pid=os.getpid(),
        pin_dir=str(relay.pin_dir),
        xdp=True,
        interfaces={"lo": "generic"},
        metrics="127.0.0.1:9478",
    )
    runstate.save(state)
    try:
        report = json.loads(invoke(relay.pin_dir, "status", "--json").stdout)
        assert report["daemon"]["state"] == "running"
        assert report["daemon"]["pid"] == os.getpid()
        assert report["daemon"]["metrics"] == "127.0.0.1:9478"
        assert report["interfaces"]["lo"]["mode"] is None  # nothing attached to lo really
        text = invoke(relay.pin_dir, "status").stdout
        assert "running (pid" in text and "attached: lo generic" in text

        gone = subprocess.Popen(["true"])
        gone.wait()  # reaped: its pid names no process now
        runstate.save(RunState(pid=gone.pid, pin_dir=str(relay.pin_dir), fallback_reason="x"))
        stale = json.loads(invoke(relay.pin_dir, "status", "--json").stdout)
        assert stale["daemon"]["state"] == "stale"
        assert stale["daemon"]["fallback_reason"] == "x"
    finally:
        runstate.remove(relay.pin_dir)


def test_status_without_maps_is_a_report_not_an_error(missing_pin_dir: Path) -> None:
    res = invoke(missing_pin_dir, "status", "--json")
    assert res.exit_code == 0
    report = json.loads(res.stdout)
    assert report["pin_dir_exists"] is False
    assert not any(m["pinned"] for m in report["maps"].values())
    assert report["sessions"] is None


# ------------------------------------------------------------------ errors


ERROR_CASES = [
    pytest.param(
        ("sessions", "ls"),
        1,
        "is the relay running? (relayctl run or relayctl attach)",
        id="no-maps",
    ),
    pytest.param(("stats", "--json"), 1, "no relay maps at", id="no-maps-stats"),
    pytest.param(("sessions", "show", "198.51.100.1"), 2, "missing :port", id="bad-endpoint"),
    pytest.param(("sessions", "show", "2001:db8::1:5"), 2, "needs brackets", id="bad-endpoint-v6"),
    pytest.param(
        ("transceivers", "add", "xyz", "203.0.113.11:4001"), 2, "bad transceiver id", id="bad-id"
    ),
    pytest.param(("transceivers", "drain", "0"), 2, "reserved", id="zero-id"),
    pytest.param(("transceivers", "rm", "1ffffffff"), 2, "1 to 8 hex digits", id="long-id"),
    pytest.param(
        ("sessions", "show", "198.51.100.99:9"),
        1,
        "no session for 198.51.100.99:9",
        id="no-session",
    ),
    pytest.param(("sessions", "rm", "[2001:db8:c::99]:9"), 1, "no session for", id="rm-no-session"),
    pytest.param(("transceivers", "drain", "dead0001"), 1, "no transceiver dead0001", id="no-tx"),
    pytest.param(("attach", "srnope0"), 1, "interface 'srnope0' does not exist", id="attach"),
    pytest.param(("attach", "lo", "--mode", "turbo"), 2, "--mode", id="bad-mode"),
    pytest.param(("frobnicate",), 2, "No such command", id="unknown-command"),
]


@pytest.mark.parametrize(("args", "code", "fragment"), ERROR_CASES)
def test_errors_are_one_line_as_a_process(
    relay: XdpHarness, missing_pin_dir: Path, args: tuple[str, ...], code: int, fragment: str
) -> None:
    pin = missing_pin_dir if "no relay maps" in fragment or "running" in fragment else relay.pin_dir
    res = run(pin, *args)
    assert res.returncode == code, res.stderr
    assert res.stdout == ""
    assert_one_line_error(res.stderr, fragment)


@pytest.mark.parametrize(("args", "code", "fragment"), ERROR_CASES)
def test_errors_are_one_line_in_process(
    relay: XdpHarness, missing_pin_dir: Path, args: tuple[str, ...], code: int, fragment: str
) -> None:
    pin = missing_pin_dir if "no relay maps" in fragment or "running" in fragment else relay.pin_dir
    res = invoke(pin, *args)
    assert res.exit_code == code, res.stderr
    assert res.stdout == ""
    assert_one_line_error(res.stderr, fragment)


def _drop_root() -> None:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)


@pytest.mark.usefixtures("checkout_reachable_by_others")
@pytest.mark.parametrize("args", [("sessions", "ls"), ("status", "--json")])
def test_without_root_says_so(relay: XdpHarness, args: tuple[str, ...]) -> None:
    res = subprocess.run(
        _argv("--pin-dir", str(relay.pin_dir), *args),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_env(),
        timeout=60,
        preexec_fn=_drop_root,
    )
    assert res.returncode == 1
    assert res.stdout == ""
    assert_one_line_error(res.stderr, "permission denied: run as root")


def test_debug_shows_the_traceback(missing_pin_dir: Path) -> None:
    res = run(None, "--debug", "--pin-dir", str(missing_pin_dir), "sessions", "ls")
    assert res.returncode == 1
    assert "Traceback" in res.stderr
    assert res.stderr.splitlines()[-1].startswith(f"{ERROR}no relay maps at {missing_pin_dir}")


def test_unexpected_errors_point_to_debug(
    relay: XdpHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(_pin_dir: Path) -> None:
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr(cli, "RelayMaps", broken)
    res = invoke(relay.pin_dir, "sessions", "ls")
    assert res.exit_code == 1
    assert_one_line_error(
        res.stderr,
        "unexpected RuntimeError: something nobody expected",
        "(rerun with --debug for the traceback)",
    )
    debug = _runner().invoke(
        cli.relayctl, ["--debug", "--pin-dir", str(relay.pin_dir), "sessions", "ls"]
    )
    assert "Traceback" in debug.stderr
    assert "rerun with --debug" not in debug.stderr


# ------------------------------------------------------------------ entry points


def test_module_entry_point(relay: XdpHarness) -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "ctl.cli",
            "--pin-dir",
            str(relay.pin_dir),
            "transceivers",
            "ls",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_env(),
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert {t["tid"] for t in json.loads(res.stdout)} == {
        e.tid for e in relay.maps.list_transceivers()
    }


def test_pin_dir_from_the_environment(relay: XdpHarness) -> None:
    res = _runner().invoke(
        cli.relayctl, ["sessions", "ls", "--json"], env={"SPLITRELAY_PIN_DIR": str(relay.pin_dir)}
    )
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout) == []


def test_help_is_not_an_error() -> None:
    res = run(None, "--help")
    assert res.returncode == 0
    for command in (
        "sessions",
        "transceivers",
        "stats",
        "status",
        "attach",
        "detach",
        "testbed",
        "run",
    ):
        assert command in res.stdout


# ------------------------------------------------------------------ bench


def _long_options(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", help_text)) - {"--help"}


def test_bench_has_the_options_of_make_bench() -> None:
    ours = run(None, "bench", "--help")
    assert ours.returncode == 0, ours.stderr
    theirs = subprocess.run(
        [sys.executable, "-m", "ctl.bench", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert theirs.returncode == 0, theirs.stderr
    assert _long_options(ours.stdout) == _long_options(theirs.stdout)
    assert "bench" in run(None, "--help").stdout


def test_bench_runs_the_benchmark_with_its_options(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Everything but the measurement (bench.run) is real: options, report, file, stdout."""
    from ctl import bench

    seen: list[bench.Options] = []
    result = bench.PathResult("relay-native", "native", 230)
    meta = {"kernel": "test"}

    def fake_run(opts: bench.Options) -> tuple[list[bench.PathResult], dict[str, Any]]:
        seen.append(opts)
        return [result], meta

    monkeypatch.setattr(bench, "run", fake_run)
    monkeypatch.setattr(bench, "_terminate_on_sigterm", lambda: None)  # not in pytest
    out = tmp_path / "bench.json"
    argv = [
        "--duration", "0.5", "--warmup", "0", "--size", "200", "--repeat", "2",
        "--paths", "relay-native, ceiling", "--json", "--output", str(out),
    ]  # fmt: skip
    res = _runner().invoke(cli.relayctl, ["bench", *argv])
    assert res.exit_code == 0, res.stderr
    assert seen == [bench.parse_args(argv)]  # the same Options as python -m ctl.bench
    expected = bench.report_json([result], meta)
    assert json.loads(res.stdout) == expected
    assert json.loads(out.read_text()) == expected


def test_bench_exits_1_when_a_check_failed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The report still prints; the exit code says the measurement is not to be trusted."""
    from ctl import bench

    failed = bench.PathResult("relay-native", "native", 230, problems=["sink saw nothing"])
    monkeypatch.setattr(bench, "run", lambda opts: ([failed], {"kernel": "test"}))
    monkeypatch.setattr(bench, "_terminate_on_sigterm", lambda: None)
    argv = ["bench", "--paths", "relay-native", "--json", "--output", str(tmp_path / "b.json")]
    res = _runner().invoke(cli.relayctl, argv)
    assert res.exit_code == 1, res.stderr
    assert json.loads(res.stdout) == bench.report_json([failed], {"kernel": "test"})


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--paths", "relay-dpdk"), "unknown path(s) relay-dpdk"),
        (("--size", "11"), "'--size'"),
        (("--repeat", "0"), "'--repeat'"),
        (("--duration", "0"), "'--duration'"),
    ],
)
def test_bench_option_errors_are_one_line(args: tuple[str, ...], fragment: str) -> None:
    res = _runner().invoke(cli.relayctl, ["bench", *args])
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, fragment)
