"""`transceiver run --redis-url`: every worker keeps its record in the shared registry.

A real redis-server (tests/redis_server.py) and `transceiver run --workers 2`
as a subprocess, everything on loopback (127.0.0.1, or ::1 with Redis over
TCP). No call is placed, so --relay/--public are loopback endpoints nobody
uses. Checked: both workers register with the tunnel address relays send to
(--tunnel and each worker's own port) and a TTL; heartbeats refresh the TTL;
SIGTERM turns the records to draining, then removes them; a front killed with
SIGKILL leaves records that expire by their TTL; and Redis being down at
start, or going away, never stops the transceiver, which registers once Redis
is back.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from tests.ports import free_tcp_port, free_udp_ports
from tests.redis_server import RedisServer
from transceiver.cli import ERROR_PREFIX, transceiver

TRANSCEIVER = str(Path(sys.executable).with_name("transceiver"))
RELAYCTL = str(Path(sys.executable).with_name("relayctl"))
PREFIX = "srtest:"
BASE_TID = 0xB001
TIDS = ("0000b001", "0000b002")
TTL = 2  # seconds; the heartbeat runs every TTL/3


def wait_until(check: Callable[[], Any], timeout: float, what: str, log: Path | None = None) -> Any:
    """Poll until `check()` is truthy; return it, or fail naming `what` (and the front's log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    tail = "\n" + log.read_text()[-3000:] if log is not None and log.exists() else ""
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}{tail}")


def endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (the worker processes of a front)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def cmdline(pid: int) -> str:
    """A process's command line (a worker's carries its spec, transceiver id included)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def socket_dir(pid: int) -> Path | None:
    """The front's private directory of worker sockets, from a worker's spec (--worker JSON)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        spec = json.loads(args[args.index(b"--worker") + 1])
    except (OSError, ValueError, IndexError):
        return None
    path = Path(spec["socket_path"]).parent
    return path if path.name.startswith("splitrelay-transceiver-") else None


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# --------------------------------------------------------------------- fixtures


@dataclass
class Setup:
    """Where everything listens: Redis, the tunnel (host and base port), signaling."""

    server: RedisServer
    host: str
    tunnel_port: int
    listen_port: int

    @property
    def url(self) -> str:
        return self.server.url

    def client(self) -> redis.Redis:
        # Always the unix socket: the test's own view does not depend on the URL under test.
        return redis.Redis(unix_socket_path=str(self.server.socket_path), decode_responses=True)


@pytest.fixture(params=["unix+127.0.0.1", "tcp+::1"])
def setup(request: pytest.FixtureRequest) -> Iterator[Setup]:
    if request.param.startswith("unix"):
        host, server = "127.0.0.1", RedisServer()
    else:
        host = "::1"
        server = RedisServer(host=host, port=free_tcp_port(host))
    yield Setup(server, host, free_udp_ports(host, 2), free_tcp_port(host))
    server.close()


class Front:
    """`transceiver run` as a subprocess; always stopped, with its workers, at the end."""

    def __init__(self, setup: Setup, log: Path, *extra: str) -> None:
        host = setup.host
        argv = [
            TRANSCEIVER,
            "run",
            "--workers",
            "2",
            "--transceiver-id",
            f"{BASE_TID:x}",
            "--listen",
            endpoint(host, setup.listen_port),
            "--tunnel",
            host,
            "--tunnel-port",
            str(setup.tunnel_port),
            "--relay",
            endpoint(host, 3479),
            "--public",
            endpoint(host, 3478),
            "--drain-timeout",
            "5",
            "--redis-url",
            setup.url,
            "--redis-prefix",
            PREFIX,
            "--redis-heartbeat-ttl",
            str(TTL),
            *extra,
        ]
        self.log = log
        self.healthz = f"http://{endpoint(host, setup.listen_port)}/healthz"
        with log.open("wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        self.workers: list[int] = []
        self.socket_dirs: set[Path | None] = set()

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.healthz, timeout=1) as resp:
                ok = resp.status == 200
        except OSError:
            return False
        if ok and not self.workers:
            self.workers = children(self.proc.pid)
            self.socket_dirs = {socket_dir(p) for p in self.workers} - {None}
        return ok

    def wait_ready(self) -> None:
        wait_until(self.ready, 60, "the transceiver to serve /healthz", self.log)
        assert len(self.workers) == 2, self.workers

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in self.workers:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        # A killed front cannot remove its private socket directory: do it for it.
        for path in self.socket_dirs:
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fronts(tmp_path: Path) -> Iterator[Callable[..., Front]]:
    started: list[Front] = []

    def start(setup: Setup, *extra: str) -> Front:
        front = Front(setup, tmp_path / f"front-{len(started)}.log", *extra)
        started.append(front)
        return front

    yield start
    for front in started:
        front.close()


class Monitor:
    """Every command Redis executes (MONITOR), to see the order of writes no poll can catch."""

    LINE = re.compile(r"^\+\d+\.\d+ \[\d+ \S+\] (.*)$")  # client may be [::1]:port
    ARG = re.compile(r'"((?:[^"\\]|\\.)*)"')

    def __init__(self, socket_path: Path) -> None:
        self.commands: list[list[str]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(str(socket_path))
        self._sock.sendall(b"MONITOR\r\n")
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        buffer = b""
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            buffer += data
            *lines, buffer = buffer.split(b"\r\n")
            for line in lines:
                match = self.LINE.match(line.decode("utf-8", "replace"))
                if match:
                    self.commands.append(self.ARG.findall(match.group(1)))

    def on(self, key: str) -> list[list[str]]:
        """Commands that touched `key`, upper-cased command names."""
        return [[c[0].upper(), *c[1:]] for c in list(self.commands) if key in c[1:2]]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


def records(r: redis.Redis) -> dict[str, dict[str, str]]:
    return {tid: r.hgetall(f"{PREFIX}transceiver:{tid}") for tid in TIDS}


def all_registered(r: redis.Redis) -> bool:
    return all(records(r).values()) and r.smembers(f"{PREFIX}transceivers") == set(TIDS)


# --------------------------------------------------------------------- tests


def test_workers_register_heartbeat_and_leave_on_sigterm(
    setup: Setup, fronts: Callable[..., Front]
) -> None:
    setup.server.start()
    monitor = Monitor(setup.server.socket_path)
    r = setup.client()
    try:
        front = fronts(setup)
        front.wait_ready()
        wait_until(lambda: all_registered(r), 10, "both workers to register", front.log)

        # Each record names the address relays send to: --tunnel and the worker's own port.
        for i, (tid, rec) in enumerate(records(r).items()):
            assert rec["id"] == tid
            assert rec["addr"] == setup.host
            assert rec["port"] == str(setup.tunnel_port + i)
            assert rec["status"] == "active"
            assert rec["source"] == "heartbeat"
            assert 0 < r.ttl(f"{PREFIX}transceiver:{tid}") <= TTL

        # Heartbeats: well past the TTL the records are still there, refreshed.
        first = {tid: float(rec["updated"]) for tid, rec in records(r).items()}
        time.sleep(2 * TTL)
        for tid, rec in records(r).items():
            assert rec, f"{tid} expired: the heartbeat did not refresh it"
            assert float(rec["updated"]) > first[tid]
            assert 0 < r.pttl(f"{PREFIX}transceiver:{tid}") <= TTL * 1000
            expires = [c for c in monitor.on(f"{PREFIX}transceiver:{tid}") if c[0] == "EXPIRE"]
            assert len(expires) >= 4 and all(c[2] == str(TTL) for c in expires), expires

        # SIGTERM: draining first, then gone; the front exits 0.
        front.proc.send_signal(signal.SIGTERM)
        assert front.proc.wait(30) == 0, front.log.read_text()[-3000:]
        assert records(r) == {tid: {} for tid in TIDS}
        assert r.smembers(f"{PREFIX}transceivers") == set()
        for tid in TIDS:
            history = monitor.on(f"{PREFIX}transceiver:{tid}")
            writes = [c for c in history if c[0] in ("HSET", "DEL")]
            assert writes[-1][0] == "DEL", writes[-3:]
            statuses = [c[c.index("status") + 1] for c in writes if "status" in c]
            assert statuses[-1] == "draining", statuses[-3:]
            assert "active" in statuses
            # Once draining, never active again before the record is deleted.
            assert "active" not in statuses[statuses.index("draining") :]
    finally:
        monitor.close()
        r.close()


def test_records_of_a_killed_front_expire(setup: Setup, fronts: Callable[..., Front]) -> None:
    setup.server.start()
    r = setup.client()
    try:
        front = fronts(setup)
        front.wait_ready()
        wait_until(lambda: all_registered(r), 10, "both workers to register", front.log)
        front.proc.kill()
        front.proc.wait(10)
        killed = time.monotonic()
        # Nobody removed them: they outlive the front until their TTL runs out.
        for tid in TIDS:
            assert r.pttl(f"{PREFIX}transceiver:{tid}") > 0
        gone = {tid: {} for tid in TIDS}
        wait_until(lambda: records(r) == gone, TTL + 2, "the records to expire")
        assert time.monotonic() - killed <= TTL + 1.0
        # The orphaned workers noticed the front is gone and exited on their own.
        wait_until(lambda: not any(alive(p) for p in front.workers), 20, "the workers to exit")
    finally:
        r.close()


def test_a_crashed_worker_leaves_and_registers_again(
    setup: Setup, fronts: Callable[..., Front]
) -> None:
    setup.server.start()
    monitor = Monitor(setup.server.socket_path)
    r = setup.client()
    key = f"{PREFIX}transceiver:{TIDS[0]}"
    try:
        front = fronts(setup)
        front.wait_ready()
        wait_until(lambda: all_registered(r), 10, "both workers to register", front.log)
        (crashed,) = [p for p in front.workers if f'"transceiver_id": {BASE_TID}' in cmdline(p)]
        os.kill(crashed, signal.SIGKILL)
        # The front removes the record at once (not left to the TTL) ...
        wait_until(lambda: ["DEL", key] in monitor.on(key), 5, "the record's removal", front.log)
        assert records(r)[TIDS[1]], "the other worker's record must stay"
        # ... and registers the restarted worker again, with the same tunnel port.
        rec = wait_until(lambda: records(r)[TIDS[0]], 20, "the restarted worker", front.log)
        assert (rec["addr"], rec["port"], rec["status"]) == (
            setup.host,
            str(setup.tunnel_port),
            "active",
        )
        front.workers = children(front.proc.pid)
        assert crashed not in front.workers and len(front.workers) == 2
    finally:
        monitor.close()
        r.close()


def test_redis_down_never_stops_the_transceiver(setup: Setup, fronts: Callable[..., Front]) -> None:
    front = fronts(setup)  # Redis is not running yet
    front.wait_ready()
    assert "cannot register transceiver" in front.log.read_text()

    setup.server.start()  # it comes up: the next heartbeat registers both workers
    r = setup.client()
    try:
        wait_until(lambda: all_registered(r), 10, "both workers to register", front.log)

        setup.server.stop()  # and goes away again, then comes back empty
        time.sleep(TTL)
        assert front.proc.poll() is None and front.ready()
        setup.server.start()
        r.close()
        r = setup.client()
        wait_until(lambda: all_registered(r), 10, "both workers to register again", front.log)
        assert front.proc.poll() is None

        front.proc.send_signal(signal.SIGTERM)
        assert front.proc.wait(30) == 0
        assert records(r) == {tid: {} for tid in TIDS}
    finally:
        r.close()


def relayctl(setup: Setup, *args: str) -> subprocess.CompletedProcess[str]:
    """`relayctl transceivers --redis-url URL --redis-prefix P ...`: the operator's path."""
    argv = [RELAYCTL, "transceivers", "--redis-url", setup.url, "--redis-prefix", PREFIX, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def beats_later(r: redis.Redis, tid: str, beats: int, log: Path) -> dict[str, str]:
    """The record once its worker has refreshed it `beats` more times (by `updated`)."""
    since = float(records(r)[tid]["updated"])
    interval = TTL / 3

    def refreshed() -> dict[str, str] | None:
        rec = records(r)[tid]
        return rec if rec and float(rec["updated"]) >= since + beats * interval else None

    found: dict[str, str] = wait_until(refreshed, 10 * TTL, f"{beats} beats of {tid}", log)
    return found


def test_an_operator_drain_and_rm_stick_on_live_workers(
    setup: Setup, fronts: Callable[..., Front]
) -> None:
    """The heartbeat keeps what an operator set: a drain stays, an rm stays removed.

    Before, every beat rewrote the whole record, so a drain went back to
    active and a removed worker reappeared within a beat.
    """
    setup.server.start()
    r = setup.client()
    try:
        front = fronts(setup)
        front.wait_ready()
        wait_until(lambda: all_registered(r), 10, "both workers to register", front.log)
        drained, removed = TIDS

        res = relayctl(setup, "drain", drained)
        assert res.returncode == 0, res.stderr
        res = relayctl(setup, "rm", removed)
        assert res.returncode == 0, res.stderr
        for tid in TIDS:
            rec = beats_later(r, tid, 3, front.log)
            assert rec["status"] == ("draining" if tid == drained else "removed"), rec
            assert 0 < r.ttl(f"{PREFIX}transceiver:{tid}") <= TTL, "the beat keeps it alive"
        listed = json.loads(relayctl(setup, "ls", "--json").stdout)
        assert [(t["id"], t["state"]) for t in listed] == [(drained, "draining")]
        # neither can be drained again nor removed twice: it is gone for operators
        assert relayctl(setup, "drain", removed).returncode != 0
        assert relayctl(setup, "rm", removed).returncode != 0

        # SIGTERM: the draining worker's record is deleted; the tombstone is
        # not (a restarted worker must stay removed) and lapses by its TTL
        front.proc.send_signal(signal.SIGTERM)
        assert front.proc.wait(30) == 0, front.log.read_text()[-3000:]
        assert records(r)[drained] == {}
        wait_until(lambda: not records(r)[removed], 5 * TTL, "the tombstone to lapse")
    finally:
        r.close()


# --------------------------------------------------------------------- options


def run_cli(*args: str) -> Any:
    base = [
        "run",
        "--transceiver-id",
        "b001",
        "--tunnel",
        "127.0.0.1",
        "--relay",
        "127.0.0.1:3479",
        "--public",
        "127.0.0.1:3478",
    ]
    return CliRunner(mix_stderr=False).invoke(transceiver, [*base, *args])


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--redis-url", "http://127.0.0.1:6379"], "redis://, rediss:// or unix://"),
        (["--redis-url", "redis://:hunter2@127.0.0.1:x/0"], "is not a URL"),
        (["--redis-url", "unix://"], "socket path"),
        (["--redis-url", "redis:///0"], "no host"),
    ],
)
def test_bad_redis_options_are_one_line_usage_errors(args: list[str], fragment: str) -> None:
    res = run_cli(*args)
    assert res.exit_code == 2, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith(ERROR_PREFIX)
    assert fragment in res.stderr
    assert "hunter2" not in res.stderr  # a password never reaches the log


def test_an_unspecified_tunnel_address_cannot_be_registered() -> None:
    res = CliRunner(mix_stderr=False).invoke(
        transceiver,
        [
            "run",
            "--transceiver-id",
            "b001",
            "--tunnel",
            "0.0.0.0",
            "--relay",
            "127.0.0.1:3479",
            "--public",
            "127.0.0.1:3478",
            "--redis-url",
            "unix:///nonexistent/redis.sock",
        ],
    )
    assert res.exit_code == 2 and "relays need the address" in res.stderr
