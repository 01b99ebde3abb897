"""Applying, replacing, clearing and reporting `testbed impair` on a namespace testbed.

Mechanism (docs/testbed.md has the why): this kernel class has no netem, so
impairment is a userspace hop. For client c<i>, on its switch port `c<i>` in
`<p>-sw`:

    clsact ingress (client -> relay, "up")   u32: IP dst = a relay public address,
    clsact egress  (relay -> client, "down") u32: IP src = a relay public address,
        protocol UDP or TCP, IPv4 and IPv6   -> mirred egress redirect to TAP imp-c<i>-<slot>

and a daemon (ctl/impaird.py, started with `Testbed.spawn` so `testbed down` stops
it) reads the TAP, applies the model and re-injects. Everything else the client
sends (signaling HTTP routed through relay1 to 203.0.113.x, ARP, neighbour
discovery, ICMP) never matches and is not touched.

Replacing without a gap: each client alternates between two slots (TAP name and
filter priorities). A new impairment starts its daemon in the free slot, adds its
filters, then deletes the old slot's filters and only then stops the old daemon,
which sends what it still holds at its due times. So every packet of the client's
relay traffic goes through exactly one daemon, and none passes unimpaired.

Files, in `Testbed.impair_dir` (/run/splitrelay/testbed-<p>-impair/):
    <client>.json   the applied impairment (written here after it took effect)
    <tap>.json      the daemon's own state and counters (written by the daemon)
    .lock           serialises impair commands on this testbed
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ctl.impair import DIRECTIONS, ImpairSpec
from ctl.netns import NetnsError, netns_exists, run_in
from ctl.testbed import Testbed, TestbedError, _proc_starttime, require_root

PREF_BASE = 4900  # tc filter priorities: 4901..4904 (slot 0), 4911..4914 (slot 1)
PROTOCOLS = (("udp", 17), ("tcp", 6))
READY_TIMEOUT_S = 10.0
REPO_ROOT = Path(__file__).resolve().parents[1]


class ImpairCtlError(TestbedError):
    """An impairment could not be applied, cleared or inspected; the message says why."""


# --------------------------------------------------------------------------- tc (pure)


def pref(slot: int, direction: str, family: str) -> int:
    """The tc priority of one slot's filters for a direction and address family."""
    return PREF_BASE + 10 * slot + 1 + 2 * DIRECTIONS.index(direction) + (family == "ipv6")


def hook(direction: str) -> str:
    """Up traffic enters the switch at the port's ingress; down leaves at its egress."""
    return "ingress" if direction == "up" else "egress"


def filter_lines(
    port: str, tap: str, slot: int, directions: Sequence[str], relay_addrs: Sequence[str]
) -> list[str]:
    """`tc -batch` lines diverting the port's relay traffic (UDP, TCP; v4, v6) to `tap`."""
    lines = []
    for direction in directions:
        field = "dst" if direction == "up" else "src"
        for addr in relay_addrs:
            v6 = ipaddress.ip_address(addr).version == 6
            family, match, plen = ("ipv6", "ip6", 128) if v6 else ("ip", "ip", 32)
            for _, proto in PROTOCOLS:
                lines.append(
                    f"filter add dev {port} {hook(direction)} protocol {family} "
                    f"pref {pref(slot, direction, family)} u32 "
                    f"match {match} {field} {addr}/{plen} match {match} protocol {proto} 0xff "
                    f"action mirred egress redirect dev {tap}"
                )
    return lines


def delete_lines(port: str, slot: int) -> list[str]:
    """`tc -batch` lines removing every filter of one slot (both hooks and families)."""
    return [
        f"filter del dev {port} {hook(d)} pref {pref(slot, d, fam)}"
        for d in DIRECTIONS
        for fam in ("ip", "ipv6")
    ]


# --------------------------------------------------------------------------- paths


def tap_name(client: str, slot: int) -> str:
    """`imp-c1-0`: at most 10 characters for c100, within IFNAMSIZ."""
    return f"imp-{client}-{slot}"


def process_name(client: str, slot: int) -> str:
    """The name the daemon is recorded under in the testbed's state."""
    return f"impair-{client}-{slot}"


def record_path(tb: Testbed, client: str) -> Path:
    return tb.impair_dir / f"{client}.json"


def daemon_state_path(tb: Testbed, tap: str) -> Path:
    return tb.impair_dir / f"{tap}.json"


def read_json(path: Path) -> dict[str, Any] | None:
    """A record or daemon state file, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # a file being replaced is never half-written; anything else is junk


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


@contextlib.contextmanager
def _locked(tb: Testbed) -> Iterator[None]:
    """One impair command at a time per testbed (a file of its own, not the testbed's)."""
    tb.impair_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(tb.impair_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- topology


def relay_addresses(tb: Testbed) -> list[str]:
    """The relays' public (client-side) addresses, IPv4 then IPv6, from the plan."""
    links = [ln for h in tb.hosts.values() if h.role == "relay" for ln in h.links]
    pub = [ln for ln in links if ln.bridge == "lan"]
    return list(dict.fromkeys([*(ln.ipv4 for ln in pub), *(ln.ipv6 for ln in pub)]))


def clients_of(tb: Testbed) -> list[str]:
    """Client host names in plan order (c1, c2, ...)."""
    return [name for name, h in tb.hosts.items() if h.role == "client"]


def resolve_clients(tb: Testbed, names: Sequence[str]) -> list[str]:
    """Check client names (`c1` or the namespace `sr-c1`); none named means every client."""
    every = clients_of(tb)
    if not names:
        return every
    out = []
    for name in names:
        short = name.removeprefix(f"{tb.prefix}-")
        if short not in tb.hosts:
            raise ImpairCtlError(
                f"no client {name!r} in testbed {tb.prefix!r} (clients: {', '.join(every)})"
            )
        if tb.hosts[short].role != "client":
            raise ImpairCtlError(
                f"{name!r} is a {tb.hosts[short].role}, not a client: impairment sits on a "
                f"client's link (clients: {', '.join(every)})"
            )
        if short not in out:
            out.append(short)
    return out


def require_up(tb: Testbed) -> None:
    """The testbed must exist: its state file and the switch and client namespaces."""
    require_root()
    missing = [ns for ns in (tb.switch_ns, *(tb.netns(c) for c in clients_of(tb)))]
    missing = [ns for ns in missing if not netns_exists(ns)]
    if not tb.state_file.exists() or missing:
        raise ImpairCtlError(
            f"testbed {tb.prefix!r} is not up (relayctl testbed up --prefix {tb.prefix})"
        )


# --------------------------------------------------------------------------- tc (system)


def _tc(tb: Testbed, lines: Sequence[str], check: bool = True) -> None:
    """Run tc lines in the switch namespace as one batch; -force keeps going after errors."""
    argv = ["tc", "-batch", "-"] if check else ["tc", "-force", "-batch", "-"]
    try:
        run_in(tb.switch_ns, argv, check=check, input="\n".join(lines) + "\n")
    except NetnsError as exc:
        raise ImpairCtlError(f"tc in {tb.switch_ns}: {exc}") from exc


def filter_prefs(tb: Testbed, port: str, which: str) -> set[int]:
    """The filter priorities present on a port's ingress or egress hook."""
    proc = run_in(tb.switch_ns, ["tc", "-j", "filter", "show", "dev", port, which], check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return set()
    try:
        return {int(f["pref"]) for f in json.loads(proc.stdout) if "pref" in f}
    except (ValueError, TypeError, KeyError):
        return set()


def slot_filters(tb: Testbed, port: str, slot: int) -> dict[str, bool]:
    """Whether a slot's filters are on the port, per direction."""
    present = {d: filter_prefs(tb, port, hook(d)) for d in DIRECTIONS}
    return {d: any(pref(slot, d, fam) in present[d] for fam in ("ip", "ipv6")) for d in DIRECTIONS}


def _ensure_clsact(tb: Testbed, port: str) -> None:
    proc = run_in(tb.switch_ns, ["tc", "-j", "qdisc", "show", "dev", port], check=False)
    if '"clsact"' not in proc.stdout:
        _tc(tb, [f"qdisc add dev {port} clsact"])


def _remove_filters(tb: Testbed, port: str, slot: int) -> None:
    """Delete a slot's filters (absent ones are fine) and check none is left."""
    _tc(tb, delete_lines(port, slot), check=False)
    left = slot_filters(tb, port, slot)
    if any(left.values()):
        raise ImpairCtlError(f"could not remove the tc filters of slot {slot} on {port}: {left}")


def _drop_clsact_if_empty(tb: Testbed, port: str) -> None:
    if not filter_prefs(tb, port, "ingress") and not filter_prefs(tb, port, "egress"):
        _tc(tb, [f"qdisc del dev {port} clsact"], check=False)


# --------------------------------------------------------------------------- daemons


def _log_tail(tb: Testbed, name: str) -> str:
    try:
        lines = (tb.log_dir / f"{name}.log").read_text().strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1] if lines else "empty log"


def _wait_state(
    tb: Testbed, path: Path, proc: subprocess.Popen[bytes], name: str, wanted: str
) -> dict[str, Any]:
    """Wait (bounded) until the daemon's state file says `wanted`; fail if it exits."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        st = read_json(path)
        if st is not None and st.get("pid") == proc.pid and st.get("state") == wanted:
            return st
        if proc.poll() is not None:
            raise ImpairCtlError(
                f"impairment daemon {name} exited with {proc.returncode}: {_log_tail(tb, name)}"
            )
        if time.monotonic() >= deadline:
            raise ImpairCtlError(
                f"impairment daemon {name} not {wanted} within {READY_TIMEOUT_S:g}s: "
                f"{_log_tail(tb, name)}"
            )
        time.sleep(0.01)


def _stop_slot(tb: Testbed, client: str, slot: int) -> dict[str, Any] | None:
    """Stop a slot's daemon (it drains what it holds), return its final state, tidy up."""
    tb.stop_processes(process_name(client, slot))
    path = daemon_state_path(tb, tap_name(client, slot))
    final = read_json(path)
    path.unlink(missing_ok=True)
    return final


def _alive(pid: int | None, starttime: int | None) -> bool:
    return bool(pid) and _proc_starttime(int(pid or 0)) == starttime


# --------------------------------------------------------------------------- apply / clear


def apply(tb: Testbed, clients: Sequence[str], spec: ImpairSpec) -> dict[str, dict[str, Any]]:
    """Impair each client's relay traffic by `spec`, replacing what it had; returns status()."""
    require_up(tb)
    clients = resolve_clients(tb, clients)
    with _locked(tb):
        for client in clients:
            _apply_one(tb, client, spec)
    return status(tb, clients)


def _apply_one(tb: Testbed, client: str, spec: ImpairSpec) -> None:
    link = tb.hosts[client].links[0]
    port = link.port
    old = read_json(record_path(tb, client))
    slot = 1 - int(old["slot"]) if old else 0
    tap, name = tap_name(client, slot), process_name(client, slot)
    state_path = daemon_state_path(tb, tap)
    _stop_slot(tb, client, slot)  # a leftover of an interrupted command, if any
    argv = [
        sys.executable, "-m", "ctl.impaird",
        "--client", client, "--client-mac", link.mac, "--port", port, "--bridge", link.bridge,
        "--tap", tap, "--spec", json.dumps(spec.to_dict()), "--state", str(state_path),
    ]  # fmt: skip
    proc = tb.spawn(tb.switch_ns, argv, name=name, cwd=REPO_ROOT)
    try:
        _wait_state(tb, state_path, proc, name, "ready")
        _ensure_clsact(tb, port)
        _remove_filters(tb, port, slot)  # stale filters of this slot would shadow ours
        _tc(tb, filter_lines(port, tap, slot, spec.directions, relay_addresses(tb)))
        # Both slots' filters are in; removing the old ones hands all traffic to the
        # new daemon, and only then does its clock (the outage's "now") start.
        _remove_filters(tb, port, 1 - slot)
        os.kill(proc.pid, signal.SIGUSR1)
        st = _wait_state(tb, state_path, proc, name, "active")
    except BaseException:
        with contextlib.suppress(Exception):
            _remove_filters(tb, port, slot)
        with contextlib.suppress(Exception):
            _stop_slot(tb, client, slot)
        raise
    _stop_slot(tb, client, 1 - slot)  # it sends what it still holds, then exits
    _write_json(
        record_path(tb, client),
        {
            "client": client,
            "port": port,
            "slot": slot,
            "tap": tap,
            "process": name,
            "pid": proc.pid,
            "starttime": _proc_starttime(proc.pid),
            "spec": spec.to_dict(),
            "applied": time.time(),
            "epoch_ns": st["epoch_ns"],
            "outage": st["outage"],
            "relay_addresses": relay_addresses(tb),
        },
    )


def clear(tb: Testbed, clients: Sequence[str]) -> dict[str, dict[str, Any] | None]:
    """Remove the impairment of each client: filters, daemon, records.

    Returns, per client, the daemon's final state (its counters), or None when the
    client had no impairment.
    """
    require_up(tb)
    clients = resolve_clients(tb, clients)
    out: dict[str, dict[str, Any] | None] = {}
    with _locked(tb):
        for client in clients:
            port = tb.hosts[client].links[0].port
            rec = read_json(record_path(tb, client))
            for slot in (0, 1):
                _remove_filters(tb, port, slot)
            _drop_clsact_if_empty(tb, port)
            finals = {slot: _stop_slot(tb, client, slot) for slot in (0, 1)}
            record_path(tb, client).unlink(missing_ok=True)
            out[client] = finals.get(int(rec["slot"])) if rec else None
    return out


# --------------------------------------------------------------------------- status


def outage_state(outage: dict[str, int] | None, now_ns: int) -> str | None:
    """`pending`, `active` or `over` for an outage window in monotonic ns (None: no outage)."""
    if not outage:
        return None
    if now_ns < outage["start_ns"]:
        return "pending"
    return "active" if now_ns < outage["end_ns"] else "over"


def status(tb: Testbed, clients: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """The applied impairments with their daemons' counters and any problem, by client."""
    out: dict[str, dict[str, Any]] = {}
    if not tb.impair_dir.is_dir():
        return out
    if clients is None:  # every record, even of clients beyond the plan's size
        clients = sorted(
            (p.stem for p in tb.impair_dir.glob("c*.json") if p.stem[1:].isdigit()),
            key=lambda c: int(c[1:]),
        )
    switch_up = netns_exists(tb.switch_ns)
    now_ns = time.monotonic_ns()
    for client in clients:
        rec = read_json(record_path(tb, client))
        if rec is None:
            continue
        spec = ImpairSpec.from_dict(rec["spec"])
        st = read_json(daemon_state_path(tb, rec["tap"])) or {}
        alive = _alive(rec.get("pid"), rec.get("starttime"))
        filters = slot_filters(tb, rec["port"], int(rec["slot"])) if switch_up else {}
        problems = []
        if not alive:
            problems.append(
                f"daemon {rec['process']} (pid {rec['pid']}) is not running: the client's relay "
                f"traffic is dropped; relayctl testbed impair --clear {client} --prefix {tb.prefix}"
            )
        for d in DIRECTIONS:
            if filters.get(d, False) != (d in spec.directions):
                want = "missing" if d in spec.directions else "unexpected"
                problems.append(f"{hook(d)} filters on {rec['port']} {want}")
        outage = rec.get("outage")
        if outage:
            outage = {**outage, "state": outage_state(outage, now_ns)}
            outage["start_wall"] = rec["applied"] + (outage["start_ns"] - rec["epoch_ns"]) / 1e9
        out[client] = {
            "client": client,
            "summary": spec.summary(),
            "spec": spec.to_dict(),
            "port": rec["port"],
            "tap": rec["tap"],
            "applied": rec["applied"],
            "epoch_ns": rec["epoch_ns"],
            "outage": outage,
            "relay_addresses": rec.get("relay_addresses", []),
            "daemon": {
                "name": rec["process"],
                "pid": rec["pid"],
                "alive": alive,
                "state": st.get("state"),
                "sched": st.get("sched"),
                "updated": st.get("updated"),
            },
            "filters": filters,
            "counters": st.get("counters"),
            "unclassified": st.get("unclassified"),
            "tap_dropped": st.get("tap_dropped"),
            "lateness": st.get("lateness"),
            "problems": problems,
        }
    return out
