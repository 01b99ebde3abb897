"""`python -m transceiver.bench`: call setup time, and echo calls per worker core.

Two questions, one command, every number from this run:

1. **Setup time through the relay vs direct.** Calls placed one at a time,
   alternating between a worker behind the userspace relay and a worker of the
   same code reached directly (``WorkerConfig(direct=True)``: its tunnel socket
   is its public candidate). Setup = offer POSTed -> ICE + DTLS connected, as
   the voice client measures it.
2. **How many concurrent echo calls ONE worker sustains on ONE core**, with
   every call's audio decoded and re-encoded by the worker. The number of
   calls is ramped (5, 10, ... 40). Each step places N fresh calls, lets them
   warm up, then measures a fixed window. A step passes when every call
   connected and heard its own echo (at least ``heard_min`` of its markers
   back), the round trip over all calls has p95 under 150 ms, and there is no
   growing backlog (the median round trip of the window's last third is not
   more than 20 ms above its first third's). The sustained number is the
   largest passing step; a variant's ramp stops after its first failing step.
   A failing step is run again once (``retries``) before it counts as failed:
   the machine may run other work, and one disturbed window must not end a
   ramp. Every attempt is in the result.

Variants of the worker run side by side, interleaved step by step so that
any drift of the machine hits them alike (``VARIANT_LIST``): ``before`` (the
transceiver as it was before the performance work: aiortc as released via
``SPLITRELAY_AIORTC_FAST=0``, and the old playback pacing and echo queue,
kept in transceiver/bench_server.py as the reference), ``stock-aiortc``
(aiortc as released, today's playback), ``release`` (the transceiver of the
last release before the adaptive audio path, its worker run from that
commit's own source, extracted with ``git archive``: what "no fewer calls
than before" is measured against) and ``after`` (everything). The clients
are identical in all of them (this tree's). ``after-c3`` (the Opus encoder at
complexity 3) is there to choose the complexity; it is not in the default run.

Placement (at least 2 CPUs): every worker process is pinned to the last CPU
of this process' affinity set; the clients and the relay are pinned to the
first. CPU use is read from /proc/<pid>/stat over each window, so the
worker's number is its own and the clients' cost is visible (a step where the
client CPU is saturated is marked ``client_limited``: it measured the clients).

Topology: one private network namespace (``srcall`` by default) whose
loopback holds every address (documentation ranges): the relay's public
198.51.100.1:3478 and tunnel 203.0.113.1:3479, the client 198.51.100.10,
the workers' tunnel sockets on 203.0.113.11 and the direct workers on
203.0.113.12. Nothing leaves the namespace; it is removed at the end, on
errors and on Ctrl-C. Every wait is bounded; every child process stops when
this one goes away (their stdin closes).

The processes are transceiver/bench_server.py (worker, relay) and
transceiver/bench_client.py (the clients, one process per step).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import select
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import click

from ctl.netns import NetnsError, create_netns, netns_exists, popen_in, remove_netns

PREFIX = "srcall"
CLIENT = "198.51.100.10"
RELAY_PUBLIC = ("198.51.100.1", 3478)
RELAY_TUNNEL = ("203.0.113.1", 3479)
WORKER_HOST = "203.0.113.11"
DIRECT_HOST = "203.0.113.12"
ADDRESSES = (CLIENT, RELAY_PUBLIC[0], RELAY_TUNNEL[0], WORKER_HOST, DIRECT_HOST)


@dataclass(frozen=True)
class Variant:
    """A way to run the worker: which of this work's changes are in place."""

    name: str
    aiortc_fast: bool
    legacy_playback: bool
    description: str
    opus_complexity: int | None = None  # the voice encoder's (None: its default)
    source: str | None = None  # a git revision whose worker runs from its own source


#: The commit of the last release before the adaptive audio path: its worker is measured
#: from its own source (git archive), so "not slower than before" is a side-by-side figure.
RELEASE_REVISION = "22038ddee1c2c6caac192e6e53ea68c2410febf8"
REPO = Path(__file__).resolve().parents[1]

VARIANT_LIST: tuple[Variant, ...] = (
    Variant(
        "before",
        aiortc_fast=False,
        legacy_playback=True,
        description="the transceiver before the performance work: aiortc as released, "
        "the first-frame-anchored playback pacing, a 10-frame echo queue",
    ),
    Variant(
        "stock-aiortc",
        aiortc_fast=False,
        legacy_playback=False,
        description="aiortc as released, with the playback pacing and echo queue fixes",
    ),
    Variant(
        "release",
        aiortc_fast=True,
        legacy_playback=False,
        description="the transceiver as released before the adaptive audio path "
        f"({RELEASE_REVISION[:7]}: aiortc's 4-frame buffer, PyAV's encoder), from its own source",
        source=RELEASE_REVISION,
    ),
    Variant(
        "after",
        aiortc_fast=True,
        legacy_playback=False,
        description="everything: transceiver/aiortc_fast.py and the playback fixes",
    ),
    Variant(
        "after-c3",
        aiortc_fast=True,
        legacy_playback=False,
        description="everything, the Opus encoder at complexity 3 (not in the default run)",
        opus_complexity=3,
    ),
)
VARIANTS: tuple[str, ...] = tuple(v.name for v in VARIANT_LIST)
#: What a run without --variants compares (after-c3 is for choosing the encoder's complexity).
DEFAULT_VARIANTS: tuple[str, ...] = ("before", "stock-aiortc", "release", "after")
DEFAULT_STEPS = (5, 10, 15, 20, 25, 30, 35, 40)
READY_TIMEOUT = 60.0
#: A client saturating its core above this share measured itself, not the worker.
CLIENT_SATURATED = 0.90


class BenchError(RuntimeError):
    """The benchmark could not run; the message is one line."""


@dataclass
class BenchConfig:
    """What to measure and the pass criteria (seconds, ratios)."""

    steps: list[int] = field(default_factory=lambda: list(DEFAULT_STEPS))
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    duration: float = 20.0
    warmup: float = 5.0
    stagger: float = 0.05
    setup_rounds: int = 10
    rtt_p95_limit: float = 0.150
    growth_limit: float = 0.020
    heard_min: float = 0.9
    retries: int = 1
    prefix: str = PREFIX

    def validate(self) -> None:
        if not self.steps or any(n < 1 or n > 200 for n in self.steps):
            raise BenchError("steps must be call counts between 1 and 200")
        if not self.variants or set(self.variants) - set(VARIANTS):
            raise BenchError(f"variants must be among {', '.join(VARIANTS)}")
        if not 1 <= self.duration <= 600 or not 0 <= self.warmup <= 120:
            raise BenchError("duration must be 1..600 s and warmup 0..120 s")
        if not 0 <= self.setup_rounds <= 200:
            raise BenchError("setup rounds must be 0..200")
        if not 0 <= self.retries <= 3:
            raise BenchError("retries must be 0..3")


def _tid(variant: int, direct: bool) -> int:
    return 0x5C000010 + 0x10 * variant + int(direct)


def _port(base: int, variant: int) -> int:
    return base + variant


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if proc.returncode != 0:
        raise BenchError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


class Process:
    """A child in the namespace that prints ``READY {json}`` and stops when stdin closes."""

    def __init__(
        self,
        ns: str,
        name: str,
        argv: Sequence[str],
        env: dict[str, str],
        cwd: str | None = None,
    ) -> None:
        self.name = name
        # stderr to a file, not a pipe: nobody reads it while the step runs, and a
        # full pipe would block the child in the middle of a measurement.
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in stop())
        self.proc = popen_in(
            ns,
            [sys.executable, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
            text=True,
            cwd=cwd,
        )
        self.info: dict[str, Any] = {}

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        line = _read_line(self.proc, timeout)
        if line is None or not line.startswith("READY "):
            err = self.stderr_tail()
            raise BenchError(f"{self.name} did not start: {err or line or 'no output'}")
        self.info = json.loads(line[6:])
        return self.info

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        self.log.close()

    def stderr_tail(self) -> str:
        """The last line the process wrote to stderr (it is stopped first if running)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.log.seek(0)
        lines = self.log.read().strip().splitlines()
        return lines[-1] if lines else ""


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str | None:
    """The next stdout line of ``proc`` within ``timeout`` s (None: timeout or exit)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        return None
    line = proc.stdout.readline()
    return line.strip() or None


def _client(ns: str, args: list[str], timeout: float) -> dict[str, Any]:
    """Run one client process to completion; its RESULT line as a dict."""
    argv = [
        sys.executable,
        "-m",
        "transceiver.bench_client",
        "--cpu",
        str(_client_cpu()),
        "--address",
        CLIENT,
        *args,
    ]
    proc = popen_in(ns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise BenchError(f"the client did not finish within {timeout:.0f} s") from None
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[7:]))
    tail = err.strip().splitlines()
    raise BenchError(f"the client failed: {tail[-1] if tail else f'exit {proc.returncode}'}")


def _cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def _worker_cpu() -> int:
    return _cpus()[-1]


def _client_cpu() -> int:
    return _cpus()[0]


# --------------------------------------------------------------------- the run


class Bench:
    """The namespace and the long-lived processes (relay, one worker per variant)."""

    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self.ns = config.prefix
        self.relay: Process | None = None
        self.workers: dict[str, Process] = {}
        self.sources: dict[str, Path] = {}  # revision -> its source tree, for `source` variants

    def up(self) -> None:
        if netns_exists(self.ns):
            remove_netns(self.ns)
        create_netns(self.ns)
        _ip("-n", self.ns, "link", "set", "lo", "up")
        for addr in ADDRESSES:
            _ip("-n", self.ns, "addr", "add", f"{addr}/32", "dev", "lo")
        env = dict(os.environ)
        transceivers = []
        for i in range(len(VARIANTS)):
            port = _port(4101, i)
            transceivers += ["--transceiver", f"{_tid(i, False):#x}={WORKER_HOST}:{port}"]
        self.relay = Process(
            self.ns,
            "the relay",
            [
                "-m",
                "transceiver.bench_server",
                "relay",
                "--cpu",
                str(_client_cpu()),
                "--public",
                f"{RELAY_PUBLIC[0]}:{RELAY_PUBLIC[1]}",
                "--tunnel",
                f"{RELAY_TUNNEL[0]}:{RELAY_TUNNEL[1]}",
                *transceivers,
            ],
            env,
        )
        self.relay.wait_ready()
        for i, spec in enumerate(VARIANT_LIST):
            variant = spec.name
            if variant not in self.config.variants:
                continue
            wenv = dict(env, SPLITRELAY_AIORTC_FAST="1" if spec.aiortc_fast else "0")
            cwd = None
            if spec.source is not None:
                cwd = str(self._source(spec.source))
                wenv["PYTHONPATH"] = cwd
            legacy = ["--legacy-playback"] if spec.legacy_playback else []
            if spec.opus_complexity is not None:
                legacy += ["--opus-complexity", str(spec.opus_complexity)]
            worker = Process(
                self.ns,
                f"the {variant} worker",
                [
                    "-m",
                    "transceiver.bench_server",
                    "worker",
                    "--cpu",
                    str(_worker_cpu()),
                    "--tid",
                    hex(_tid(i, False)),
                    "--tunnel",
                    f"{WORKER_HOST}:{_port(4101, i)}",
                    "--relay",
                    f"{RELAY_TUNNEL[0]}:{RELAY_TUNNEL[1]}",
                    "--public",
                    f"{RELAY_PUBLIC[0]}:{RELAY_PUBLIC[1]}",
                    "--signal",
                    f"{WORKER_HOST}:{_port(8101, i)}",
                    "--direct",
                    f"{DIRECT_HOST}:{_port(4101, i)}",
                    "--direct-signal",
                    f"{DIRECT_HOST}:{_port(8101, i)}",
                    *legacy,
                ],
                wenv,
                cwd,
            )
            self.workers[variant] = worker
            info = worker.wait_ready()
            got = (info.get("aiortc_fast"), info.get("legacy_playback"))
            if got != (spec.aiortc_fast, spec.legacy_playback):
                raise BenchError(
                    f"the {variant} worker came up with aiortc_fast={got[0]}, "
                    f"legacy_playback={got[1]}"
                )
            if spec.opus_complexity not in (None, info.get("opus_complexity")):
                raise BenchError(
                    f"the {variant} worker came up with Opus complexity "
                    f"{info.get('opus_complexity')}, not {spec.opus_complexity}"
                )

    def down(self) -> None:
        for proc in [*self.workers.values(), self.relay]:
            if proc is not None:
                with contextlib.suppress(Exception):  # teardown goes on whatever one does
                    proc.stop()
        self.workers.clear()
        self.relay = None
        if netns_exists(self.ns):
            remove_netns(self.ns)
        for tree in self.sources.values():
            shutil.rmtree(tree, ignore_errors=True)
        self.sources.clear()

    def _source(self, revision: str) -> Path:
        """This repository's tree at `revision`, extracted once (git archive) for a variant."""
        if revision not in self.sources:
            proc = subprocess.run(
                ["git", "-C", str(REPO), "archive", "--format=tar", revision],
                capture_output=True,
                timeout=120,
                check=False,
            )
            if proc.returncode != 0:
                why = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
                raise BenchError(
                    f"cannot extract revision {revision[:12]} for the release variant "
                    f"(it needs this repository's git history): {why[0]}"
                )
            tree = Path(tempfile.mkdtemp(prefix="splitrelay-release-"))
            with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as archive:
                # Our own repository's archive: regular files and directories only.
                members = [m for m in archive.getmembers() if m.isfile() or m.isdir()]
                if any(m.name.startswith("/") or ".." in Path(m.name).parts for m in members):
                    raise BenchError(f"revision {revision[:12]}'s archive has unsafe paths")
                archive.extractall(tree, members=members)
            self.sources[revision] = tree
        return self.sources[revision]

    def _index(self, variant: str) -> int:
        return VARIANTS.index(variant)

    def url(self, variant: str, direct: bool = False) -> str:
        host = DIRECT_HOST if direct else WORKER_HOST
        return f"http://{host}:{_port(8101, self._index(variant))}"

    def setup_times(self) -> dict[str, Any]:
        targets = []
        for variant in self.config.variants:
            targets += ["--target", f"{variant}/relay={self.url(variant)}/v1/calls"]
            targets += ["--target", f"{variant}/direct={self.url(variant, True)}/v1/calls"]
        rounds = self.config.setup_rounds
        return _client(
            self.ns, ["setup", "--rounds", str(rounds), *targets], timeout=60 + 10 * rounds
        )

    def step(self, variant: str, calls: int) -> dict[str, Any]:
        c = self.config
        i = self._index(variant)
        assert self.relay is not None
        result = _client(
            self.ns,
            [
                "load",
                "--url",
                f"{self.url(variant)}/v1/calls",
                "--stats-url",
                self.url(variant),
                "--tunnel",
                f"{WORKER_HOST}:{_port(4101, i)}",
                "--calls",
                str(calls),
                "--duration",
                str(c.duration),
                "--warmup",
                str(c.warmup),
                "--stagger",
                str(c.stagger),
                "--worker-pid",
                str(self.workers[variant].pid),
                "--relay-pid",
                str(self.relay.pid),
            ],
            timeout=c.warmup + c.duration + calls * c.stagger + 120,
        )
        ok, reasons = judge(result, c)
        cpu = result.get("cpu", {})
        busy = result.get("cpu_busy", {})
        return {
            "variant": variant,
            "calls": calls,
            "ok": ok,
            "reasons": reasons,
            "client_limited": busy.get(str(_client_cpu()), 0.0) > CLIENT_SATURATED,
            # Time the worker's CPU spent on anything but the worker (other processes, IRQs).
            "worker_cpu_other": max(0.0, busy.get(str(_worker_cpu()), 0.0) - cpu.get("worker", 0)),
            **{k: v for k, v in result.items() if k != "per_call"},
            "per_call": result.get("per_call", []),
        }


def judge(result: dict[str, Any], config: BenchConfig) -> tuple[bool, list[str]]:
    """A step's verdict and, when it failed, why (one phrase per failed criterion)."""
    reasons = []
    if result["connected"] < result["calls"]:
        reasons.append(f"{result['calls'] - result['connected']} calls did not connect")
    heard = result.get("min_call_heard_ratio") or 0.0
    if heard < config.heard_min:
        reasons.append(f"a call heard only {heard:.0%} of its markers")
    p95 = result["rtt_seconds"]["p95"]
    if p95 is None or p95 >= config.rtt_p95_limit:
        shown = "none" if p95 is None else f"{p95 * 1000:.0f} ms"
        reasons.append(f"rtt p95 {shown} >= {config.rtt_p95_limit * 1000:.0f} ms")
    first, last = result.get("rtt_first_third_p50"), result.get("rtt_last_third_p50")
    if first is not None and last is not None and last - first > config.growth_limit:
        reasons.append(f"backlog grows (rtt p50 {first * 1000:.0f} -> {last * 1000:.0f} ms)")
    return not reasons, reasons


def run(config: BenchConfig | None = None, progress: Any = None) -> dict[str, Any]:
    """Run the whole benchmark; the result as a JSON-able dict (see the module docstring).

    ``progress`` (a callable taking one line) hears of each step as it ends.
    """
    config = config or BenchConfig()
    config.validate()
    if os.geteuid() != 0:
        raise BenchError("the benchmark needs root (it builds a network namespace)")
    if len(_cpus()) < 2:
        raise BenchError("the benchmark needs 2 CPUs: one for the worker, one for the clients")
    say = progress or (lambda line: None)
    bench = Bench(config)
    started = time.time()
    result: dict[str, Any] = {
        "config": asdict(config),
        "variants": {v.name: v.description for v in VARIANT_LIST if v.name in config.variants},
        "machine": {
            "cpus": _cpus(),
            "worker_cpu": _worker_cpu(),
            "client_cpu": _client_cpu(),
            "python": platform.python_version(),
            "aiortc": metadata.version("aiortc"),
            "cpu_model": _cpu_model(),
        },
    }
    try:
        bench.up()
        if config.setup_rounds:
            say(f"setup times: {config.setup_rounds} calls per target, one at a time")
            result["setup"] = bench.setup_times()
        steps: list[dict[str, Any]] = []
        failed: set[str] = set()
        for calls in config.steps:
            for variant in config.variants:
                if variant in failed:
                    continue
                for attempt in range(1 + config.retries):
                    step = bench.step(variant, calls)
                    step["attempt"] = attempt + 1
                    steps.append(step)
                    say(_step_line(step))
                    if step["ok"]:
                        break
                else:
                    failed.add(variant)
            if failed >= set(config.variants):
                break
        result["steps"] = steps
        result["sustained"] = {
            v: max((s["calls"] for s in steps if s["variant"] == v and s["ok"]), default=0)
            for v in config.variants
        }
        result["summary"] = summarize(steps, config.variants)
    finally:
        bench.down()
    result["elapsed_seconds"] = round(time.time() - started, 1)
    return result


def summarize(steps: list[dict[str, Any]], variants: Sequence[str]) -> dict[str, Any]:
    """Per variant: the sustained calls, and the worker's CPU at that step (whole and per call)."""
    out: dict[str, Any] = {}
    for variant in variants:
        passed = [s for s in steps if s["variant"] == variant and s["ok"]]
        best = max(passed, key=lambda s: s["calls"], default=None)
        cpu = None if best is None else best.get("cpu", {}).get("worker")
        out[variant] = {
            "sustained_calls": 0 if best is None else best["calls"],
            "worker_cpu": cpu,
            "worker_cpu_per_call": None if best is None or cpu is None else cpu / best["calls"],
            "rtt_p95_seconds": None if best is None else best["rtt_seconds"]["p95"],
        }
    return out


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def _step_line(step: dict[str, Any]) -> str:
    rtt = step["rtt_seconds"]
    cpu = step.get("cpu", {})
    lag = (step.get("worker") or {}).get("loop_lag_seconds") or {}
    verdict = "ok" if step["ok"] else "FAIL: " + "; ".join(step["reasons"])
    if step.get("attempt", 1) > 1:
        verdict = f"(attempt {step['attempt']}) {verdict}"
    if step.get("client_limited"):
        verdict += " (client-limited)"
    return (
        f"{step['variant']:<12} {step['calls']:>3} calls  rtt p50/p95/max "
        f"{_ms(rtt['p50'])}/{_ms(rtt['p95'])}/{_ms(rtt['max'])} ms  "
        f"worker cpu {cpu.get('worker', 0) * 100:5.1f}%  client cpu "
        f"{cpu.get('client', 0) * 100:5.1f}%  relay cpu {cpu.get('relay', 0) * 100:4.1f}%  "
        f"other on worker cpu {step.get('worker_cpu_other', 0) * 100:4.1f}%  "
        f"loop lag p99 {_ms(lag.get('p99'))} ms  {verdict}"
    )


def render(result: dict[str, Any]) -> str:
    """The human-readable report."""
    lines = []
    m = result["machine"]
    lines.append(
        f"machine: {m['cpu_model']}, worker on CPU {m['worker_cpu']}, clients and relay on "
        f"CPU {m['client_cpu']}; aiortc {m['aiortc']}, Python {m['python']}"
    )
    setup = result.get("setup")
    if setup:
        lines.append("")
        lines.append("call setup (offer POSTed -> connected), ms:")
        lines.append(f"  {'target':<14} {'p50':>6} {'p95':>6} {'max':>6}  calls")
        for name, d in setup.items():
            lines.append(
                f"  {name:<14} {_ms(d['p50']):>6} {_ms(d['p95']):>6} {_ms(d['max']):>6}  "
                f"{d['count']}" + (f"  errors: {d['errors'][0]}" if d["errors"] else "")
            )
    lines.append("")
    lines.append("concurrent echo calls on one worker core:")
    for step in result.get("steps", []):
        lines.append("  " + _step_line(step))
    summary = result.get("summary", {})
    if summary:
        lines.append("")
        lines.append("sustained echo calls on one worker core (every call heard, p95 < 150 ms):")
        lines.append(f"  {'variant':<12} {'calls':>5} {'worker cpu':>10} {'per call':>9}  what")
        for variant, row in summary.items():
            cpu, per = row["worker_cpu"], row["worker_cpu_per_call"]
            lines.append(
                f"  {variant:<12} {row['sustained_calls']:>5} "
                f"{'-' if cpu is None else f'{cpu * 100:.0f}%':>10} "
                f"{'-' if per is None else f'{per * 100:.2f}%':>9}  "
                f"{result.get('variants', {}).get(variant, '')}"
            )
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--steps",
    default=",".join(map(str, DEFAULT_STEPS)),
    show_default=True,
    help="Concurrent call counts to ramp through.",
)
@click.option(
    "--variants",
    default=",".join(DEFAULT_VARIANTS),
    show_default=True,
    help="Worker variants, among: " + ", ".join(VARIANTS) + ".",
)
@click.option(
    "--duration", type=float, default=20.0, show_default=True, help="Measured seconds per step."
)
@click.option(
    "--warmup",
    type=float,
    default=5.0,
    show_default=True,
    help="Seconds after the last call connected before measuring.",
)
@click.option(
    "--setup-rounds",
    type=int,
    default=10,
    show_default=True,
    help="Calls per target for the setup-time comparison (0: skip).",
)
@click.option(
    "--retries",
    type=int,
    default=1,
    show_default=True,
    help="Times a failing step is run again before the ramp stops.",
)
@click.option("--prefix", default=PREFIX, show_default=True, help="Network namespace name.")
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON.")
@click.option("--quiet", is_flag=True, help="No progress lines on stderr.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True),
    help="Also write the full JSON result to this file.",
)
def main(
    steps: str,
    variants: str,
    duration: float,
    warmup: float,
    setup_rounds: int,
    retries: int,
    prefix: str,
    as_json: bool,
    quiet: bool,
    out: str | None,
) -> None:
    """Call setup through the relay vs direct, and echo calls one worker core sustains."""
    try:
        config = BenchConfig(
            steps=[int(s) for s in steps.split(",") if s.strip()],
            variants=[v.strip() for v in variants.split(",") if v.strip()],
            duration=duration,
            warmup=warmup,
            setup_rounds=setup_rounds,
            retries=retries,
            prefix=prefix,
        )
    except ValueError as exc:
        raise click.UsageError(f"--steps: {exc}") from None
    progress = None if quiet else (lambda line: click.echo(line, err=True))
    try:
        result = run(config, progress)
    except (BenchError, NetnsError) as exc:
        click.echo(f"bench: error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("bench: interrupted", err=True)
        sys.exit(130)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(render(result))


if __name__ == "__main__":
    main()
