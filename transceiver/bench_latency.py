"""`python -m transceiver.bench_latency`: echo round trip, stock aiortc vs ours, clean and impaired.

What a caller hears, through the XDP relay on the namespace testbed, with the
two audio paths side by side in one run:

* ``stock``: aiortc 1.16 as released (``SPLITRELAY_AIORTC_FAST=0`` for the
  worker and the client: its 4-frame receive buffer in the worker, its
  encoder; the voice client lowers its own buffer to 1 frame, as before);
* ``adaptive``: the transceiver as it ships (the adaptive jitter buffer and
  the voice encoder of docs/audio.md), on both ends.

The demo's stack (ctl/demo.py): redis-server, ``relayctl run`` with XDP,
``transceiver run`` on tx1 (stock) and tx2 (adaptive), the echo backend.
For each profile both client namespaces (c1 calls tx1, c2 calls tx2) get the
same impairment (``relayctl testbed impair``, both directions, on the client
side of the relay), and both place their calls at the same time, so the two
variants meet the same machine and the same network.

Profiles: clean; 2 % random loss; 20 ms jitter; 2 % loss + 20 ms jitter;
5 % burst loss (mean burst 3 packets); a 300 ms outage in the middle of the
call (both directions), for which the time until the round trip is back
within 5 ms of its value before the outage is reported.

Per profile and variant: the echo round trip p50/p95/p99 over every marker
of every call (transceiver/markers.py), markers lost, the share of the
client's frames concealed and recovered from FEC (the adaptive buffer's own
counters; aiortc's buffer has none), how much of the echoed background tone
came back intact (markers.ToneMeter: a buffer that drops too much cannot
look fast), and the worker's mean buffer delay (its /metrics). The clean
profile also gives the round trip's breakdown by component.

Run as root; about 4 minutes. ``--json`` prints the result, ``--out`` writes
it too. Every process is the testbed's and stops with it, also on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from ctl.demo import (
    CALL_GRACE,
    CALL_TIMEOUT,
    Demo,
    DemoError,
    Reporter,
    TransceiverPlan,
    http_get,
    metric_sum,
    parse_metrics,
    preflight,
    signals_deferred,
    signals_interrupt,
    stop_process,
)
from transceiver.aiortc_fast import ENV as FAST_ENV
from transceiver.markers import percentile

PREFIX = "srlat"
STOCK_HOST, ADAPTIVE_HOST = "tx1", "tx2"
VARIANTS = {STOCK_HOST: "stock", ADAPTIVE_HOST: "adaptive"}
#: When, after the impairment is applied, the outage profile's outage begins (seconds).
OUTAGE_AT = 10.0
#: "Back to clean delay": within this of the round trip's median before the outage.
RECOVERED_WITHIN = 0.005
#: ... for this many markers in a row (a second of them at 4 per second).
RECOVERED_RUN = 4
FRAME_MS = 20.0
#: aiortc's receive buffer releases a frame once this many later frames have arrived.
STOCK_PREFETCH_FRAMES = {"worker": 4, "client": 1}


@dataclass(frozen=True)
class Profile:
    """One network condition, as `relayctl testbed impair` options (ImpairSpec fields)."""

    name: str
    spec: Mapping[str, float] = field(default_factory=dict)
    aim: str = ""


PROFILES: tuple[Profile, ...] = (
    Profile("clean", {}, "p50 <= 55 ms"),
    Profile("loss 2%", {"loss": 0.02}, "p95 <= 120 ms, <= 3 % markers lost"),
    Profile("jitter 20 ms", {"jitter_ms": 20.0}, ""),
    Profile("loss 2% + jitter 20 ms", {"loss": 0.02, "jitter_ms": 20.0}, "p95 <= 150 ms"),
    Profile("burst loss 5%", {"burst_loss": 0.05, "burst_length": 3.0}, ""),
    Profile(
        "outage 300 ms",
        {"outage_ms": 300.0, "outage_in_s": OUTAGE_AT},
        "back within 5 ms of clean in <= 2 s",
    ),
)


class _Stack(Demo):
    """The demo's stack, with tx1's worker (and c1's calls) running aiortc as released."""

    def spawn(self, host: str, argv: Sequence[str], name: str) -> subprocess.Popen[bytes]:
        env = dict(self.env)
        if host == STOCK_HOST:
            env[FAST_ENV] = "0"
        return self.testbed.spawn(host, argv, name=name, env=env)


# ------------------------------------------------------------------ measuring


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def outage_recovery(samples: Sequence[Sequence[float]], start: float, end: float) -> float | None:
    """Seconds from the outage's end until the round trip is back (None: it never was).

    ``samples`` are [unix time the marker came back, rtt ms]. Back means:
    RECOVERED_RUN markers in a row within RECOVERED_WITHIN of the median
    before the outage; the time is the first of them.
    """
    before = [rtt for t, rtt in samples if t < start]
    after = [(t, rtt) for t, rtt in samples if t >= end]
    if not before or not after:
        return None
    limit = statistics.median(before) + RECOVERED_WITHIN * 1000
    for i in range(len(after) - RECOVERED_RUN + 1):
        if all(rtt <= limit for _, rtt in after[i : i + RECOVERED_RUN]):
            return max(0.0, after[i][0] - end)
    return None


def summarize_calls(summary: Mapping[str, Any]) -> dict[str, Any]:
    """One variant's figures from `transceiver call --json` output."""
    calls = summary.get("per_call", [])
    rtts = [x for c in calls for x in c.get("audio_rtts", [])]
    sent = sum(c.get("markers_sent", 0) for c in calls)
    lost = sum(c.get("markers_lost", 0) for c in calls)
    buffer = summary.get("jitter_buffer") or {}
    slots = sum(buffer.get(k, 0) for k in ("played", "fec", "concealed"))
    return {
        "calls": summary.get("calls", 0),
        "ok": summary.get("ok", 0),
        "errors": summary.get("errors", []),
        "rtt_ms": {
            "count": len(rtts),
            "p50": _ms(percentile(rtts, 50)),
            "p95": _ms(percentile(rtts, 95)),
            "p99": _ms(percentile(rtts, 99)),
        },
        "markers_sent": sent,
        "markers_lost": lost,
        "markers_lost_share": lost / sent if sent else None,
        "client_buffer": {
            "frames": slots,
            "concealed_share": buffer["concealed"] / slots if slots else None,
            "fec_share": buffer["fec"] / slots if slots else None,
            "late": buffer.get("late"),
            "dropped": buffer.get("dropped"),
            "mean_delay_ms": _ms(buffer.get("delay_seconds_mean")),
        },
        "tone_intact": summary.get("tone_intact"),
    }


def worker_buffer(samples: Any) -> dict[str, float]:
    """The worker's jitter-buffer totals from one /metrics scrape."""
    name = "splitrelay_transceiver_jitter_buffer_delay_seconds"
    return {
        "delay_sum": metric_sum(samples, f"{name}_sum"),
        "delay_count": metric_sum(samples, f"{name}_count"),
        "concealed": metric_sum(samples, "splitrelay_transceiver_audio_concealed_frames_total"),
        "fec": metric_sum(samples, "splitrelay_transceiver_audio_fec_frames_total"),
    }


def buffer_delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, Any]:
    count = after["delay_count"] - before["delay_count"]
    total = after["delay_sum"] - before["delay_sum"]
    return {
        "mean_delay_ms": round(1000 * total / count, 2) if count else None,
        "frames": int(count),
        "concealed": int(after["concealed"] - before["concealed"]),
        "fec": int(after["fec"] - before["fec"]),
    }


def codec_lookahead_ms() -> float:
    """The Opus encoder's algorithmic delay beyond its frame (OPUS_GET_LOOKAHEAD), in ms.

    VOIP application at 48 kHz, as aiortc's encoder and ours both use.
    """
    from transceiver import opus

    with opus.Encoder() as encoder:
        return 1000 * encoder.lookahead_samples / opus.SAMPLE_RATE


def breakdown(clean: Mapping[str, Any], lookahead_ms: float, ping_ms: float | None) -> dict:
    """The clean round trip (p50) by component, for both variants.

    Measured: the total, the adaptive buffers' mean waits (client: its own
    counters; worker: its /metrics), the codec's lookahead (libopus), the
    network (ping RTT between the client and the relay). aiortc's buffers
    have no counters: their delay is what they are built to hold (4 frames
    in the worker, 1 in the client). The rest is decoding, the echo backend,
    the playback pacing and event-loop scheduling.
    """
    out = {}
    for variant, figures in clean.items():
        total = figures["rtt_ms"]["p50"]
        if variant == "stock":
            server = STOCK_PREFETCH_FRAMES["worker"] * FRAME_MS
            client = STOCK_PREFETCH_FRAMES["client"] * FRAME_MS
            how = "aiortc's prefetch, by construction"
        else:
            server = figures["worker_buffer"]["mean_delay_ms"]
            client = figures["client_buffer"]["mean_delay_ms"]
            how = "measured (buffer counters)"
        parts = {
            "encode x2 (Opus lookahead)": round(2 * lookahead_ms, 2),
            "network + relay, both ways (ping)": ping_ms,
            "worker jitter buffer": server,
            "client jitter buffer": client,
        }
        known = sum(v for v in parts.values() if v is not None)
        parts["decode x2, echo backend, pacing, scheduling (rest)"] = (
            round(total - known, 2) if total is not None else None
        )
        out[variant] = {"total_p50_ms": total, "buffers": how, "components_ms": parts}
    return out


# ------------------------------------------------------------------ the run


class LatencyBench:
    """Build the stack once, run every profile, tear down (also on errors and Ctrl-C)."""

    def __init__(self, calls: int, duration: float, seed: int, say: Reporter) -> None:
        self.calls = calls
        self.duration = duration
        self.seed = seed
        self.say = say
        out = Path(tempfile.mkdtemp(prefix="splitrelay-latency-"))
        self.stack = _Stack(PREFIX, 2 * calls, duration, out, False, True, say)

    def run(self, profiles: Sequence[Profile]) -> dict[str, Any]:
        owner = os.getpid()
        try:
            with signals_interrupt():
                self.stack.clean_leftovers()
                self.stack.start()
                ping = self.ping_ms()
                results = {p.name: self.profile(p) for p in profiles}
        finally:
            if os.getpid() != owner:
                os._exit(1)
            with signals_deferred():
                self.stack.teardown()
        clean = results.get("clean")
        return {
            "config": {
                "calls_per_variant": self.calls,
                "duration_s": self.duration,
                "seed": self.seed,
                "outage_at_s": OUTAGE_AT,
            },
            "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release},
            "profiles": {p.name: {"aim": p.aim, "spec": dict(p.spec)} for p in profiles},
            "results": results,
            "breakdown": breakdown(clean, codec_lookahead_ms(), ping) if clean else None,
        }

    def ping_ms(self) -> float | None:
        """Mean ICMP round trip client -> relay public address (veth, bridge, relay host)."""
        tb = self.stack.testbed
        res = subprocess.run(
            ["ip", "netns", "exec", tb.netns("c1"), "ping", "-q", "-c", "20", "-i", "0.05",
             "-W", "1", self.stack.plan.public4],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        for line in res.stdout.splitlines():
            if "min/avg/max" in line:
                return round(float(line.split("=")[1].split("/")[1]), 3)
        return None

    def profile(self, profile: Profile) -> dict[str, Any]:
        from ctl import impairctl
        from ctl.impair import ImpairSpec

        tb = self.stack.testbed
        self.say.line(f"{profile.name}: {self.calls} calls per variant, {self.duration:g} s ...")
        applied = None
        if profile.spec:
            spec = ImpairSpec(direction="both", seed=self.seed, **profile.spec)
            applied = impairctl.apply(tb, ["c1", "c2"], spec)
        try:
            before = {tx.host: self.scrape(tx) for tx in self.stack.plan.transceivers}
            summaries = self.place_calls()
            after = {tx.host: self.scrape(tx) for tx in self.stack.plan.transceivers}
        finally:
            if applied:
                impairctl.clear(tb, ["c1", "c2"])
        figures: dict[str, Any] = {}
        for tx in self.stack.plan.transceivers:
            variant = VARIANTS[tx.host]
            one = summarize_calls(summaries[tx.host])
            one["worker_buffer"] = buffer_delta(before[tx.host], after[tx.host])
            if applied and profile.spec.get("outage_ms"):
                outage = applied[tx.caller]["outage"]
                start = outage["start_wall"]
                end = start + profile.spec["outage_ms"] / 1000
                recoveries = [
                    outage_recovery(c.get("samples", []), start, end)
                    for c in summaries[tx.host].get("per_call", [])
                ]
                one["outage_recovery_s"] = (
                    None if None in recoveries or not recoveries else round(max(recoveries), 3)
                )
                one["outage"] = {"start": start, "end": end, "recoveries_s": recoveries}
                # Every marker of every call ([unix time back, rtt ms]), to see the recovery.
                one["samples"] = [c.get("samples", []) for c in summaries[tx.host]["per_call"]]
            figures[variant] = one
        self.say.line("  " + _profile_line(figures))
        return figures

    def scrape(self, tx: TransceiverPlan) -> dict[str, float]:
        status, body = http_get(tx.caller_netns, f"{tx.signaling_url}/metrics", timeout=2.0)
        if status != 200:
            raise DemoError(f"{tx.host}'s /metrics answered {status}")
        return worker_buffer(parse_metrics(body.decode()))

    def place_calls(self) -> dict[str, dict[str, Any]]:
        """Both variants' `transceiver call` at once; their JSON summaries by tx host."""
        from ctl.netns import popen_in

        procs = {}
        for tx in self.stack.plan.transceivers:
            env = dict(self.stack.env)
            if tx.host == STOCK_HOST:
                env[FAST_ENV] = "0"
            argv = self.stack.plan.call_argv(tx, self.duration)
            argv[argv.index("--calls") + 1] = str(self.calls)
            procs[tx.host] = popen_in(
                tx.caller_netns, argv, keep_mounts=True, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
            )  # fmt: skip
        out = {}
        deadline = time.monotonic() + self.duration + CALL_TIMEOUT + CALL_GRACE
        for host, proc in procs.items():
            try:
                stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stop_process(proc)
                raise DemoError(f"the calls to {host} did not end in time") from None
            try:
                out[host] = json.loads(stdout)
            except ValueError:
                last = stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise DemoError(f"the calls to {host} printed no summary: {last[0]}") from None
        return out


# ------------------------------------------------------------------ report


def _fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _profile_line(figures: Mapping[str, Any]) -> str:
    parts = []
    for variant in ("stock", "adaptive"):
        f = figures[variant]
        rtt = f["rtt_ms"]
        parts.append(
            f"{variant} p50/p95/p99 {_fmt(rtt['p50'])}/{_fmt(rtt['p95'])}/{_fmt(rtt['p99'])} ms"
            f", lost {f['markers_lost']}/{f['markers_sent']}"
        )
    return "; ".join(parts)


def render(result: Mapping[str, Any]) -> str:
    """The side-by-side table (markdown, as README and docs/performance.md carry it)."""
    lines = [
        "| profile | variant | rtt p50 | p95 | p99 | markers lost | concealed | FEC | tone intact"
        " | worker buffer | recovery |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, figures in result["results"].items():
        for variant in ("stock", "adaptive"):
            f = figures[variant]
            rtt, buf = f["rtt_ms"], f["client_buffer"]
            recovery = f.get("outage_recovery_s")
            rec = "" if "outage_recovery_s" not in f else _fmt(recovery, " s", 2)
            if "outage_recovery_s" in f and recovery is None:
                rec = "not back"
            lines.append(
                f"| {name} | {variant} | {_fmt(rtt['p50'])} | {_fmt(rtt['p95'])} | "
                f"{_fmt(rtt['p99'])} | {_pct(f['markers_lost_share'])} | "
                f"{_pct(buf['concealed_share'])} | {_pct(buf['fec_share'])} | "
                f"{_pct(f['tone_intact'])} | {_fmt(f['worker_buffer']['mean_delay_ms'], ' ms')} | "
                f"{rec} |"
            )
    table = "\n".join(lines)
    parts = [table]
    if result.get("breakdown"):
        parts.append(render_breakdown(result["breakdown"]))
    return "\n\n".join(parts)


def render_breakdown(breakdown: Mapping[str, Any]) -> str:
    stock, adaptive = breakdown["stock"], breakdown["adaptive"]
    lines = ["| component (clean, p50) | stock aiortc | adaptive |", "|---|---:|---:|"]
    for key in stock["components_ms"]:
        lines.append(
            f"| {key} | {_fmt(stock['components_ms'][key], ' ms')} | "
            f"{_fmt(adaptive['components_ms'][key], ' ms')} |"
        )
    lines.append(
        f"| **total (measured)** | **{_fmt(stock['total_p50_ms'], ' ms')}** | "
        f"**{_fmt(adaptive['total_p50_ms'], ' ms')}** |"
    )
    lines.append("")
    lines.append(
        "Not in either column: a real microphone's 20 ms capture frame (the markers are "
        "timed from the frame's hand-off to the encoder) and a sound card's output buffer."
    )
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--calls", type=click.IntRange(1, 10), default=2, show_default=True,
              help="Calls per variant and profile.")  # fmt: skip
@click.option("--duration", type=click.FloatRange(15, 600), default=30.0, show_default=True,
              help="Seconds of audio per call (the outage comes at 10 s).")  # fmt: skip
@click.option("--profile", "names", multiple=True, type=click.Choice([p.name for p in PROFILES]),
              help="Run only these profiles (repeat); default all.")  # fmt: skip
@click.option("--seed", type=int, default=1, show_default=True, help="Impairment seed.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the JSON result here.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the JSON result, not the table.")
def main(
    calls: int, duration: float, names: tuple[str, ...], seed: int, out: Path | None,
    as_json: bool,
) -> None:  # fmt: skip
    """Echo round trip through the XDP relay: stock aiortc vs the adaptive audio path."""
    try:
        preflight()
    except DemoError as exc:
        raise click.ClickException(str(exc)) from None
    profiles = [p for p in PROFILES if not names or p.name in names]
    say = Reporter(as_json=True, stream=sys.stderr)
    try:
        result = LatencyBench(calls, duration, seed, say).run(profiles)
    except DemoError as exc:
        raise click.ClickException(" ".join(str(exc).split())) from None
    except KeyboardInterrupt:
        raise click.ClickException("interrupted; the testbed was removed") from None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    click.echo(json.dumps(result, indent=2) if as_json else render(result))


if __name__ == "__main__":
    main()
