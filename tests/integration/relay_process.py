"""Driving a real `relayctl run` in the testbed's relay namespace, for tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ctl import runstate, wire
from ctl.loader import remove_pins
from ctl.netns import in_netns
from ctl.testbed import Testbed
from ctl.xdp import detach

RELAYCTL = str(Path(sys.executable).with_name("relayctl"))
PUBLIC_V4, PUBLIC_V6 = "198.51.100.1", "2001:db8:c::1"
TUNNEL_V4, TUNNEL_V6 = "203.0.113.1", "2001:db8:1::1"
PUBLIC_PORT, TUNNEL_PORT = 3478, 3479
TX1, TX2 = ("203.0.113.11", 4001), ("203.0.113.12", 4001)
TID_TX1, TID_TX2, TID_TX3 = 0x11, 0x12, 0x13

# path name -> relayctl run flags
PATHS = {
    "native": ["--mode", "native"],
    "generic": ["--mode", "generic"],
    "userspace": ["--no-xdp"],
}


class RelayProcess:
    """One relay daemon, its pin dir, and ways to look at it."""

    def __init__(self, testbed: Testbed, path: str, pin_dir: Path, host: str = "relay1") -> None:
        self.testbed = testbed
        self.path = path
        self.pin_dir = pin_dir
        self.host = host
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self, extra: Sequence[str] = ()) -> list[str]:
        return [
            RELAYCTL, "--pin-dir", str(self.pin_dir), "run",
            "-i", "pub0", "-i", "dc0",
            "--public", PUBLIC_V4, "--public", PUBLIC_V6,
            "--tunnel", TUNNEL_V4, "--tunnel", TUNNEL_V6,
            "--transceiver", f"{TID_TX1:x}={TX1[0]}:{TX1[1]}",
            "--transceiver", f"{TID_TX2:x}={TX2[0]}:{TX2[1]}",
            "--metrics", f"{PUBLIC_V4}:9478",
            *PATHS[self.path], *extra,
        ]  # fmt: skip

    def start(
        self, extra: Sequence[str] = (), timeout: float = 20.0, env: dict[str, str] | None = None
    ) -> RelayProcess:
        """Start `relayctl run` and wait until its run state names it (it is then serving)."""
        runstate.remove(self.pin_dir)
        self.proc = self.testbed.spawn(
            self.host, self.argv(extra), name=f"relay-{self.path}", env=env
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = runstate.load(self.pin_dir)
            if state is not None and state.pid == self.proc.pid:
                return self
            if self.proc.poll() is not None:
                pytest.fail(f"relayctl run exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        pytest.fail(f"relayctl run not ready within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        path = self.testbed.log_dir / f"relay-{self.path}.log"
        return path.read_text()[-4000:] if path.exists() else "(no log)"

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        with in_netns(self.testbed.netns(self.host)):
            for ifname in ("pub0", "dc0"):
                detach(ifname)
        remove_pins(self.pin_dir)
        runstate.remove(self.pin_dir)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [RELAYCTL, "--pin-dir", str(self.pin_dir), *args],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip

    def cli_json(self, *args: str) -> object:
        res = self.cli(*args, "--json")
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of the relay's /metrics, keyed by (name, sorted labels)."""
        with in_netns(self.testbed.netns("c1")):
            body = urllib.request.urlopen(f"http://{PUBLIC_V4}:9478/metrics", timeout=5).read()
        out = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out


def establish(
    client: socket.socket,
    tx: socket.socket,
    tid: int = TID_TX1,
    relay: tuple[str, int] = (PUBLIC_V4, PUBLIC_PORT),
) -> wire.TunnelHeader:
    """The client's STUN request opens the session; returns the tunnel header T saw."""
    request = stun(tid)
    client.sendto(request, relay)
    data, src = tx.recvfrom(4096)
    assert src[1] == TUNNEL_PORT
    header, payload = wire.decap(data)
    assert payload == request
    return header


def scrape_until(
    relay: RelayProcess, done: Callable[[dict], bool], timeout: float = 3.0
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Scrape until `done(samples)` or the deadline; the last samples either way.

    The userspace path counts a packet right after its send returns, so a
    scrape triggered by the packet's arrival may beat the increment by a
    moment: tests wait for the count, then assert it exactly.
    """
    deadline = time.monotonic() + timeout
    while True:
        samples = relay.scrape()
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def metric_sum(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(
        v for (n, lbls), v in samples.items()
        if n == name and all(dict(lbls).get(k) == val for k, val in labels.items())
    )  # fmt: skip


def udp(testbed: Testbed, host: str, bind: tuple[str, int], timeout: float = 2.0) -> socket.socket:
    """A UDP socket in a testbed host's namespace."""
    family = socket.AF_INET6 if ":" in bind[0] else socket.AF_INET
    with in_netns(testbed.netns(host)):
        sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(bind)
    sock.settimeout(timeout)
    return sock


def stun(tid: int, client_ufrag: str = "abcd") -> bytes:
    return wire.build_binding_request(f"{wire.make_server_ufrag(tid)}:{client_ufrag}".encode())


def quiet(sock: socket.socket, wait: float = 0.3) -> bool:
    """True if nothing arrives on sock within `wait` seconds."""
    old = sock.gettimeout()
    sock.settimeout(wait)
    try:
        sock.recvfrom(4096)
        return False
    except TimeoutError:
        return True
    finally:
        sock.settimeout(old)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
