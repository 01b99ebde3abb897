"""A real redis-server for tests: private, on a unix socket or a chosen address.

No fakes: the sync logic is tested against the server the product talks to.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


class RedisServer:
    """One redis-server process with no persistence, started and stopped by tests."""

    def __init__(self, host: str | None = None, port: int = 0, netns: str | None = None) -> None:
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not installed (Debian package redis-server)")
        self.dir = Path(tempfile.mkdtemp(prefix="splitrelay-redis-"))
        self.host, self.port, self.netns = host, port, netns
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.dir / "redis.sock"

    @property
    def url(self) -> str:
        if self.host is None:
            return f"unix://{self.socket_path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{host}:{self.port}/0"

    def start(self) -> RedisServer:
        argv = [
            "redis-server",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.dir),
            "--unixsocket",
            str(self.socket_path),
            "--unixsocketperm",
            "700",
        ]
        if self.host is None:
            argv += ["--port", "0"]
        else:
            argv += ["--port", str(self.port), "--bind", self.host, "--protected-mode", "no"]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._ping():
                return self
            if self.proc.poll() is not None:
                pytest.fail(f"redis-server exited with {self.proc.returncode}")
            time.sleep(0.02)
        pytest.fail("redis-server did not answer within 10 s")

    def _ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(0.2)
                s.connect(str(self.socket_path))
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self.socket_path.unlink(missing_ok=True)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
