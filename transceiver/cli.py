"""The `transceiver` command: `run` (signaling + workers) and `call URL` (a voice client).

Every option of `run` can also come from the environment
(SPLITRELAY_TRANSCEIVER_<OPTION>, shown in --help), which is how the systemd
units and containers configure it. Errors are one line on stderr and a
non-zero exit, never a traceback: operators read these in journals and CI logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

import click
from yarl import URL

from ctl.cliutil import ENDPOINT, TRANSCEIVER_ID, Endpoint

if TYPE_CHECKING:
    from transceiver.jitterbuffer import JitterConfig
    from transceiver.registry import Registration
    from transceiver.supervisor import SupervisorHooks, WorkerInfo

PROG = "transceiver"
ERROR_PREFIX = f"{PROG}: error: "
ENV = "SPLITRELAY_TRANSCEIVER_"
DEFAULT_LISTEN = "0.0.0.0:8080"
DEFAULT_TUNNEL_PORT = 3480
DEFAULT_MAX_CALLS = 50
BACKENDS = ("echo", "ws")
WS_SAMPLE_RATES = ("8000", "16000", "24000", "48000")
DEFAULT_REDIS_PREFIX = "splitrelay:"
#: How long a registry hook may hold up a worker's start or drain: Redis is never on
#: the call path, so a slow or dead Redis only delays its own record, in the background.
REGISTRY_HOOK_WAIT = 1.0
REGISTRY_STOP_WAIT = 2.0
QUIET_LOGGERS = ("aiortc", "aioice", "aiohttp.access", "aiohttp.server", "asyncio")


class CliError(click.ClickException):
    """A failure the operator can act on: one stderr line, exit code `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _fail(message: str, code: int = 1) -> NoReturn:
    raise CliError(message, code)


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[0] if lines else ""


class TransceiverGroup(click.Group):
    """The root group: every failure becomes `transceiver: error: ...` on one stderr line.

    In main() rather than a wrapper so the console script, `python -m` and
    click's CliRunner behave the same. Exit codes: 2 usage, 130 interrupted,
    1 anything else. --debug adds the traceback of an unexpected error.
    """

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in argv[:1]
        try:
            rv = super().main(argv, prog_name, complete_var, False, windows_expand_args, **extra)
            code = rv if isinstance(rv, int) else 0
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx else PROG
            _print_error(f"{_one_line(exc.format_message())} (see '{where} --help')")
            code = exc.exit_code
        except click.ClickException as exc:
            _print_error(_one_line(exc.format_message()))
            code = exc.exit_code
        except (click.Abort, KeyboardInterrupt):
            _print_error("interrupted")
            code = 130
        except Exception as exc:
            if debug:
                traceback.print_exc()
            _print_error(
                f"unexpected {type(exc).__name__}: {_one_line(str(exc))} (rerun with --debug)"
            )
            code = 1
        if standalone_mode:
            sys.exit(code)
        return code


def _print_error(message: str) -> None:
    click.echo(ERROR_PREFIX + message, err=True)


def default_workers() -> int:
    """One worker per core this process may run on (respects cpusets and affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class ListenType(click.ParamType):
    """HOST:PORT for the signaling listener; HOST may be a name, [v6], or empty (all)."""

    name = "HOST:PORT"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        text = str(value).strip()
        if text.startswith("["):
            host, sep, port = text[1:].partition("]:")
        else:
            host, sep, port = text.rpartition(":")
            if ":" in host:
                self.fail(f"{text!r}: an IPv6 address needs brackets, [v6]:port", param, ctx)
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            self.fail(f"{text!r} is not HOST:PORT with a port in 0..65535", param, ctx)
        return (host or "0.0.0.0", int(port))


class HostType(click.ParamType):
    """An IP address (the tunnel socket is bound to it and relays send to it)."""

    name = "ADDR"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return str(ipaddress.ip_address(str(value).strip().strip("[]")))
        except ValueError:
            self.fail(f"{value!r} is not an IP address", param, ctx)


class HttpUrlType(click.ParamType):
    """An http(s) URL with a host."""

    name = "URL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            url = URL(str(value))
        except ValueError:
            self.fail(f"{value!r} is not a URL", param, ctx)
        if url.scheme not in ("http", "https") or not url.host:
            self.fail(f"{value!r} is not an http:// or https:// URL", param, ctx)
        return str(url)


class WsUrlType(click.ParamType):
    name = "URL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            url = URL(str(value))
        except ValueError:
            self.fail(f"{value!r} is not a URL", param, ctx)
        if url.scheme not in ("ws", "wss") or not url.host:
            self.fail(f"{value!r} is not a ws:// or wss:// URL", param, ctx)
        return str(url)


class RedisUrlType(click.ParamType):
    """redis://host:port/db, rediss:// (TLS) or unix:///path (the shared registry)."""

    name = "URL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from ctl.redisstate import connect, redact

        text = str(value).strip()
        shown = redact(text)
        try:
            parts = urlsplit(text)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            self.fail(f"{shown!r} is not a URL", param, ctx)
        if parts.scheme not in ("redis", "rediss", "unix"):
            self.fail(f"{shown!r} is not a redis://, rediss:// or unix:// URL", param, ctx)
        if parts.scheme == "unix" and not parts.path:
            self.fail(f"{shown!r} names no socket path", param, ctx)
        if parts.scheme != "unix" and not parts.hostname:
            self.fail(f"{shown!r} names no host", param, ctx)
        try:
            connect(text)  # builds the client only (no I/O): catches what redis-py refuses
        except ValueError as exc:
            self.fail(_one_line(str(exc)), param, ctx)
        return text


LISTEN = ListenType()
HOST = HostType()
HTTP_URL = HttpUrlType()
WS_URL = WsUrlType()
REDIS_URL = RedisUrlType()


@click.group(
    cls=TransceiverGroup,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
)
@click.option("--debug", is_flag=True, help="Show a traceback on unexpected errors.")
def transceiver(debug: bool) -> None:
    """splitrelay transceiver: WebRTC sessions for voice AI behind the split relay."""


def main() -> None:
    """Console-script entry point (`transceiver`)."""
    transceiver.main(prog_name=PROG)


# --------------------------------------------------------------------- jitter buffer

#: The receive buffer's bounds, in milliseconds (transceiver/jitterbuffer.py's JitterConfig).
JITTER_MS = click.FloatRange(0, 5000)


def jitter_options(env: bool) -> Callable[[Any], Any]:
    """--jitter-min-ms / --jitter-max-ms, with SPLITRELAY_TRANSCEIVER_* variables when `env`."""

    def decorate(func: Any) -> Any:
        for name, default, text in reversed(
            (
                ("min", 0.0, "Floor of the adaptive jitter buffer's target delay, ms."),
                ("max", 500.0, "Ceiling of the adaptive jitter buffer's delay, ms."),
            )
        ):
            extra: dict[str, Any] = {}
            if env:
                extra = {"envvar": f"{ENV}JITTER_{name.upper()}_MS", "show_envvar": True}
            func = click.option(
                f"--jitter-{name}-ms",
                f"jitter_{name}_ms",
                type=JITTER_MS,
                default=default,
                show_default=True,
                help=text,
                **extra,
            )(func)
        return func

    return decorate


def jitter_config(min_ms: float, max_ms: float) -> JitterConfig:
    """The JitterConfig for the two options; a floor above the ceiling is a usage error."""
    from transceiver.jitterbuffer import JitterConfig

    if min_ms > max_ms:
        raise click.UsageError(f"--jitter-min-ms {min_ms:g} is above --jitter-max-ms {max_ms:g}")
    return JitterConfig(min_delay=min_ms / 1000, max_delay=max_ms / 1000)


# --------------------------------------------------------------------- run


@transceiver.command()
@click.option(
    "--listen",
    type=LISTEN,
    default=DEFAULT_LISTEN,
    envvar=ENV + "LISTEN",
    show_envvar=True,
    help="Signaling HTTP address (calls, /healthz, /metrics).",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    default=default_workers,
    envvar=ENV + "WORKERS",
    show_envvar=True,
    show_default="one per core",
    help="Worker processes; worker i gets transceiver id BASE+i and tunnel port BASE+i.",
)
@click.option(
    "--transceiver-id",
    "transceiver_id",
    type=TRANSCEIVER_ID,
    required=True,
    envvar=ENV + "ID",
    show_envvar=True,
    help="Base transceiver id, hex (e.g. a001); unique across the fleet.",
)
@click.option(
    "--tunnel",
    type=HOST,
    required=True,
    envvar=ENV + "TUNNEL",
    show_envvar=True,
    help="Tunnel address the relays send to (this host's inside address).",
)
@click.option(
    "--tunnel-port",
    type=click.IntRange(1, 65535),
    default=DEFAULT_TUNNEL_PORT,
    envvar=ENV + "TUNNEL_PORT",
    show_envvar=True,
    help="Base tunnel UDP port.",
)
@click.option(
    "--relay",
    "relays",
    type=ENDPOINT,
    multiple=True,
    required=True,
    envvar=ENV + "RELAY",
    show_envvar=True,
    help="Relay tunnel endpoint ADDR:PORT whose packets are accepted (repeat).",
)
@click.option(
    "--public",
    "public",
    type=ENDPOINT,
    multiple=True,
    required=True,
    envvar=ENV + "PUBLIC",
    show_envvar=True,
    help="Relay public ADDR:PORT advertised as the only candidate (repeat; one per family).",
)
@click.option(
    "--max-calls",
    type=click.IntRange(1, 100000),
    default=DEFAULT_MAX_CALLS,
    envvar=ENV + "MAX_CALLS",
    show_envvar=True,
    help="Calls per worker.",
)
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="echo",
    envvar=ENV + "BACKEND",
    show_envvar=True,
    help="Media/event backend.",
)
@click.option(
    "--ws-url",
    type=WS_URL,
    default=None,
    envvar=ENV + "WS_URL",
    show_envvar=True,
    help="Backend WebSocket URL (with --backend ws). A bearer token for the service, if "
    "any, comes from SPLITRELAY_TRANSCEIVER_WS_TOKEN (never a command line).",
)
@click.option(
    "--ws-sample-rate",
    type=click.Choice(WS_SAMPLE_RATES),
    default=None,
    envvar=ENV + "WS_SAMPLE_RATE",
    show_envvar=True,
    show_default="48000",
    help="PCM sample rate on the backend WebSocket (announced in session.start).",
)
@click.option(
    "--ws-channels",
    type=click.Choice(("1", "2")),
    default=None,
    envvar=ENV + "WS_CHANNELS",
    show_envvar=True,
    show_default="1",
    help="PCM channels on the backend WebSocket.",
)
@click.option(
    "--redis-url",
    type=REDIS_URL,
    default=None,
    envvar=ENV + "REDIS_URL",
    show_envvar=True,
    help="Register every worker in the shared registry (redis://, rediss://, unix://; "
    "password from the URL or REDIS_PASSWORD).",
)
@click.option(
    "--redis-prefix",
    default=DEFAULT_REDIS_PREFIX,
    envvar=ENV + "REDIS_PREFIX",
    show_envvar=True,
    help="Prefix of the Redis keys (as the relays use).",
)
@click.option(
    "--redis-heartbeat-ttl",
    type=click.IntRange(1, 3600),
    default=None,
    envvar=ENV + "REDIS_HEARTBEAT_TTL",
    hidden=True,
    help="Seconds a worker's record outlives its last heartbeat (tests shorten it).",
)
@click.option(
    "--token",
    default=None,
    envvar=ENV + "TOKEN",
    show_envvar=True,
    help="Bearer token required on call requests (none: open).",
)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(0, 86400),
    default=30.0,
    envvar=ENV + "DRAIN_TIMEOUT",
    show_envvar=True,
    help="On SIGTERM, seconds live calls may continue before they are ended.",
)
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    envvar=ENV + "CORS_ORIGIN",
    show_envvar=True,
    help="Origin allowed to call from a browser (repeat)  [default: any]",
)
@jitter_options(env=True)
@click.option(
    "--opus-bitrate",
    type=click.IntRange(6000, 510000),
    default=None,
    envvar=ENV + "OPUS_BITRATE",
    show_envvar=True,
    show_default="40000",
    help="Bit rate of the audio sent to callers (in-band FEC needs about 40 kbit/s).",
)
@click.option(
    "--opus-complexity",
    type=click.IntRange(0, 10),
    default=None,
    envvar=ENV + "OPUS_COMPLEXITY",
    show_envvar=True,
    show_default="5",
    help="Opus encoder complexity: quality against CPU per call (docs/audio.md).",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def run(
    listen: tuple[str, int],
    workers: int,
    transceiver_id: int,
    tunnel: str,
    tunnel_port: int,
    relays: tuple[Endpoint, ...],
    public: tuple[Endpoint, ...],
    max_calls: int,
    backend: str,
    ws_url: str | None,
    ws_sample_rate: str | None,
    ws_channels: str | None,
    redis_url: str | None,
    redis_prefix: str,
    redis_heartbeat_ttl: int | None,
    token: str | None,
    drain_timeout: float,
    cors_origins: tuple[str, ...],
    jitter_min_ms: float,
    jitter_max_ms: float,
    opus_bitrate: int | None,
    opus_complexity: int | None,
    verbose: bool,
) -> None:
    """Serve signaling and run the worker processes until SIGTERM, then drain."""
    from transceiver.supervisor import Supervisor, SupervisorConfig, SupervisorError

    if backend == "ws" and not ws_url:
        raise click.UsageError("--backend ws needs --ws-url")
    if backend != "ws":
        for name, value in (
            ("--ws-url", ws_url),
            ("--ws-sample-rate", ws_sample_rate),
            ("--ws-channels", ws_channels),
        ):
            if value:
                raise click.UsageError(f"{name} is only used with --backend ws")
    if redis_url and ipaddress.ip_address(tunnel).is_unspecified:
        raise click.UsageError(
            f"--tunnel {tunnel} cannot be registered in Redis: relays need the address they send to"
        )
    if tunnel_port + workers - 1 > 65535:
        raise click.UsageError(f"--tunnel-port {tunnel_port} + {workers} workers exceeds 65535")
    if transceiver_id + workers - 1 > 0xFFFFFFFF:
        raise click.UsageError(f"--transceiver-id {transceiver_id:x} + {workers} workers overflows")
    families = [e.addr.version for e in public]
    if len(set(families)) != len(families):
        raise click.UsageError("--public takes at most one address per IP family")
    _check_backend(backend)
    jitter = jitter_config(jitter_min_ms, jitter_max_ms)
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = SupervisorConfig(
        listen_host=listen[0],
        listen_port=listen[1],
        workers=workers,
        base_transceiver_id=transceiver_id,
        tunnel_host=tunnel,
        base_tunnel_port=tunnel_port,
        relays=[(str(e.addr), e.port) for e in relays],
        public_candidates=[(str(e.addr), e.port) for e in public],
        max_calls=max_calls,
        backend=backend,
        backend_options=_backend_options(ws_url, ws_sample_rate, ws_channels),
        bearer_token=token or None,
        drain_timeout=drain_timeout,
        cors_origins=list(cors_origins) if cors_origins else "*",
        log_level=level,
        jitter_min_delay=jitter.min_delay,
        jitter_max_delay=jitter.max_delay,
        opus_bitrate=opus_bitrate,
        opus_complexity=opus_complexity,
    )
    hooks = None
    if redis_url:
        hooks = WorkerRegistry(redis_url, redis_prefix, redis_heartbeat_ttl).hooks()
    try:
        supervisor = Supervisor(config, hooks)
        asyncio.run(supervisor.run())
    except SupervisorError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(exc.strerror or str(exc))


def _backend_options(
    ws_url: str | None, sample_rate: str | None, channels: str | None
) -> dict[str, Any]:
    """WorkerConfig.backend_options: the keyword arguments of the ws backend (none for echo).

    No secret goes in here: the options travel to the workers on their command
    line, so the service token is read from the environment by the backend.
    """
    if not ws_url:
        return {}
    options: dict[str, Any] = {"url": ws_url}
    if sample_rate:
        options["sample_rate"] = int(sample_rate)
    if channels:
        options["channels"] = int(channels)
    return options


@dataclass
class _Registered:
    """One worker's Registration and the registry operations still running for it."""

    registration: Registration
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    draining: bool = False  # the transceiver drains: for good, whatever the worker's health
    unhealthy: bool = False  # draining in the registry because the worker stopped answering

    async def run(self, operation: Coroutine[Any, Any, None], wait: float) -> None:
        """Start an operation and wait for it at most `wait` seconds; it goes on regardless."""
        task = asyncio.create_task(operation)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), wait)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logging.getLogger("splitrelay.transceiver.registry").error(
                "registry update for transceiver %08x failed",
                self.registration.tid,
                exc_info=task.exception(),
            )

    async def stop(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.registration.stop(), REGISTRY_STOP_WAIT)


class WorkerRegistry:
    """Keeps each worker's record in the Redis registry in step with its process.

    It runs in the front process, through the supervisor's hooks: started ->
    register (tunnel address = --tunnel and the worker's own port, the
    address relays send to) and heartbeat; draining -> status draining;
    stopped (also a crash, before the restart registers again) -> remove;
    unhealthy (the process runs but has not answered the front for a few
    seconds: hung, SIGSTOPped) -> status draining, so relays send it no new
    sessions while its live ones keep their path in case it comes back;
    recovered -> active again (unless the transceiver itself is draining).
    If the front dies, even by SIGKILL, the heartbeats stop and the records
    expire within the TTL, while the workers drain on their own. Redis being
    slow or down delays a worker's start or drain by at most
    REGISTRY_HOOK_WAIT: Registration logs the outage once and keeps retrying,
    and calls never depend on it.
    """

    def __init__(self, url: str, prefix: str, ttl: int | None = None) -> None:
        from ctl.redisstate import HEARTBEAT_INTERVAL, HEARTBEAT_TTL

        self.url = url
        self.prefix = prefix
        self.ttl = ttl or HEARTBEAT_TTL
        # At least three beats per TTL, so one slow beat never lets a live record lapse.
        self.interval = min(HEARTBEAT_INTERVAL, self.ttl / 3)
        self._workers: dict[int, _Registered] = {}

    def hooks(self) -> SupervisorHooks:
        from ctl.redisstate import redact
        from transceiver.supervisor import SupervisorHooks

        logging.getLogger("splitrelay.transceiver.registry").info(
            "registering workers in Redis %s (prefix %r, heartbeat TTL %d s)",
            redact(self.url),
            self.prefix,
            self.ttl,
        )
        return SupervisorHooks(
            on_worker_started=[self.started],
            on_worker_draining=[self.draining],
            on_worker_stopped=[self.stopped],
            on_worker_unhealthy=[self.unhealthy],
            on_worker_recovered=[self.recovered],
        )

    async def started(self, info: WorkerInfo) -> None:
        from transceiver.registry import Registration

        await self.stopped(info)  # a record left from before a restart
        registration = Registration(
            self.url,
            info.transceiver_id,
            info.tunnel_host,
            info.tunnel_port,
            prefix=self.prefix,
            interval=self.interval,
            ttl=self.ttl,
        )
        entry = _Registered(registration)
        self._workers[info.transceiver_id] = entry
        await entry.run(registration.start(), REGISTRY_HOOK_WAIT)

    async def draining(self, info: WorkerInfo) -> None:
        entry = self._workers.get(info.transceiver_id)
        if entry is not None:
            entry.draining = True
            await entry.run(entry.registration.drain(), REGISTRY_HOOK_WAIT)

    async def unhealthy(self, info: WorkerInfo) -> None:
        """The worker stopped answering: no new sessions for it (its record says draining)."""
        entry = self._workers.get(info.transceiver_id)
        if entry is None or entry.draining or entry.unhealthy:
            return
        entry.unhealthy = True
        await entry.run(entry.registration.drain(), REGISTRY_HOOK_WAIT)

    async def recovered(self, info: WorkerInfo) -> None:
        """The worker answers again: active, unless the whole transceiver drains meanwhile."""
        entry = self._workers.get(info.transceiver_id)
        if entry is None or not entry.unhealthy:
            return
        entry.unhealthy = False

        async def reactivate() -> None:
            if not (entry.draining or entry.unhealthy):  # either may change before this runs
                await entry.registration.activate()

        await entry.run(reactivate(), REGISTRY_HOOK_WAIT)

    async def stopped(self, info: WorkerInfo) -> None:
        entry = self._workers.pop(info.transceiver_id, None)
        if entry is not None:
            await entry.stop()


def _check_backend(backend: str) -> None:
    """Fail at startup, in one line, when a backend is not available in this build."""
    from transceiver.supervisor import load_backends

    known = load_backends()
    if backend not in known:
        _fail(f"backend {backend!r} is not available (have: {', '.join(known)})")


# --------------------------------------------------------------------- call


@transceiver.command()
@click.argument("url", type=HTTP_URL)
@click.option("--token", default=None, envvar=ENV + "TOKEN", help="Bearer token.")
@click.option("--calls", type=click.IntRange(1, 1000), default=1, help="Concurrent calls to place.")
@click.option(
    "--duration",
    type=click.FloatRange(0.5, 3600),
    default=5.0,
    help="Seconds of audio per call, once connected.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0.1, 600),
    default=15.0,
    help="Seconds allowed for signaling plus ICE/DTLS setup.",
)
@click.option(
    "--stagger",
    type=click.FloatRange(0, 60),
    default=0.02,
    help="Seconds between the starts of concurrent calls.",
)
@click.option(
    "--realtime",
    is_flag=True,
    help="POST multipart/form-data to /v1/realtime/calls, as OpenAI's Realtime API does.",
)
@click.option(
    "--expect-echo/--no-expect-echo",
    default=True,
    help="Fail a call whose audio and events do not come back (the echo backend returns them).",
)
@jitter_options(env=False)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging (aiortc, aioice).")
def call(
    url: str,
    token: str | None,
    calls: int,
    duration: float,
    timeout: float,
    stagger: float,
    realtime: bool,
    expect_echo: bool,
    jitter_min_ms: float,
    jitter_max_ms: float,
    as_json: bool,
    verbose: bool,
) -> None:
    """Place voice call(s) to URL (a signaling endpoint or base URL) and measure latency.

    URL is the WHIP endpoint (e.g. http://10.0.0.1:8080/v1/calls) or just the
    server (http://10.0.0.1:8080, meaning /v1/calls, or /v1/realtime/calls with
    --realtime). Prints setup time and audio/event round-trip percentiles; exits
    non-zero if any call failed.
    """
    from transceiver.client import (
        CallOptions,
        failure_line,
        place_calls,
        render_summary,
        summarize,
    )

    jitter = jitter_config(jitter_min_ms, jitter_max_ms)
    _quiet_logging(verbose)
    options = CallOptions(
        url=url,
        token=token or None,
        duration=duration,
        timeout=timeout,
        realtime=realtime,
        require_echo=expect_echo,
        jitter=jitter,
    )
    results = asyncio.run(_quietly(place_calls(options, calls, stagger)))
    summary = summarize(results)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    elif summary["setup_seconds"]["count"]:
        click.echo(render_summary(summary))  # nothing to show when no call connected
    problem = failure_line(summary)
    if problem:
        _fail(problem)


def _quiet_logging(verbose: bool) -> None:
    """Library warnings (aioice, aiortc) would drown the summary; --verbose shows them."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)


async def _quietly(coro: Any) -> Any:
    """Run with a loop exception handler that logs (debug) instead of printing tracebacks.

    aiortc's background tasks can fail after a peer goes away (e.g. a refused
    connection); those are outcomes of the call, already in its result.
    """
    loop = asyncio.get_running_loop()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        logging.getLogger("splitrelay.transceiver.client").debug(
            "background error: %s", context.get("message"), exc_info=context.get("exception")
        )

    loop.set_exception_handler(handler)
    return await coro


if __name__ == "__main__":  # pragma: no cover
    main()
