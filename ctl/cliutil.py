"""Parsing and formatting for `relayctl`, kept apart from the commands so it is pure.

Everything here is a function of its arguments (no maps, no kernel), which is
what lets tests/unit/test_cliutil.py check the operator-facing surface, the
accepted spellings of endpoints and ids, the JSON records, the tables and the
one-line error messages, without root.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from ctl import impair
from ctl.bpfsys import BpfError
from ctl.loader import LoadError
from ctl.maps import RelayAddresses, SessionEntry, TransceiverEntry
from ctl.netns import NetnsError
from ctl.xdp import XdpError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
T = TypeVar("T")

MAX_TID = 0xFFFFFFFF
ENDPOINT_FORMS = "a.b.c.d:port or [v6]:port"

# Terminal control for `stats --watch`: redraw in place instead of scrolling.
CLEAR_SCREEN = "\x1b[2J"
HOME = "\x1b[H"
CLEAR_EOL = "\x1b[K"
CLEAR_EOS = "\x1b[J"
HIDE_CURSOR = "\x1b[?25l"
SHOW_CURSOR = "\x1b[?25h"

_PORT_RE = re.compile(r"[0-9]{1,5}")
_TID_RE = re.compile(r"[0-9a-f]{1,8}")


# --------------------------------------------------------------------- endpoints


@dataclass(frozen=True)
class Endpoint:
    """An address and UDP port, the unit every relay map is keyed by."""

    addr: IPAddress
    port: int

    def __str__(self) -> str:
        return format_endpoint(self.addr, self.port)


def format_endpoint(addr: IPAddress, port: int) -> str:
    """`a.b.c.d:port` or `[v6]:port`: the form parse_endpoint reads back."""
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


def parse_endpoint(text: str) -> Endpoint:
    """Read `a.b.c.d:port` or `[v6]:port` (no names: the maps hold addresses only).

    An IPv4-mapped IPv6 address comes back as IPv4, because the maps store both
    spellings identically and the listings print the IPv4 form.
    """
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"bad endpoint {text!r}: expected {ENDPOINT_FORMS}")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f"bad endpoint {text!r}: missing :port ({ENDPOINT_FORMS})")
        if ":" in host:
            raise ValueError(f"bad endpoint {text!r}: an IPv6 address needs brackets, [v6]:port")
    if "%" in host:
        raise ValueError(f"bad endpoint {text!r}: scoped addresses are not supported")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"bad endpoint {text!r}: {host!r} is not an IP address") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return Endpoint(addr, parse_port(port, text))


def parse_port(port: str, context: str) -> int:
    """A UDP port, 1..65535 (0 cannot be a client's or relay's port)."""
    if not _PORT_RE.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise ValueError(f"bad endpoint {context!r}: port must be 1..65535")
    return int(port)


# --------------------------------------------------------------------- transceiver ids


def parse_tid(text: str) -> int:
    """A transceiver id in hex as the routing token spells it (`0000a001`, `a001`, `0xa001`)."""
    digits = text.strip().lower().removeprefix("0x")
    if not _TID_RE.fullmatch(digits):
        raise ValueError(f"bad transceiver id {text!r}: expected 1 to 8 hex digits, like 0000a001")
    tid = int(digits, 16)
    if tid == 0:
        raise ValueError("transceiver id 0 is reserved: ids are 1..ffffffff")
    return tid


def format_tid(tid: int) -> str:
    """Eight lowercase hex digits, exactly as inside the server ufrag."""
    return f"{tid:08x}"


# --------------------------------------------------------------------- click parameter types


class EndpointType(click.ParamType):
    """Click parameter for an address:port, so bad input is a usage error naming the option."""

    name = "ADDR:PORT"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, Endpoint):
            return value
        try:
            return parse_endpoint(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class TransceiverIdType(click.ParamType):
    """Click parameter for a hex transceiver id."""

    name = "ID"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int):
            return value
        try:
            return parse_tid(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class ImpairValueType(click.ParamType):
    """Click parameter for `testbed impair` values: `2`/`2%`, `20`/`20ms`/`0.3s`, counts.

    The parsing itself is ctl/impair.py's, so the CLI and the spec agree.
    """

    def __init__(self, kind: str, name: str, default_unit: str = "ms") -> None:
        self.kind = kind
        self.name = name
        self.default_unit = default_unit

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, float):
            return value
        try:
            if self.kind == "percent":
                return impair.parse_percent(str(value), "value")
            if self.kind == "count":
                return impair.parse_count(str(value), "value")
            ms = impair.parse_duration_ms(str(value), "value", self.default_unit)
            return ms / 1000.0 if self.default_unit == "s" else ms
        except impair.ImpairError as exc:
            self.fail(str(exc).removeprefix("value: "), param, ctx)


ENDPOINT = EndpointType()
TRANSCEIVER_ID = TransceiverIdType()
PERCENT = ImpairValueType("percent", "PCT")
MILLISECONDS = ImpairValueType("duration", "MS", "ms")
SECONDS = ImpairValueType("duration", "S", "s")
PACKETS = ImpairValueType("count", "N")


# --------------------------------------------------------------------- numbers and times


def format_duration(seconds: float) -> str:
    """A compact age: `0.4s`, `42s`, `5m03s`, `2h05m`, `3d04h` (fits a table column)."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{int(seconds * 10) / 10:.1f}s"  # truncated, like every tier below
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def format_bytes(n: float) -> str:
    """Bytes in IEC units (`512B`, `1.5KiB`, `20MiB`): readable; --json has exact values."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(value)}B"
            return f"{value:.1f}{unit}" if abs(value) < 10 else f"{value:.0f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_rate(rate: float | None) -> str:
    """Per-second rate for the watch view; `-` when there is no previous sample."""
    if rate is None:
        return "-"
    return f"{rate:.1f}/s" if rate < 100 else f"{rate:.0f}/s"


def render_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()
) -> str:
    """Columns padded to their widest cell, two spaces apart; `right` columns are numbers."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = []
    for row in (headers, *rows):
        cells = [
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def render_fields(fields: Sequence[tuple[str, str]]) -> str:
    """`key   value` lines with aligned values (show/status views)."""
    width = max((len(k) for k, _ in fields), default=0)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in fields)


# --------------------------------------------------------------------- records


def session_record(entry: SessionEntry, now_ns: int) -> dict[str, Any]:
    """One session as JSON: display strings plus exact numbers (ns and counts)."""
    return {
        "client": format_endpoint(entry.client_addr, entry.client_port),
        "client_addr": str(entry.client_addr),
        "client_port": entry.client_port,
        "transceiver": format_tid(entry.tid),
        "tid": entry.tid,
        "relay": format_endpoint(entry.relay_addr, entry.relay_port),
        "relay_addr": str(entry.relay_addr),
        "relay_port": entry.relay_port,
        "origin": entry.origin.name.lower(),
        "created_ns": entry.created_ns,
        "last_seen_ns": entry.last_seen_ns,
        "age_seconds": round(max(0, now_ns - entry.created_ns) / 1e9, 3),
        "idle_seconds": round(max(0, now_ns - entry.last_seen_ns) / 1e9, 3),
        "packets_to_transceiver": entry.packets_to_transceiver,
        "bytes_to_transceiver": entry.bytes_to_transceiver,
        "packets_to_client": entry.packets_to_client,
        "bytes_to_client": entry.bytes_to_client,
    }


SESSION_HEADERS = (
    "CLIENT",
    "TRANSCEIVER",
    "RELAY",
    "ORIGIN",
    "AGE",
    "IDLE",
    "PKTS_TO_T",
    "BYTES_TO_T",
    "PKTS_TO_C",
    "BYTES_TO_C",
)
SESSION_NUMERIC_COLUMNS = (4, 5, 6, 7, 8, 9)


def session_row(rec: Mapping[str, Any]) -> list[str]:
    """A session_record as table cells, in SESSION_HEADERS order."""
    return [
        rec["client"],
        rec["transceiver"],
        rec["relay"],
        rec["origin"],
        format_duration(rec["age_seconds"]),
        format_duration(rec["idle_seconds"]),
        str(rec["packets_to_transceiver"]),
        format_bytes(rec["bytes_to_transceiver"]),
        str(rec["packets_to_client"]),
        format_bytes(rec["bytes_to_client"]),
    ]


def session_sort_key(entry: SessionEntry) -> tuple[int, int, int]:
    """Stable listing order: IPv4 before IPv6, then address, then port."""
    return (entry.client_addr.version, int(entry.client_addr), entry.client_port)


def transceiver_record(entry: TransceiverEntry, sessions: int) -> dict[str, Any]:
    """One transceiver as JSON, with how many sessions the data plane routes to it."""
    return {
        "id": format_tid(entry.tid),
        "tid": entry.tid,
        "address": format_endpoint(entry.addr, entry.port),
        "addr": str(entry.addr),
        "port": entry.port,
        "state": entry.state.name.lower(),
        "sessions": sessions,
    }


TRANSCEIVER_HEADERS = ("ID", "ADDRESS", "STATE", "SESSIONS")


def transceiver_row(rec: Mapping[str, Any]) -> list[str]:
    """A transceiver_record as table cells, in TRANSCEIVER_HEADERS order."""
    return [rec["id"], rec["address"], rec["state"], str(rec["sessions"])]


def addresses_record(addrs: RelayAddresses) -> dict[str, Any]:
    """The relay's configured addresses; None where a family is not served."""
    return {
        "public_port": addrs.public_port,
        "tunnel_port": addrs.tunnel_port,
        "public_v4": _str_or_none(addrs.public_v4),
        "public_v6": _str_or_none(addrs.public_v6),
        "tunnel_v4": _str_or_none(addrs.tunnel_v4),
        "tunnel_v6": _str_or_none(addrs.tunnel_v6),
    }


def addresses_configured(addrs: RelayAddresses) -> bool:
    """False while the config map is still zero, when the program passes everything up."""
    return any(
        a is not None for a in (addrs.public_v4, addrs.public_v6, addrs.tunnel_v4, addrs.tunnel_v6)
    )


def _str_or_none(value: object | None) -> str | None:
    return None if value is None else str(value)


def render_session(rec: Mapping[str, Any]) -> str:
    """`sessions show`: one session as aligned fields, exact byte counts included."""
    return render_fields(
        [
            ("client", rec["client"]),
            ("transceiver", rec["transceiver"]),
            ("relay", rec["relay"]),
            ("origin", rec["origin"]),
            ("age", format_duration(rec["age_seconds"])),
            ("idle", format_duration(rec["idle_seconds"])),
            ("to transceiver", _traffic(rec, "to_transceiver")),
            ("to client", _traffic(rec, "to_client")),
        ]
    )


def _traffic(rec: Mapping[str, Any], direction: str) -> str:
    packets, nbytes = rec[f"packets_{direction}"], rec[f"bytes_{direction}"]
    return f"{packets} packets, {nbytes} bytes ({format_bytes(nbytes)})"


# --------------------------------------------------------------------- status


def render_status(r: Mapping[str, Any]) -> str:
    """`status`: the JSON report of cli._status_report as aligned fields."""
    fields = [
        ("pin dir", f"{r['pin_dir']}{'' if r['pin_dir_exists'] else ' (missing)'}"),
        ("program", "pinned" if r["program_pinned"] else "not pinned"),
    ]
    for name, m in r["maps"].items():
        fields.append((f"map {name}", _map_line(m)))
    if r["addresses"]:
        a = r["addresses"]
        fields.append(("public", _addr_line(a["public_v4"], a["public_v6"], a["public_port"])))
        fields.append(("tunnel", _addr_line(a["tunnel_v4"], a["tunnel_v6"], a["tunnel_port"])))
    fields.extend(_daemon_fields(r["daemon"]))
    for name, i in r["interfaces"].items():
        live = i.get("error") or f"{i['mode'] or 'no XDP'} (prog id {i['prog_id']})"
        fields.append((f"  {name}", live))
    return render_fields(fields)


def _map_line(m: Mapping[str, Any]) -> str:
    if not m["pinned"]:
        return "not pinned"
    line = f"{m['type']}, max {m['max_entries']}"
    if "entries" in m:
        line += f", {m['entries']} used ({m['fill']:.1%})"
    return line


def _addr_line(v4: str | None, v6: str | None, port: int) -> str:
    addrs = [a for a in (v4, v6) if a]
    return f"{', '.join(addrs)} port {port}" if addrs else "not configured"


def _daemon_fields(d: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    if d is None:
        return [("daemon", "no state recorded (not started with relayctl run)")]
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d["started"]))
    fields = [("daemon", f"{d['state']} (pid {d['pid']}, started {started})")]
    if d["xdp"]:
        modes = ", ".join(f"{k} {v}" for k, v in d["interfaces"].items())
        fields.append(("xdp", f"attached: {modes}"))
    else:
        fields.append(("xdp", f"not attached: {d['fallback_reason'] or 'no reason recorded'}"))
    fields.append(("metrics", d["metrics"] or "off"))
    return fields


# --------------------------------------------------------------------- testbed


def render_testbed(desc: Mapping[str, Any]) -> str:
    """`testbed up`: where every host is and how to reach it."""
    rows = []
    for name, h in desc.get("hosts", {}).items():
        if h.get("role") == "relay":
            where = ", ".join(h.get("relay_addr", []))
        else:
            where = ", ".join(a for a in (h.get("ipv4"), h.get("ipv6")) if a)
        url = h.get("signaling_url") or h.get("url") or h.get("metrics_url") or ""
        rows.append([name, h.get("role", ""), h.get("netns", ""), where, url])
    table = render_table(("HOST", "ROLE", "NETNS", "ADDRESSES", "URL"), rows)
    return f"testbed {desc.get('prefix')} is up\n{table}"


def render_testbed_status(prefix: str, st: Mapping[str, Any]) -> str:
    """`testbed status`: the state, then what `up` would fix, then the processes."""
    state = st.get("state", "?")
    if state == "down":  # every step would be a "problem": say how to build it instead
        return f"testbed {prefix}: down (relayctl testbed up --prefix {prefix} builds it)"
    lines = [f"testbed {prefix}: {state}"]
    lines += [f"  problem: {p}" for p in st.get("problems", [])]
    for p in st.get("processes", []):
        lines.append(f"  process {p.get('pid')}: {'alive' if p.get('alive') else 'gone'}")
    impairments = st.get("impairments") or {}
    for rec in impairments.values():
        lines += ["  " + line for line in render_impairment(rec)]
    return "\n".join(lines)


# --------------------------------------------------------------------- testbed impair


def _clock(wall: float) -> str:
    """`12:00:01.234`, local time, for an outage window."""
    return time.strftime("%H:%M:%S", time.localtime(wall)) + f".{int(wall * 1000) % 1000:03d}"


def impairment_line(rec: Mapping[str, Any]) -> str:
    """`c1: both: loss 10% (seed 7, daemon pid 42 active, SCHED_FIFO 10)`."""
    d = rec["daemon"]
    state = d.get("state") if d.get("alive") else "NOT RUNNING"
    line = (
        f"{rec['client']}: {rec['summary']} (seed {rec['spec']['seed']}, "
        f"daemon pid {d['pid']} {state}, {d.get('sched') or '?'})"
    )
    outage = rec.get("outage")
    if outage:
        start = outage["start_wall"]
        length = (outage["end_ns"] - outage["start_ns"]) / 1e9
        line += f"; outage {_clock(start)}-{_clock(start + length)} ({outage['state']})"
    return line


def impairment_counter_line(direction: str, c: Mapping[str, Any]) -> str:
    """`up    seen 2000  forwarded 1800  dropped 200 (loss 200)  reordered 0  held 0`."""
    reasons = ", ".join(f"{k} {v}" for k, v in c["dropped"].items() if v)
    dropped = f"dropped {c['dropped_total']}" + (f" ({reasons})" if reasons else "")
    return (
        f"{direction.ljust(4)}  seen {c['seen']}  forwarded {c['forwarded']}  {dropped}  "
        f"reordered {c['reordered']}  held {c['held']}"
    )


def render_impairment(rec: Mapping[str, Any]) -> list[str]:
    """One client's impairment: its line, counters per direction, lateness, problems."""
    lines = [f"impairment {impairment_line(rec)}"]
    for direction, c in (rec.get("counters") or {}).items():
        lines.append("  " + impairment_counter_line(direction, c))
    late = rec.get("lateness")
    if late and sum(late["counts"]):
        on_time = sum(late["counts"][:5])  # buckets below 1 ms
        total = sum(late["counts"])
        lines.append(
            f"  sent within 1ms of due: {on_time}/{total}, latest {late['max_us'] / 1000:.2f}ms"
        )
    lines += [f"  problem: {p}" for p in rec.get("problems", [])]
    return lines


def render_impairments(prefix: str, impairments: Mapping[str, Mapping[str, Any]]) -> str:
    """`testbed impair --show`: every client's impairment, or a line saying there is none."""
    if not impairments:
        return f"testbed {prefix}: no impairment applied"
    return "\n".join(line for rec in impairments.values() for line in render_impairment(rec))


def render_cleared(cleared: Mapping[str, Mapping[str, Any] | None]) -> str:
    """`testbed impair --clear`: per client, the final counters or that nothing was applied."""
    lines = []
    for client, final in cleared.items():
        if final is None:
            lines.append(f"{client}: nothing to clear")
            continue
        lines.append(f"{client}: cleared")
        for direction, c in (final.get("counters") or {}).items():
            lines.append("  " + impairment_counter_line(direction, c))
    return "\n".join(lines)


# --------------------------------------------------------------------- counters

# Counter name prefix -> (group, prefix stripped in the group). The groups are the
# operator's questions: what was forwarded, what happened to sessions, why was a
# packet dropped, why was it passed up to the userspace path.
COUNTER_GROUPS: tuple[tuple[str, str, bool], ...] = (
    ("fwd_", "forwarded", True),
    ("sessions_", "sessions", True),
    ("events_", "sessions", False),
    ("drop_", "drops", True),
    ("pass_", "passes", True),
)
GROUP_ORDER = ("forwarded", "sessions", "drops", "passes", "other")


def group_counters(values: Mapping[str, T]) -> dict[str, dict[str, T]]:
    """Split flat counter values into the stats groups, keeping the header's order.

    A counter with an unknown prefix lands in `other`, so a new counter added to
    bpf/splitrelay.h shows up at once instead of being hidden.
    """
    groups: dict[str, dict[str, T]] = {g: {} for g in GROUP_ORDER}
    for name, value in values.items():
        for prefix, group, strip in COUNTER_GROUPS:
            if name.startswith(prefix):
                groups[group][name.removeprefix(prefix) if strip else name] = value
                break
        else:
            groups["other"][name] = value
    if not groups["other"]:
        del groups["other"]
    return groups


def counter_rates(
    before: Mapping[str, int], after: Mapping[str, int], seconds: float
) -> dict[str, float | None]:
    """Per-second increase of each counter; None when it went down (counters were reset)."""
    rates: dict[str, float | None] = {}
    for name, value in after.items():
        delta = value - before.get(name, value)
        rates[name] = delta / seconds if delta >= 0 and seconds > 0 else None
    return rates


def render_stats(
    groups: Mapping[str, Mapping[str, int]],
    rates: Mapping[str, Mapping[str, float | None]] | None = None,
    with_rates: bool = False,
) -> list[str]:
    """The grouped counters as text lines; drops and passes carry their total.

    with_rates adds a rate column (`-` for the first sample, before any rate exists).
    """
    width = max((len(n) for g in groups.values() for n in g), default=0)
    lines: list[str] = []
    for group, counters in groups.items():
        title = group
        if group in ("drops", "passes"):
            title = f"{group} (total {sum(counters.values())})"
        lines.append(title)
        for name, value in counters.items():
            line = f"  {name.ljust(width)}  {value:>14}"
            if with_rates:
                rate = rates.get(group, {}).get(name) if rates else None
                line += f"  {format_rate(rate):>12}"
            lines.append(line)
    return lines


@dataclass(frozen=True)
class StatsSection:
    """One titled block of `stats --watch`: counter values and their rates (None: no rate yet)."""

    title: str
    snapshot: Mapping[str, int]
    rates: Mapping[str, float | None] | None


def stats_watch_lines(
    pin_dir: Path,
    interval: float,
    frame: int,
    count: int | None,
    snapshot: Mapping[str, int],
    rates: Mapping[str, float | None] | None,
    *,
    path_line: str | None = None,
    userspace: StatsSection | None = None,
) -> list[str]:
    """One `stats --watch` screen: a header line, then every counter with its rate.

    snapshot/rates are the kernel's counters; with `userspace` (the daemon's
    counters) both blocks get a title, and path_line says which path relays.
    """
    of = f"/{count}" if count else ""
    header = (
        f"relayctl stats  {pin_dir}  every {interval:g}s  {time.strftime('%H:%M:%S')}  "
        f"refresh {frame}{of}  (Ctrl-C quits)"
    )
    grouped_rates = group_counters(rates) if rates is not None else None
    lines = [header, ""]
    if path_line:
        lines += [path_line, ""]
    if userspace is not None:
        lines.append(XDP_TITLE)
    lines += render_stats(group_counters(snapshot), grouped_rates, with_rates=True)
    if userspace is not None:
        us_rates = group_counters(userspace.rates) if userspace.rates is not None else None
        lines += ["", userspace.title]
        lines += render_stats(group_counters(userspace.snapshot), us_rates, with_rates=True)
    return lines


# `relayctl stats` reads two sources: the kernel's per-CPU counters in the pinned
# map (what the XDP program did), and the userspace path's counters, which live in
# the daemon and which it copies into its run state every second (ctl/runstate.py).
XDP_TITLE = "[xdp] kernel counters (pinned map)"


def stats_report(
    kernel: Mapping[str, int] | None, daemon: Mapping[str, Any] | None
) -> dict[str, Any]:
    """`stats --json`: both paths' counters, grouped, and the daemon they come from.

    kernel is the pinned counter map (None when nothing is pinned); daemon is
    the run state as a dict with `alive` added (None when none was recorded).
    The userspace counters are given only while their daemon runs: a stopped
    daemon's last copy would read as a relay that stopped relaying.
    """
    running = bool(daemon and daemon.get("alive"))
    userspace = None
    if daemon is not None and running and daemon.get("counters_updated") is not None:
        userspace = group_counters(daemon.get("userspace_counters") or {})
    info = None
    if daemon is not None:
        info = {
            "pid": daemon["pid"],
            "state": "running" if running else "stale",
            "xdp_attached": bool(daemon.get("xdp")),
            "interfaces": dict(daemon.get("interfaces") or {}),
            "fallback_reason": daemon.get("fallback_reason"),
            "counters_updated": daemon.get("counters_updated") if running else None,
        }
    return {
        "xdp": group_counters(kernel) if kernel is not None else None,
        "userspace": userspace,
        "daemon": info,
    }


def stats_path_line(daemon: Mapping[str, Any] | None) -> str:
    """Which path relays, in one line: what an operator must know to read the numbers."""
    if daemon is None:
        return "no daemon state recorded (relayctl run): kernel counters only"
    if daemon["state"] != "running":
        return (
            f"daemon pid {daemon['pid']} is not running: kernel counters only; "
            "the userspace path relays nothing without it"
        )
    if daemon["xdp_attached"]:
        modes = ", ".join(f"{k} {v}" for k, v in daemon["interfaces"].items())
        return f"XDP attached ({modes}); the userspace path relays what XDP passes up"
    reason = daemon.get("fallback_reason") or "no reason recorded"
    return (
        f"XDP not in use ({reason}): the userspace path relays everything, "
        "so the kernel counters stay at zero"
    )


def userspace_title(daemon: Mapping[str, Any]) -> str:
    """The heading of the userspace block, naming where its numbers come from."""
    when = daemon.get("counters_updated")
    at = time.strftime("%H:%M:%S", time.localtime(when)) if when else "?"
    return f"[userspace] counters of daemon pid {daemon['pid']} (run state, as of {at})"


def render_stats_report(report: Mapping[str, Any]) -> list[str]:
    """`stats` as text: the path line, then the kernel block and the userspace block."""
    daemon = report["daemon"]
    lines = [stats_path_line(daemon), ""]
    if report["xdp"] is not None:
        lines += [XDP_TITLE, *render_stats(report["xdp"])]
    else:
        lines.append("[xdp] no maps pinned: XDP could not load (see `relayctl status`)")
    if report["userspace"] is not None:
        lines += ["", userspace_title(daemon), *render_stats(report["userspace"])]
    return lines


def watch_frame(lines: Sequence[str]) -> str:
    """One `top`-like refresh: cursor home, each line overwritten, the rest erased.

    Overwriting instead of clearing first avoids flicker; erasing to the end of
    each line and of the screen removes what a longer previous frame left.
    """
    return HOME + "".join(line + CLEAR_EOL + "\n" for line in lines) + CLEAR_EOS


# --------------------------------------------------------------------- errors


def one_line(message: str) -> str:
    """The first non-empty line of a message (compiler output can be pages long)."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    if not lines:
        return ""
    return lines[0] + (" ..." if len(lines) > 1 else "")


def error_line(exc: BaseException, pin_dir: Path) -> tuple[str, bool]:
    """The operator-facing line for an exception, and whether it is a known kind.

    Known kinds get a plain message; anything else is a bug in relayctl or a
    dependency, and the caller adds a hint to rerun with --debug.
    """
    if isinstance(exc, OSError) and exc.errno in (errno.EPERM, errno.EACCES):
        return "permission denied: run as root", True
    if isinstance(exc, BpfError):
        if exc.errno == errno.ENOENT and exc.operation == "bpf_obj_get":
            return (
                f"no relay maps at {pin_dir}: is the relay running? "
                "(relayctl run or relayctl attach)",
                True,
            )
        return one_line(str(exc)), True
    if isinstance(exc, XdpError | LoadError | NetnsError | ValueError):
        return one_line(str(exc)), True
    if isinstance(exc, OSError):
        text = exc.strerror or str(exc)
        if exc.filename:
            text = f"{exc.filename}: {text}"
        return one_line(text), True
    return f"unexpected {type(exc).__name__}: {one_line(str(exc))}", False
