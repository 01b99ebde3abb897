"""`relayctl demo`: the whole system on one machine, driven end to end, then a summary.

What `sudo make demo` shows a newcomer in half a minute, with real parts only:

1. checks root, bpffs and redis-server (one clear line if one is missing);
2. removes whatever an interrupted earlier demo with the same prefix left behind;
3. builds the namespace testbed (`<prefix>-c1`, `-c2`, `-relay1`, `-tx1`, `-tx2`,
   `-redis`, `-sw`; see ctl/testbed.py);
4. starts redis-server in the redis namespace, `relayctl run` in relay1 (XDP, mode
   auto; when XDP cannot load the daemon relays in userspace and the demo says why,
   from the daemon's run state), and `transceiver run` in tx1 and tx2 with the echo
   backend, each registering itself in Redis;
5. waits until both transceivers are in the relay's BPF transceiver map (the relay
   mirrors them from Redis), so the first call cannot race the registry;
6. places the calls with `transceiver call`, c1 calling tx1 and c2 calling tx2, and
   shows a progress line (elapsed, calls connected, packets per path);
7. prints the summary (or, with --json, only JSON on stdout), and writes the RTT
   chart, summary.json and the processes' logs under --out;
8. tears everything down (unless --keep): processes, namespaces, pins, run state,
   also on Ctrl-C, SIGTERM, SIGHUP or an error, so a second run always starts clean.

Choices the brief leaves open:

- The demo pins its maps under its own directory, /sys/fs/bpf/splitrelay-<prefix>,
  never the default one, so it cannot disturb a relay running on the same machine
  (`relayctl --pin-dir` does not apply to it).
- One worker per transceiver: two aiortc servers plus two clients already keep two
  cores busy; more workers would measure the machine, not the relay.
- Every process the demo starts carries SPLITRELAY_DEMO_TAG=<prefix> in its
  environment, so what belongs to a demo can be found (and checked gone) by its tag.
- A run where a call fails still prints the summary (it is the diagnosis), then
  exits 1 with one line naming the first reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import click

from ctl import runstate
from ctl.loader import remove_pins

DEFAULT_PREFIX = "srdemo"
DEFAULT_OUT = Path("demo-results")
PIN_ROOT = Path("/sys/fs/bpf")
TAG_ENV = "SPLITRELAY_DEMO_TAG"
REDIS_KEY_PREFIX = "splitrelay:"
TRANSCEIVER_IDS = {"tx1": 0xA001, "tx2": 0xA002}  # one worker each: ids do not overlap
CALLER_OF = {"tx1": "c1", "tx2": "c2"}
TX_TUNNEL_PORT = 3480
RELAY_TUNNEL_PORT = 3479
CALL_TIMEOUT = 15.0  # signaling + ICE/DTLS, per call (transceiver call --timeout)
CALL_GRACE = 30.0  # beyond duration + timeout before a call process counts as hung
READY_TIMEOUT = 60.0  # the relay compiles its XDP program with bcc on start
PLAIN_PROGRESS_EVERY = 2.0  # seconds between progress lines when not on a terminal
MAX_CALLS = 100


class DemoError(RuntimeError):
    """The demo cannot go on; the message is one line for the person running it."""


# --------------------------------------------------------------------------- helpers


def pin_dir_for(prefix: str) -> Path:
    """The demo's own bpffs directory: never the production default."""
    return PIN_ROOT / f"splitrelay-{prefix}"


def program_path(name: str) -> str:
    """The console script `name` of this installation (next to this Python).

    Spawned commands must be this venv's, whatever PATH says (sudo resets it).
    """
    sibling = Path(sys.executable).with_name(name)
    return str(sibling) if sibling.exists() else name


def display_command(name: str) -> str:
    """How to type `name` in the printed hints: bare when PATH finds this very program."""
    path = program_path(name)
    found = shutil.which(name)
    return name if found and Path(found) == Path(path) else path


def preflight() -> None:
    """Fail fast, in one line, on what the demo cannot work without."""
    if os.geteuid() != 0:
        raise DemoError(
            "the demo needs root (network namespaces, XDP, BPF maps): run `sudo make demo`"
        )
    if not os.path.ismount(PIN_ROOT):
        raise DemoError(
            f"bpffs is not mounted at {PIN_ROOT}: run ctl/bootstrap.sh "
            f"(or mount -t bpf bpf {PIN_ROOT})"
        )
    if shutil.which("redis-server") is None:
        raise DemoError("redis-server is not installed: run ctl/bootstrap.sh (Debian redis-server)")


def split_calls(calls: int, ways: int) -> list[int]:
    """Spread `calls` over `ways` targets as evenly as possible (earlier ones get the rest)."""
    return [calls // ways + (1 if i < calls % ways else 0) for i in range(ways)]


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (the one transceiver/markers.py reports); None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-p * len(ordered) // 100))
    return ordered[min(int(rank), len(ordered)) - 1]


def distribution_ms(seconds: Sequence[float]) -> dict[str, Any]:
    """count/p50/p95/max of durations given in seconds, in milliseconds (3 decimals)."""

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 3)

    return {
        "count": len(seconds),
        "p50": ms(percentile(seconds, 50)),
        "p95": ms(percentile(seconds, 95)),
        "max": ms(max(seconds) if seconds else None),
    }


def _last_line(path: Path) -> str:
    """The last non-empty line of a log: usually the one error that matters."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines()]
    except OSError:
        return "(no log)"
    lines = [ln for ln in lines if ln]
    return lines[-1][:300] if lines else "(empty log)"


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(netns: str, url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    """GET `url` from inside `netns`; (status, body). Never through a proxy.

    Proxies are disabled on purpose: an http_proxy inherited through sudo would
    send the request out of the machine instead of into the testbed.
    """
    from ctl.netns import in_netns

    with in_netns(netns):
        try:
            with _NO_PROXY.open(url, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Samples:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric_sum(samples: Samples, name: str, **labels: str) -> float:
    """Sum of `name`'s samples whose labels include `labels`."""
    return sum(
        v
        for (n, lbls), v in samples.items()
        if n == name and all(dict(lbls).get(k) == want for k, want in labels.items())
    )


# --------------------------------------------------------------------------- output


class Reporter:
    """Human-readable lines: stdout normally, stderr with --json (stdout is JSON only).

    On a terminal the progress is one line redrawn in place; anywhere else (a log,
    CI, a pipe) it is a plain line every few seconds, so logs stay readable.
    """

    def __init__(self, as_json: bool, stream: TextIO | None = None) -> None:
        self.stream = stream or (sys.stderr if as_json else sys.stdout)
        self.live = self.stream.isatty()
        self._drawn = False
        self._last_plain = 0.0

    def line(self, text: str = "") -> None:
        """One finished line (ends a live progress line first)."""
        self.end_progress()
        print(text, file=self.stream, flush=True)

    def progress(self, text: str, force: bool = False) -> None:
        """Show the current progress: redrawn in place, or a line every few seconds."""
        if self.live:
            self.stream.write("\r" + text + "\x1b[K")
            self.stream.flush()
            self._drawn = True
            return
        now = time.monotonic()
        if force or now - self._last_plain >= PLAIN_PROGRESS_EVERY:
            self._last_plain = now
            print(text, file=self.stream, flush=True)

    def end_progress(self) -> None:
        """Leave the live line on screen and move below it."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


# --------------------------------------------------------------------------- signals


DEMO_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _signal_handlers(in_owner: Callable[[int], None]) -> Iterator[None]:
    """Handle DEMO_SIGNALS with `in_owner` in this process; a fork just exits.

    A child forked without exec (pyroute2 forks short-lived helpers and stops them
    with SIGTERM) inherits Python's handlers. Raising there would unwind a copy of
    the demo's stack and run its cleanup a second time, against the lock the parent
    holds; the child exits at once instead. Python-level handlers (unlike SIG_IGN)
    do not survive exec, so the services the demo starts get default dispositions.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    owner = os.getpid()

    def handler(signum: int, _frame: object) -> None:
        if os.getpid() != owner:
            os._exit(128 + signum)
        in_owner(signum)

    old = {s: signal.signal(s, handler) for s in DEMO_SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _interrupt(signum: int) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _ignore(_signum: int) -> None:
    return None


def signals_interrupt() -> contextlib.AbstractContextManager[None]:
    """SIGINT, SIGTERM and SIGHUP end the demo the way Ctrl-C does, so its cleanup runs."""
    return _signal_handlers(_interrupt)


def signals_deferred() -> contextlib.AbstractContextManager[None]:
    """Cleanup must finish: a second Ctrl-C would leave namespaces and pins behind.

    Every step of the cleanup is bounded (processes get SIGKILL after a grace).
    """
    return _signal_handlers(_ignore)


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class TransceiverPlan:
    """One `transceiver run` and the client that calls it."""

    host: str
    netns: str
    tid: int
    addr: str
    signaling_url: str
    caller: str  # client host
    caller_netns: str
    calls: int

    @property
    def id_hex(self) -> str:
        return f"{self.tid:08x}"


@dataclass(frozen=True)
class DemoPlan:
    """Names, addresses and commands of one demo, all derived from the testbed plan."""

    prefix: str
    pin_dir: Path
    public4: str
    public6: str
    tunnel4: str
    tunnel6: str
    metrics_addr: str
    metrics_url: str
    metrics_netns: str  # where the metrics are scraped from (a client, as a user would)
    redis_netns: str
    redis_host: str
    redis_port: int
    redis_url: str
    transceivers: tuple[TransceiverPlan, ...]

    @classmethod
    def from_testbed(cls, desc: Mapping[str, Any], calls: int) -> DemoPlan:
        """The plan for a testbed description (Testbed.describe())."""
        hosts = desc["hosts"]
        relay, redis = hosts["relay1"], hosts["redis"]
        names = [n for n in desc["transceivers"] if n in TRANSCEIVER_IDS]
        shares = split_calls(calls, len(names))
        txs = tuple(
            TransceiverPlan(
                host=name,
                netns=hosts[name]["netns"],
                tid=TRANSCEIVER_IDS[name],
                addr=hosts[name]["ipv4"],
                signaling_url=hosts[name]["signaling_url"],
                caller=CALLER_OF[name],
                caller_netns=hosts[CALLER_OF[name]]["netns"],
                calls=share,
            )
            for name, share in zip(names, shares, strict=True)
        )
        public4 = relay["public"]["ipv4"]
        metrics_url = desc["relay_metrics_url"]
        return cls(
            prefix=desc["prefix"],
            pin_dir=pin_dir_for(desc["prefix"]),
            public4=public4,
            public6=relay["public"]["ipv6"],
            tunnel4=relay["tunnel"]["ipv4"],
            tunnel6=relay["tunnel"]["ipv6"],
            metrics_addr=metrics_url.split("//", 1)[1].split("/", 1)[0],
            metrics_url=metrics_url,
            metrics_netns=hosts["c1"]["netns"],
            redis_netns=redis["netns"],
            redis_host=redis["ipv4"],
            redis_port=int(redis["url"].rsplit(":", 1)[1].split("/", 1)[0]),
            redis_url=redis["url"],
            transceivers=txs,
        )

    def relay_argv(self, static: bool) -> list[str]:
        """`relayctl run` in relay1: XDP on both sides, Redis, metrics on the public side.

        `static` registers the transceivers on the command line, for a `transceiver
        run` that cannot register itself in Redis.
        """
        argv = [
            program_path("relayctl"), "--pin-dir", str(self.pin_dir), "run",
            "-i", "pub0", "-i", "dc0",
            "--public", self.public4, "--public", self.public6,
            "--tunnel", self.tunnel4, "--tunnel", self.tunnel6,
            "--mode", "auto",
            "--redis-url", self.redis_url,
            "--metrics", self.metrics_addr,
            "--detach-on-exit",
        ]  # fmt: skip
        if static:
            for tx in self.transceivers:
                argv += ["--transceiver", f"{tx.tid:x}={tx.addr}:{TX_TUNNEL_PORT}"]
        return argv

    def transceiver_argv(self, tx: TransceiverPlan, register: bool) -> list[str]:
        """`transceiver run` on a tx host: one worker, echo backend, the relay as only path."""
        argv = [
            program_path("transceiver"), "run",
            "--listen", f"{tx.addr}:8080",
            "--workers", "1",
            "--transceiver-id", f"{tx.tid:x}",
            "--tunnel", tx.addr,
            "--tunnel-port", str(TX_TUNNEL_PORT),
            "--relay", f"{self.tunnel4}:{RELAY_TUNNEL_PORT}",
            "--public", f"{self.public4}:3478",
            "--public", f"[{self.public6}]:3478",
            "--backend", "echo",
            "--max-calls", str(max(50, tx.calls)),
            "--drain-timeout", "2",
        ]  # fmt: skip
        if register:
            argv += ["--redis-url", self.redis_url]
        return argv

    def redis_argv(self, workdir: Path) -> list[str]:
        """A throwaway redis-server: no persistence, reachable inside the testbed only."""
        return [
            "redis-server",
            "--bind", self.redis_host,
            "--port", str(self.redis_port),
            "--protected-mode", "no",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(workdir),
        ]  # fmt: skip

    def call_argv(self, tx: TransceiverPlan, duration: float) -> list[str]:
        """`transceiver call` from the client namespace to one transceiver."""
        return [
            program_path("transceiver"), "call", tx.signaling_url,
            "--calls", str(tx.calls),
            "--duration", f"{duration:g}",
            "--timeout", f"{CALL_TIMEOUT:g}",
            "--stagger", "0.05",
            "--json",
        ]  # fmt: skip


def transceiver_self_registers() -> bool:
    """True when `transceiver run` takes --redis-url (its workers register in Redis).

    A build without it still gets a working demo: the transceivers are then given
    to the relay on its command line instead.
    """
    from transceiver.cli import run

    return any(p.name == "redis_url" for p in run.params)


# --------------------------------------------------------------------------- the run


@dataclass
class CallBatch:
    """One `transceiver call` process and where its output goes."""

    tx: TransceiverPlan
    proc: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    timed_out: bool = False


@dataclass
class Live:
    """What the progress line shows, from the latest scrapes."""

    connected: int = 0
    packets: dict[str, float] = field(default_factory=dict)


class Demo:
    """One demo run: build, start, call, measure, report, tear down."""

    def __init__(
        self,
        prefix: str,
        calls: int,
        duration: float,
        out: Path,
        keep: bool,
        as_json: bool,
        reporter: Reporter | None = None,
    ) -> None:
        from ctl.testbed import Testbed

        self.testbed = Testbed(prefix, clients=2, relays=1, transceivers=2)
        self.calls = calls
        self.duration = duration
        self.out = out
        self.keep = keep
        self.as_json = as_json
        self.say = reporter or Reporter(as_json)
        self.plan = DemoPlan.from_testbed(self.testbed.describe(), calls)
        self.env = {**os.environ, TAG_ENV: prefix}
        self.workdir: Path | None = None
        self.batches: list[CallBatch] = []
        self.relay_proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------ top level

    def run(self) -> dict[str, Any]:
        """Everything, with cleanup guaranteed; returns the summary."""
        done = False
        owner = os.getpid()
        try:
            with signals_interrupt():
                self.clean_leftovers()
                self.start()
                started = time.time()
                elapsed = self.place_calls()
                summary = self.collect(started, elapsed)
                done = True
                return summary
        finally:
            if os.getpid() != owner:  # a forked helper unwinding: never clean up from it
                os._exit(1)
            with signals_deferred():
                if not (done and self.keep):
                    self.teardown()
                hand_over(self.out)

    def clean_leftovers(self) -> None:
        """Remove what an interrupted (or --keep) earlier run with this prefix left."""
        removed = self.testbed.down()
        stale = self.plan.pin_dir.exists()
        remove_pins(self.plan.pin_dir)
        runstate.remove(self.plan.pin_dir)
        if removed or stale:
            self.say.line(f"removed an earlier demo's leftovers ({len(removed)} namespaces)")

    def start(self) -> None:
        """Testbed, Redis, relay, transceivers; returns when calls can be placed."""
        self.say.line(f"building testbed {self.plan.prefix!r} (network namespaces) ...")
        self.testbed.up()
        self.workdir = Path(tempfile.mkdtemp(prefix="splitrelay-demo-"))
        self.start_redis()
        register = transceiver_self_registers()
        self.start_relay(static=not register)
        self.start_transceivers(register)
        self.wait_registered()

    # ------------------------------------------------------------ services

    def spawn(self, host: str, argv: Sequence[str], name: str) -> subprocess.Popen[bytes]:
        """Start a service in a testbed host, tagged and recorded (down() stops it)."""
        return self.testbed.spawn(host, argv, name=name, env=self.env)

    def log_of(self, name: str) -> Path:
        return self.testbed.log_dir / f"{name}.log"

    def start_redis(self) -> None:
        assert self.workdir is not None
        proc = self.spawn("redis", self.plan.redis_argv(self.workdir), "redis")
        wait_until(
            lambda: self._redis_ping(),
            10.0,
            proc,
            "redis-server",
            self.log_of("redis"),
        )
        self.say.line(f"redis-server on {self.plan.redis_host}:{self.plan.redis_port}")

    def _redis_ping(self) -> bool:
        from ctl.netns import in_netns

        with in_netns(self.plan.redis_netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(0.3)
            sock.connect((self.plan.redis_host, self.plan.redis_port))
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False
        finally:
            sock.close()

    def start_relay(self, static: bool) -> None:
        """`relayctl run`; ready when its run state names its pid. Says how it relays."""
        runstate.remove(self.plan.pin_dir)
        proc = self.spawn("relay1", self.plan.relay_argv(static), "relay")
        self.relay_proc = proc

        def ready() -> bool:
            state = runstate.load(self.plan.pin_dir)
            return state is not None and state.pid == proc.pid

        wait_until(ready, READY_TIMEOUT, proc, "the relay daemon", self.log_of("relay"))
        state = runstate.load(self.plan.pin_dir)
        assert state is not None
        self.say.line(f"relay on {self.plan.public4}:3478 and [{self.plan.public6}]:3478, "
                      f"{describe_path(state.xdp, state.interfaces, None)}")  # fmt: skip
        if not state.xdp:
            # Always on stderr: with --json this is the one thing a script must not miss.
            print(
                "notice: XDP is not in use, the relay's userspace path carries every packet: "
                f"{state.fallback_reason or 'no reason recorded'}",
                file=sys.stderr,
                flush=True,
            )
        if static:
            self.say.line("note: `transceiver run` has no --redis-url here; the transceivers "
                          "are registered on the relay's command line")  # fmt: skip

    def start_transceivers(self, register: bool) -> None:
        """One `transceiver run` per tx host; ready when /healthz says every worker is up."""
        procs = [
            (tx, self.spawn(tx.host, self.plan.transceiver_argv(tx, register), tx.host))
            for tx in self.plan.transceivers
        ]
        for tx, proc in procs:
            wait_until(
                lambda tx=tx: self._healthy(tx),
                READY_TIMEOUT,
                proc,
                f"the transceiver on {tx.host}",
                self.log_of(tx.host),
            )

    def _healthy(self, tx: TransceiverPlan) -> bool:
        try:
            status, body = http_get(tx.netns, f"{tx.signaling_url}/healthz", timeout=0.5)
            health = json.loads(body)
        except (OSError, ValueError):
            return False
        return status == 200 and health.get("workers_alive") == health.get("workers")

    def wait_registered(self) -> None:
        """Until every transceiver is in the relay's BPF map (`transceivers ls`)."""
        from ctl.maps import RelayMaps

        want = {tx.tid for tx in self.plan.transceivers}

        def present() -> bool:
            with RelayMaps(self.plan.pin_dir) as maps:
                return want <= {t.tid for t in maps.list_transceivers()}

        wait_until(present, 15.0, self.relay_proc, "the transceivers in the relay's map", None)
        ids = ", ".join(f"{tx.id_hex} ({tx.host})" for tx in self.plan.transceivers)
        self.say.line(f"transceivers {ids} ready, in the relay's map")

    # ------------------------------------------------------------ calls

    def place_calls(self) -> float:
        """Start the call processes, show progress until they end; returns the elapsed time."""
        from ctl.netns import popen_in

        self.say.line(
            f"placing {self.calls} call{'s' if self.calls != 1 else ''} of {self.duration:g} s "
            "through the relay (echo backend) ..."
        )
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for tx in self.plan.transceivers:
            if not tx.calls:
                continue
            stdout, stderr = logs / f"calls-{tx.host}.json", logs / f"calls-{tx.host}.err"
            with open(stdout, "wb") as out, open(stderr, "wb") as err:
                proc = popen_in(
                    tx.caller_netns,
                    self.plan.call_argv(tx, self.duration),
                    keep_mounts=True,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    env=self.env,
                    start_new_session=True,
                )
            self.batches.append(CallBatch(tx, proc, stdout, stderr))
        return self.watch_calls()

    def watch_calls(self) -> float:
        """Redraw the progress line until every call process has exited (bounded)."""
        t0 = time.monotonic()
        expected = self.duration + 2.0
        deadline = t0 + self.duration + CALL_TIMEOUT + CALL_GRACE
        live = Live()
        while any(b.proc.poll() is None for b in self.batches):
            if time.monotonic() > deadline:
                for b in self.batches:
                    if b.proc.poll() is None:
                        b.timed_out = True
                        stop_process(b.proc)
                break
            live = self.scrape_live(live)
            self.say.progress(progress_line(time.monotonic() - t0, expected, self.calls, live))
            time.sleep(0.5)
        live = self.scrape_live(live)
        self.say.progress(
            progress_line(time.monotonic() - t0, expected, self.calls, live), force=True
        )
        self.say.end_progress()
        return time.monotonic() - t0

    def scrape_live(self, last: Live) -> Live:
        """Calls connected (transceiver metrics) and packets per path (relay metrics).

        A scrape that fails keeps the previous numbers: progress is a view, never a
        reason to stop the demo.
        """
        live = Live(last.connected, dict(last.packets))
        with contextlib.suppress(OSError, ValueError):
            relay = self.scrape_relay()
            live.packets = {
                path: metric_sum(relay, "splitrelay_relay_packets_total", path=path)
                for path in ("xdp", "userspace")
            }
        connected = 0
        try:
            for tx in self.plan.transceivers:
                _, body = http_get(tx.netns, f"{tx.signaling_url}/metrics")
                samples = parse_metrics(body.decode())
                connected += int(
                    metric_sum(samples, "splitrelay_transceiver_calls_connected_total")
                )
            live.connected = connected
        except (OSError, ValueError):
            pass
        return live

    def scrape_relay(self) -> Samples:
        """The relay's /metrics, fetched from a client namespace as a user would."""
        _, body = http_get(self.plan.metrics_netns, self.plan.metrics_url, timeout=2.0)
        return parse_metrics(body.decode())

    # ------------------------------------------------------------ results

    def collect(self, started: float, elapsed: float) -> dict[str, Any]:
        """Every figure of the summary, the chart, summary.json."""
        calls = [(b.tx, read_batch(b)) for b in self.batches]
        try:
            relay = self.scrape_relay()
        except (OSError, ValueError) as exc:
            raise DemoError(
                f"cannot read the relay's metrics at {self.plan.metrics_url}: {exc}"
            ) from exc
        state = runstate.load(self.plan.pin_dir)
        summary = build_summary(
            plan=self.plan,
            duration=self.duration,
            elapsed=elapsed,
            calls=calls,
            relay=relay,
            state=state,
            redis_sessions=self.count_redis_sessions(),
            relay_sessions=self.count_relay_sessions(),
        )
        chart = self.out / "rtt.png"
        write_chart(chart, calls, started, chart_title(summary))
        summary["chart"] = str(chart)
        summary["summary_file"] = str(self.out / "summary.json")
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def count_redis_sessions(self) -> int | None:
        """Keys `splitrelay:session:*` in the demo's Redis (None if it cannot be read)."""
        import redis

        from ctl.netns import in_netns

        try:
            with in_netns(self.plan.redis_netns):
                client = redis.Redis(
                    host=self.plan.redis_host, port=self.plan.redis_port, socket_timeout=2
                )
                try:
                    pattern = f"{REDIS_KEY_PREFIX}session:*"
                    return sum(1 for _ in client.scan_iter(match=pattern, count=1000))
                finally:
                    client.close()
        except (redis.RedisError, OSError):
            return None

    def count_relay_sessions(self) -> int | None:
        """Sessions in the relay's BPF session map."""
        from ctl.bpfsys import BpfError
        from ctl.maps import RelayMaps

        try:
            with RelayMaps(self.plan.pin_dir) as maps:
                return sum(1 for _ in maps.iter_sessions())
        except (BpfError, OSError):
            return None

    # ------------------------------------------------------------ teardown

    def teardown(self) -> None:
        """Stop the calls, save the logs, remove namespaces, pins and run state."""
        self.say.end_progress()
        for b in self.batches:
            stop_process(b.proc)
        self.save_logs()
        try:
            self.testbed.down()
        finally:
            remove_pins(self.plan.pin_dir)
            runstate.remove(self.plan.pin_dir)
            if self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def save_logs(self) -> None:
        """Copy the services' logs next to the results: they outlive the testbed."""
        src = self.testbed.log_dir
        if not src.is_dir():
            return
        dest = self.out / "logs"
        with contextlib.suppress(OSError):
            dest.mkdir(parents=True, exist_ok=True)
            for f in src.iterdir():
                shutil.copyfile(f, dest / f.name)


def hand_over(out: Path) -> None:
    """Give the results to the user behind sudo, so they can read and delete them."""
    uid, gid = os.environ.get("SUDO_UID"), os.environ.get("SUDO_GID")
    if os.geteuid() != 0 or not (uid and gid and uid.isdigit() and gid.isdigit()):
        return
    with contextlib.suppress(OSError):
        for path in [out, *out.rglob("*")]:
            os.chown(path, int(uid), int(gid), follow_symlinks=False)


def wait_until(
    cond: Callable[[], bool],
    timeout: float,
    proc: subprocess.Popen[bytes] | None,
    what: str,
    log: Path | None,
) -> None:
    """Poll `cond` until true; fail in one line if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            if cond():
                return
        if proc is not None and proc.poll() is not None:
            detail = f": {_last_line(log)}" if log else ""
            raise DemoError(f"{what} exited with status {proc.returncode}{detail}")
        if time.monotonic() > deadline:
            detail = f" (last log line: {_last_line(log)})" if log else ""
            raise DemoError(f"{what} not ready after {timeout:g} s{detail}")
        time.sleep(0.1)


def stop_process(proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
    """SIGTERM the process group, SIGKILL it after `grace` seconds; always reaped."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)
            return


def progress_line(elapsed: float, expected: float, calls: int, live: Live) -> str:
    """`  7.5 s / ~22 s   calls 10/10 connected   packets  xdp 12,345  userspace 41`."""
    paths = "  ".join(f"{p} {int(n):,}" for p, n in live.packets.items()) or "-"
    return (
        f"{elapsed:5.1f} s / ~{expected:.0f} s   calls {live.connected}/{calls} connected   "
        f"packets  {paths}"
    )


def read_batch(batch: CallBatch) -> dict[str, Any]:
    """The JSON `transceiver call` printed, or a stand-in naming why there is none."""
    try:
        data = json.loads(batch.stdout.read_text())
        if isinstance(data, dict) and isinstance(data.get("per_call"), list):
            return data
    except (OSError, ValueError):
        pass
    if batch.timed_out:
        reason = "the call process did not finish in time and was stopped"
    else:
        reason = f"transceiver call exited with {batch.proc.returncode}: {_last_line(batch.stderr)}"
    return {"per_call": [{"index": i, "ok": False, "error": reason} for i in range(batch.tx.calls)]}


# --------------------------------------------------------------------------- summary


def describe_path(xdp: bool, interfaces: Mapping[str, str], reason: str | None) -> str:
    """`XDP (native on pub0, dc0)` or `userspace only (reason)`."""
    if xdp:
        modes = sorted(set(interfaces.values()))
        return f"XDP ({'/'.join(modes)} on {', '.join(interfaces)})"
    return "userspace only" + (f" ({reason})" if reason else "")


def relay_figures(relay: Samples) -> dict[str, Any]:
    """Packets and bytes per path and direction, non-zero drops by path and reason."""
    paths: dict[str, Any] = {}
    for path in ("xdp", "userspace"):
        entry: dict[str, Any] = {}
        for metric in ("packets", "bytes"):
            name = f"splitrelay_relay_{metric}_total"
            entry[metric] = {
                d: int(metric_sum(relay, name, path=path, direction=d))
                for d in ("to_transceiver", "to_client")
            }
        entry["sessions_created"] = int(
            metric_sum(relay, "splitrelay_relay_sessions_created_total", path=path)
        )
        paths[path] = entry
    drops: dict[str, dict[str, int]] = {}
    for (name, labels), value in sorted(relay.items()):
        if name == "splitrelay_relay_drops_total" and value:
            lbl = dict(labels)
            drops.setdefault(lbl.get("path", "?"), {})[lbl.get("reason", "?")] = int(value)
    return {"paths": paths, "drops": drops}


def build_summary(
    *,
    plan: DemoPlan,
    duration: float,
    elapsed: float,
    calls: Sequence[tuple[TransceiverPlan, Mapping[str, Any]]],
    relay: Samples,
    state: runstate.RunState | None,
    redis_sessions: int | None,
    relay_sessions: int | None,
) -> dict[str, Any]:
    """The figures of one run, JSON-ready; `render_summary` prints the same."""
    per_call = [c for _, out in calls for c in out.get("per_call", [])]
    setups = [c["setup_seconds"] for c in per_call if c.get("setup_seconds")]
    rtts = [x for c in per_call for x in c.get("audio_rtts") or []]
    events = [x for c in per_call for x in c.get("event_rtts") or []]
    errors = sorted({c["error"] for c in per_call if c.get("error")})
    figures = relay_figures(relay)
    return {
        "prefix": plan.prefix,
        "duration_seconds": duration,
        "elapsed_seconds": round(elapsed, 3),
        "calls": {
            "placed": len(per_call),
            "connected": len(setups),
            "ok": sum(1 for c in per_call if c.get("ok")),
            "failed": sum(1 for c in per_call if not c.get("ok")),
            "errors": errors,
        },
        "setup_ms": distribution_ms(setups),
        "echo_rtt_ms": distribution_ms(rtts),
        "event_rtt_ms": distribution_ms(events),
        "markers": {
            "sent": sum(int(c.get("markers_sent") or 0) for c in per_call),
            "lost": sum(int(c.get("markers_lost") or 0) for c in per_call),
        },
        "relay": {
            "xdp": bool(state and state.xdp),
            "interfaces": dict(state.interfaces) if state else {},
            "fallback_reason": state.fallback_reason if state else "the relay is not running",
            "public": [f"{plan.public4}:3478", f"[{plan.public6}]:3478"],
            "metrics_url": plan.metrics_url,
            "pin_dir": str(plan.pin_dir),
        },
        **figures,
        "sessions": {"redis": redis_sessions, "relay": relay_sessions},
        "transceivers": [
            {
                "id": tx.id_hex,
                "host": tx.host,
                "signaling_url": tx.signaling_url,
                "caller": tx.caller,
                "calls": len(out.get("per_call", [])),
                "connected": sum(1 for c in out.get("per_call", []) if c.get("setup_seconds")),
            }
            for tx, out in calls
        ],
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _dist_line(label: str, dist: Mapping[str, Any], note: str) -> str:
    return (
        f"  {label:<10} p50 {_ms(dist['p50']):>9}   p95 {_ms(dist['p95']):>9}   "
        f"max {_ms(dist['max']):>9}   {note}"
    ).rstrip()


def _bytes(n: int) -> str:
    from ctl.cliutil import format_bytes

    return format_bytes(n)


def render_summary(s: Mapping[str, Any]) -> str:
    """The summary a person reads at a glance (the JSON has the same figures)."""
    c, relay = s["calls"], s["relay"]
    path = describe_path(relay["xdp"], relay["interfaces"], relay["fallback_reason"])
    lines = [
        f"splitrelay demo: {c['placed']} calls of {s['duration_seconds']:g} s through "
        f"relay1, {path}",
        "",
        f"  {'calls':<10} {c['connected']} of {c['placed']} connected, {c['ok']} heard their echo",
        _dist_line("setup", s["setup_ms"], "offer POSTed -> ICE + DTLS connected"),
        _dist_line(
            "echo rtt",
            s["echo_rtt_ms"],
            f"{s['echo_rtt_ms']['count']} of {s['markers']['sent']} markers came back",
        ),
    ]
    lines += _path_lines(s["paths"])
    lines.append(f"  {'drops':<10} {_drops_text(s['drops'])}")
    sessions = s["sessions"]
    redis_n = "?" if sessions["redis"] is None else sessions["redis"]
    relay_n = "?" if sessions["relay"] is None else sessions["relay"]
    lines.append(
        f"  {'sessions':<10} {redis_n} in Redis ({REDIS_KEY_PREFIX}session:*), "
        f"{relay_n} in the relay's map"
    )
    if s.get("chart"):
        lines.append(f"  {'chart':<10} {s['chart']}")
    for err in c["errors"][:3]:
        lines.append(f"  {'error':<10} {err}")
    return "\n".join(lines)


def _path_lines(paths: Mapping[str, Any]) -> list[str]:
    """Packets and bytes per path and direction, with each path's share of the packets."""
    total = sum(sum(p["packets"].values()) for p in paths.values())
    lines = [
        f"  {'relayed':<12}{'packets to tx':>13}{'to client':>11}"
        f"{'bytes to tx':>13}{'to client':>11}{'share':>8}"
    ]
    for name, p in paths.items():
        pk, by = p["packets"], p["bytes"]
        share = f"{100 * sum(pk.values()) / total:.1f}%" if total else "-"
        lines.append(
            f"    {name:<10}{pk['to_transceiver']:>13,}{pk['to_client']:>11,}"
            f"{_bytes(by['to_transceiver']):>13}{_bytes(by['to_client']):>11}{share:>8}"
        )
    return lines


def _drops_text(drops: Mapping[str, Mapping[str, int]]) -> str:
    if not drops:
        return "none"
    return ", ".join(
        f"{path} {reason} {n:,}" for path, reasons in drops.items() for reason, n in reasons.items()
    )


def chart_title(s: Mapping[str, Any]) -> str:
    relay = s["relay"]
    path = "XDP" if relay["xdp"] else "userspace relay"
    return (
        f"Echo round trip through the relay ({path}): {s['calls']['placed']} calls, "
        f"{s['duration_seconds']:g} s"
    )


def write_chart(
    path: Path,
    calls: Sequence[tuple[TransceiverPlan, Mapping[str, Any]]],
    started: float,
    title: str,
) -> None:
    """A PNG of every echo round trip over the run, one colour per transceiver.

    Uses `samples` ([unix time, rtt ms]) from `transceiver call --json`; the x axis
    is seconds since the calls were launched. The Agg backend: no display needed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    everything: list[float] = []
    for tx, out in calls:
        pts = [p for c in out.get("per_call", []) for p in c.get("samples") or []]
        if not pts:
            continue
        xs = [t - started for t, _ in pts]
        ys = [rtt for _, rtt in pts]
        everything += ys
        ax.scatter(xs, ys, s=9, alpha=0.6, label=f"{tx.host} ({tx.id_hex}), {len(ys)} samples")
    if everything:
        for p, style in ((50, "-"), (95, "--")):
            value = percentile(everything, p)
            assert value is not None
            ax.axhline(
                value, color="grey", linestyle=style, linewidth=1, label=f"p{p} {value:.1f} ms"
            )
        ax.legend(loc="lower right", fontsize=8)  # the round trips sit high
        ax.set_ylim(bottom=0, top=max(everything) * 1.25)
    else:
        ax.text(0.5, 0.5, "no echo came back", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(left=0)
    ax.set_xlabel("seconds since the calls were placed")
    ax.set_ylabel("echo round trip (ms)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


# --------------------------------------------------------------------------- keep / down


def keep_hints(plan: DemoPlan) -> list[str]:
    """The exact commands to look around a demo left up with --keep."""
    relayctl = f"{display_command('relayctl')} --pin-dir {plan.pin_dir}"
    tx = plan.transceivers[0]
    c1 = plan.metrics_netns
    # nsenter, not `ip netns exec`: status looks at the relay's interfaces, and
    # `ip netns exec` would remount /sys and hide the pins on /sys/fs/bpf.
    relay_ns = f"nsenter --net=/run/netns/{plan.prefix}-relay1"
    return [
        "The demo is still up (--keep). Look around:",
        f"  {relay_ns} {relayctl} status",
        f"  {relayctl} sessions ls",
        f"  {relayctl} transceivers ls",
        f"  {relayctl} stats --watch",
        f"  ip netns exec {c1} curl -s --noproxy '*' {plan.metrics_url}",
        f"  ip netns exec {c1} {display_command('transceiver')} call {tx.signaling_url} "
        "--calls 2 --duration 5",
        f"  ip netns exec {plan.redis_netns} redis-cli -h {plan.redis_host} "
        f"--scan --pattern '{REDIS_KEY_PREFIX}*'",
        "Take it down with:",
        f"  {display_command('relayctl')} demo --down --prefix {plan.prefix}",
    ]


def take_down(prefix: str) -> list[str]:
    """Remove a demo left up (--keep) or interrupted: processes, namespaces, pins, state."""
    from ctl.testbed import Testbed

    tb = Testbed(prefix, clients=2, relays=1, transceivers=2)
    try:
        return tb.down()
    finally:
        remove_pins(pin_dir_for(prefix))
        runstate.remove(pin_dir_for(prefix))


# --------------------------------------------------------------------------- command


@click.command("demo")
@click.option(
    "--calls",
    type=click.IntRange(1, MAX_CALLS),
    default=10,
    show_default=True,
    help="Voice calls to place, spread over both transceivers.",
)
@click.option(
    "--duration",
    type=click.FloatRange(1, 3600),
    default=20.0,
    show_default=True,
    help="Seconds each call talks once connected.",
)
@click.option(
    "--prefix",
    default=DEFAULT_PREFIX,
    show_default=True,
    help="Namespace prefix of the demo's testbed (its pins: /sys/fs/bpf/splitrelay-PREFIX).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default=DEFAULT_OUT,
    show_default=True,
    help="Where the RTT chart, summary.json and logs go.",
)
@click.option(
    "--keep", is_flag=True, help="Leave the testbed running and print how to look around."
)
@click.option("--down", "down_only", is_flag=True, help="Only take down a demo left running.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON only.")
def demo_command(
    calls: int, duration: float, prefix: str, out: Path, keep: bool, down_only: bool, as_json: bool
) -> None:
    """Testbed, Redis, relay (XDP), two transceivers, N echo calls, a summary; then clean up."""
    from ctl.testbed import TestbedError

    preflight_click()
    try:
        if down_only:
            removed = take_down(prefix)
            click.echo(f"demo {prefix}: removed {len(removed)} namespaces")
            return
        demo = Demo(prefix, calls, duration, out, keep, as_json)
        try:
            summary = demo.run()
        except KeyboardInterrupt:
            interrupted = click.ClickException("interrupted; the demo's testbed was removed")
            interrupted.exit_code = 130
            raise interrupted from None
    except (DemoError, TestbedError) as exc:
        raise click.ClickException(" ".join(str(exc).split())) from None
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        demo.say.line()
        demo.say.line(render_summary(summary))
    if keep:  # with --json too: the hints go where the progress went (stderr)
        demo.say.line()
        for hint in keep_hints(demo.plan):
            demo.say.line(hint)
    failed = summary["calls"]["failed"]
    if failed:
        reason = summary["calls"]["errors"][0] if summary["calls"]["errors"] else "unknown"
        raise click.ClickException(
            f"{failed} of {summary['calls']['placed']} calls failed: {reason}"
        )


def preflight_click() -> None:
    """`preflight` with its failure as the CLI's one error line."""
    try:
        preflight()
    except DemoError as exc:
        raise click.ClickException(str(exc)) from None
