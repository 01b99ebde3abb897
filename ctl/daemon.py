"""The relay daemon behind `relayctl run`.

It loads the XDP program (maps pinned, so state survives restarts), attaches
it, runs the userspace path for what XDP passes up (or for everything when
XDP cannot load), expires idle sessions, turns kernel session events into
notifications for the Redis sync, and serves Prometheus metrics.

Hitless restart: a new daemon adopts the pinned maps and swaps its program
in atomically; the old program forwards until that instant, and the kernel
keeps it attached while no daemon runs. Stopping never detaches unless asked
(`--detach-on-exit` or `relayctl detach`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click

from ctl import runstate
from ctl.layout import Session, SessionEvent, port_host
from ctl.loader import DEFAULT_PIN_DIR, LoadError, MapSizes, RelayProgram
from ctl.maps import RelayAddresses, RelayMaps, SessionEntry, monotonic_ns
from ctl.metrics import MetricsServer, RelaySources, make_registry
from ctl.redisstate import RedisState, connect, redact
from ctl.redissync import RedisSync
from ctl.store import KernelState, MemoryState, RelayState
from ctl.xdp import AttachMode, XdpError, detach, info

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
        self.relay: object | None = None
        self.state: RelayState | None = None
        self.sync: RedisSync | None = None
        self.metrics: MetricsServer | None = None
        self.counters = {"sessions_expired": 0, "events_lost": 0}
        self.session_listeners: list[Callable[[SessionEntry, str], None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._sweep_keys: Iterator[bytes] | None = None
        self._stopping = asyncio.Event()

    # ------------------------------------------------------------ start / stop
    async def start(self) -> None:
        """Bring the relay up; raises DaemonError with a one-line reason."""
        cfg = self.config
        if not cfg.public:
            raise DaemonError("no public address: give --public ADDR (IPv4 and/or IPv6)")
        if not cfg.tunnel:
            raise DaemonError("no tunnel address: give --tunnel ADDR")
        addresses = cfg.addresses()
        self._load_data_plane(addresses)
        self.state = self._make_state()
        await self._start_redis()
        await self._start_userspace(addresses)
        self._start_metrics()
        if self.program is not None:
            self.program.open_events(self._on_kernel_event)
            self._tasks.append(asyncio.create_task(self._poll_events()))
        self._tasks.append(asyncio.create_task(self._sweep_loop()))
        self._save_state()

    def _load_data_plane(self, addresses: RelayAddresses) -> None:
        cfg = self.config
        try:
            # Loaded even with --no-xdp: the pinned maps then hold the state, so
            # the CLI works and a restart keeps the sessions.
            self.program = RelayProgram(cfg.pin_dir, cfg.sizes).load()
        except (LoadError, OSError) as exc:
            self.fallback_reason = f"cannot load the XDP program: {_one_line(exc)}"
        if self.program is not None:
            self.maps = RelayMaps(cfg.pin_dir)
            self.maps.set_addresses(addresses)
            for tid, addr, port in cfg.transceivers:
                self.maps.put_transceiver(tid, addr, port)
            if cfg.mode is None:
                self.fallback_reason = "XDP disabled by --no-xdp"
                for ifname in cfg.interfaces:  # a previous run's program must not forward
                    with contextlib.suppress(XdpError):
                        detach(ifname)
            else:
                self.program.pin_program()
                self._attach_all()
        if self.fallback_reason:
            log.warning(
                "XDP not in use, the userspace path relays everything: %s", self.fallback_reason
            )
        self._warn_forwarding_off()

    def _attach_all(self) -> None:
        assert self.program is not None and self.config.mode is not None
        if not self.config.interfaces:
            self.fallback_reason = "no --interface given to attach XDP to"
            return
        try:
            for ifname in self.config.interfaces:
                mode = self.program.attach(ifname, self.config.mode)
                self.attached[ifname] = str(mode)
                log.info("XDP attached to %s in %s mode", ifname, mode)
        except XdpError as exc:
            for ifname in self.attached:
                with contextlib.suppress(XdpError):
                    detach(ifname)
            self.attached.clear()
            self.fallback_reason = _one_line(exc)

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
        state = MemoryState(self.config.sizes.sessions)
        for tid, addr, port in self.config.transceivers:
            state.put_transceiver(tid, addr, port)
        return state

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
        from ctl.userspace import RelayError, UserspaceRelay

        assert self.state is not None
        relay = UserspaceRelay(
            addresses,
            self.state,
            recover=self.sync.recover if self.sync is not None else None,
            on_session=self._on_userspace_session,
        )
        try:
            await relay.start()
        except RelayError as exc:
            raise DaemonError(str(exc)) from exc
        self.relay = relay

    def _start_metrics(self) -> None:
        cfg = self.config
        if cfg.metrics_port < 0:
            return
        sources = RelaySources(
            xdp_counters=self.maps.counters_snapshot if self.maps is not None else None,
            userspace_counters=lambda: self.relay.counters if self.relay else {},  # type: ignore[attr-defined]
            session_count=self.session_count,
            xdp_attachments=lambda: dict(self.attached),
            daemon_counters=self._daemon_counters,
            redis_up=lambda: self.sync.stats.up if self.sync is not None else None,
        )
        try:
            self.metrics = MetricsServer(make_registry(sources), cfg.metrics_host, cfg.metrics_port)
        except OSError as exc:
            raise DaemonError(
                f"cannot serve metrics on {cfg.metrics_host}:{cfg.metrics_port}: {exc.strerror}"
            ) from exc
        self.metrics.start()

    async def stop(self) -> None:
        """Stop everything; the XDP program stays attached unless told otherwise."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.relay is not None:
            await self.relay.close()  # type: ignore[attr-defined]
        if self.sync is not None:
            await self.sync.stop()
        if self.metrics is not None:
            self.metrics.stop()
        if self.config.detach_on_exit:
            for ifname in self.attached:
                with contextlib.suppress(XdpError):
                    detach(ifname)
                log.info("XDP detached from %s", ifname)
        if self.maps is not None:
            self.maps.close()
        if self.program is not None:
            self.program.close()
        runstate.remove(self.config.pin_dir)

    async def run_until_signalled(self) -> None:
        """Serve until SIGTERM or SIGINT."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        await self._stopping.wait()

    # ------------------------------------------------------------ sessions
    def _daemon_counters(self) -> dict[str, int]:
        out = dict(self.counters)
        if self.sync is not None:
            st = self.sync.stats
            out.update(
                redis_errors=st.errors,
                sessions_recovered=st.sessions_recovered,
                redis_sessions_written=st.sessions_written,
                redis_writes_dropped=st.writes_dropped,
            )
        return out

    def session_count(self) -> int:
        """Sessions in the kernel map (or the userspace table)."""
        if self.maps is not None:
            return sum(1 for _ in self.maps.sessions)
        return self.state.session_count() if self.state is not None else 0

    def _on_kernel_event(self, event: SessionEvent) -> None:
        assert self.maps is not None
        entry = self.maps.session(_addr(event), port_host(event.client_port))
        if entry is not None:
            kind = "created" if event.kind == 1 else "rerouted"
            for listener in self.session_listeners:
                listener(entry, kind)

    def _on_userspace_session(self, entry: SessionEntry, kind: str) -> None:
        for listener in self.session_listeners:
            listener(entry, kind)

    async def _poll_events(self) -> None:
        assert self.program is not None
        while True:
            self.program.poll_events(0)
            await asyncio.sleep(0.02)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval)
            try:
                self.sweep()
            except Exception:  # housekeeping must never stop the relay
                log.exception("session sweep failed")

    def sweep(self) -> int:
        """Remove sessions idle past the timeout; examines at most sweep_batch entries."""
        limit_ns = monotonic_ns() - int(self.config.idle_timeout * 1e9)
        removed = 0
        if self.maps is None:
            for entry in list(self.state.iter_sessions()):
                if entry.last_seen_ns < limit_ns:
                    self.state.remove_session(entry.client_addr, entry.client_port)
                    removed += 1
        else:
            if self._sweep_keys is None:
                self._sweep_keys = self.maps.sessions.keys()
            batch = list(itertools.islice(self._sweep_keys, self.config.sweep_batch))
            if len(batch) < self.config.sweep_batch:
                self._sweep_keys = None  # a full pass is done; start over next time
            for key in batch:
                raw = self.maps.sessions.lookup(key)
                if raw is None:
                    continue
                if Session.from_buffer_copy(raw).last_seen_ns < limit_ns:
                    removed += int(self.maps.sessions.delete(key))
        self.counters["sessions_expired"] += removed
        return removed

    # ------------------------------------------------------------ state
    def _save_state(self) -> None:
        cfg = self.config
        runstate.save(
            runstate.RunState(
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
        )


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


@click.command("run")
@click.option(
    "-i",
    "--interface",
    "interfaces",
    multiple=True,
    help="Interface to attach XDP to (repeat: public and tunnel side).",
)
@click.option(
    "--public",
    multiple=True,
    metavar="ADDR",
    help="Public address clients send to: one IPv4 and/or one IPv6; "
    "0.0.0.0 or :: accepts any local address.",
)
@click.option(
    "--public-port",
    default=3478,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="The relay's public UDP port.",
)
@click.option(
    "--tunnel",
    multiple=True,
    metavar="ADDR",
    help="Tunnel source address toward transceivers: one IPv4 and/or one IPv6.",
)
@click.option(
    "--tunnel-port",
    default=3479,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="UDP port transceivers send their tunnel packets to.",
)
@click.option(
    "--transceiver",
    "transceivers",
    multiple=True,
    metavar="ID=ADDR:PORT",
    help="Register a transceiver statically (repeatable; Redis does it otherwise).",
)
@click.option(
    "--mode",
    type=click.Choice([m.value for m in AttachMode]),
    default="auto",
    show_default=True,
    help="XDP attach mode: native (driver), generic, or auto.",
)
@click.option("--no-xdp", is_flag=True, help="Do not load XDP: the userspace path does it all.")
@click.option(
    "--max-sessions",
    default=65536,
    show_default=True,
    type=click.IntRange(1),
    help="Bound of the session map (LRU beyond it).",
)
@click.option(
    "--max-transceivers",
    default=1024,
    show_default=True,
    type=click.IntRange(1),
    help="Bound of the transceiver map.",
)
@click.option(
    "--idle-timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(0.1),
    help="Seconds without packets after which a session expires.",
)
@click.option(
    "--metrics",
    "metrics_addr",
    default="0.0.0.0:9478",
    show_default=True,
    metavar="HOST:PORT",
    help="Where to serve Prometheus metrics.",
)
@click.option(
    "--redis-url",
    default=None,
    metavar="URL",
    help="redis://, rediss:// or unix:// URL of the shared state.",
)
@click.option(
    "--redis-prefix", default="splitrelay:", show_default=True, help="Prefix of every Redis key."
)
@click.option(
    "--relay-id",
    default=None,
    help="Name of this relay in Redis (default: its public endpoints, so a replacement "
    "on the same address loads the same sessions).",
)
@click.option(
    "--detach-on-exit",
    is_flag=True,
    help="Detach XDP when stopping (default: keep forwarding for a restart).",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
def run_command(**opts: object) -> None:
    """Run the relay daemon: XDP data plane, userspace path, expiry, metrics.

    Every option can also come from the environment as
    SPLITRELAY_RUN_<OPTION>, e.g. SPLITRELAY_RUN_PUBLIC_PORT=3478.
    """
    logging.basicConfig(
        level=str(opts["log_level"]).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    root = click.get_current_context().find_root()
    pin_dir = Path(str(root.params.get("pin_dir") or DEFAULT_PIN_DIR))
    try:
        config = _config_from_options(opts, pin_dir)
    except ValueError as exc:
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
