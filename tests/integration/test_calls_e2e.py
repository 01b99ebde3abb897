"""Voice calls end to end on the testbed: client -> relay -> transceiver and back.

`transceiver run` serves on both transceiver hosts, `relayctl run` relays
with native XDP or with the userspace path alone, and `transceiver call` in
the client namespace places real aiortc calls: they connect through the
relay's public address only, the echo comes back within a bounded round
trip, a data-channel event makes the round trip, each call is routed by its
token to the transceiver that answered, and after the client's DELETE the
relay's session expires.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctl.testbed import Testbed

from .relay_process import PUBLIC_PORT, PUBLIC_V4, TUNNEL_PORT, TUNNEL_V4, RelayProcess

TRANSCEIVER = str(Path(sys.executable).with_name("transceiver"))
HOSTS = {"tx1": (0xA001, "203.0.113.11"), "tx2": (0xA002, "203.0.113.12")}
TUNNEL_BASE = 3480
RTT_BOUND = 0.5  # seconds: generous for a 2-core machine running the whole stack


@pytest.fixture(scope="module", params=["native", "userspace"])
def stack(request: pytest.FixtureRequest, testbed: Testbed) -> Iterator[RelayProcess]:
    pin_dir = Path(tempfile.mkdtemp(prefix="splitrelay-calls-", dir="/sys/fs/bpf"))
    pin_dir.rmdir()
    relay = RelayProcess(testbed, request.param, pin_dir)
    statics = []
    for tid, addr in HOSTS.values():
        statics += ["--transceiver", f"{tid:x}={addr}:{TUNNEL_BASE}"]
    relay.start([*statics, "--idle-timeout", "2"])
    procs = []
    for host, (tid, addr) in HOSTS.items():
        argv = [
            TRANSCEIVER, "run", "--listen", f"{addr}:8080", "--workers", "1",
            "--transceiver-id", f"{tid:x}", "--tunnel", addr, "--tunnel-port", str(TUNNEL_BASE),
            "--relay", f"{TUNNEL_V4}:{TUNNEL_PORT}", "--public", f"{PUBLIC_V4}:{PUBLIC_PORT}",
        ]  # fmt: skip
        procs.append(testbed.spawn(host, argv, name=f"transceiver-{host}"))
    try:
        for host, (_, addr) in HOSTS.items():
            _wait_healthy(testbed, addr, host)
        yield relay
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(20)
        relay.cleanup()


def _wait_healthy(testbed: Testbed, addr: str, host: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        res = subprocess.run(
            ["ip", "netns", "exec", testbed.netns("c1"), "curl", "-sf", "-m", "1",
             f"http://{addr}:8080/healthz"],
            capture_output=True, text=True,
        )  # fmt: skip
        if res.returncode == 0:
            return
        time.sleep(0.2)
    log = testbed.log_dir / f"transceiver-{host}.log"
    pytest.fail(f"transceiver on {host} not healthy:\n{log.read_text()[-3000:]}")


def _call(testbed: Testbed, addr: str, calls: int = 1, duration: float = 3) -> dict:
    res = subprocess.run(
        ["ip", "netns", "exec", testbed.netns("c1"), TRANSCEIVER, "call",
         f"http://{addr}:8080/v1/calls", "--calls", str(calls), "--duration", str(duration),
         "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


def _sessions(relay: RelayProcess) -> list[dict]:
    return relay.cli_json("sessions", "ls")  # type: ignore[return-value]


def test_calls_connect_echo_and_route_by_token(stack: RelayProcess, testbed: Testbed) -> None:
    for host, (tid, addr) in HOSTS.items():
        before = {s["client"] for s in _sessions(stack)}
        summary = _call(testbed, addr)
        assert (summary["ok"], summary["failed"]) == (1, 0), host
        assert summary["audio_rtt_seconds"]["count"] > 0, "no echo heard"
        assert summary["audio_rtt_seconds"]["p95"] < RTT_BOUND
        assert summary["event_rtt_seconds"]["count"] > 0, "no data-channel event came back"
        new = [s for s in _sessions(stack) if s["client"] not in before]
        assert new, "the relay carried no session for this call"
        assert {s["tid"] for s in new} == {tid}, f"{host}: routed elsewhere"
        assert all(s["relay"] == f"{PUBLIC_V4}:{PUBLIC_PORT}" for s in new)


def test_ended_call_session_expires(stack: RelayProcess, testbed: Testbed) -> None:
    summary = _call(testbed, HOSTS["tx1"][1], duration=1)
    assert summary["ok"] == 1
    deadline = time.monotonic() + 8  # idle timeout 2 s after the DELETE'd call goes quiet
    while time.monotonic() < deadline:
        if not _sessions(stack):
            return
        time.sleep(0.25)
    pytest.fail(f"sessions left after the call ended: {_sessions(stack)}")


def test_several_calls_on_both_transceivers(stack: RelayProcess, testbed: Testbed) -> None:
    summary = _call(testbed, HOSTS["tx2"][1], calls=4, duration=3)
    assert (summary["ok"], summary["failed"]) == (4, 0)
    assert summary["audio_rtt_seconds"]["p95"] < RTT_BOUND
