"""The impairment daemon: one per impaired client, in the testbed's switch namespace.

`relayctl testbed impair` (ctl/impairctl.py) starts it with `python -m ctl.impaird`
through `Testbed.spawn`, so `testbed down` stops it like any testbed process. tc
filters on the client's switch port redirect the client's relay traffic into the
TAP device this daemon creates; it reads each frame, lets the direction's model
(ctl/impair.py) decide its fate, and at the due time re-injects it:

* up (Ethernet source is the client's MAC): an AF_PACKET socket on the bridge
  device `lan`; the bridge's transmit forwards it by its FDB toward the relay;
* down (destination is the client's MAC): an AF_PACKET socket on the client's
  switch port, out of which the frame reaches the client.

Both sockets set PACKET_QDISC_BYPASS: the frame goes straight to the device's
transmit function, so it passes neither the port's clsact egress hook (where the
down filters sit) nor its ingress (the bridge transmits up frames to the relay's
port, not back in through the client's), and is never diverted twice. The
integration test checks that the daemon sees each packet exactly once.

Timing: a monotonic clock, a heap of due frames, and select() with a microsecond
timeout; the process asks for SCHED_FIFO (falling back to nice -20) so that busy
CPUs do not delay it, and gets zero timer slack. Python's cyclic GC is off in the
loop (its data, tuples of ints and bytes, has no cycles) and runs only when no
frame is due soon. How late each frame left against its due time is counted in
a histogram that `relayctl testbed status --json` shows.

Protocol with the controller, all through the state file (JSON, replaced
atomically, also what `status` reads):
* `state: "ready"` once the TAP is up and the sockets are open (the filters may
  now point at the TAP);
* SIGUSR1 arms the impairment (the outage clock starts): `state: "active"` and
  `epoch_ns` (monotonic) in the file;
* counters every second; SIGTERM or SIGINT: stop reading, send what is held at its
  due time (for at most DRAIN_MAX_S), write the final counters, exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import fcntl
import gc
import heapq
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

from ctl.impair import DIRECTIONS, DROP_REASONS, DirectionModel, ImpairError, ImpairSpec

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCSIFTXQLEN = 0x8913, 0x8914, 0x8943
IFF_UP = 0x1
SOL_PACKET = 263
PACKET_QDISC_BYPASS = 20
PR_SET_TIMERSLACK = 29

RT_PRIORITY = 10  # above every SCHED_OTHER task, below the kernel's own RT threads
TAP_TXQUEUELEN = 4096  # frames the kernel buffers for us if we are briefly late
READ_BATCH = 64  # frames read per wakeup before due frames are sent again
STATS_INTERVAL_S = 1.0
QUIET_NS = 2_000_000  # housekeeping only when no frame is due within 2 ms
DRAIN_MAX_S = 1.5  # below Testbed.down()'s 3 s grace before SIGKILL
LATE_BUCKETS_US = (50, 100, 250, 500, 1000, 2000, 5000)
FRAME_MAX = 65536
EXTRA_DROPS = ("queue_full", "send_failed", "shutdown")


def _mac(text: str) -> bytes:
    raw = bytes.fromhex(text.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"bad MAC address {text!r}")
    return raw


def _ifreq(name: str, fmt: str, *values: int) -> bytes:
    return struct.pack(f"16s{fmt}", name.encode(), *values).ljust(40, b"\0")


def open_tap(name: str) -> int:
    """Create TAP `name` (no packet-info header), bring it up, return its fd.

    The device exists as long as the fd is open, so it vanishes with the daemon
    (and a tc filter pointing at it then drops, which status reports).
    """
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, "H", IFF_TAP | IFF_NO_PI))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            fcntl.ioctl(s, SIOCSIFTXQLEN, _ifreq(name, "i", TAP_TXQUEUELEN))
            flags = struct.unpack_from("H", fcntl.ioctl(s, SIOCGIFFLAGS, _ifreq(name, "H", 0)), 16)
            fcntl.ioctl(s, SIOCSIFFLAGS, _ifreq(name, "H", flags[0] | IFF_UP))
    except OSError:
        os.close(fd)
        raise
    return fd


def packet_socket(ifname: str) -> socket.socket:
    """A send-only AF_PACKET socket on `ifname` that bypasses the device's qdisc and tc.

    Protocol 0: it receives nothing, so it adds no copy of any frame anywhere.
    """
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        s.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.bind((ifname, 0))
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


def set_realtime() -> str:
    """SCHED_FIFO if allowed, else nice -20; zero timer slack. Returns what was set."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(RT_PRIORITY))
        return f"SCHED_FIFO {RT_PRIORITY}"
    except OSError:
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -20)
        return "SCHED_OTHER nice -20"
    except OSError:
        return "SCHED_OTHER (could not raise priority)"


def tap_tx_dropped(name: str) -> int | None:
    """Frames the kernel dropped toward our TAP (its tx_dropped), from /proc/net/dev.

    /proc/net is the reading thread's namespace (the switch), unlike /sys here,
    which is the host's (the daemon keeps the host's mounts).
    """
    try:
        for line in Path("/proc/net/dev").read_text().splitlines():
            ifname, sep, rest = line.partition(":")
            if sep and ifname.strip() == name:
                return int(rest.split()[11])
    except (OSError, ValueError, IndexError):
        return None
    return None


class Counters:
    """Per-direction packet counts; `to_dict()` is the JSON in the state file."""

    def __init__(self) -> None:
        self.seen = 0
        self.forwarded = 0
        self.reordered = 0
        self.held = 0
        self.dropped = dict.fromkeys((*DROP_REASONS, *EXTRA_DROPS), 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "seen": self.seen,
            "forwarded": self.forwarded,
            "dropped": dict(self.dropped),
            "dropped_total": sum(self.dropped.values()),
            "reordered": self.reordered,
            "held": self.held,
        }


class Impaird:
    """The daemon's state and loop; `run()` returns the exit code."""

    def __init__(self, args: argparse.Namespace, spec: ImpairSpec) -> None:
        self.args = args
        self.spec = spec
        self.state_path = Path(args.state)
        self.client_mac = _mac(args.client_mac)
        self.models = {d: DirectionModel(spec, d) for d in spec.directions}
        self.counters = {d: Counters() for d in DIRECTIONS}
        self.unclassified = 0
        self.late_hist = [0] * (len(LATE_BUCKETS_US) + 1)
        self.late_max_ns = 0
        self.heap: list[tuple[int, int, int, bytes]] = []
        self.seq = 0
        self.state = "starting"
        self.epoch_ns: int | None = None
        self.sched = ""
        self.started = time.time()
        self.stop_at: int | None = None  # monotonic deadline of the drain, once stopping
        self.flags = {"arm": False, "stop": False}

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        self.sched = set_realtime()
        self.tap = open_tap(self.args.tap)
        self.socks = (packet_socket(self.args.bridge), packet_socket(self.args.port))
        self.wake_r, self.wake_w = socket.socketpair()
        for s in (self.wake_r, self.wake_w):
            s.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGUSR1, self._on_arm)

    def _on_stop(self, signum: int, frame: Any) -> None:
        self.flags["stop"] = True

    def _on_arm(self, signum: int, frame: Any) -> None:
        self.flags["arm"] = True

    # ------------------------------------------------------------------ state file

    def snapshot(self) -> dict[str, Any]:
        outage = next((m.outage for m in self.models.values() if m.outage), None)
        return {
            "client": self.args.client,
            "tap": self.args.tap,
            "pid": os.getpid(),
            "state": self.state,
            "started": self.started,
            "updated": time.time(),
            "updated_ns": time.monotonic_ns(),
            "epoch_ns": self.epoch_ns,
            "outage": None if outage is None else {"start_ns": outage[0], "end_ns": outage[1]},
            "spec": self.spec.to_dict(),
            "sched": self.sched,
            "counters": {d: c.to_dict() for d, c in self.counters.items()},
            "unclassified": self.unclassified,
            "tap_dropped": tap_tx_dropped(self.args.tap),
            "lateness": {
                "buckets_us": list(LATE_BUCKETS_US),
                "counts": list(self.late_hist),
                "max_us": round(self.late_max_ns / 1000, 1),
            },
        }

    def write_state(self) -> None:
        tmp = self.state_path.with_name(f".{self.state_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.snapshot()) + "\n")
        tmp.replace(self.state_path)

    # ------------------------------------------------------------------ packets

    def receive(self, now: int) -> None:
        """Read up to READ_BATCH frames from the TAP and schedule or drop each."""
        for _ in range(READ_BATCH):
            try:
                frame = os.read(self.tap, FRAME_MAX)
            except BlockingIOError:
                return
            if frame[6:12] == self.client_mac:
                direction, out = "up", 0
            elif frame[0:6] == self.client_mac:
                direction, out = "down", 1
            else:  # e.g. a flooded frame for another host: the client would ignore it
                self.unclassified += 1
                continue
            c = self.counters[direction]
            c.seen += 1
            model = self.models.get(direction)
            if model is None:  # not impaired in this direction (no filter sends it here)
                self._push(now, out, frame, c)
                continue
            verdict = model.decide(now)
            if verdict.drop is not None:
                c.dropped[verdict.drop] += 1
                continue
            if len(self.heap) >= self.spec.limit:
                c.dropped["queue_full"] += 1
                continue
            if verdict.reordered:
                c.reordered += 1
            self._push(verdict.due_ns, out, frame, c)

    def _push(self, due: int, out: int, frame: bytes, c: Counters) -> None:
        self.seq += 1
        c.held += 1
        heapq.heappush(self.heap, (due, self.seq, out, frame))

    def send_due(self) -> None:
        """Send every frame whose time has come, in due order (FIFO among equals)."""
        heap = self.heap
        now = time.monotonic_ns()
        while heap and heap[0][0] <= now:
            due, _, out, frame = heapq.heappop(heap)
            c = self.counters[DIRECTIONS[out]]
            c.held -= 1
            try:
                self.socks[out].send(frame)
            except OSError:
                c.dropped["send_failed"] += 1
            else:
                c.forwarded += 1
                late = now - due
                self.late_max_ns = max(self.late_max_ns, late)
                us = late / 1000
                i = 0
                while i < len(LATE_BUCKETS_US) and us >= LATE_BUCKETS_US[i]:
                    i += 1
                self.late_hist[i] += 1
            now = time.monotonic_ns()

    # ------------------------------------------------------------------ loop

    def run(self) -> int:
        self.setup()
        self.state = "ready"
        self.write_state()
        gc.disable()
        next_stats = time.monotonic_ns() + int(STATS_INTERVAL_S * 1e9)
        reading = True
        while True:
            if self.flags["arm"] and self.epoch_ns is None:
                self.epoch_ns = time.monotonic_ns()
                for m in self.models.values():
                    m.arm(self.epoch_ns)
                self.state = "active"
                self.write_state()
            if self.flags["stop"] and self.stop_at is None:
                # Filters were removed (or moved to a successor) before the signal:
                # take what is already queued for us, then read no more.
                self.receive(time.monotonic_ns())
                reading = False
                self.state = "stopping"
                self.stop_at = time.monotonic_ns() + int(DRAIN_MAX_S * 1e9)
            now = time.monotonic_ns()
            if self.stop_at is not None and (not self.heap or now >= self.stop_at):
                break
            wake = next_stats if self.stop_at is None else self.stop_at
            if self.heap:
                wake = min(wake, self.heap[0][0])
            rlist = [self.wake_r, self.tap] if reading else [self.wake_r]
            try:
                ready, _, _ = select.select(rlist, [], [], max(0, wake - now) / 1e9)
            except InterruptedError:  # pragma: no cover - PEP 475 retries select itself
                ready = []
            if self.wake_r in ready:
                with contextlib.suppress(OSError):
                    self.wake_r.recv(4096)
            if reading and self.tap in ready:
                self.receive(time.monotonic_ns())
            self.send_due()
            now = time.monotonic_ns()
            if now >= next_stats and (not self.heap or self.heap[0][0] - now > QUIET_NS):
                self.write_state()
                gc.collect(0)
                next_stats = now + int(STATS_INTERVAL_S * 1e9)
        for frame_info in self.heap:
            self.counters[DIRECTIONS[frame_info[2]]].dropped["shutdown"] += 1
            self.counters[DIRECTIONS[frame_info[2]]].held -= 1
        self.heap.clear()
        self.state = "stopped"
        self.write_state()
        return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ctl.impaird", description=__doc__.splitlines()[0])
    p.add_argument("--client", required=True, help="client host name (c1), for the record")
    p.add_argument("--client-mac", required=True, help="the client's MAC (up = from it)")
    p.add_argument("--port", required=True, help="the client's switch port (down frames leave)")
    p.add_argument("--bridge", default="lan", help="bridge device (up frames are sent into)")
    p.add_argument("--tap", required=True, help="TAP device to create and read")
    p.add_argument("--spec", required=True, help="the ImpairSpec as JSON")
    p.add_argument("--state", required=True, help="state file to write")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        spec = ImpairSpec.from_dict(json.loads(args.spec))
        return Impaird(args, spec).run()
    except (ImpairError, ValueError, OSError) as exc:
        print(f"impaird: error: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
