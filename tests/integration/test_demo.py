"""`relayctl demo` as a user runs it: a subprocess, real namespaces, XDP, Redis, calls.

The demo is what a newcomer sees first, so the test checks what they would: every
call connected and heard its echo, the relay carried the media in XDP (this
machine can load it, so the fallback would be a regression), the chart is a PNG,
and afterwards nothing is left: no namespace, pin, state file or process. An
interrupted demo must clean up just as well, and the next one must work.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ctl import runstate
from ctl.demo import (
    TAG_ENV,
    CallBatch,
    DemoPlan,
    pin_dir_for,
    read_batch,
    render_summary,
    split_calls,
)
from ctl.netns import list_netns
from ctl.testbed import STATE_DIR, Testbed

RELAYCTL = str(Path(sys.executable).with_name("relayctl"))
PREFIX = "srdt"  # the demo's own prefix in tests: never a user's "srdemo"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _demo(out: Path, *extra: str) -> list[str]:
    return [RELAYCTL, "demo", "--prefix", PREFIX, "--out", str(out), *extra]


def _tagged_processes() -> list[int]:
    """PIDs whose environment carries the demo's tag for PREFIX."""
    tag = f"{TAG_ENV}={PREFIX}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue  # gone, or a kernel thread
        if tag in env:
            found.append(int(entry.name))
    return found


def _assert_nothing_left() -> None:
    assert list_netns(f"{PREFIX}-") == []
    assert not pin_dir_for(PREFIX).exists()
    assert not runstate.state_path(pin_dir_for(PREFIX)).exists()
    assert not (STATE_DIR / f"testbed-{PREFIX}.json").exists()
    assert _tagged_processes() == []


def test_demo_calls_through_xdp_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "results"
    res = subprocess.run(
        _demo(out, "--calls", "4", "--duration", "5", "--json"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    summary = json.loads(res.stdout)  # stdout is the JSON document and nothing else

    calls = summary["calls"]
    assert (calls["placed"], calls["connected"], calls["ok"], calls["failed"]) == (4, 4, 4, 0)
    assert summary["echo_rtt_ms"]["count"] > 0
    assert 0 < summary["echo_rtt_ms"]["p50"] < 1000
    assert summary["setup_ms"]["count"] == 4
    assert [t["calls"] for t in summary["transceivers"]] == [2, 2]

    assert summary["relay"]["xdp"] is True, summary["relay"]["fallback_reason"]
    assert "notice: XDP is not in use" not in res.stderr
    xdp = summary["paths"]["xdp"]["packets"]
    assert xdp["to_transceiver"] > 0 and xdp["to_client"] > 0
    assert summary["sessions"]["redis"] >= 4

    chart = Path(summary["chart"])
    assert chart == out / "rtt.png"
    assert chart.read_bytes()[:8] == PNG_MAGIC
    assert json.loads((out / "summary.json").read_text())["calls"] == calls
    per_call = json.loads((out / "logs" / "calls-tx1.json").read_text())["per_call"]
    assert all(len(c["samples"]) == len(c["audio_rtts"]) > 0 for c in per_call)

    _assert_nothing_left()


def test_interrupted_demo_cleans_up(tmp_path: Path) -> None:
    """Ctrl-C while the calls run: exit 130, one line, and nothing left behind."""
    proc = subprocess.Popen(
        _demo(tmp_path, "--calls", "2", "--duration", "30", "--json"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    seen = []
    deadline = time.monotonic() + 90
    for line in proc.stderr:  # progress goes to stderr with --json
        seen.append(line)
        if line.startswith("placing") or time.monotonic() > deadline:
            break
    assert any(line.startswith("placing") for line in seen), "".join(seen)
    time.sleep(2)  # calls in flight
    os.kill(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stdout == ""
    assert "relayctl: error: interrupted" in stderr
    assert "Traceback" not in stderr
    _assert_nothing_left()


def test_plan_and_rendering_without_running() -> None:
    """The parts that need no root: call spreading, commands, the summary text."""
    assert split_calls(10, 2) == [5, 5]
    assert split_calls(5, 2) == [3, 2]
    assert split_calls(1, 2) == [1, 0]
    plan = DemoPlan.from_testbed(Testbed(PREFIX, clients=2).describe(), calls=3)
    assert [(t.host, t.caller, t.calls) for t in plan.transceivers] == [
        ("tx1", "c1", 2),
        ("tx2", "c2", 1),
    ]
    argv = plan.relay_argv(static=False)
    assert argv[argv.index("--pin-dir") + 1] == f"/sys/fs/bpf/splitrelay-{PREFIX}"
    assert argv[argv.index("--metrics") + 1] == "198.51.100.1:9478"
    assert "--transceiver" not in argv
    assert "--transceiver" in plan.relay_argv(static=True)

    summary = {
        "duration_seconds": 20.0,
        "calls": {"placed": 2, "connected": 2, "ok": 1, "failed": 1, "errors": ["boom"]},
        "setup_ms": {"count": 2, "p50": 40.0, "p95": 50.0, "max": 50.0},
        "echo_rtt_ms": {"count": 3, "p50": 110.0, "p95": 120.0, "max": 130.0},
        "markers": {"sent": 4, "lost": 1},
        "relay": {"xdp": True, "interfaces": {"pub0": "native"}, "fallback_reason": None},
        "paths": {
            "xdp": {
                "packets": {"to_transceiver": 1500, "to_client": 1400},
                "bytes": {"to_transceiver": 400_000, "to_client": 300_000},
            },
            "userspace": {
                "packets": {"to_transceiver": 2, "to_client": 0},
                "bytes": {"to_transceiver": 200, "to_client": 0},
            },
        },
        "drops": {"xdp": {"bad_token": 3}},
        "sessions": {"redis": 2, "relay": None},
        "chart": "demo-results/rtt.png",
    }
    text = render_summary(summary)
    assert "2 of 2 connected, 1 heard their echo" in text
    assert "p50  110.0 ms" in text
    assert "1,500" in text and "99.9%" in text
    assert "xdp bad_token 3" in text
    assert "2 in Redis" in text and "? in the relay's map" in text
    assert "demo-results/rtt.png" in text and "boom" in text


def test_a_call_process_without_output_counts_its_calls_failed(tmp_path: Path) -> None:
    plan = DemoPlan.from_testbed(Testbed(PREFIX, clients=2).describe(), calls=4)
    err = tmp_path / "err"
    err.write_text("transceiver: error: cannot reach http://203.0.113.11:8080/v1/calls\n")
    proc = subprocess.Popen(["false"])
    proc.wait()
    out = read_batch(CallBatch(plan.transceivers[0], proc, tmp_path / "missing.json", err))
    assert [c["ok"] for c in out["per_call"]] == [False, False]
    assert "cannot reach" in out["per_call"][0]["error"]


def test_keep_leaves_it_up_with_working_hints_then_down_removes_it(tmp_path: Path) -> None:
    """A third run after the two above: --keep, the printed hints work, --down cleans up."""
    res = subprocess.run(
        _demo(tmp_path, "--calls", "2", "--duration", "2", "--keep", "--json"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        assert res.returncode == 0, res.stderr[-4000:]
        assert json.loads(res.stdout)["calls"]["ok"] == 2
        assert f"demo --down --prefix {PREFIX}" in res.stderr
        assert list_netns(f"{PREFIX}-"), "--keep removed the testbed"
        # The printed hint for the sessions, run as printed: the calls' sessions are there.
        hint = next(line for line in res.stderr.splitlines() if "sessions ls" in line)
        ls = subprocess.run([*hint.split(), "--json"], capture_output=True, text=True, timeout=30)
        assert ls.returncode == 0, ls.stderr
        assert len(json.loads(ls.stdout)) >= 2
    finally:
        down = subprocess.run(
            [RELAYCTL, "demo", "--down", "--prefix", PREFIX],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert down.returncode == 0, down.stderr
    _assert_nothing_left()
