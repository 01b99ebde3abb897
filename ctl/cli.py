"""`relayctl`: the operator's command line for the relay.

Most commands work on the pinned BPF maps directly (ctl/maps.py), so they need
neither a running daemon nor a compiler: sessions and transceivers can be
inspected and edited while the data plane forwards, and after the controller
stopped. Only `attach` compiles the program (bcc), and only `run` is a daemon.

Contract for scripts: every listing and `status` take `--json` and then print
exactly one JSON document on stdout. Failures print one line on stderr,
`relayctl: error: ...`, and exit non-zero (2 for usage errors, 1 otherwise);
a traceback appears only with `--debug`. Options can also come from the
environment, `SPLITRELAY_<OPTION>` (e.g. SPLITRELAY_PIN_DIR).

Choices the brief left open:
- `status` is a report, not a check: it exits 0 even when nothing is pinned
  (the JSON says what is missing); only errors it cannot report exit non-zero.
- `sessions add` refuses an unregistered transceiver and a relay address of the
  other family than the client's: the data plane could never use either.
- `sessions flush` asks unless `--yes`; `transceivers rm` keeps the sessions
  (the kernel passes their packets up until they expire), and says how many.
- `stats --watch` cannot be combined with `--json`: poll `stats --json`.
- `attach` compiles, pins and attaches only; the relay's addresses are set by
  `relayctl run`, so until then the program passes everything up (it says so).
- `stats` shows the kernel's counters and, next to them, the userspace path's,
  which only the daemon holds: it copies them into its run state every second
  (a file the CLI reads from any network namespace, unlike the metrics port).
- `bench` is ctl/bench.py's command (also `python -m ctl.bench`), what `make bench` runs.
- `testbed impair` replaces a client's whole impairment each time (not only the
  options given), and `testbed status` reports on the testbed as `up` built it
  (its sizes from the state file); docs/testbed.md has the mechanism and models.
"""

from __future__ import annotations

import asyncio
import errno
import json
import sys
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from ctl import bench, runstate, xdp
from ctl import cliutil as cu
from ctl.bpfsys import BpfError, PinnedMap
from ctl.daemon import run_command
from ctl.demo import demo_command
from ctl.layout import TransceiverState
from ctl.loader import DEFAULT_PIN_DIR, MAP_NAMES, PROGRAM_NAME, RelayProgram
from ctl.maps import RelayMaps, TransceiverEntry, monotonic_ns
from ctl.redisstate import RedisState, connect, redact
from ctl.redissync import transceiver_record

PROG = "relayctl"
ERROR_PREFIX = f"{PROG}: error: "


@dataclass
class Settings:
    """Global options, shared with every command through the click context."""

    pin_dir: Path = DEFAULT_PIN_DIR
    debug: bool = False
    redis_url: str | None = None
    redis_prefix: str = "splitrelay:"


T = TypeVar("T")


class RelayctlGroup(click.Group):
    """The root group: turns every failure into one stderr line and an exit code.

    This lives in the group's main() rather than in a wrapper function so that
    the console script, `python -m ctl.cli` and click's CliRunner all behave
    the same.
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
        settings = Settings()
        extra.setdefault("obj", settings)
        try:
            rv = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
            code = rv if isinstance(rv, int) else 0
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx else PROG
            _fail(f"{cu.one_line(exc.format_message())} (see '{where} --help')")
            code = exc.exit_code
        except click.ClickException as exc:
            _fail(cu.one_line(exc.format_message()))
            code = exc.exit_code
        except click.Abort:
            _fail("aborted")
            code = 1
        except Exception as exc:
            code = _report(exc, settings)
        if standalone_mode:
            sys.exit(code)
        return code


def _fail(message: str) -> None:
    """The single stderr line every failure ends in (scripts may grep the prefix)."""
    click.echo(ERROR_PREFIX + message, err=True)


def _report(exc: Exception, settings: Settings) -> int:
    """Print the one-line message for exc (and the traceback with --debug)."""
    if settings.debug:
        traceback.print_exception(exc, file=sys.stderr)
    message, known = cu.error_line(exc, settings.pin_dir)
    if not known and not settings.debug:
        message += " (rerun with --debug for the traceback)"
    _fail(message)
    return 1


def _emit_json(data: Any) -> None:
    """One indented JSON document and nothing else on stdout, for `--json`."""
    click.echo(json.dumps(data, indent=2))


@contextmanager
def _open_maps(settings: Settings) -> Iterator[RelayMaps]:
    """The pinned maps, closed again even when the command fails half-way."""
    maps = RelayMaps(settings.pin_dir)
    try:
        yield maps
    finally:
        maps.close()


JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print JSON only.")


@click.group(PROG, cls=RelayctlGroup, context_settings={"auto_envvar_prefix": "SPLITRELAY"})
@click.option(
    "--pin-dir",
    type=click.Path(path_type=Path, file_okay=False, readable=False),  # EACCES: "run as root"
    default=DEFAULT_PIN_DIR,
    show_default=True,
    help="bpffs directory holding the relay's pinned maps and program.",
)
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.pass_obj
def relayctl(settings: Settings, pin_dir: Path, debug: bool) -> None:
    """Control the splitrelay XDP relay: sessions, transceivers, counters, status."""
    settings.pin_dir = pin_dir
    settings.debug = debug


relayctl.add_command(run_command)
relayctl.add_command(demo_command)


# ----------------------------------------------------------------------- sessions


@relayctl.group()
def sessions() -> None:
    """Client sessions in the data plane (client address:port -> transceiver)."""


@sessions.command("ls")
@JSON_OPTION
@click.option("--transceiver", "tid", type=cu.TRANSCEIVER_ID, help="Only this transceiver's.")
@click.pass_obj
def sessions_ls(settings: Settings, as_json: bool, tid: int | None) -> None:
    """List sessions, IPv4 first, by client address."""
    with _open_maps(settings) as maps:
        now = monotonic_ns()
        entries = sorted(maps.iter_sessions(), key=cu.session_sort_key)
    records = [cu.session_record(e, now) for e in entries if tid is None or e.tid == tid]
    if as_json:
        _emit_json(records)
        return
    rows = [cu.session_row(r) for r in records]
    click.echo(cu.render_table(cu.SESSION_HEADERS, rows, cu.SESSION_NUMERIC_COLUMNS))


@sessions.command("show")
@click.argument("client", type=cu.ENDPOINT)
@JSON_OPTION
@click.pass_obj
def sessions_show(settings: Settings, client: cu.Endpoint, as_json: bool) -> None:
    """Show one session by client ADDR:PORT."""
    with _open_maps(settings) as maps:
        entry = maps.session(client.addr, client.port)
    if entry is None:
        raise click.ClickException(f"no session for {client}")
    rec = cu.session_record(entry, monotonic_ns())
    if as_json:
        _emit_json(rec)
        return
    click.echo(cu.render_session(rec))


@sessions.command("add")
@click.argument("client", type=cu.ENDPOINT)
@click.option("--transceiver", "tid", type=cu.TRANSCEIVER_ID, required=True, help="Owner id.")
@click.option(
    "--relay",
    type=cu.ENDPOINT,
    required=True,
    help="Public ADDR:PORT the client sends to (replies leave from it).",
)
@click.pass_obj
def sessions_add(settings: Settings, client: cu.Endpoint, tid: int, relay: cu.Endpoint) -> None:
    """Route CLIENT to a transceiver (replaces an existing session)."""
    if client.addr.version != relay.addr.version:
        raise click.UsageError(f"client {client} and relay {relay} must be the same address family")
    with _open_maps(settings) as maps:
        if maps.transceiver(tid) is None:
            raise click.ClickException(
                f"no transceiver {cu.format_tid(tid)} (add it first: relayctl transceivers add)"
            )
        maps.put_session(client.addr, client.port, tid, relay.addr, relay.port)
    click.echo(f"added session {client} -> {cu.format_tid(tid)} via {relay}")


@sessions.command("rm")
@click.argument("client", type=cu.ENDPOINT)
@click.pass_obj
def sessions_rm(settings: Settings, client: cu.Endpoint) -> None:
    """Forget the session of CLIENT (its next STUN request can route it again)."""
    with _open_maps(settings) as maps:
        if not maps.remove_session(client.addr, client.port):
            raise click.ClickException(f"no session for {client}")
    click.echo(f"removed session {client}")


@sessions.command("flush")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def sessions_flush(settings: Settings, yes: bool) -> None:
    """Remove every session."""
    with _open_maps(settings) as maps:
        if not yes:
            click.confirm(f"remove every session in {settings.pin_dir}?", abort=True, err=True)
        count = maps.flush_sessions()
    click.echo(f"flushed {count} session{'s' if count != 1 else ''}")


# ----------------------------------------------------------------------- transceivers


@relayctl.group()
@click.option(
    "--redis-url",
    envvar="SPLITRELAY_REDIS_URL",
    metavar="URL",
    help="Edit the shared registry in Redis instead of this relay's maps "
    "(every relay mirrors it within a second).",
)
@click.option(
    "--redis-prefix",
    envvar="SPLITRELAY_REDIS_PREFIX",
    default="splitrelay:",
    show_default=True,
    help="Prefix of the Redis keys.",
)
@click.pass_obj
def transceivers(settings: Settings, redis_url: str | None, redis_prefix: str) -> None:
    """Transceivers the relay may forward to.

    Without --redis-url these commands edit the relay's BPF copy of the
    registry; a daemon that syncs the registry from Redis may overwrite them.
    With --redis-url they write the shared registry (operator records, no TTL).
    """
    settings.redis_url = redis_url
    settings.redis_prefix = redis_prefix


def _registry(settings: Settings, action: Callable[[RedisState], Awaitable[T]]) -> T:
    """Run one registry operation against Redis, with a one-line error if it is down."""
    from redis.exceptions import RedisError

    async def run() -> T:
        state = RedisState(connect(settings.redis_url or ""), settings.redis_prefix)
        try:
            return await action(state)
        finally:
            await state.r.aclose()

    try:
        return asyncio.run(run())
    except (RedisError, OSError) as exc:
        raise click.ClickException(
            f"Redis {redact(settings.redis_url or '')}: {' '.join(str(exc).split())}"
        ) from None


@transceivers.command("ls")
@JSON_OPTION
@click.pass_obj
def transceivers_ls(settings: Settings, as_json: bool) -> None:
    """List transceivers with their sessions count."""
    if settings.redis_url:
        found = _registry(settings, lambda r: r.list_transceivers())
        entries = [TransceiverEntry(t.tid, t.addr, t.port, t.state) for t in found]
        owned: Counter[int] = Counter()
    else:
        with _open_maps(settings) as maps:
            entries = maps.list_transceivers()
            owned = Counter(s.tid for s in maps.iter_sessions())
    records = [cu.transceiver_record(e, owned.get(e.tid, 0)) for e in entries]
    if as_json:
        _emit_json(records)
        return
    rows = [cu.transceiver_row(r) for r in records]
    click.echo(cu.render_table(cu.TRANSCEIVER_HEADERS, rows, right=(3,)))


@transceivers.command("add")
@click.argument("tid", metavar="ID", type=cu.TRANSCEIVER_ID)
@click.argument("address", metavar="ADDR:PORT", type=cu.ENDPOINT)
@click.option("--draining", is_flag=True, help="Add it draining (no new sessions).")
@click.pass_obj
def transceivers_add(settings: Settings, tid: int, address: cu.Endpoint, draining: bool) -> None:
    """Add or replace transceiver ID at its tunnel ADDR:PORT (active unless --draining)."""
    state = TransceiverState.DRAINING if draining else TransceiverState.ACTIVE
    if settings.redis_url:
        rec = transceiver_record(tid, address.addr, address.port, draining, source="operator")
        _registry(settings, lambda r: r.put_transceiver(rec, ttl=None))
        click.echo(
            f"registered transceiver {cu.format_tid(tid)} at {address} "
            f"({state.name.lower()}) in Redis"
        )
        return
    with _open_maps(settings) as maps:
        verb = "updated" if maps.transceiver(tid) is not None else "added"
        maps.put_transceiver(tid, address.addr, address.port, state)
    click.echo(f"{verb} transceiver {cu.format_tid(tid)} at {address} ({state.name.lower()})")


@transceivers.command("rm")
@click.argument("tid", metavar="ID", type=cu.TRANSCEIVER_ID)
@click.pass_obj
def transceivers_rm(settings: Settings, tid: int) -> None:
    """Remove transceiver ID; its sessions stay until they expire or are removed.

    With --redis-url every relay removes it, and its sessions with it.
    """
    if settings.redis_url:
        if not _registry(settings, lambda r: r.remove_transceiver(tid)):
            raise click.ClickException(f"no transceiver {cu.format_tid(tid)} in Redis")
        click.echo(f"removed transceiver {cu.format_tid(tid)} from Redis")
        return
    with _open_maps(settings) as maps:
        if not maps.remove_transceiver(tid):
            raise click.ClickException(f"no transceiver {cu.format_tid(tid)}")
        left = sum(1 for s in maps.iter_sessions() if s.tid == tid)
    note = f" ({left} of its sessions remain until they expire or are removed)" if left else ""
    click.echo(f"removed transceiver {cu.format_tid(tid)}{note}")


@transceivers.command("drain")
@click.argument("tid", metavar="ID", type=cu.TRANSCEIVER_ID)
@click.pass_obj
def transceivers_drain(settings: Settings, tid: int) -> None:
    """Stop new sessions for ID; its existing sessions keep flowing."""
    if settings.redis_url:
        draining = TransceiverState.DRAINING
        if not _registry(settings, lambda r: r.set_transceiver_state(tid, draining)):
            raise click.ClickException(f"no transceiver {cu.format_tid(tid)} in Redis")
        click.echo(f"transceiver {cu.format_tid(tid)} is draining (in Redis)")
        return
    with _open_maps(settings) as maps:
        entry = maps.transceiver(tid)
        if entry is None:
            raise click.ClickException(f"no transceiver {cu.format_tid(tid)}")
        maps.put_transceiver(tid, entry.addr, entry.port, TransceiverState.DRAINING)
    click.echo(f"transceiver {cu.format_tid(tid)} is draining")


# ----------------------------------------------------------------------- stats


@relayctl.command()
@JSON_OPTION
@click.option("--watch", is_flag=True, help="Refresh in place, with rates, until Ctrl-C.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Seconds between refreshes (with --watch).",
)
@click.option("--count", type=click.IntRange(min=1), help="Stop after N refreshes (--watch).")
@click.pass_context
def stats(
    ctx: click.Context, as_json: bool, watch: bool, interval: float, count: int | None
) -> None:
    """Counters of both paths: forwarded, sessions, drops and passes by reason.

    The XDP program's counters come from the pinned map; the userspace path's
    from the running daemon, which copies them into its run state every
    second. The first line says which path relays. JSON: {"xdp": groups or
    null, "userspace": groups or null (no running daemon), "daemon": ...}.
    """
    settings: Settings = ctx.obj
    if watch and as_json:
        raise click.UsageError("--json and --watch do not mix: poll `stats --json` instead")
    if not watch:
        for name in ("interval", "count"):
            if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
                raise click.UsageError(f"--{name} needs --watch")
    if watch:
        with _open_maps(settings) as maps:
            _watch_stats(maps, settings.pin_dir, interval, count)
        return
    report = cu.stats_report(_kernel_counters(settings.pin_dir), _daemon_record(settings.pin_dir))
    if as_json:
        _emit_json(report)
    else:
        click.echo("\n".join(cu.render_stats_report(report)))


def _daemon_record(pin_dir: Path) -> dict[str, Any] | None:
    """The daemon's run state as a dict, with whether it still runs."""
    state = runstate.load(pin_dir)
    return None if state is None else {**asdict(state), "alive": state.alive}


def _kernel_counters(pin_dir: Path) -> dict[str, int] | None:
    """The pinned counters; None only when a running daemon has no maps (XDP could not load)."""
    try:
        with RelayMaps(pin_dir) as maps:
            return maps.counters_snapshot()
    except BpfError as exc:
        state = runstate.load(pin_dir)
        if exc.errno == errno.ENOENT and state is not None and state.alive:
            return None
        raise


def _watch_stats(maps: RelayMaps, pin_dir: Path, interval: float, count: int | None) -> None:
    """Redraw the counters in place like `top`; Ctrl-C ends it as a normal exit.

    Userspace rates are computed between two copies the daemon recorded (one
    a second), not between frames, and kept until the next copy arrives.
    """
    prev: dict[str, int] | None = None
    prev_t = 0.0
    us_prev: tuple[float, dict[str, int]] | None = None
    us_rates: dict[str, float | None] | None = None
    deadline = time.monotonic()
    frames = 0
    try:
        click.echo(cu.HIDE_CURSOR + cu.CLEAR_SCREEN, nl=False, color=True)
        while True:
            snap, now = maps.counters_snapshot(), time.monotonic()
            rates = cu.counter_rates(prev, snap, now - prev_t) if prev is not None else None
            record = _daemon_record(pin_dir)
            daemon = cu.stats_report(snap, record)["daemon"]
            userspace = None
            if record is not None and daemon["counters_updated"] is not None:
                taken = float(daemon["counters_updated"])
                us_snap: dict[str, int] = dict(record["userspace_counters"])
                if us_prev is not None and taken > us_prev[0]:
                    us_rates = cu.counter_rates(us_prev[1], us_snap, taken - us_prev[0])
                if us_prev is None or taken > us_prev[0]:
                    us_prev = (taken, us_snap)
                userspace = cu.StatsSection(cu.userspace_title(daemon), us_snap, us_rates)
            frames += 1
            lines = cu.stats_watch_lines(
                pin_dir,
                interval,
                frames,
                count,
                snap,
                rates,
                path_line=cu.stats_path_line(daemon),
                userspace=userspace,
            )
            click.echo(cu.watch_frame(lines), nl=False, color=True)
            if count is not None and frames >= count:
                return
            prev, prev_t = snap, now
            deadline += interval
            delay = deadline - time.monotonic()
            if delay < 0:  # fell behind (e.g. suspended): carry on, do not catch up
                deadline, delay = time.monotonic() + interval, interval
            time.sleep(delay)
    except KeyboardInterrupt:
        return
    finally:
        click.echo(cu.SHOW_CURSOR, nl=False, color=True)


# ----------------------------------------------------------------------- status


@relayctl.command()
@JSON_OPTION
@click.pass_obj
def status(settings: Settings, as_json: bool) -> None:
    """What is pinned, how full the maps are, and what the daemon reports."""
    report = _status_report(settings.pin_dir)
    if as_json:
        _emit_json(report)
    else:
        click.echo(cu.render_status(report))


def _status_report(pin_dir: Path) -> dict[str, Any]:
    maps = {name: _map_status(pin_dir / name) for name in MAP_NAMES}
    report: dict[str, Any] = {
        "pin_dir": str(pin_dir),
        "pin_dir_exists": pin_dir.is_dir(),
        "program_pinned": (pin_dir / PROGRAM_NAME).exists(),
        "maps": maps,
        "sessions": maps["sessions"].get("entries"),
        "transceivers": maps["transceivers"].get("entries"),
        "addresses": None,
        "daemon": None,
        "interfaces": {},
    }
    if all(m["pinned"] for m in maps.values()):
        with RelayMaps(pin_dir) as relay_maps:
            report["addresses"] = cu.addresses_record(relay_maps.addresses())
    state = runstate.load(pin_dir)
    if state is not None:
        report["daemon"] = {**asdict(state), "alive": state.alive}
        report["daemon"]["state"] = "running" if state.alive else "stale"
        report["interfaces"] = {name: _xdp_status(name) for name in state.interfaces}
    return report


def _map_status(path: Path) -> dict[str, Any]:
    """Geometry and fill of one pinned map; a missing pin is reported, not raised."""
    try:
        m = PinnedMap.open(path)
    except BpfError as exc:
        if exc.errno != errno.ENOENT:  # not pinned; anything else (EPERM...) is an error
            raise
        return {"pinned": False}
    with m:
        out: dict[str, Any] = {
            "pinned": True,
            "type": m.type_name.lower(),
            "max_entries": m.max_entries,
        }
        if path.name in ("sessions", "transceivers"):
            out["entries"] = sum(1 for _ in m)
            out["fill"] = round(out["entries"] / m.max_entries, 4)
    return out


def _xdp_status(ifname: str) -> dict[str, Any]:
    """The live kernel view of one of the daemon's interfaces (it may have vanished)."""
    try:
        info = xdp.info(ifname)
    except xdp.XdpError as exc:
        return {"error": str(exc)}
    return {"ifindex": info.ifindex, "mode": info.mode, "prog_id": info.prog_id}


# ----------------------------------------------------------------------- attach / detach

MODES = click.Choice([m.value for m in xdp.AttachMode])


@relayctl.command()
@click.argument("ifnames", metavar="IFNAME...", nargs=-1, required=True)
@click.option("--mode", type=MODES, default="auto", show_default=True, help="XDP attach mode.")
@click.pass_obj
def attach(settings: Settings, ifnames: tuple[str, ...], mode: str) -> None:
    """Compile and pin the relay program and attach it to each interface."""
    for name in ifnames:  # a typo fails in milliseconds, before the compile
        xdp.ifindex(name)
    program = RelayProgram(settings.pin_dir).load()
    try:
        program.pin_program()
        for name in ifnames:
            used = program.attach(name, xdp.AttachMode(mode))
            click.echo(f"{name}: attached ({used.value})")
    finally:
        program.close()
    with _open_maps(settings) as maps:
        if not cu.addresses_configured(maps.addresses()):
            click.echo(
                "note: no relay addresses configured yet; the program passes everything up "
                "until the daemon (relayctl run) sets them",
                err=True,
            )


@relayctl.command()
@click.argument("ifnames", metavar="IFNAME...", nargs=-1, required=True)
def detach(ifnames: tuple[str, ...]) -> None:
    """Remove whatever XDP program is attached to each interface."""
    for name in ifnames:
        click.echo(f"{name}: {'detached' if xdp.detach(name) else 'no XDP program'}")


# ----------------------------------------------------------------------- testbed


@relayctl.group()
def testbed() -> None:
    """The single-machine network-namespace testbed."""


PREFIX_OPTION = click.option(
    "--prefix", default="sr", show_default=True, help="Namespace name prefix."
)


@contextmanager
def _testbed(prefix: str, from_state: bool = False) -> Iterator[Any]:
    """The Testbed for a prefix, with its errors turned into one-line CLI errors.

    from_state: the testbed as `up` built it (its sizes from the state file), for
    the commands that inspect or change a built testbed.
    Imported late: only these commands need it, and its import is the heaviest
    of the package.
    """
    from ctl.testbed import Testbed, TestbedError

    try:
        yield Testbed.from_state(prefix) if from_state else Testbed(prefix)
    except TestbedError as exc:
        raise click.ClickException(cu.one_line(str(exc))) from exc


@testbed.command("up")
@JSON_OPTION
@PREFIX_OPTION
def testbed_up(as_json: bool, prefix: str) -> None:
    """Build (or repair) the testbed; idempotent."""
    with _testbed(prefix) as tb:
        desc = tb.up()
    if as_json:
        _emit_json(desc)
    else:
        click.echo(cu.render_testbed(desc))


@testbed.command("down")
@JSON_OPTION
@PREFIX_OPTION
def testbed_down(as_json: bool, prefix: str) -> None:
    """Remove every namespace and process the testbed made."""
    with _testbed(prefix) as tb:
        removed = tb.down()
    if as_json:
        _emit_json({"prefix": prefix, "removed": removed})
    else:
        click.echo(f"testbed {prefix}: removed {len(removed)} namespaces")


@testbed.command("status")
@JSON_OPTION
@PREFIX_OPTION
def testbed_status(as_json: bool, prefix: str) -> None:
    """Compare what exists with the plan; changes nothing. Shows impairments too."""
    with _testbed(prefix, from_state=True) as tb:
        st = tb.status()
    if as_json:
        _emit_json(st)
    else:
        click.echo(cu.render_testbed_status(prefix, st))


# Options that describe an impairment (the rest select clients or the output).
IMPAIR_OPTIONS = (
    "loss",
    "burst_loss",
    "burst_length",
    "delay",
    "jitter",
    "reorder",
    "reorder_gap",
    "outage",
    "outage_in",
    "seed",
    "limit",
)


@testbed.command("impair")
@click.argument("clients", nargs=-1, metavar="[CLIENT]...")
@PREFIX_OPTION
@click.option(
    "--direction",
    type=click.Choice(["up", "down", "both"]),
    default="both",
    show_default=True,
    help="up: client to relay; down: relay to client.",
)
@click.option("--loss", type=cu.PERCENT, help="Random (independent) loss: 2, 2% or 0.5%.")
@click.option(
    "--burst-loss",
    type=cu.PERCENT,
    help="Burst loss (Gilbert-Elliott): mean loss rate; needs --burst-length.",
)
@click.option("--burst-length", type=cu.PACKETS, help="Mean burst length in packets (>= 1).")
@click.option("--delay", type=cu.MILLISECONDS, help="Fixed delay: 20, 20ms or 0.3s.")
@click.option(
    "--jitter",
    type=cu.MILLISECONDS,
    help="Extra delay, uniform in [0, MS]; packets keep their order.",
)
@click.option(
    "--reorder",
    type=cu.PERCENT,
    help="Share of packets held back by --reorder-gap, landing after their successors.",
)
@click.option(
    "--reorder-gap",
    type=cu.MILLISECONDS,
    help="How long a reordered packet is held back (default 30ms).",
)
@click.option("--outage", type=cu.MILLISECONDS, help="Drop everything for MS, once.")
@click.option(
    "--outage-in",
    type=cu.SECONDS,
    help="Start the outage S seconds from now (default: at once): 2, 2s, 500ms.",
)
@click.option(
    "--seed",
    type=click.IntRange(0, 2**63 - 1),
    help="Seed of the random models (default: drawn, shown and recorded).",
)
@click.option(
    "--limit",
    type=click.IntRange(1, 1_000_000),
    help="Packets held at most (default 10000); beyond it drops count as queue_full.",
)
@click.option("--clear", is_flag=True, help="Remove the impairment of the CLIENTs.")
@click.option("--show", is_flag=True, help="Show applied impairments and their counters.")
@JSON_OPTION
@click.pass_context
def testbed_impair(
    ctx: click.Context,
    clients: tuple[str, ...],
    prefix: str,
    direction: str,
    clear: bool,
    show: bool,
    as_json: bool,
    **values: Any,
) -> None:
    """Impair the traffic between CLIENTs (default: every client) and the relays.

    Loss, burst loss, delay, jitter, reordering and a timed outage, on the
    client's switch port, for UDP and TCP to and from the relays' public
    addresses only (signaling to the transceivers is untouched), IPv4 and
    IPv6, whatever runs in the client's namespace. Applying again replaces the
    client's impairment without a gap; `--clear` removes it; `testbed down`
    removes everything. See docs/testbed.md.
    """
    given = [
        name
        for name in (*IMPAIR_OPTIONS, "direction")
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
    ]
    if clear and show:
        raise click.UsageError("--clear and --show do not mix")
    if (clear or show) and given:
        opts = ", ".join("--" + n.replace("_", "-") for n in given)
        raise click.UsageError(f"{'--clear' if clear else '--show'} takes no {opts}")
    if not (clear or show) and not [n for n in given if n not in ("direction", "seed", "limit")]:
        raise click.UsageError(
            "nothing to apply: give --loss, --burst-loss, --delay, --jitter, --reorder "
            "or --outage (or --clear, --show)"
        )
    if "reorder_gap" in given and values.get("reorder") is None:
        raise click.UsageError("--reorder-gap needs --reorder (the share of packets held back)")
    spec = None if clear or show else _impair_spec(direction, values)
    from ctl import impairctl

    with _testbed(prefix, from_state=True) as tb:
        if show:
            impairctl.require_up(tb)
            selected = impairctl.resolve_clients(tb, clients) if clients else None
            shown = impairctl.status(tb, selected)
            if as_json:
                _emit_json({"prefix": prefix, "impairments": shown})
            else:
                click.echo(cu.render_impairments(prefix, shown))
            return
        if clear:
            cleared = impairctl.clear(tb, clients)
            if as_json:
                _emit_json({"prefix": prefix, "cleared": cleared})
            else:
                click.echo(cu.render_cleared(cleared))
            return
        applied = impairctl.apply(tb, clients, spec)
    if as_json:
        _emit_json({"prefix": prefix, "applied": applied})
    else:
        click.echo("\n".join(cu.impairment_line(rec) for rec in applied.values()))


def _impair_spec(direction: str, values: dict[str, Any]) -> Any:
    """The validated ImpairSpec from the options; a bad combination is a usage error."""
    import secrets

    from ctl.impair import DEFAULT_LIMIT, DEFAULT_REORDER_GAP_MS, ImpairError, ImpairSpec

    def get(name: str, default: float = 0.0) -> Any:
        value = values.get(name)
        return default if value is None else value

    try:
        return ImpairSpec(
            direction=direction,
            loss=get("loss"),
            burst_loss=get("burst_loss"),
            burst_length=get("burst_length"),
            delay_ms=get("delay"),
            jitter_ms=get("jitter"),
            reorder=get("reorder"),
            reorder_gap_ms=get("reorder_gap", DEFAULT_REORDER_GAP_MS),
            outage_ms=get("outage"),
            outage_in_s=get("outage_in"),
            seed=values["seed"] if values.get("seed") is not None else secrets.randbelow(2**32),
            limit=get("limit", DEFAULT_LIMIT),
        )
    except ImpairError as exc:
        raise click.UsageError(str(exc)) from None


# ----------------------------------------------------------------------- bench


relayctl.add_command(bench.bench_command)


def main() -> None:
    """Console-script entry point (`relayctl`)."""
    relayctl.main(prog_name=PROG)


if __name__ == "__main__":
    main()
