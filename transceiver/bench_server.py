"""The server-side processes of `python -m transceiver.bench`: a worker, and the relay.

The benchmark (transceiver/bench.py) starts each of these as its own
interpreter inside the benchmark's private network namespace, so that each
can be pinned to a CPU and its CPU time read from /proc on its own:

* ``worker``: one process with two Workers of the same code: one behind the
  relay (the measured one), one in direct mode (clients reach its socket
  without the relay; only used to compare call setup times). Each gets the
  signaling app (transceiver/signaling.py) over an InProcessPool on its own
  port, plus two benchmark routes: ``GET /bench/stats`` (the Worker's stats,
  the event loop's lateness since the last reset, the playback backlog) and
  ``POST /bench/reset``. Whether aiortc's fast paths are on is decided by
  ``SPLITRELAY_AIORTC_FAST`` in the environment (transceiver/aiortc_fast.py),
  which the benchmark sets per process: that is the "before" and "after".
* ``relay``: the userspace relay (ctl.userspace.UserspaceRelay) with an
  in-memory registry of the workers.

Both print one line ``READY {json}`` on stdout when they serve, and stop on
SIGTERM or when their stdin closes (the benchmark died), so none outlives it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import ipaddress
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

#: How often the loop-lag probe wakes (seconds); its lateness is the loop's backlog.
LAG_INTERVAL = 0.010
#: How often the playback backlog is sampled (seconds).
BACKLOG_INTERVAL = 0.100
#: Samples of each kept between two resets (a step is well under this).
MAX_SAMPLES = 200_000
#: Scheduling priority of every benchmark process: the machine may run other work,
#: and a worker that other processes preempt would look slower than it is.
BENCH_NICE = -15


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def pin_cpu(cpu: int | None) -> None:
    """Run this process (and every thread it starts later) on one CPU only, at high priority.

    The priority (nice BENCH_NICE) keeps unrelated processes on the same CPU
    from taking time away from what is measured; the benchmark reports how
    busy each CPU was besides its own processes, so such load stays visible.
    """
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, BENCH_NICE)


def _percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


class LoopProbe:
    """Measures how late the event loop runs a timer, and samples the playback backlog.

    A loop that keeps up wakes a 10 ms timer within a fraction of a millisecond;
    a loop with more work than time wakes it later and later. The probe's own
    cost (100 wake-ups a second) is the same in every benchmark variant.
    """

    def __init__(self, backlog: Callable[[], int]) -> None:
        self._backlog = backlog
        self.lags: list[float] = []
        self.backlogs: list[int] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.gc_pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._gc_started = 0.0

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        """Garbage collector pauses stop the loop too; keep their durations per generation."""
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            pauses = self.gc_pauses.get(int(info.get("generation", 2)))
            if pauses is not None and len(pauses) < MAX_SAMPLES:
                pauses.append(time.perf_counter() - self._gc_started)

    def start(self) -> None:
        gc.callbacks.append(self._on_gc)
        self._tasks = [
            asyncio.ensure_future(self._lag()),
            asyncio.ensure_future(self._sample_backlog()),
        ]

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_gc)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def reset(self) -> None:
        self.lags = []
        self.backlogs = []
        self.gc_pauses = {0: [], 1: [], 2: []}

    async def _lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + LAG_INTERVAL
            await asyncio.sleep(LAG_INTERVAL)
            if len(self.lags) < MAX_SAMPLES:
                self.lags.append(max(0.0, loop.time() - due))

    async def _sample_backlog(self) -> None:
        while True:
            await asyncio.sleep(BACKLOG_INTERVAL)
            if len(self.backlogs) < MAX_SAMPLES:
                self.backlogs.append(self._backlog())

    def snapshot(self) -> dict[str, Any]:
        lags, backlogs = self.lags, self.backlogs
        third = len(backlogs) // 3
        return {
            "loop_lag_seconds": {
                "count": len(lags),
                "p50": _percentile(lags, 50),
                "p99": _percentile(lags, 99),
                "max": max(lags) if lags else None,
            },
            "gc_pauses": {
                str(gen): {
                    "count": len(p),
                    "total_seconds": sum(p),
                    "max_seconds": max(p) if p else None,
                }
                for gen, p in self.gc_pauses.items()
            },
            "playback_backlog_frames": {
                "mean": sum(backlogs) / len(backlogs) if backlogs else None,
                "max": max(backlogs) if backlogs else None,
                "first_third_mean": sum(backlogs[:third]) / third if third else None,
                "last_third_mean": sum(backlogs[-third:]) / third if third else None,
            },
        }


def _bench_routes(app: web.Application, workers: list[Any], probe: LoopProbe) -> None:
    async def stats(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "pid": os.getpid(),
                "workers": [w.stats() for w in workers],
                **probe.snapshot(),
            }
        )

    async def reset(request: web.Request) -> web.Response:
        probe.reset()
        return web.Response(status=204)

    app.router.add_get("/bench/stats", stats)
    app.router.add_post("/bench/reset", reset)


async def _until_stopped() -> None:
    """Return on SIGTERM/SIGINT, or when stdin closes (the benchmark is gone)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def stdin_ready() -> None:
        try:
            if not os.read(sys.stdin.fileno(), 4096):
                stop.set()
        except OSError:
            stop.set()

    with contextlib.suppress(OSError, ValueError):
        loop.add_reader(sys.stdin.fileno(), stdin_ready)
    await stop.wait()


def use_legacy_playback() -> None:
    """Put back the playback of the transceiver as it was before the pacing and echo fixes.

    The benchmark's "before" variant measures the transceiver as it was; this
    is that code, kept here (and only here) as the reference: the pacing clock
    started with the first frame, frames early for it waited, and it
    re-anchored only on a frame more than 20 ms late (so each late frame could
    add up to 20 ms of delay for the rest of the call); the echo queue held 10
    frames (200 ms), which a stall could fill for good.
    """
    from av import AudioFrame

    from transceiver import backends, session

    async def recv(self: Any) -> AudioFrame:
        if self.readyState != "live":
            raise session.MediaStreamError
        loop = asyncio.get_running_loop()
        while True:
            pcm = await self._queue.get()
            if len(pcm) == self._size:
                break
            self._counters.backend_errors += 1
        now = loop.time()
        if self._next is None or now - self._next > backends.FRAME_SECONDS:
            self._next = now
        elif self._next > now:
            await asyncio.sleep(self._next - now)
        self._next += backends.FRAME_SECONDS
        frame = AudioFrame(format="s16", layout=self._layout, samples=backends.FRAME_SAMPLES)
        frame.planes[0].update(pcm)
        frame.sample_rate = backends.SAMPLE_RATE
        frame.time_base = session._TIME_BASE
        frame.pts = self._pts
        self._pts += backends.FRAME_SAMPLES
        self._counters.audio_frames_out += 1
        return frame

    session.PlaybackTrack.recv = recv  # type: ignore[method-assign]
    backends.register_backend("echo", lambda **options: backends.EchoBackend(max_frames=10))


async def run_worker(args: argparse.Namespace) -> None:
    from transceiver import aiortc_fast
    from transceiver.opus import voice_settings
    from transceiver.pool import InProcessPool
    from transceiver.signaling import make_app
    from transceiver.worker import Worker, WorkerConfig

    if args.legacy_playback:
        use_legacy_playback()
    tunnel = _hostport(args.tunnel)
    direct = _hostport(args.direct)
    relay_worker = Worker(
        WorkerConfig(
            transceiver_id=args.tid,
            tunnel_host=tunnel[0],
            tunnel_port=tunnel[1],
            relays=[_hostport(args.relay)],
            public_candidates=[_hostport(args.public)],
            max_calls=args.max_calls,
            voice=voice_settings(complexity=args.opus_complexity),
        )
    )
    direct_worker = Worker(
        WorkerConfig(
            transceiver_id=args.tid + 1,
            tunnel_host=direct[0],
            tunnel_port=direct[1],
            relays=[],
            public_candidates=[direct],
            max_calls=args.max_calls,
            direct=True,
            voice=voice_settings(complexity=args.opus_complexity),
        )
    )
    workers = [relay_worker, direct_worker]

    def backlog() -> int:
        return sum(int(w.stats()["playback_frames_queued"]) for w in workers)

    probe = LoopProbe(backlog)
    runners = []
    for worker, listen in ((relay_worker, args.signal), (direct_worker, args.direct_signal)):
        await worker.start()
        app = make_app(InProcessPool([worker]), bearer_token=None)
        _bench_routes(app, workers, probe)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        host, port = _hostport(listen)
        await web.TCPSite(runner, host, port).start()
        runners.append(runner)
    probe.start()
    ready = {
        "pid": os.getpid(),
        "aiortc_fast": aiortc_fast.applied(),
        "legacy_playback": bool(args.legacy_playback),
        "opus_complexity": relay_worker.config.voice.complexity,
        "cpu": sorted(os.sched_getaffinity(0)),
    }
    print("READY " + json.dumps(ready), flush=True)
    try:
        await _until_stopped()
    finally:
        await probe.stop()
        for runner in runners:
            await runner.cleanup()
        for worker in workers:
            await worker.stop(0)


async def run_relay(args: argparse.Namespace) -> None:
    from ctl.maps import RelayAddresses
    from ctl.store import MemoryState
    from ctl.userspace import UserspaceRelay

    public = _hostport(args.public)
    tunnel = _hostport(args.tunnel)
    state = MemoryState(max_sessions=4096)
    for spec in args.transceiver:
        tid, _, where = spec.partition("=")
        host, port = _hostport(where)
        state.put_transceiver(int(tid, 0), host, port)
    relay = UserspaceRelay(
        RelayAddresses(
            public_port=public[1],
            tunnel_port=tunnel[1],
            public_v4=ipaddress.IPv4Address(public[0]),
            tunnel_v4=ipaddress.IPv4Address(tunnel[0]),
        ),
        state,
    )
    await relay.start()
    print("READY " + json.dumps({"pid": os.getpid()}), flush=True)
    try:
        await _until_stopped()
    finally:
        await relay.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m transceiver.bench_server")
    roles = parser.add_subparsers(dest="role", required=True)
    worker = roles.add_parser("worker")
    worker.add_argument("--cpu", type=int)
    worker.add_argument("--tid", type=lambda s: int(s, 0), required=True)
    worker.add_argument("--tunnel", required=True)
    worker.add_argument("--relay", required=True)
    worker.add_argument("--public", required=True)
    worker.add_argument("--signal", required=True)
    worker.add_argument("--direct", required=True)
    worker.add_argument("--direct-signal", required=True)
    worker.add_argument("--max-calls", type=int, default=128)
    worker.add_argument("--legacy-playback", action="store_true")
    worker.add_argument("--opus-complexity", type=int, default=None)
    relay = roles.add_parser("relay")
    relay.add_argument("--cpu", type=int)
    relay.add_argument("--public", required=True)
    relay.add_argument("--tunnel", required=True)
    relay.add_argument("--transceiver", action="append", default=[], help="TID=HOST:PORT")
    args = parser.parse_args(argv)
    pin_cpu(args.cpu)
    started = time.monotonic()
    try:
        asyncio.run(run_worker(args) if args.role == "worker" else run_relay(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        print(
            f"{args.role} failed after {time.monotonic() - started:.1f}s: {exc!r}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
