"""`relayctl run` as a process in the testbed: failures, fallbacks, restarts, shutdown.

Every failure must be one `relayctl: error:` line and a non-zero exit, and must
leave nothing behind: the pin dir is not even created when the daemon stops
before loading. Fallbacks are forced for real: a `bcc` package that cannot be
imported (first on PYTHONPATH, so the daemon's own code is unchanged) and an
interface that cannot take native XDP (lo). The kernel is asked what is
attached; the daemon's log, `relayctl status` and its metrics must agree.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ctl import runstate, wire
from ctl.loader import remove_pins
from ctl.maps import RelayMaps
from ctl.netns import in_netns, popen_in
from ctl.testbed import Testbed
from ctl.xdp import info

from .conftest import build_testbed
from .relay_process import (
    PUBLIC_PORT,
    PUBLIC_V4,
    RELAYCTL,
    TID_TX1,
    TID_TX2,
    TUNNEL_V4,
    TX1,
    RelayProcess,
    establish,
    metric_sum,
    quiet,
    scrape_until,
    stun,
    udp,
)

ERROR = "relayctl: error: "
NOBODY = 65534
# Its own testbed, so that this suite's many daemon starts and stops never meet
# another suite's relay on the shared one (srtb).
TESTBED_PREFIX = "srdr"


@pytest.fixture(scope="module")
def testbed() -> Iterator[Testbed]:
    """The conftest's testbed, under this suite's prefix; always torn down."""
    yield from build_testbed(TESTBED_PREFIX, clients=1, relays=1, transceivers=1)


@pytest.fixture
def pin_dir() -> Iterator[Path]:
    """A fresh pin dir path on bpffs (not created: the daemon makes it)."""
    path = Path(tempfile.mkdtemp(prefix="splitrelay-run-", dir="/sys/fs/bpf"))
    path.rmdir()
    yield path
    remove_pins(path)
    runstate.remove(path)


@pytest.fixture
def no_bcc(tmp_path: Path) -> dict[str, str]:
    """An environment in which `import bcc` fails, as on a host without python3-bpfcc."""
    pkg = tmp_path / "nobcc" / "bcc"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('raise ImportError("bcc disabled for this test")\n')
    return {**os.environ, "PYTHONPATH": str(pkg.parent)}


@pytest.fixture
def relays(testbed: Testbed, pin_dir: Path) -> Iterator[Callable[[str], RelayProcess]]:
    """Make RelayProcess objects on the test's pin dir; every one is cleaned up."""
    made: list[RelayProcess] = []

    def make(path: str) -> RelayProcess:
        made.append(RelayProcess(testbed, path, pin_dir))
        return made[-1]

    yield make
    for relay in made:
        relay.cleanup()


def userspace_packets(samples: dict) -> float:
    return metric_sum(samples, "splitrelay_relay_packets_total", path="userspace")


def base_args(pin_dir: Path, *extra: str, public: str = PUBLIC_V4) -> list[str]:
    return [
        "--pin-dir", str(pin_dir), "run", "-i", "pub0", "-i", "dc0",
        "--public", public, "--tunnel", TUNNEL_V4,
        "--transceiver", f"{TID_TX1:x}={TX1[0]}:{TX1[1]}",
        "--metrics", f"{PUBLIC_V4}:19478", *extra,
    ]  # fmt: skip


def relayctl_in(
    testbed: Testbed,
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    as_nobody: bool = False,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """relayctl in the relay's namespace (sharing our mounts, so bpffs is there)."""

    def drop_root() -> None:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    proc = popen_in(
        testbed.netns("relay1"),
        [RELAYCTL, *args],
        keep_mounts=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=drop_root if as_nobody else None,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"relayctl {' '.join(args)} did not exit: {err}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def assert_one_line_error(res: subprocess.CompletedProcess[str], code: int, fragment: str) -> None:
    lines = res.stderr.splitlines()
    assert res.returncode == code, res.stderr
    assert len(lines) == 1 and lines[0].startswith(ERROR), res.stderr
    assert "Traceback" not in res.stderr
    assert fragment in lines[0], lines[0]


def live_modes(testbed: Testbed, *ifnames: str) -> dict[str, str | None]:
    """What the kernel says is attached, interface by interface."""
    with in_netns(testbed.netns("relay1")):
        return {name: info(name).mode for name in ifnames}


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("public", "extra", "code", "fragment"),
    [
        pytest.param(
            PUBLIC_V4, ["-i", "srnope0"], 1, "interface 'srnope0' does not exist", id="no-iface"
        ),
        pytest.param(
            "198.51.100.300", [], 2, "'198.51.100.300' is not an IP address", id="bad-address"
        ),
        pytest.param(
            "192.0.2.1", [], 1, "192.0.2.1 is not an address of this host", id="not-local"
        ),
        pytest.param(
            "2001:db8:c::1", ["--public", "::1"], 2, "one IPv6 address per role", id="two-v6"
        ),
    ],
)
def test_run_errors_are_one_line_and_touch_nothing(
    testbed: Testbed, pin_dir: Path, public: str, extra: list[str], code: int, fragment: str
) -> None:
    res = relayctl_in(testbed, base_args(pin_dir, *extra, public=public))
    assert_one_line_error(res, code, fragment)
    assert not pin_dir.exists(), "a daemon that cannot start must not load anything"
    assert runstate.load(pin_dir) is None
    assert live_modes(testbed, "pub0", "dc0") == {"pub0": None, "dc0": None}


def test_port_in_use_fails_before_loading(testbed: Testbed, pin_dir: Path) -> None:
    blocker = udp(testbed, "relay1", (PUBLIC_V4, PUBLIC_PORT))
    try:
        res = relayctl_in(testbed, base_args(pin_dir))
    finally:
        blocker.close()
    assert_one_line_error(res, 1, f"cannot bind the public address {PUBLIC_V4}:3478")
    assert "already in use" in res.stderr
    assert not pin_dir.exists()
    assert live_modes(testbed, "pub0", "dc0") == {"pub0": None, "dc0": None}


@pytest.mark.usefixtures("checkout_reachable_by_others")
def test_without_root_says_so(testbed: Testbed, pin_dir: Path) -> None:
    res = relayctl_in(testbed, base_args(pin_dir), as_nobody=True)
    assert_one_line_error(res, 1, "permission denied")
    assert "needs root" in res.stderr
    assert not pin_dir.exists()


def test_a_second_daemon_leaves_the_first_intact(
    testbed: Testbed,
    pin_dir: Path,
    relays: Callable[[str], RelayProcess],
    client: socket.socket,
    tx1: socket.socket,
) -> None:
    first = relays("native").start()
    before = live_modes(testbed, "pub0", "dc0")
    with in_netns(testbed.netns("relay1")):
        prog_before = info("pub0").prog_id
    assert before == {"pub0": "native", "dc0": "native"}
    state = runstate.load(pin_dir)
    assert state is not None and first.proc is not None and state.pid == first.proc.pid

    # Same pin dir: refused before anything is bound or loaded.
    same = relayctl_in(testbed, base_args(pin_dir))
    assert_one_line_error(same, 1, f"a relay daemon (pid {first.proc.pid}) already runs on")
    # Another pin dir, same ports: refused at the bind, before loading.
    other_pins = Path(f"{pin_dir}-other")
    other = relayctl_in(testbed, base_args(other_pins, "--metrics", f"{PUBLIC_V4}:19479"))
    assert_one_line_error(other, 1, "the port is already in use")
    assert not other_pins.exists()

    state_after = runstate.load(pin_dir)
    assert state_after is not None and state_after.pid == first.proc.pid
    with in_netns(testbed.netns("relay1")):
        assert info("pub0").prog_id == prog_before
    assert live_modes(testbed, "pub0", "dc0") == before
    establish(client, tx1)  # the first daemon's data plane still routes new sessions
    client.sendto(b"\x80still-here", (PUBLIC_V4, PUBLIC_PORT))
    assert wire.decap(tx1.recvfrom(4096)[0])[1] == b"\x80still-here"
    assert first.stop() == 0, first.log()
    assert runstate.load(pin_dir) is None  # its own file, removed on a clean stop


# ------------------------------------------------------------------ attach / detach / stop


def test_attach_and_detach_commands(testbed: Testbed, pin_dir: Path) -> None:
    res = relayctl_in(
        testbed, ["--pin-dir", str(pin_dir), "attach", "pub0", "dc0", "--mode", "generic"]
    )
    try:
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines() == ["pub0: attached (generic)", "dc0: attached (generic)"]
        assert "no relay addresses configured yet" in res.stderr
        assert live_modes(testbed, "pub0", "dc0") == {"pub0": "generic", "dc0": "generic"}
        status = relayctl_in(testbed, ["--pin-dir", str(pin_dir), "status", "--json"])
        assert json.loads(status.stdout)["program_pinned"] is True
    finally:
        res = relayctl_in(testbed, ["--pin-dir", str(pin_dir), "detach", "pub0", "dc0"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["pub0: detached", "dc0: detached"]
    assert live_modes(testbed, "pub0", "dc0") == {"pub0": None, "dc0": None}
    again = relayctl_in(testbed, ["--pin-dir", str(pin_dir), "detach", "pub0"])
    assert again.stdout.strip() == "pub0: no XDP program"


def test_detach_on_exit(testbed: Testbed, relays: Callable[[str], RelayProcess]) -> None:
    relay = relays("generic").start(["--detach-on-exit"])
    assert live_modes(testbed, "pub0", "dc0") == {"pub0": "generic", "dc0": "generic"}
    assert relay.stop() == 0, relay.log()
    assert live_modes(testbed, "pub0", "dc0") == {"pub0": None, "dc0": None}
    assert "XDP detached from pub0 (--detach-on-exit)" in relay.log()


def test_sigint_stops_cleanly_and_xdp_keeps_forwarding(
    testbed: Testbed,
    pin_dir: Path,
    relays: Callable[[str], RelayProcess],
    client: socket.socket,
    tx1: socket.socket,
) -> None:
    relay = relays("native").start()
    header = establish(client, tx1)
    assert relay.stop(signal.SIGINT) == 0, relay.log()
    log = relay.log()
    assert "stopping" in log and "Traceback" not in log
    assert runstate.load(pin_dir) is None
    assert live_modes(testbed, "pub0", "dc0") == {"pub0": "native", "dc0": "native"}
    client.sendto(b"\x80no-daemon", (PUBLIC_V4, PUBLIC_PORT))  # the kernel alone relays it
    data, src = tx1.recvfrom(4096)
    assert wire.decap(data)[1] == b"\x80no-daemon"
    tx1.sendto(wire.encap(header, b"back"), src[:2])
    assert client.recvfrom(4096)[0] == b"back"


# ------------------------------------------------------------------ fallbacks


def test_falls_back_to_userspace_when_bcc_cannot_be_imported(
    testbed: Testbed,
    relays: Callable[[str], RelayProcess],
    no_bcc: dict[str, str],
    client: socket.socket,
    tx1: socket.socket,
) -> None:
    relay = relays("native").start(env=no_bcc)
    reason = "cannot load the XDP program: bcc is not importable (bcc disabled for this test)"
    assert f"XDP not in use, the userspace path relays everything: {reason}" in relay.log()
    daemon = relay.cli_json("status")["daemon"]  # type: ignore[index]
    assert daemon["state"] == "running" and daemon["xdp"] is False
    assert daemon["fallback_reason"].startswith(reason)
    assert live_modes(testbed, "pub0", "dc0") == {"pub0": None, "dc0": None}

    header = establish(client, tx1)  # the userspace path, on its in-memory table
    tx1.sendto(wire.encap(header, b"back"), (TUNNEL_V4, 3479))
    assert client.recvfrom(4096)[0] == b"back"
    samples = scrape_until(relay, lambda s: userspace_packets(s) >= 2)
    assert metric_sum(samples, "splitrelay_relay_xdp_attached") == 0
    assert metric_sum(samples, "splitrelay_relay_packets_total", path="xdp") == 0
    assert userspace_packets(samples) == 2
    deadline = time.monotonic() + 5
    while True:  # no pinned maps: stats shows the userspace counters alone
        stats = relay.cli_json("stats")
        assert stats["xdp"] is None  # type: ignore[index]
        forwarded = (stats["userspace"] or {}).get("forwarded", {})  # type: ignore[index]
        if forwarded.get("to_client_packets") == 1:
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.2)


def test_falls_back_when_an_interface_cannot_take_native_xdp(
    testbed: Testbed,
    relays: Callable[[str], RelayProcess],
    client: socket.socket,
    tx1: socket.socket,
) -> None:
    relay = relays("native").start(["-i", "lo"])  # loopback has no native XDP
    daemon = relay.cli_json("status")["daemon"]  # type: ignore[index]
    assert daemon["xdp"] is False and daemon["interfaces"] == {}
    assert "cannot attach XDP to lo" in daemon["fallback_reason"]
    # pub0 and dc0 took it, and gave it back: XDP on some interfaces only is XDP on none
    assert live_modes(testbed, "pub0", "dc0", "lo") == {"pub0": None, "dc0": None, "lo": None}
    assert "detached the XDP program on pub0" in relay.log()
    establish(client, tx1)
    samples = scrape_until(relay, lambda s: userspace_packets(s) >= 1)
    assert userspace_packets(samples) == 1


def test_a_restart_that_cannot_load_detaches_the_stale_program(
    testbed: Testbed,
    relays: Callable[[str], RelayProcess],
    no_bcc: dict[str, str],
    client: socket.socket,
    tx1: socket.socket,
) -> None:
    relay = relays("native").start()
    establish(client, tx1)
    assert relay.stop() == 0, relay.log()
    assert live_modes(testbed, "pub0", "dc0") == {"pub0": "native", "dc0": "native"}

    relay.start(env=no_bcc)
    log = relay.log()
    assert "detached the XDP program on pub0: a previous run left it" in log
    assert live_modes(testbed, "pub0", "dc0") == {"pub0": None, "dc0": None}
    # The old session lived in the pinned map only: its packets are no longer forwarded
    # from it (documented), and a new Binding Request routes the client again.
    client.sendto(b"\x80old-session", (PUBLIC_V4, PUBLIC_PORT))
    assert quiet(tx1)
    establish(client, tx1)


def test_a_drained_transceiver_stays_drained_across_restart(
    relays: Callable[[str], RelayProcess],
) -> None:
    relay = relays("native").start()

    def states() -> dict[int, str]:
        return {t["tid"]: t["state"] for t in relay.cli_json("transceivers", "ls")}  # type: ignore[index,union-attr]

    assert relay.cli("transceivers", "drain", f"{TID_TX1:x}").returncode == 0
    assert relay.stop() == 0
    relay.start()
    assert states() == {TID_TX1: "draining", TID_TX2: "active"}
    assert "transceiver 00000011 stays draining" in relay.log()

    res = relay.cli("transceivers", "add", f"{TID_TX1:x}", f"{TX1[0]}:{TX1[1]}")
    assert res.returncode == 0, res.stderr
    assert relay.stop() == 0
    relay.start()
    assert states() == {TID_TX1: "active", TID_TX2: "active"}


# ------------------------------------------------------------------ events


def test_lost_kernel_events_are_exported(
    testbed: Testbed,
    pin_dir: Path,
    relays: Callable[[str], RelayProcess],
    client: socket.socket,
    tx1: socket.socket,
) -> None:
    """With the daemon paused, new sessions overflow the event ring; the metric says so."""
    relay = relays("native").start()
    establish(client, tx1)  # resolves the neighbour: XDP itself creates what follows
    assert relay.proc is not None
    request = stun(TID_TX1)
    relay.proc.send_signal(signal.SIGSTOP)
    try:
        # 4096 events of 64 bytes fill the default ring (64 pages); send more.
        with in_netns(testbed.netns("c1")):
            senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(5000)]
        for sock in senders:
            sock.bind(("198.51.100.11", 0))
            sock.sendto(request, (PUBLIC_V4, PUBLIC_PORT))
            sock.close()
        with RelayMaps(pin_dir) as maps:
            lost = maps.counters_snapshot()["events_lost"]
        assert lost > 0, "the ring buffer did not overflow: the test sent too little"
    finally:
        relay.proc.send_signal(signal.SIGCONT)
    samples = relay.scrape()
    assert metric_sum(samples, "splitrelay_relay_events_lost_total") == lost
