"""The relay daemon behind `relayctl run`.

It loads the XDP program (maps pinned, so state survives restarts), attaches
it, runs the userspace path for what XDP passes up (or for everything when
XDP cannot load), expires idle sessions, turns kernel session events into
notifications for the Redis sync, and serves Prometheus metrics.

Hitless restart: a new daemon adopts the pinned maps and swaps its program
in atomically; the old program forwards until that instant, and the kernel
keeps it attached while no daemon runs. Stopping never detaches unless asked
(`--detach-on-exit` or `relayctl detach`).

Start-up never harms a relay that already runs: a daemon refuses a pin dir
whose run state names a live process, and claims its ports before it touches
the pinned maps or the attached program. If a restarted daemon cannot load
XDP, it detaches the program the previous run left on its interfaces (that
program would keep forwarding from maps the daemon, now relaying from an
in-memory table, no longer updates), or refuses to start if it cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import itertools
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click

from ctl import runstate
from ctl.layout import Session, SessionEvent, TransceiverState, port_host
from ctl.loader import DEFAULT_PIN_DIR, LoadError, MapSizes, RelayProgram
from ctl.maps import RelayAddresses, RelayMaps, SessionEntry, monotonic_ns
from ctl.metrics import MetricsServer, RelaySources, make_registry
from ctl.redisstate import RedisState, connect, redact
from ctl.redissync import RedisSync
from ctl.store import KernelState, MemoryState, RelayState
from ctl.userspace import RelayError, RelaySockets, UserspaceRelay, bind_sockets
from ctl.xdp import AttachMode, XdpError, detach, ifindex, info

log = logging.getLogger("splitrelay.relay")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class DaemonError(RuntimeError):
    """The daemon cannot start; the message is one line for the operator."""


@dataclass
class DaemonConfig:
    """Everything `relayctl run` can be told (see its --help)."""

    interfaces: list[str] = field(default_factory=list)
    public: list[IPAddress] = field(default_factory=list)
    public_port: int = 3478
    tunnel: list[IPAddress] = field(default_factory=list)
    tunnel_port: int = 3479
    mode: AttachMode | None = AttachMode.AUTO  # None: userspace only (--no-xdp)
    pin_dir: Path = DEFAULT_PIN_DIR
    sizes: MapSizes = field(default_factory=MapSizes)
    idle_timeout: float = 30.0
    sweep_interval: float = 1.0
    sweep_batch: int = 4096
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9478
    redis_url: str | None = None
    redis_prefix: str = "splitrelay:"
    relay_id: str | None = None  # default: the public endpoints
    detach_on_exit: bool = False
    transceivers: list[tuple[int, IPAddress, int]] = field(default_factory=list)

    def addresses(self) -> RelayAddresses:
        """The relay_config the data plane uses."""
        pick = _pick_family
        return RelayAddresses(
            public_port=self.public_port,
            tunnel_port=self.tunnel_port,
            public_v4=pick(self.public, 4),  # type: ignore[arg-type]
            public_v6=pick(self.public, 6),  # type: ignore[arg-type]
            tunnel_v4=pick(self.tunnel, 4),  # type: ignore[arg-type]
            tunnel_v6=pick(self.tunnel, 6),  # type: ignore[arg-type]
        )


def _pick_family(addrs: list[IPAddress], version: int) -> IPAddress | None:
    found = [a for a in addrs if a.version == version]
    if len(found) > 1:
        raise DaemonError(f"one IPv{version} address per role, got {', '.join(map(str, found))}")
    return found[0] if found else None


class RelayDaemon:
    """One relay: data plane, userspace path, housekeeping and metrics."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.program: RelayProgram | None = None
        self.maps: RelayMaps | None = None
        self.attached: dict[str, str] = {}
        self.fallback_reason: str | None = None
        self.relay: UserspaceRelay | None = None
        self.state: RelayState | None = None
        self.sync: RedisSync | None = None
        self.metrics: MetricsServer | None = None
        # The daemon's own counters; events_lost counts events it received but could
        # not pass on (the kernel counts those it could not queue: both are exported).
        self.counters = {"sessions_expired": 0, "events_lost": 0}
        self.session_listeners: list[Callable[[SessionEntry, str], None]] = []
        self._sockets: RelaySockets | None = None  # bound, not yet handed to the relay
        self._run_state: runstate.RunState | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._sweep_keys: Iterator[bytes] | None = None
        self._stopping = asyncio.Event()
        self._last_event_error = 0.0
        self._last_save_error = 0.0

    # ------------------------------------------------------------ start / stop
    async def start(self) -> None:
        """Bring the relay up; raises DaemonError with a one-line reason.

        The order protects a relay that already runs: whatever can fail
        without changing anything (the addresses, the permission to record
        run state, a live daemon on this pin dir, the interfaces, the ports)
        is checked or claimed before the pinned maps, the attached program or
        the run state are touched, so a second `relayctl run` by mistake fails
        and leaves the first one exactly as it was.
        """
        addresses = self._preflight()
        self._bind(addresses)
        self._load_program()
        self.state = self._make_state()
        if self.maps is not None:
            self.maps.set_addresses(addresses)
        self._register_static_transceivers()
        self._attach_or_fall_back()
        await self._start_redis()
        await self._start_userspace(addresses)
        if self.metrics is not None:
            self.metrics.start()
        if self.program is not None:
            self.program.open_events(self._on_kernel_event)
            self._tasks.append(asyncio.create_task(self._poll_events()))
        self._tasks.append(asyncio.create_task(self._housekeeping()))
        self._save_state()

    def _preflight(self) -> RelayAddresses:
        """Every check that needs no change to the system; returns the relay's addresses."""
        cfg = self.config
        if not cfg.public:
            raise DaemonError("no public address: give --public ADDR (IPv4 and/or IPv6)")
        if not cfg.tunnel:
            raise DaemonError("no tunnel address: give --tunnel ADDR")
        addresses = cfg.addresses()
        try:
            runstate.ensure_writable()
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise DaemonError(
                    f"permission denied: cannot record run state in {runstate.RUN_DIR} "
                    "(relayctl run needs root)"
                ) from exc
            raise DaemonError(f"cannot record run state in {runstate.RUN_DIR}: {exc}") from exc
        other = runstate.load(cfg.pin_dir)
        if other is not None and other.pid != os.getpid() and other.alive:
            raise DaemonError(
                f"a relay daemon (pid {other.pid}) already runs on {cfg.pin_dir}: "
                "stop it first, or give this one another --pin-dir"
            )
        for ifname in cfg.interfaces:  # a typo must not turn into a silent fallback
            try:
                ifindex(ifname)
            except XdpError as exc:
                raise DaemonError(str(exc)) from exc
        return addresses

    def _bind(self, addresses: RelayAddresses) -> None:
        """Claim the relay's UDP ports and the metrics port (serving starts later)."""
        try:
            self._sockets = bind_sockets(addresses)
        except RelayError as exc:
            raise DaemonError(str(exc)) from exc
        self.metrics = self._bind_metrics()

    def _load_program(self) -> None:
        """Load the program and adopt the pinned maps, or note why not."""
        cfg = self.config
        try:
            # Loaded even with --no-xdp: the pinned maps then hold the state, so
            # the CLI works and a restart keeps the sessions.
            self.program = RelayProgram(cfg.pin_dir, cfg.sizes).load()
        except (LoadError, OSError) as exc:
            self.fallback_reason = f"cannot load the XDP program: {_one_line(exc)}"
            # A program a previous run left attached would go on forwarding from
            # pinned maps that this daemon (in-memory table) no longer updates or
            # expires: two diverging tables. Take it off, or do not start.
            failed = self._detach_interfaces(
                "a previous run left it, and it would forward from maps this daemon "
                "cannot use (it relays in userspace)"
            )
            if failed:
                raise DaemonError(
                    f"cannot load XDP ({_one_line(exc)}), and cannot detach the previous "
                    f"program ({'; '.join(failed)}); it would forward from stale maps: "
                    "detach it (ip link set dev IFACE xdp off) and start again"
                ) from exc
            return
        self.maps = RelayMaps(cfg.pin_dir)

    def _attach_or_fall_back(self) -> None:
        """Attach to every interface, or to none: then the userspace path relays it all."""
        cfg = self.config
        if self.program is None:
            pass  # _load_program said why
        elif cfg.mode is None:
            self.fallback_reason = "XDP disabled by --no-xdp"
            self._detach_interfaces("--no-xdp: the userspace path relays everything")
        elif not cfg.interfaces:
            self.fallback_reason = "no --interface given to attach XDP to"
        else:
            try:
                self.program.pin_program()
                for ifname in cfg.interfaces:
                    mode = self.program.attach(ifname, cfg.mode)
                    self.attached[ifname] = str(mode)
                    log.info("XDP attached to %s in %s mode", ifname, mode)
            except (XdpError, LoadError) as exc:
                self.attached.clear()
                self.fallback_reason = _one_line(exc)
                self._detach_interfaces("XDP is not on every interface, so it is on none")
        if self.fallback_reason:
            log.warning(
                "XDP not in use, the userspace path relays everything: %s", self.fallback_reason
            )
        self._warn_forwarding_off()

    def _detach_interfaces(self, why: str) -> list[str]:
        """Detach any XDP program from each -i interface, saying so; returns failures."""
        failed: list[str] = []
        for ifname in self.config.interfaces:
            try:
                if detach(ifname):
                    log.warning("detached the XDP program on %s: %s", ifname, why)
            except XdpError as exc:
                failed.append(_one_line(exc))
        return failed

    def _warn_forwarding_off(self) -> None:
        """bpf_fib_lookup forwards only where IP forwarding is on; say so once."""
        for ifname in self.attached:
            for path in (
                f"/proc/sys/net/ipv4/conf/{ifname}/forwarding",
                f"/proc/sys/net/ipv6/conf/{ifname}/forwarding",
            ):
                with contextlib.suppress(OSError):
                    if Path(path).read_text().strip() == "0":
                        log.warning(
                            "%s is 0: XDP passes this interface's packets up to the "
                            "slower userspace path",
                            path,
                        )

    def _make_state(self) -> RelayState:
        if self.maps is not None:
            return KernelState(self.maps)
        return MemoryState(self.config.sizes.sessions, self.config.sizes.transceivers)

    def _register_static_transceivers(self) -> None:
        """Install the --transceiver entries, keeping a drain that outlived a restart.

        `relayctl transceivers drain` is an operator decision recorded in the
        pinned map; a restart with the same flags must not quietly reactivate
        the transceiver. `relayctl transceivers add` reactivates it.
        """
        assert self.state is not None
        for tid, addr, port in self.config.transceivers:
            known = self.state.get_transceiver(tid)
            state = TransceiverState.ACTIVE
            if known is not None and known.state == TransceiverState.DRAINING:
                state = TransceiverState.DRAINING
                log.info(
                    "transceiver %08x stays draining, as it was before this start "
                    "(relayctl transceivers add reactivates it)",
                    tid,
                )
            self.state.put_transceiver(tid, addr, port, state)

    async def _start_redis(self) -> None:
        """Join the shared state; Redis being down now is not an error."""
        cfg = self.config
        if not cfg.redis_url:
            return
        try:
            client = connect(cfg.redis_url)
        except ValueError as exc:
            raise DaemonError(str(exc)) from exc
        relay_id = cfg.relay_id or ",".join(_endpoint(a, cfg.public_port) for a in cfg.public)
        assert self.state is not None
        self.sync = RedisSync(
            RedisState(client, cfg.redis_prefix),
            self.state,
            relay_id,
            session_ttl=int(max(1.0, 2 * cfg.idle_timeout)),
            static_transceivers=[tid for tid, _, _ in cfg.transceivers],
        )
        await self.sync.start()
        self.session_listeners.append(self.sync.on_session)
        log.info(
            "Redis %s (%s), relay id %s, %d sessions loaded",
            redact(cfg.redis_url),
            "up" if self.sync.stats.up else "down: retrying",
            relay_id,
            self.sync.stats.sessions_loaded,
        )

    async def _start_userspace(self, addresses: RelayAddresses) -> None:
        assert self.state is not None
        relay = UserspaceRelay(
            addresses,
            self.state,
            recover=self.sync.recover if self.sync is not None else None,
            on_session=self._on_userspace_session,
            sockets=self._sockets,
        )
        self._sockets = None  # the relay owns (and closes) them now
        self.relay = relay
        try:
            await relay.start()
        except RelayError as exc:
            raise DaemonError(str(exc)) from exc

    def _bind_metrics(self) -> MetricsServer | None:
        cfg = self.config
        if cfg.metrics_port < 0:
            return None
        # Every source is read at scrape time, so the server can be bound before
        # the data plane exists.
        sources = RelaySources(
            xdp_counters=self._xdp_counters,
            userspace_counters=self._userspace_counters,
            session_count=self.session_count,
            xdp_attachments=lambda: dict(self.attached),
            daemon_counters=self._daemon_counters,
            redis_up=lambda: self.sync.stats.up if self.sync is not None else None,
        )
        try:
            return MetricsServer(make_registry(sources), cfg.metrics_host, cfg.metrics_port)
        except OSError as exc:
            raise DaemonError(
                f"cannot serve metrics on {cfg.metrics_host}:{cfg.metrics_port}: "
                f"{exc.strerror or exc}"
            ) from exc

    async def stop(self) -> None:
        """Stop everything; the XDP program stays attached unless told otherwise."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.relay is not None:
            await self.relay.close()
        if self._sockets is not None:  # bound, but start() failed before the relay took them
            self._sockets.close()
            self._sockets = None
        if self.sync is not None:
            await self.sync.stop()
        if self.metrics is not None:
            self.metrics.stop()
        if self.config.detach_on_exit:
            for ifname in self.attached:
                try:
                    detach(ifname)
                    log.info("XDP detached from %s (--detach-on-exit)", ifname)
                except XdpError as exc:
                    log.warning("cannot detach XDP from %s: %s", ifname, _one_line(exc))
        if self.maps is not None:
            self.maps.close()
        if self.program is not None:
            self.program.close()
        runstate.remove(self.config.pin_dir, pid=os.getpid())  # only if it is ours

    async def run_until_signalled(self) -> None:
        """Serve until SIGTERM or SIGINT."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        await self._stopping.wait()

    # ------------------------------------------------------------ counters
    def _xdp_counters(self) -> dict[str, int] | None:
        return self.maps.counters_snapshot() if self.maps is not None else None

    def _userspace_counters(self) -> dict[str, int]:
        return self.relay.counters if self.relay is not None else {}

    def _daemon_counters(self) -> dict[str, int]:
        out = dict(self.counters)
        if self.maps is not None:  # events the kernel could not queue (ring buffer full)
            out["events_lost"] += self.maps.counters_snapshot().get("events_lost", 0)
        if self.sync is not None:
            st = self.sync.stats
            out.update(
                redis_errors=st.errors,
                sessions_recovered=st.sessions_recovered,
                redis_sessions_written=st.sessions_written,
                redis_writes_dropped=st.writes_dropped,
            )
        return out

    # ------------------------------------------------------------ sessions
    def session_count(self) -> int:
        """Sessions in the kernel map (or the userspace table)."""
        if self.maps is not None:
            return sum(1 for _ in self.maps.sessions)
        return self.state.session_count() if self.state is not None else 0

    def _on_kernel_event(self, event: SessionEvent) -> None:
        """Pass a kernel session event on; it runs inside bcc's ring buffer callback.

        An exception there would be printed and swallowed by ctypes, so a
        failure is counted as a lost event and logged at most once a minute.
        """
        assert self.maps is not None
        try:
            entry = self.maps.session(_addr(event), port_host(event.client_port))
            if entry is None:  # expired or evicted before the event was read
                return
            kind = "created" if event.kind == 1 else "rerouted"
            for listener in self.session_listeners:
                listener(entry, kind)
        except Exception:
            self.counters["events_lost"] += 1
            now = time.monotonic()
            if now - self._last_event_error >= 60.0:
                self._last_event_error = now
                log.exception("a kernel session event could not be passed on")

    def _on_userspace_session(self, entry: SessionEntry, kind: str) -> None:
        for listener in self.session_listeners:
            listener(entry, kind)

    async def _poll_events(self) -> None:
        assert self.program is not None
        while True:
            self.program.poll_events(0)
            await asyncio.sleep(0.02)

    async def _housekeeping(self) -> None:
        """Every sweep interval: expire idle sessions, refresh the recorded counters."""
        while True:
            await asyncio.sleep(self.config.sweep_interval)
            try:
                self.sweep()
            except Exception:  # housekeeping must never stop the relay
                log.exception("session sweep failed")
            try:
                self._save_state()
            except OSError as exc:
                now = time.monotonic()
                if now - self._last_save_error >= 60.0:
                    self._last_save_error = now
                    log.warning("cannot record run state: %s", exc)

    def sweep(self) -> int:
        """Remove sessions idle past the timeout; examines at most sweep_batch entries.

        The bound holds on both tables, so a sweep's cost never grows with the
        number of sessions: the kernel map is walked in slices, resuming where
        the last sweep stopped; the userspace table is in LRU order, so the
        idle sessions are at its front.
        """
        limit_ns = monotonic_ns() - int(self.config.idle_timeout * 1e9)
        batch = self.config.sweep_batch
        removed = 0
        if self.maps is None:
            assert isinstance(self.state, MemoryState)
            removed = self.state.expire_idle(limit_ns, batch)
        else:
            if self._sweep_keys is None:
                self._sweep_keys = self.maps.sessions.keys()
            keys = list(itertools.islice(self._sweep_keys, batch))
            if len(keys) < batch:
                self._sweep_keys = None  # a full pass is done; start over next time
            for key in keys:
                raw = self.maps.sessions.lookup(key)
                if raw is None:
                    continue
                if Session.from_buffer_copy(raw).last_seen_ns < limit_ns:
                    removed += int(self.maps.sessions.delete(key))
        self.counters["sessions_expired"] += removed
        return removed

    # ------------------------------------------------------------ state
    def _save_state(self) -> None:
        """Record (or refresh) this daemon's run state, with the userspace counters."""
        cfg = self.config
        if self._run_state is None:
            self._run_state = runstate.RunState(
                pid=os.getpid(),
                pin_dir=str(cfg.pin_dir),
                xdp=bool(self.attached),
                interfaces=dict(self.attached),
                fallback_reason=self.fallback_reason,
                metrics=f"{self.metrics.address[0]}:{self.metrics.address[1]}"
                if self.metrics
                else None,
                public=[_endpoint(a, cfg.public_port) for a in cfg.public],
                tunnel=[_endpoint(a, cfg.tunnel_port) for a in cfg.tunnel],
                redis=redact(cfg.redis_url) if cfg.redis_url else None,
            )
        self._run_state.userspace_counters = self._userspace_counters()
        self._run_state.counters_updated = time.time()
        runstate.save(self._run_state)


def _addr(event: SessionEvent) -> IPAddress:
    from ctl import wire

    return wire.from_mapped(bytes(event.client_addr))


def _endpoint(addr: IPAddress, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def xdp_interfaces_info(ifnames: list[str]) -> dict[str, str | None]:
    """The live attach mode of each interface (None when nothing is attached)."""
    return {name: info(name).mode for name in ifnames}


# ---------------------------------------------------------------- relayctl run
def _parse_transceiver(text: str) -> tuple[int, IPAddress, int]:
    from ctl.cliutil import parse_endpoint, parse_tid

    tid_text, sep, endpoint = text.partition("=")
    if not sep:
        raise ValueError(f"transceiver {text!r}: expected ID=ADDR:PORT")
    ep = parse_endpoint(endpoint)
    return parse_tid(tid_text), ep.addr, ep.port


def _parse_address(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None


def _parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics address {text!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


#: `relayctl run --public-port` reads SPLITRELAY_RUN_PUBLIC_PORT, and so on.
ENV_PREFIX = "SPLITRELAY_RUN_"


def _option(*decls: str, **kw: object) -> Callable[[Callable[..., object]], Callable[..., object]]:
    """A `run` option whose environment variable is named after its long flag.

    Explicit rather than click's auto_envvar_prefix, which names the variable
    after the Python parameter (SPLITRELAY_RUN_INTERFACES for -i/--interface)
    and so would silently ignore the name an operator reads in --help.
    """
    flag = next(d for d in decls if d.startswith("--"))
    envvar = ENV_PREFIX + flag.removeprefix("--").upper().replace("-", "_")
    return click.option(*decls, envvar=envvar, show_envvar=True, **kw)


@click.command("run")
@_option(
    "-i",
    "--interface",
    "interfaces",
    multiple=True,
    metavar="IFNAME",
    help="Interface to attach XDP to (repeat: public and tunnel side). It must exist.",
)
@_option(
    "--public",
    multiple=True,
    metavar="ADDR",
    help="Public address clients send to: one IPv4 and/or one IPv6; "
    "0.0.0.0 or :: accepts any local address.",
)
@_option(
    "--public-port",
    default=3478,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="The relay's public UDP port.",
)
@_option(
    "--tunnel",
    multiple=True,
    metavar="ADDR",
    help="Tunnel source address toward transceivers: one IPv4 and/or one IPv6.",
)
@_option(
    "--tunnel-port",
    default=3479,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="UDP port transceivers send their tunnel packets to.",
)
@_option(
    "--transceiver",
    "transceivers",
    multiple=True,
    metavar="ID=ADDR:PORT",
    help="Register a transceiver statically (repeatable; Redis does it otherwise). "
    "One drained before a restart stays draining.",
)
@_option(
    "--mode",
    type=click.Choice([m.value for m in AttachMode]),
    default="auto",
    show_default=True,
    help="XDP attach mode: native (driver), generic, or auto (native, else generic).",
)
@_option("--no-xdp", is_flag=True, help="Do not attach XDP: the userspace path does it all.")
@_option(
    "--max-sessions",
    default=65536,
    show_default=True,
    type=click.IntRange(1),
    help="Bound of the session map (LRU beyond it).",
)
@_option(
    "--max-transceivers",
    default=1024,
    show_default=True,
    type=click.IntRange(1),
    help="Bound of the transceiver map.",
)
@_option(
    "--idle-timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(0.1),
    help="Seconds without packets after which a session expires.",
)
@_option(
    "--metrics",
    "metrics_addr",
    default="0.0.0.0:9478",
    show_default=True,
    metavar="HOST:PORT",
    help="Where to serve Prometheus metrics.",
)
@_option(
    "--redis-url",
    default=None,
    metavar="URL",
    help="redis://, rediss:// or unix:// URL of the shared state.",
)
@_option(
    "--redis-prefix",
    default="splitrelay:",
    show_default=True,
    help="Prefix of every Redis key.",
)
@_option(
    "--relay-id",
    default=None,
    help="Name of this relay in Redis (default: its public endpoints, so a replacement "
    "on the same address loads the same sessions).",
)
@_option(
    "--detach-on-exit",
    is_flag=True,
    help="Detach XDP when stopping (default: keep forwarding for a restart).",
)
@_option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="Least severe log messages to print (on stderr).",
)
def run_command(**opts: object) -> None:
    """Run the relay daemon: XDP data plane, userspace path, expiry, metrics.

    Every option can also come from the environment variable shown next to
    it, SPLITRELAY_RUN_ and the option's long name (for example
    SPLITRELAY_RUN_PUBLIC_PORT=3478); a repeatable option takes a
    space-separated list there (SPLITRELAY_RUN_INTERFACE="eth0 eth1"), a flag
    takes 1 or 0. SPLITRELAY_PIN_DIR sets relayctl's --pin-dir.
    """
    logging.basicConfig(
        level=str(opts["log_level"]).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    root = click.get_current_context().find_root()
    pin_dir = Path(str(root.params.get("pin_dir") or DEFAULT_PIN_DIR))
    try:
        config = _config_from_options(opts, pin_dir)
        config.addresses()  # one address per family and role: a usage error, said at once
    except (ValueError, DaemonError) as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        asyncio.run(_serve(config))
    except DaemonError as exc:
        raise click.ClickException(str(exc)) from exc


def _config_from_options(opts: dict[str, object], pin_dir: Path) -> DaemonConfig:
    host, port = _parse_hostport(str(opts["metrics_addr"]))
    return DaemonConfig(
        interfaces=list(opts["interfaces"]),  # type: ignore[call-overload]
        public=[_parse_address(a) for a in opts["public"]],  # type: ignore[attr-defined]
        public_port=int(opts["public_port"]),  # type: ignore[call-overload]
        tunnel=[_parse_address(a) for a in opts["tunnel"]],  # type: ignore[attr-defined]
        tunnel_port=int(opts["tunnel_port"]),  # type: ignore[call-overload]
        mode=None if opts["no_xdp"] else AttachMode(str(opts["mode"])),
        pin_dir=pin_dir,
        sizes=MapSizes(
            sessions=int(opts["max_sessions"]),  # type: ignore[call-overload]
            transceivers=int(opts["max_transceivers"]),
        ),  # type: ignore[call-overload]
        idle_timeout=float(opts["idle_timeout"]),  # type: ignore[arg-type]
        metrics_host=host,
        metrics_port=port,
        redis_url=opts["redis_url"],  # type: ignore[arg-type]
        redis_prefix=str(opts["redis_prefix"]),
        relay_id=opts["relay_id"],  # type: ignore[arg-type]
        detach_on_exit=bool(opts["detach_on_exit"]),
        transceivers=[_parse_transceiver(t) for t in opts["transceivers"]],  # type: ignore[attr-defined]
    )


async def _serve(config: DaemonConfig) -> None:
    daemon = RelayDaemon(config)
    try:
        await daemon.start()
        mode = ", ".join(f"{i}={m}" for i, m in daemon.attached.items()) or "off"
        log.info(
            "relay up: public %s, tunnel %s, XDP %s%s",
            ", ".join(_endpoint(a, config.public_port) for a in config.public),
            ", ".join(_endpoint(a, config.tunnel_port) for a in config.tunnel),
            mode,
            f" ({daemon.fallback_reason})" if daemon.fallback_reason else "",
        )
        await daemon.run_until_signalled()
        log.info("stopping")
    finally:
        await daemon.stop()
