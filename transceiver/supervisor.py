"""`transceiver run`: N worker processes behind one signaling endpoint, and their drain.

Why processes: aiortc does its Opus, DTLS and SRTP work in Python, so one
process uses about one core; a worker per core uses the machine. Each worker
has its own transceiver id and tunnel port (base + i), so a routing token
names exactly one process and the relays deliver its clients to its socket.

Layout:

    front process:  signaling HTTP (transceiver/signaling.py) -> ProcessPool
                        |  HTTP over a private unix socket per worker
    worker i:       Worker (transceiver/worker.py) + the internal API below

The internal API of a worker (unix socket, not reachable from the network):

    POST   /calls        body = SDP offer -> 201 {"call_id", "answer", "load"}
                         400 {"error": "bad_offer", "message"}
                         503 {"error": "capacity" | "draining", "message"}
    DELETE /calls/{id}   -> 204 | 404
    GET    /stats        -> {"load", "capacity", "draining", "stats": Worker.stats()}

Draining (SIGTERM or SIGINT to the front): the pool refuses new calls (503 +
Retry-After, /healthz says draining), every worker gets SIGTERM and stops
taking calls, live calls go on until they end or --drain-timeout passes, then
the workers exit and so does the front. A second signal ends the calls at once.
A worker that dies outside a drain is restarted (same id and port) with backoff.

Hooks (`SupervisorHooks`) let a registry (Redis, transceiver/registry.py) follow
each worker: started (with its tunnel address), draining, stopped, and unhealthy /
recovered: a worker whose process runs but has not answered /stats for
`unhealthy_after` seconds (hung, stopped, starved) gets no calls from the front,
and the unhealthy hooks let the registry stop relays sending it new sessions too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from transceiver.pool import (
    BadOffer,
    PoolError,
    PoolStats,
    Unavailable,
    WorkerSnapshot,
    make_call_id,
    pick_least_loaded,
    split_call_id,
)

log = logging.getLogger("splitrelay.transceiver.supervisor")

STARTUP_TIMEOUT = 30.0
STATS_TIMEOUT = 2.0
CALL_TIMEOUT = 30.0  # a create_call that takes longer is a stuck worker
POLL_INTERVAL = 1.0
RESTART_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)
STABLE_AFTER = 60.0  # a worker that ran this long gets its backoff reset
KILL_GRACE = 10.0  # after the drain deadline, before SIGKILL
UNHEALTHY_AFTER = 5.0  # seconds without a /stats answer from a running worker


class SupervisorError(RuntimeError):
    """The supervisor cannot start; the message is one line for the operator."""


# --------------------------------------------------------------------- specs and hooks


@dataclass(frozen=True)
class WorkerSpec:
    """Everything one worker process needs, passed to it as JSON on its command line."""

    index: int
    transceiver_id: int
    tunnel_host: str
    tunnel_port: int
    relays: list[tuple[str, int]]
    public_candidates: list[tuple[str, int]]
    max_calls: int
    backend: str
    backend_options: dict[str, Any]
    socket_path: str
    log_level: int = logging.INFO
    jitter_min_delay: float = 0.0
    jitter_max_delay: float = 0.5
    opus_bitrate: int | None = None
    opus_complexity: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        data = json.loads(text)
        data["relays"] = [tuple(r) for r in data["relays"]]
        data["public_candidates"] = [tuple(p) for p in data["public_candidates"]]
        return cls(**data)


@dataclass(frozen=True)
class WorkerInfo:
    """What a hook learns about a worker process."""

    index: int
    transceiver_id: int
    tunnel_host: str
    tunnel_port: int
    pid: int | None


Hook = Callable[[WorkerInfo], Awaitable[None]]


@dataclass
class SupervisorHooks:
    """Callbacks run in the front process; a failing hook is logged, never fatal.

    A Redis registry plugs in here: register on started, set draining on
    draining, deregister on stopped (also called when a worker crashes).

    `on_worker_unhealthy` runs when a worker's process is running but has not
    answered /stats for `SupervisorConfig.unhealthy_after` seconds (hung,
    SIGSTOPped, starved of CPU): the front already gives it no calls, and the
    registry should stop relays routing new sessions to it. `on_worker_recovered`
    runs when it answers again. Neither runs while the transceiver drains, and a
    worker that exits gets `on_worker_stopped` as usual, healthy or not.
    """

    on_worker_started: list[Hook] = field(default_factory=list)
    on_worker_draining: list[Hook] = field(default_factory=list)
    on_worker_stopped: list[Hook] = field(default_factory=list)
    on_worker_unhealthy: list[Hook] = field(default_factory=list)
    on_worker_recovered: list[Hook] = field(default_factory=list)


async def _run_hooks(hooks: list[Hook], info: WorkerInfo, what: str) -> None:
    for hook in hooks:
        try:
            await hook(info)
        except Exception:
            log.exception("%s hook failed for transceiver %08x", what, info.transceiver_id)


@dataclass
class SupervisorConfig:
    """The `transceiver run` options."""

    listen_host: str
    listen_port: int
    workers: int
    base_transceiver_id: int
    tunnel_host: str
    base_tunnel_port: int
    relays: list[tuple[str, int]]
    public_candidates: list[tuple[str, int]]
    max_calls: int
    backend: str = "echo"
    backend_options: dict[str, Any] = field(default_factory=dict)
    bearer_token: str | None = None
    drain_timeout: float = 30.0
    cors_origins: str | list[str] = "*"
    max_body: int = 64 * 1024
    log_level: int = logging.INFO
    unhealthy_after: float = UNHEALTHY_AFTER
    jitter_min_delay: float = 0.0
    jitter_max_delay: float = 0.5
    opus_bitrate: int | None = None  # None: VoiceSettings' default
    opus_complexity: int | None = None

    def validate(self) -> None:
        """Refuse a configuration no worker could run with (SupervisorError, one line)."""
        if self.workers < 1:
            raise SupervisorError("--workers must be at least 1")
        if self.unhealthy_after <= 0:
            raise SupervisorError("unhealthy_after must be positive")
        last_tid = self.base_transceiver_id + self.workers - 1
        if last_tid > 0xFFFFFFFF:
            raise SupervisorError(
                f"transceiver ids {self.base_transceiver_id:08x}..{last_tid:x} exceed ffffffff"
            )
        if self.base_tunnel_port + self.workers - 1 > 0xFFFF:
            raise SupervisorError(
                f"tunnel ports {self.base_tunnel_port}..{self.base_tunnel_port + self.workers - 1}"
                " exceed 65535"
            )

    def specs(self, socket_dir: Path) -> list[WorkerSpec]:
        """One spec per worker: ids and tunnel ports counted up from the bases."""
        self.validate()
        return [
            WorkerSpec(
                index=i,
                transceiver_id=self.base_transceiver_id + i,
                tunnel_host=self.tunnel_host,
                tunnel_port=self.base_tunnel_port + i,
                relays=list(self.relays),
                public_candidates=list(self.public_candidates),
                max_calls=self.max_calls,
                backend=self.backend,
                backend_options=dict(self.backend_options),
                socket_path=str(socket_dir / f"worker-{i}.sock"),
                log_level=self.log_level,
                jitter_min_delay=self.jitter_min_delay,
                jitter_max_delay=self.jitter_max_delay,
                opus_bitrate=self.opus_bitrate,
                opus_complexity=self.opus_complexity,
            )
            for i in range(self.workers)
        ]


# --------------------------------------------------------------------- the worker process


# Modules that register extra backends when imported (transceiver.backends.register_backend).
OPTIONAL_BACKEND_MODULES: tuple[str, ...] = ("transceiver.wsbackend", "transceiver.ws_backend")


def load_backends() -> list[str]:
    """Import the optional backend modules that exist; return the backend names known then.

    Both the front (to refuse an unavailable backend at once) and every worker
    process (whose WorkerConfig checks the name) call this.
    """
    import importlib

    from transceiver import backends

    for module in OPTIONAL_BACKEND_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return backends.backend_names()


def worker_config(spec: WorkerSpec) -> Any:
    """The Worker's own config from a spec (validates: a bad value raises ValueError)."""
    from transceiver.jitterbuffer import JitterConfig
    from transceiver.opus import voice_settings
    from transceiver.worker import WorkerConfig

    return WorkerConfig(
        transceiver_id=spec.transceiver_id,
        tunnel_host=spec.tunnel_host,
        tunnel_port=spec.tunnel_port,
        relays=list(spec.relays),
        public_candidates=list(spec.public_candidates),
        max_calls=spec.max_calls,
        backend=spec.backend,
        backend_options=dict(spec.backend_options),
        jitter=JitterConfig(min_delay=spec.jitter_min_delay, max_delay=spec.jitter_max_delay),
        voice=voice_settings(spec.opus_bitrate, spec.opus_complexity),
    )


def make_worker_api(worker: Any) -> web.Application:
    """The internal API of one worker process (see the module docstring)."""
    from transceiver import worker as worker_mod

    async def create(request: web.Request) -> web.Response:
        offer = (await request.read()).decode("utf-8", "replace")
        try:
            call_id, answer = await worker.create_call(offer)
        except worker_mod.BadOffer as exc:
            return web.json_response({"error": "bad_offer", "message": str(exc)}, status=400)
        except worker_mod.Draining as exc:
            return web.json_response({"error": "draining", "message": str(exc)}, status=503)
        except worker_mod.AtCapacity as exc:
            return web.json_response({"error": "capacity", "message": str(exc)}, status=503)
        except Exception:
            log.exception("call setup failed")
            return web.json_response(
                {"error": "internal", "message": "call setup failed in the worker"}, status=500
            )
        return web.json_response(
            {"call_id": call_id, "answer": answer, "load": worker.load}, status=201
        )

    async def delete(request: web.Request) -> web.Response:
        ok = await worker.end_call(request.match_info["call_id"])
        return web.Response(status=204 if ok else 404)

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "load": worker.load,
                "capacity": worker.config.max_calls,
                "draining": worker.draining,
                "stats": worker.stats(),
            }
        )

    # The front checks sizes before forwarding; this bound only guards the socket.
    app = web.Application(client_max_size=1 << 20)
    app.router.add_post("/calls", create)
    app.router.add_delete("/calls/{call_id}", delete)
    app.router.add_get("/stats", stats)
    return app


async def run_worker(spec: WorkerSpec, drain_timeout: float) -> int:
    """A worker process: the Worker, its internal API, and its own drain on SIGTERM.

    The process also stops when its stdin reaches EOF, which is how it learns
    that the front process died (even by SIGKILL): no orphan keeps a port.
    """
    from transceiver.worker import Worker

    loop = asyncio.get_running_loop()
    error_file = Path(spec.socket_path + ".error")
    try:
        load_backends()
        worker = Worker(worker_config(spec))
        await worker.start()
    except (ValueError, OSError, RuntimeError) as exc:
        what = "cannot bind the tunnel socket: " if isinstance(exc, OSError) else ""
        error_file.write_text(what + _one_line(exc))
        return 2
    app = make_worker_api(worker)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(spec.socket_path)
    site = web.UnixSite(runner, spec.socket_path)
    await site.start()
    os.chmod(spec.socket_path, 0o600)

    stop = asyncio.Event()
    stops = 0
    background: set[asyncio.Task[None]] = set()

    def on_signal() -> None:
        nonlocal stops
        stops += 1
        stop.set()
        if stops > 1:
            # A second signal: end every call now.
            task = loop.create_task(worker.stop(0))
            background.add(task)
            task.add_done_callback(background.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    if not sys.stdin.closed:
        with contextlib.suppress(OSError, ValueError):
            loop.add_reader(sys.stdin.fileno(), _watch_parent, sys.stdin.fileno(), on_signal)
    await stop.wait()
    log.info("transceiver %08x draining (up to %gs)", spec.transceiver_id, drain_timeout)
    await worker.stop(drain_timeout)
    log.info("transceiver %08x stopped", spec.transceiver_id)
    await runner.cleanup()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(spec.socket_path)
    return 0


def _watch_parent(fd: int, on_gone: Callable[[], None]) -> None:
    """stdin readable: data (ignored) or EOF, which means the front process is gone."""
    try:
        data = os.read(fd, 4096)
    except OSError:
        data = b""
    if not data:
        asyncio.get_running_loop().remove_reader(fd)
        log.warning("the front process is gone: draining")
        on_gone()


def _one_line(exc: BaseException) -> str:
    """`Address already in use`, not `[Errno 98] ...` or asyncio's multi-part wording."""
    if isinstance(exc, OSError) and exc.errno and exc.errno > 0:
        return os.strerror(exc.errno)
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def worker_main(argv: list[str] | None = None) -> int:
    """Entry point of a worker process (`python -m transceiver.supervisor --worker SPEC`)."""
    parser = argparse.ArgumentParser(prog="transceiver-worker")
    parser.add_argument("--worker", required=True, help="worker spec (JSON)")
    parser.add_argument("--drain-timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    spec = WorkerSpec.from_json(args.worker)
    logging.basicConfig(
        level=spec.log_level,
        format=f"%(asctime)s worker {spec.transceiver_id:08x} %(levelname)s %(name)s: %(message)s",
    )
    return asyncio.run(run_worker(spec, args.drain_timeout))


# --------------------------------------------------------------------- the front: ProcessPool


@dataclass
class WorkerHandle:
    """The front's view of one worker process."""

    spec: WorkerSpec
    process: asyncio.subprocess.Process | None = None
    http: aiohttp.ClientSession | None = None
    alive: bool = False
    load: int = 0
    pending: int = 0
    started_at: float = 0.0
    restarts: int = 0
    announced: bool = False  # the started hooks ran, the stopped hooks not yet
    healthy: bool = True  # False once the unhealthy hooks ran, until it answers again
    last_ok: float = 0.0  # time.monotonic() of its last answer to /stats
    last_stats: dict[str, Any] = field(default_factory=dict)

    @property
    def tid(self) -> int:
        return self.spec.transceiver_id

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            index=self.spec.index,
            transceiver_id=self.tid,
            tunnel_host=self.spec.tunnel_host,
            tunnel_port=self.spec.tunnel_port,
            pid=None if self.process is None else self.process.pid,
        )

    def open_http(self) -> aiohttp.ClientSession:
        if self.http is None or self.http.closed:
            self.http = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.spec.socket_path),
                timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT),
            )
        return self.http

    async def close_http(self) -> None:
        if self.http is not None:
            await self.http.close()
            self.http = None


class ProcessPool:
    """The WorkerPool over worker processes, talking to each over its unix socket.

    Loads are known without asking: each create response carries the worker's
    load, `pending` counts calls being set up, and a poll every second catches
    calls that ended on their own.
    """

    def __init__(self, handles: list[WorkerHandle]) -> None:
        self.handles = handles
        self._by_tid = {h.tid: h for h in handles}
        self._draining = False
        self._next = 0

    @property
    def draining(self) -> bool:
        return self._draining

    def start_draining(self) -> None:
        self._draining = True

    def _loads(self) -> list[tuple[int, int]]:
        return [(h.load + h.pending, h.spec.max_calls if h.alive else 0) for h in self.handles]

    def at_capacity(self) -> bool:
        return pick_least_loaded(self._loads()) is None

    async def create_call(self, offer_sdp: str) -> tuple[str, str]:
        if self._draining:
            raise Unavailable("draining", "this transceiver is draining")
        tried: set[int] = set()
        while True:
            loads = self._loads()
            for i in tried:
                loads[i] = (0, 0)
            index = pick_least_loaded(loads, self._next)
            if index is None:
                raise Unavailable("capacity", "every worker is at capacity")
            self._next = (index + 1) % len(self.handles)
            handle = self.handles[index]
            try:
                return await self._create_on(handle, offer_sdp)
            except _WorkerUnreachable:
                tried.add(index)  # try the next worker; the monitor restarts this one

    async def _create_on(self, handle: WorkerHandle, offer_sdp: str) -> tuple[str, str]:
        handle.pending += 1
        try:
            http = handle.open_http()
            async with http.post("http://worker/calls", data=offer_sdp.encode()) as resp:
                body = await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientConnectionError, ValueError) as exc:
            log.warning("worker %08x unreachable: %s", handle.tid, exc)
            handle.alive = False
            raise _WorkerUnreachable from exc
        finally:
            handle.pending -= 1
        if resp.status == 201:
            handle.load = int(body.get("load", handle.load + 1))
            return make_call_id(handle.tid, body["call_id"]), body["answer"]
        message = str(body.get("message", "")) if isinstance(body, dict) else ""
        error = body.get("error") if isinstance(body, dict) else None
        if resp.status == 400:
            raise BadOffer(message or "the offer was rejected")
        if resp.status == 503:
            if error == "capacity":
                handle.load = max(handle.load, handle.spec.max_calls)
            reason = "draining" if error == "draining" else "capacity"
            raise Unavailable(reason, message or "the worker is not taking calls")
        raise PoolError(message or f"worker answered {resp.status}")

    async def end_call(self, call_id: str) -> bool:
        parts = split_call_id(call_id)
        if parts is None:
            return False
        handle = self._by_tid.get(parts[0])
        if handle is None or not handle.alive:
            return False
        try:
            http = handle.open_http()
            async with http.delete(f"http://worker/calls/{parts[1]}") as resp:
                ended = resp.status == 204
        except (TimeoutError, aiohttp.ClientConnectionError):
            return False
        if ended:
            handle.load = max(0, handle.load - 1)
        return ended

    async def refresh(self, handle: WorkerHandle) -> None:
        """Ask one worker for its stats; its load and snapshot follow."""
        if handle.process is None or handle.process.returncode is not None:
            handle.alive = False
            return
        try:
            http = handle.open_http()
            async with http.get(
                "http://worker/stats", timeout=aiohttp.ClientTimeout(total=STATS_TIMEOUT)
            ) as resp:
                body = await resp.json()
        except (TimeoutError, aiohttp.ClientError, ValueError):
            handle.alive = False
            return
        handle.alive = True
        handle.last_ok = time.monotonic()
        handle.load = int(body.get("load", 0))
        handle.last_stats = dict(body.get("stats", {}))

    async def refresh_all(self) -> None:
        await asyncio.gather(*(self.refresh(h) for h in self.handles))

    async def stats(self) -> PoolStats:
        await self.refresh_all()
        return PoolStats(
            [
                WorkerSnapshot(
                    tid=h.tid,
                    calls=h.load if h.alive else 0,
                    capacity=h.spec.max_calls,
                    alive=h.alive,
                    draining=self._draining,
                    stats=h.last_stats if h.alive else {},
                )
                for h in self.handles
            ],
            self._draining,
        )


class _WorkerUnreachable(Exception):
    pass


# --------------------------------------------------------------------- the front: Supervisor


class Supervisor:
    """Starts the workers and the signaling site, restarts crashed workers, drains on signal."""

    def __init__(self, config: SupervisorConfig, hooks: SupervisorHooks | None = None) -> None:
        self.config = config
        self.hooks = hooks or SupervisorHooks()
        config.validate()
        self._socket_dir = Path(tempfile.mkdtemp(prefix="splitrelay-transceiver-"))
        os.chmod(self._socket_dir, 0o700)
        self.handles = [WorkerHandle(spec) for spec in config.specs(self._socket_dir)]
        self.pool = ProcessPool(self.handles)
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._monitors: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._signals = 0
        self.listen_address: tuple[str, int] | None = None

    # -- processes

    async def _spawn(self, handle: WorkerHandle) -> None:
        """Start one worker process and wait until its API answers."""
        spec = handle.spec
        error_file = Path(spec.socket_path + ".error")
        with contextlib.suppress(FileNotFoundError):
            error_file.unlink()
        handle.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "transceiver.supervisor",
            "--worker",
            spec.to_json(),
            "--drain-timeout",
            str(self.config.drain_timeout),
            stdin=asyncio.subprocess.PIPE,
        )
        handle.started_at = time.monotonic()
        deadline = handle.started_at + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if handle.process.returncode is not None:
                break
            if os.path.exists(spec.socket_path):
                await self.pool.refresh(handle)
                if handle.alive:
                    log.info(
                        "worker %d: transceiver %08x, tunnel %s:%d, pid %d",
                        spec.index,
                        spec.transceiver_id,
                        spec.tunnel_host,
                        spec.tunnel_port,
                        handle.process.pid,
                    )
                    handle.announced = True
                    handle.healthy = True
                    await _run_hooks(self.hooks.on_worker_started, handle.info(), "started")
                    return
            await asyncio.sleep(0.05)
        reason = "did not start in time"
        if handle.process.returncode is not None:
            reason = f"exited with status {handle.process.returncode}"
        else:
            handle.process.kill()
            await handle.process.wait()
        with contextlib.suppress(OSError):
            reason = error_file.read_text().strip() or reason
        raise SupervisorError(
            f"worker {spec.index} (transceiver {spec.transceiver_id:08x}, "
            f"tunnel {spec.tunnel_host}:{spec.tunnel_port}): {reason}"
        )

    async def _monitor(self, handle: WorkerHandle) -> None:
        """Restart a worker that dies outside a drain, with backoff."""
        backoff = 0
        while True:
            assert handle.process is not None
            code = await handle.process.wait()
            handle.alive = False
            handle.load = 0
            await handle.close_http()
            await self._stopped(handle)
            if self.pool.draining:
                return
            if time.monotonic() - handle.started_at > STABLE_AFTER:
                backoff = 0
            log.error(
                "worker %d (transceiver %08x) exited with status %s",
                handle.spec.index,
                handle.tid,
                code,
            )
            while True:
                delay = RESTART_BACKOFF[min(backoff, len(RESTART_BACKOFF) - 1)]
                backoff += 1
                log.info("restarting worker %d in %gs", handle.spec.index, delay)
                await asyncio.sleep(delay)
                if self.pool.draining:
                    return
                try:
                    await self._spawn(handle)
                except SupervisorError as exc:
                    log.error("restart failed: %s", exc)
                    continue
                handle.restarts += 1
                break

    async def _stopped(self, handle: WorkerHandle) -> None:
        if handle.announced:
            handle.announced = False
            await _run_hooks(self.hooks.on_worker_stopped, handle.info(), "stopped")

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            await self.pool.refresh_all()
            await self.check_health()

    async def check_health(self) -> None:
        """Run the unhealthy / recovered hooks of workers whose health changed.

        Unhealthy: the process runs (a dead one is the monitor's business), its
        last /stats request failed, and its last answer is `unhealthy_after`
        seconds old. Recovered: it answered since. Skipped while draining: the
        draining hooks already took every worker out of the registry's
        rotation, and that must not be undone.
        """
        now = time.monotonic()
        for handle in self.handles:
            process = handle.process
            if self.pool.draining:
                return
            if not handle.announced or process is None or process.returncode is not None:
                continue
            silent = now - handle.last_ok
            if handle.healthy and not handle.alive and silent >= self.config.unhealthy_after:
                handle.healthy = False
                log.warning(
                    "worker %d (transceiver %08x, pid %d) has not answered for %.1fs: "
                    "no new calls until it does",
                    handle.spec.index,
                    handle.tid,
                    process.pid,
                    silent,
                )
                await _run_hooks(self.hooks.on_worker_unhealthy, handle.info(), "unhealthy")
            elif not handle.healthy and handle.alive and silent < self.config.unhealthy_after:
                handle.healthy = True
                log.info(
                    "worker %d (transceiver %08x) answers again", handle.spec.index, handle.tid
                )
                await _run_hooks(self.hooks.on_worker_recovered, handle.info(), "recovered")

    # -- lifecycle

    async def start(self) -> None:
        """Start every worker (in parallel), then the signaling site."""
        from transceiver.signaling import make_app

        try:
            await asyncio.gather(*(self._spawn(h) for h in self.handles))
        except BaseException:
            await self._kill_all()
            raise
        self._monitors = [asyncio.create_task(self._monitor(h)) for h in self.handles]
        self._tasks.extend(self._monitors)
        self._tasks.append(asyncio.create_task(self._poll()))
        app = make_app(
            self.pool,
            bearer_token=self.config.bearer_token,
            max_body=self.config.max_body,
            cors_origins=self.config.cors_origins,
        )
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.listen_host, self.config.listen_port)
        try:
            await site.start()
        except OSError as exc:
            await self._kill_all()
            raise SupervisorError(
                f"cannot listen on {self.config.listen_host}:{self.config.listen_port}: "
                f"{_one_line(exc)}"
            ) from None
        if self._runner.addresses:
            host, port = self._runner.addresses[0][:2]
            self.listen_address = (str(host), int(port))
        log.info(
            "signaling on http://%s:%d (%d workers, %d calls each)",
            self.config.listen_host,
            self.listen_address[1] if self.listen_address else self.config.listen_port,
            len(self.handles),
            self.config.max_calls,
        )

    def request_stop(self) -> None:
        """Signal handler: the first call drains, a second one ends calls at once."""
        self._signals += 1
        if self._signals == 1:
            log.info("draining: no new calls, live calls get %gs", self.config.drain_timeout)
        else:
            log.info("second signal: ending every call now")
        self._stopping.set()
        if self._signals > 1:
            for handle in self.handles:
                _signal(handle, signal.SIGTERM)

    async def run(self) -> None:
        """Start, serve until a signal, drain, stop."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
            await self._stopping.wait()
            await self.drain()
        finally:
            await self.close()

    async def drain(self) -> None:
        """Refuse new calls, let workers finish theirs (up to the deadline), wait for them."""
        self.pool.start_draining()
        for handle in self.handles:
            await _run_hooks(self.hooks.on_worker_draining, handle.info(), "draining")
            _signal(handle, signal.SIGTERM)
        deadline = self.config.drain_timeout + KILL_GRACE
        waits = [h.process.wait() for h in self.handles if h.process is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), deadline)
        except TimeoutError:
            log.error("workers did not exit %gs after the drain deadline: killing", KILL_GRACE)
            await self._kill_all()
        # The monitors see the exits and run the stopped hooks, then return.
        if self._monitors:
            await asyncio.wait(self._monitors, timeout=5.0)
        log.info("drained: every worker has stopped")

    async def _kill_all(self) -> None:
        for handle in self.handles:
            if handle.process is not None and handle.process.returncode is None:
                handle.process.kill()
                await handle.process.wait()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._runner is not None:
            await self._runner.cleanup()
        await self._kill_all()
        for handle in self.handles:
            await handle.close_http()
            await self._stopped(handle)  # workers killed without a monitor watching
        shutil.rmtree(self._socket_dir, ignore_errors=True)


def _signal(handle: WorkerHandle, sig: int) -> None:
    process = handle.process
    if process is not None and process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)


if __name__ == "__main__":
    sys.exit(worker_main())
