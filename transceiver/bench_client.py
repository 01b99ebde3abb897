"""The client side of `python -m transceiver.bench`: many cheap echo calls in one process.

The benchmark measures how many calls ONE worker sustains on ONE core, so the
clients, on the other core, must cost far less than the worker per call, or
they would be what is measured. They are real WebRTC peers all the same
(aiortc: HTTP signaling, ICE, DTLS, SRTP, SCTP through the relay) and they
measure the echo round trip on every call, the way `transceiver call` does
(transceiver/markers.py: tone bursts, detected to the sample). What makes
them cheap:

* **No encoding.** The marker signal is periodic (8 pitches x 250 ms = 2 s =
  100 frames), so it is Opus-encoded once, by the voice client's encoder
  settings (transceiver/opus.py's VoiceSettings, no loss expected), and
  every call sends those packets in a loop (aiortc's sender
  takes encoded packets from a track as they are). The loop is taken from the
  third 2 s cycle the encoder saw, so the encoder state at its start is the
  state it had after the same audio: the loop has no seam. Marker send times
  follow the same convention as MarkerTrack (a frame's samples span the 20 ms
  after it is handed to the sender).
* **Decoding, but nothing else per sample in Python**: received audio is
  decoded (the detector needs samples), channel 0 is taken with one slice, and
  the detector's per-millisecond peak runs in C; its pitch check, four times a
  second, uses precomputed DFT tables (C-level sums) instead of a Python loop.
* The process applies transceiver/aiortc_fast.py like the worker does (the
  clients are the same in every variant, so "before" and "after" differ only
  in the worker).

Modes: ``load`` (N concurrent calls, a warm-up, then a measured window; one
JSON result) and ``setup`` (calls one at a time against several signaling
URLs in turn, each hung up as soon as it connects: setup time through the
relay vs direct). The result is printed as one line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fractions
import json
import math
import operator
import os
import sys
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from transceiver import aiortc_fast
from transceiver.markers import (
    DEFAULT_FREQUENCIES,
    DEFAULT_PERIOD,
    SAMPLE_RATE,
    ArrivalClock,
    MarkerDetector,
    MarkerSource,
    RoundTrips,
    channel0,
    percentile,
)

FRAME_SAMPLES = 960
FRAME_SECONDS = FRAME_SAMPLES / SAMPLE_RATE
TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
EVENTS_LABEL = "oai-events"
PING_INTERVAL = 1.0
CONNECT_TIMEOUT = 30.0
#: /proc/<pid>/stat times are in clock ticks.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------- the sent audio


@dataclass
class MarkerLoop:
    """One 2 s cycle of the marker signal, already Opus-encoded, and its markers.

    ``markers[j]`` lists (sequence number within the cycle, sample offset of
    the onset in frame j) for the frame j of the cycle.
    """

    packets: list[bytes]
    markers: list[list[tuple[int, int]]]
    markers_per_cycle: int

    @classmethod
    def build(cls, period: float = DEFAULT_PERIOD) -> MarkerLoop:
        from transceiver import opus

        source = MarkerSource(period=period)
        count = len(DEFAULT_FREQUENCIES)
        cycle_samples = count * source.period_samples
        if cycle_samples % FRAME_SAMPLES:
            raise ValueError("the marker cycle must be a whole number of 20 ms frames")
        cycle = cycle_samples // FRAME_SAMPLES
        encoder = opus.Encoder(opus.VoiceSettings(), channels=1)
        packets: list[bytes] = []
        markers: list[list[tuple[int, int]]] = []
        for k in range(3 * cycle):
            start = source.position
            samples, found = source.read(FRAME_SAMPLES)
            payload = encoder.encode(samples.tobytes())
            if k >= 2 * cycle:
                packets.append(payload)
                markers.append([(m.seq - 2 * count, m.sample - start) for m in found])
        encoder.close()
        return cls(packets, markers, count)


def _packet_track_class() -> type:
    from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
    from av.packet import Packet

    class PacketTrack(MediaStreamTrack):
        """Sends the encoded marker loop, paced in real time; records marker send times."""

        kind = "audio"

        def __init__(self, loop_: MarkerLoop, trips: RoundTrips, sent: list[float]) -> None:
            super().__init__()
            self._table = loop_
            self._trips = trips
            self._sent = sent
            self.frames = 0
            self.markers = True
            self._start: float | None = None
            self._loop = asyncio.get_running_loop()

        async def recv(self) -> Packet:
            if self.readyState != "live":
                raise MediaStreamError
            now = self._loop.time()
            k = self.frames
            if self._start is None:
                self._start = now
            else:
                due = self._start + k * FRAME_SECONDS
                if due > now:
                    await asyncio.sleep(due - now)
            sent_at = self._loop.time()
            table = self._table
            cycle, j = divmod(k, len(table.packets))
            if self.markers:
                for seq, offset in table.markers[j]:
                    when = sent_at + offset / SAMPLE_RATE
                    self._trips.on_sent(seq + cycle * table.markers_per_cycle, when)
                    self._sent.append(when)
            packet = Packet(table.packets[j])
            packet.pts = k * FRAME_SAMPLES
            packet.time_base = TIME_BASE
            self.frames += 1
            return packet

    return PacketTrack


# --------------------------------------------------------------------- the received audio


class FastDetector(MarkerDetector):
    """MarkerDetector whose pitch check uses precomputed DFT tables summed in C.

    Goertzel power at a frequency equals the squared magnitude of the DFT
    bin, so (sum x cos)^2 + (sum x sin)^2 is the same number (up to float
    rounding) at a fraction of the cost of a per-sample Python loop.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self._win_len
        self._tables = [
            (
                array("d", (math.cos(2 * math.pi * f * i / self.sample_rate) for i in range(n))),
                array("d", (math.sin(2 * math.pi * f * i / self.sample_rate) for i in range(n))),
            )
            for f in self.frequencies
        ]

    def feed(self, samples: Any) -> list[Any]:
        """As MarkerDetector.feed, with one C-level peak check for a quiet frame.

        Outside a burst, a chunk whose peak is under the threshold only adds to
        the quiet run, which is all the per-millisecond loop would do with it.
        """
        if (
            self._onset is None
            and len(samples)
            and max(max(samples), -min(samples)) <= self.threshold
        ):
            self._quiet_run += len(samples)
            self._position += len(samples)
            return []
        return super().feed(samples)

    def _classify(self, window: Any) -> int | None:
        mul = operator.mul
        powers = []
        for cos, sin in self._tables:
            re_ = sum(map(mul, window, cos))
            im = sum(map(mul, window, sin))
            powers.append(re_ * re_ + im * im)
        ranked = sorted(range(len(powers)), key=powers.__getitem__, reverse=True)
        best = ranked[0]
        runner_up = powers[ranked[1]] if len(ranked) > 1 else 0.0
        if powers[best] <= 0 or powers[best] < 4.0 * runner_up:
            return None
        energy = float(sum(map(mul, window, window)))
        if powers[best] < 0.5 * energy * len(window) / 2:
            return None
        return best


@dataclass
class Call:
    """One benchmark call and what it measured (loop-clock times)."""

    index: int
    setup_seconds: float | None = None
    error: str | None = None
    call_url: str | None = None
    rtts: list[tuple[float, float]] = field(default_factory=list)  # (detected at, rtt)
    sent: list[float] = field(default_factory=list)  # marker send times
    frames_in: int = 0
    event_rtts: list[float] = field(default_factory=list)
    pc: Any = None
    track: Any = None
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)


async def _listen(track: Any, trips: RoundTrips, call: Call) -> None:
    from aiortc.mediastreams import MediaStreamError

    loop = asyncio.get_running_loop()
    detector: FastDetector | None = None
    clock = ArrivalClock()
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        arrived = loop.time()
        if detector is None:
            detector = FastDetector(sample_rate=frame.sample_rate)
        clock.add(detector.position, arrived)
        call.frames_in += 1
        for found in detector.feed(channel0(frame)):
            when = clock.time_of(found.sample, detector.sample_rate)
            if when is None:
                continue
            rtt = trips.on_detected(found.marker_id, when)
            if rtt is not None:
                call.rtts.append((when, rtt))


def _set_jitter_buffer(pc: Any) -> None:
    """The voice client's (and a browser's) adaptive buffer, decoding to one channel.

    The detector reads one channel, and the echo carries the same signal on
    both (the marker source is mono); libopus then skips the second
    channel's synthesis. Only the client does this: the worker decodes
    stereo, as aiortc does.
    """
    from transceiver import playout
    from transceiver.client import _set_jitter_buffer as set_buffer
    from transceiver.jitterbuffer import JitterConfig

    set_buffer(pc, JitterConfig(), playout.default_counters(), channels=1)


async def _ping(channel: Any, call: Call) -> None:
    loop = asyncio.get_running_loop()
    pending: dict[str, float] = {}

    def on_message(message: str | bytes) -> None:
        # A handler that raises would take aiortc's DTLS transport down: catch all.
        if not isinstance(message, str) or '"echo"' not in message:
            return
        with contextlib.suppress(Exception):
            event = json.loads(message)
            if event.get("type") == "echo":
                sent = pending.pop(event["event"]["event_id"], None)
                if sent is not None:
                    call.event_rtts.append(loop.time() - sent)

    channel.on("message", on_message)
    n = 0
    while True:
        await asyncio.sleep(PING_INTERVAL)
        if channel.readyState == "open":
            n += 1
            event_id = f"ping_{n}"
            pending[event_id] = loop.time()
            channel.send(json.dumps({"type": "splitrelay.ping", "event_id": event_id}))


async def open_call(
    http: aiohttp.ClientSession, url: str, index: int, table: MarkerLoop | None
) -> Call:
    """Offer, POST, answer, connect; with ``table`` the call then sends markers and listens."""
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    loop = asyncio.get_running_loop()
    call = Call(index)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    call.pc = pc
    trips = RoundTrips(count=len(DEFAULT_FREQUENCIES))
    connected = asyncio.Event()
    failed = asyncio.Event()

    @pc.on("connectionstatechange")
    def _state() -> None:
        if pc.connectionState == "connected":
            connected.set()
        elif pc.connectionState in ("failed", "closed"):
            failed.set()

    @pc.on("track")
    def _track(remote: Any) -> None:
        if remote.kind == "audio" and table is not None:
            call.tasks.append(asyncio.ensure_future(_listen(remote, trips, call)))

    try:
        if table is not None:
            call.track = _packet_track_class()(table, trips, call.sent)
            pc.addTrack(call.track)
        else:
            pc.addTransceiver("audio", direction="sendrecv")
        _set_jitter_buffer(pc)
        channel = pc.createDataChannel(EVENTS_LABEL)
        await pc.setLocalDescription(await pc.createOffer())
        started = loop.time()
        async with http.post(
            url, data=pc.localDescription.sdp, headers={"Content-Type": "application/sdp"}
        ) as resp:
            body = await resp.text()
            if resp.status != 201:
                raise RuntimeError(f"HTTP {resp.status}: {body[:200]}")
            location = resp.headers.get("Location")
        if location:
            call.call_url = str(aiohttp.client.URL(url).join(aiohttp.client.URL(location)))
        await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
        done, _ = await asyncio.wait(
            [asyncio.ensure_future(connected.wait()), asyncio.ensure_future(failed.wait())],
            timeout=CONNECT_TIMEOUT,
            return_when=asyncio.FIRST_COMPLETED,
        )
        for task in done:
            task.cancel()
        if not connected.is_set():
            raise RuntimeError("the WebRTC connection failed or timed out")
        call.setup_seconds = loop.time() - started
        if table is not None:
            call.tasks.append(asyncio.ensure_future(_ping(channel, call)))
    except Exception as exc:
        call.error = f"{type(exc).__name__}: {exc}"
    return call


async def close_call(http: aiohttp.ClientSession, call: Call) -> None:
    for task in call.tasks:
        task.cancel()
    await asyncio.gather(*call.tasks, return_exceptions=True)
    if call.call_url:
        with contextlib.suppress(Exception):
            async with http.delete(call.call_url) as resp:
                await resp.read()
    if call.pc is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(call.pc.close(), 10)


# --------------------------------------------------------------------- system probes


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (all its threads) so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_times() -> dict[int, tuple[int, int]]:
    """Per CPU: (busy ticks, total ticks) so far, from /proc/stat."""
    out: dict[int, tuple[int, int]] = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if name.startswith("cpu") and name != "cpu":
                ticks = [int(v) for v in values[:8]]
                idle = ticks[3] + ticks[4]
                out[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
    return out


def udp_socket_queue(host: str, port: int) -> tuple[int, int] | None:
    """(receive queue bytes, drops) of the IPv4 UDP socket bound to host:port, this netns."""
    want = f"{int.from_bytes(bytes(map(int, host.split('.'))), 'little'):08X}:{port:04X}"
    try:
        with open("/proc/net/udp") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[1] == want:
                    rx = int(parts[4].split(":")[1], 16)
                    return rx, int(parts[-1])
    except OSError:
        return None
    return None


class QueueSampler:
    """Samples the worker's tunnel socket receive queue: kernel-side backlog and drops."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.samples: list[int] = []
        self.drops_start: int | None = None
        self.drops_end: int | None = None

    async def run(self) -> None:
        while True:
            found = udp_socket_queue(self.host, self.port)
            if found is not None:
                self.samples.append(found[0])
                if self.drops_start is None:
                    self.drops_start = found[1]
                self.drops_end = found[1]
            await asyncio.sleep(0.25)


# --------------------------------------------------------------------- modes


def _dist(values: list[float]) -> dict[str, float | int | None]:
    return {
        "count": len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "max": max(values) if values else None,
    }


async def run_load(args: argparse.Namespace) -> dict[str, Any]:
    """N concurrent calls; warm-up; a measured window; per-window numbers."""
    loop = asyncio.get_running_loop()
    table = MarkerLoop.build()
    tunnel_host, _, tunnel_port = args.tunnel.rpartition(":")
    sampler = QueueSampler(tunnel_host, int(tunnel_port))
    connector = aiohttp.TCPConnector(limit=max(16, args.calls))
    timeout = aiohttp.ClientTimeout(total=CONNECT_TIMEOUT)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def one(i: int) -> Call:
            await asyncio.sleep(i * args.stagger)
            return await open_call(http, args.url, i, table)

        calls = await asyncio.gather(*(one(i) for i in range(args.calls)))
        try:
            ok = [c for c in calls if c.error is None]
            await asyncio.sleep(args.warmup)
            async with http.post(f"{args.stats_url}/bench/reset") as resp:
                await resp.read()
            pids = {"worker": args.worker_pid, "relay": args.relay_pid, "client": os.getpid()}
            cpu0 = {k: cpu_seconds(p) for k, p in pids.items() if p}
            cpus0 = cpu_times()
            frames0 = [(c.track.frames if c.track else 0, c.frames_in) for c in calls]
            sampler_task = asyncio.ensure_future(sampler.run())
            start = loop.time()
            wall0 = time.monotonic()
            await asyncio.sleep(args.duration)
            end = loop.time()
            wall = time.monotonic() - wall0
            cpu1 = {k: cpu_seconds(p) for k, p in pids.items() if p}
            cpus1 = cpu_times()
            frames1 = [(c.track.frames if c.track else 0, c.frames_in) for c in calls]
            async with http.get(f"{args.stats_url}/bench/stats") as resp:
                worker_stats = await resp.json()
            sampler_task.cancel()
            await asyncio.gather(sampler_task, return_exceptions=True)
            for c in ok:
                c.track.markers = False
            await asyncio.sleep(1.0)  # the last markers of the window come back
        finally:
            await asyncio.gather(*(close_call(http, c) for c in calls))
    result = _load_result(
        args, calls, start, end, wall, cpu0, cpu1, frames0, frames1, worker_stats, sampler
    )
    result["cpu_busy"] = {
        str(n): (cpus1[n][0] - cpus0[n][0]) / max(1, cpus1[n][1] - cpus0[n][1])
        for n in cpus1
        if n in cpus0
    }
    return result


def _load_result(
    args: argparse.Namespace,
    calls: list[Call],
    start: float,
    end: float,
    wall: float,
    cpu0: dict[str, float | None],
    cpu1: dict[str, float | None],
    frames0: list[tuple[int, int]],
    frames1: list[tuple[int, int]],
    worker_stats: dict[str, Any],
    sampler: QueueSampler,
) -> dict[str, Any]:
    late = 0.5  # markers sent this close to the end may come back after the window
    rtts: list[float] = []
    first: list[float] = []
    last: list[float] = []
    third = (end - start) / 3
    per_call = []
    markers_sent = markers_heard = 0
    for c in calls:
        sent = [t for t in c.sent if start <= t < end - late]
        heard = [(t, r) for t, r in c.rtts if start <= t - r < end - late]
        window = [r for t, r in c.rtts if start <= t < end]
        rtts.extend(window)
        first.extend(r for t, r in c.rtts if start <= t < start + third)
        last.extend(r for t, r in c.rtts if end - third <= t < end)
        markers_sent += len(sent)
        markers_heard += len(heard)
        out0, in0 = frames0[c.index]
        out1, in1 = frames1[c.index]
        per_call.append(
            {
                "error": c.error,
                "setup_seconds": c.setup_seconds,
                "markers_sent": len(sent),
                "markers_heard": len(heard),
                "rtt_p50": percentile(window, 50),
                "rtt_p95": percentile(window, 95),
                "frames_sent": out1 - out0,
                "frames_received": in1 - in0,
                "events_answered": len(c.event_rtts),
            }
        )
    cpu = {
        k: (cpu1[k] - cpu0[k]) / wall
        for k in cpu0
        if cpu0.get(k) is not None and cpu1.get(k) is not None
    }
    frames_sent = sum(p["frames_sent"] for p in per_call)
    frames_received = sum(p["frames_received"] for p in per_call)
    return {
        "calls": len(calls),
        "connected": sum(1 for c in calls if c.error is None),
        "errors": sorted({c.error for c in calls if c.error}),
        "window_seconds": wall,
        "rtt_seconds": _dist(rtts),
        "rtt_first_third_p50": percentile(first, 50),
        "rtt_last_third_p50": percentile(last, 50),
        "markers_sent": markers_sent,
        "markers_heard": markers_heard,
        "min_call_heard_ratio": min(
            (p["markers_heard"] / p["markers_sent"] for p in per_call if p["markers_sent"]),
            default=0.0,
        ),
        "frames_sent": frames_sent,
        "frames_received": frames_received,
        "cpu": cpu,
        "setup_seconds": _dist([c.setup_seconds for c in calls if c.setup_seconds is not None]),
        "tunnel_rx_queue_max_bytes": max(sampler.samples, default=None),
        "tunnel_rx_drops": (
            None
            if sampler.drops_start is None or sampler.drops_end is None
            else sampler.drops_end - sampler.drops_start
        ),
        "worker": {
            "loop_lag_seconds": worker_stats.get("loop_lag_seconds"),
            "playback_backlog_frames": worker_stats.get("playback_backlog_frames"),
            "gc_pauses": worker_stats.get("gc_pauses"),
        },
        "per_call": per_call,
    }


async def run_setup(args: argparse.Namespace) -> dict[str, Any]:
    """Calls one at a time, round-robin over the targets; setup seconds per target."""
    targets = [t.partition("=")[::2] for t in args.target]
    times: dict[str, list[float]] = {name: [] for name, _ in targets}
    errors: dict[str, list[str]] = {name: [] for name, _ in targets}
    timeout = aiohttp.ClientTimeout(total=CONNECT_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for i in range(args.rounds):
            for name, url in targets:
                call = await open_call(http, url, i, None)
                if call.setup_seconds is not None:
                    times[name].append(call.setup_seconds)
                if call.error:
                    errors[name].append(call.error)
                await close_call(http, call)
                await asyncio.sleep(0.05)
    return {
        name: {
            **_dist(values),
            "mean": sum(values) / len(values) if values else None,
            "errors": errors[name],
        }
        for name, values in times.items()
    }


def _only_client_address(address: str) -> None:
    """aioice would offer every address of the namespace; the client has just its own."""
    import aioice.ice

    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: [address]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m transceiver.bench_client")
    parser.add_argument("--cpu", type=int)
    parser.add_argument("--address", required=True, help="the client's own address")
    modes = parser.add_subparsers(dest="mode", required=True)
    load = modes.add_parser("load")
    load.add_argument("--url", required=True)
    load.add_argument("--stats-url", required=True)
    load.add_argument("--tunnel", required=True, help="the worker's tunnel HOST:PORT")
    load.add_argument("--calls", type=int, required=True)
    load.add_argument("--duration", type=float, default=20.0)
    load.add_argument("--warmup", type=float, default=5.0)
    load.add_argument("--stagger", type=float, default=0.05)
    load.add_argument("--worker-pid", type=int)
    load.add_argument("--relay-pid", type=int)
    setup = modes.add_parser("setup")
    setup.add_argument("--target", action="append", required=True, help="NAME=URL")
    setup.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    from transceiver.bench_server import pin_cpu

    pin_cpu(args.cpu)
    aiortc_fast.apply()
    _only_client_address(args.address)
    runner = run_load if args.mode == "load" else run_setup
    result = asyncio.run(runner(args))
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
