"""Impairment models for `relayctl testbed impair`: the spec, its parsing, per-packet fate.

This module is pure (standard library only, no sockets, no clock of its own): the
daemon (ctl/impaird.py) feeds it arrival times and gets back each packet's fate,
and tests/unit/test_impair.py feeds it synthetic, seeded streams. Keeping every
decision here means the integration test can replay a seeded run through the same
code and demand the daemon dropped exactly the packets the model says.

The models, per direction, applied in this order to each packet at its arrival:

* **Outage** (one-shot): every packet arriving in [start, start + D) is dropped.
  The window opens `outage_in` seconds after the impairment is *armed* (the moment
  its tc filters are in place), so "now" means when the command took effect.
* **Burst loss**: the simple Gilbert model (Gilbert-Elliott with loss probability
  1 in Bad and 0 in Good), stepped once per packet. With mean loss rate ``pi`` and
  mean burst length ``L`` (consecutive losses), ``r = 1/L`` (Bad -> Good) and
  ``p = r * pi / (1 - pi)`` (Good -> Bad): the stationary loss rate is
  ``p / (p + r) = pi`` and a burst lasts a geometric number of packets with mean
  ``1 / r = L``. ``p <= 1`` limits ``pi`` to ``L / (L + 1)``. The chain starts in
  its stationary distribution so short runs are not biased toward Good.
* **Random loss**: independent (Bernoulli) per packet.
* **Delay and jitter**: each packet is due ``delay + U`` after arrival, ``U``
  uniform in [0, jitter]. Order is kept, as in a real queue: a packet is never due
  before the one ahead of it in the same direction (``due = max(due, previous
  due)``), so jitter alone never reorders. When jitter exceeds the spacing of the
  packets this clamp makes delays larger than the uniform draw (it is a queue).
* **Reordering**: with probability ``reorder`` a packet is held back by an extra
  ``reorder_gap`` after its due time and does not hold back the packets behind it,
  so it lands after the successors that arrive within the gap. The default gap,
  30 ms, is one and a half 20 ms voice packet intervals: at voice rate a reordered
  packet lands after exactly one successor.

Randomness is a `random.Random` per direction seeded from ``(seed, direction)``,
and every enabled model draws exactly one number per packet, whatever befalls the
packet: packet n's fate depends only on the seed, n, and (for the outage) its
arrival time, so runs are reproducible and the two directions independent.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

DIRECTIONS = ("up", "down")
DIRECTION_CHOICES = ("up", "down", "both")

MAX_DELAY_MS = 10_000.0  # packets are held in memory: bound how long
MAX_OUTAGE_MS = 3_600_000.0
MAX_OUTAGE_IN_S = 3_600.0
MAX_BURST_LENGTH = 1_000_000.0
MAX_LIMIT = 1_000_000
DEFAULT_LIMIT = 10_000
DEFAULT_REORDER_GAP_MS = 30.0
MAX_SEED = 2**63 - 1

# What the options that carry an impairment are called, for messages and summaries.
IMPAIRMENT_FIELDS = (
    "loss",
    "burst_loss",
    "burst_length",
    "delay_ms",
    "jitter_ms",
    "reorder",
    "reorder_gap_ms",
    "outage_ms",
    "outage_in_s",
)


class ImpairError(ValueError):
    """An impairment spec or value is invalid; the message names the option."""


# --------------------------------------------------------------------------- parsing

_NUMBER = r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+"
_PERCENT_RE = re.compile(rf"\s*({_NUMBER})\s*%?\s*")
_DURATION_RE = re.compile(rf"\s*({_NUMBER})\s*(us|µs|ms|s)?\s*")
_UNIT_MS = {"us": 0.001, "µs": 0.001, "ms": 1.0, "s": 1000.0}


def parse_percent(text: str, option: str = "value") -> float:
    """`2`, `2%`, `0.5 %` -> a fraction (0.02, 0.005); 0..100 percent."""
    m = _PERCENT_RE.fullmatch(str(text))
    if not m:
        raise ImpairError(f"{option}: bad percentage {text!r} (expected e.g. 2 or 2% or 0.5%)")
    pct = float(m.group(1))
    if not 0.0 <= pct <= 100.0:
        raise ImpairError(f"{option}: {text!r} is not between 0 and 100%")
    return pct / 100.0


def parse_duration_ms(text: str, option: str = "value", default_unit: str = "ms") -> float:
    """`20`, `20ms`, `0.3s`, `500us` -> milliseconds; a bare number is in `default_unit`."""
    m = _DURATION_RE.fullmatch(str(text))
    if not m:
        raise ImpairError(
            f"{option}: bad duration {text!r} (expected e.g. 20, 20ms, 0.3s or 500us)"
        )
    return float(m.group(1)) * _UNIT_MS[m.group(2) or default_unit]


def parse_count(text: str, option: str = "value") -> float:
    """A mean packet count such as a burst length: a number, optionally `4pkt`/`4 packets`."""
    m = re.fullmatch(rf"\s*({_NUMBER})\s*(?:pkts?|packets?)?\s*", str(text))
    if not m:
        raise ImpairError(f"{option}: bad packet count {text!r} (expected e.g. 4 or 2.5)")
    return float(m.group(1))


def format_percent(fraction: float) -> str:
    """0.1 -> `10%`, 0.005 -> `0.5%` (no trailing zeros)."""
    return f"{fraction * 100:.4g}%"


def format_ms(ms: float) -> str:
    """20.0 -> `20ms`, 1500 -> `1.5s`, 0.25 -> `250us`."""
    if ms >= 1000:
        return f"{ms / 1000:.4g}s"
    if 0 < ms < 1:
        return f"{ms * 1000:.4g}us"
    return f"{ms:.4g}ms"


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class ImpairSpec:
    """What to do to one client's relay traffic. Validated on construction.

    Rates are fractions (0.1 = 10 %), times are milliseconds except `outage_in_s`.
    `seed` is always concrete (the CLI draws one when none is given and records
    it), so every applied impairment can be replayed.
    """

    direction: str = "both"
    loss: float = 0.0
    burst_loss: float = 0.0
    burst_length: float = 0.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    reorder: float = 0.0
    reorder_gap_ms: float = DEFAULT_REORDER_GAP_MS
    outage_ms: float = 0.0
    outage_in_s: float = 0.0
    seed: int = 0
    limit: int = DEFAULT_LIMIT

    def __post_init__(self) -> None:
        if self.direction not in DIRECTION_CHOICES:
            raise ImpairError(f"direction must be up, down or both, not {self.direction!r}")
        for name in ("loss", "burst_loss", "reorder"):
            value = getattr(self, name)
            if not (_finite(value) and 0.0 <= value <= 1.0):
                raise ImpairError(f"--{_opt(name)}: {value!r} is not a rate between 0 and 100%")
        _bounded("delay_ms", self.delay_ms, MAX_DELAY_MS)
        _bounded("jitter_ms", self.jitter_ms, MAX_DELAY_MS)
        _bounded("reorder_gap_ms", self.reorder_gap_ms, MAX_DELAY_MS)
        _bounded("outage_ms", self.outage_ms, MAX_OUTAGE_MS)
        _bounded("outage_in_s", self.outage_in_s, MAX_OUTAGE_IN_S)
        if self.burst_loss > 0:
            if not (_finite(self.burst_length) and 1.0 <= self.burst_length <= MAX_BURST_LENGTH):
                raise ImpairError(
                    "--burst-loss needs --burst-length N, the mean burst length in packets (>= 1)"
                )
            if self.burst_loss >= 1.0 or self.gilbert()[0] > 1.0:
                most = self.burst_length / (self.burst_length + 1)
                raise ImpairError(
                    f"--burst-loss {format_percent(self.burst_loss)} is impossible with a mean "
                    f"burst length of {self.burst_length:g}: bursts that long allow at most "
                    f"{format_percent(most)} loss"
                )
        elif self.burst_length:
            raise ImpairError("--burst-length needs --burst-loss (the mean loss rate)")
        if self.outage_in_s and not self.outage_ms:
            raise ImpairError("--outage-in needs --outage (the outage's length)")
        if self.reorder_gap_ms != DEFAULT_REORDER_GAP_MS and not self.reorder:
            raise ImpairError("--reorder-gap needs --reorder (the share of packets held back)")
        if self.reorder and self.reorder_gap_ms <= 0:
            raise ImpairError("--reorder-gap must be more than 0 for reordering to happen")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ImpairError(f"--seed must be an integer, not {self.seed!r}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ImpairError(f"--seed must be 0..{MAX_SEED}")
        if isinstance(self.limit, bool) or not isinstance(self.limit, int):
            raise ImpairError(f"--limit must be an integer, not {self.limit!r}")
        if not 1 <= self.limit <= MAX_LIMIT:
            raise ImpairError(f"--limit must be 1..{MAX_LIMIT} packets")

    @property
    def directions(self) -> tuple[str, ...]:
        """The directions this spec impairs: ("up",), ("down",) or both."""
        return DIRECTIONS if self.direction == "both" else (self.direction,)

    def gilbert(self) -> tuple[float, float]:
        """(p, r) of the Gilbert chain: P(Good -> Bad) and P(Bad -> Good) per packet."""
        if not self.burst_loss:
            return (0.0, 1.0)
        r = 1.0 / self.burst_length
        return (r * self.burst_loss / (1.0 - self.burst_loss), r)

    def max_hold_ms(self) -> float:
        """The longest time a packet can be held: what draining on exit may take."""
        return self.delay_ms + self.jitter_ms + (self.reorder_gap_ms if self.reorder else 0.0)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (records, the daemon's argument, `status --json`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImpairSpec:
        """Read `to_dict()` back; unknown keys are an error (a typo must not pass)."""
        known = {f.name for f in fields(cls)}
        extra = sorted(set(data) - known)
        if extra:
            raise ImpairError(f"unknown impairment fields: {', '.join(extra)}")
        return cls(**dict(data))

    def summary(self) -> str:
        """One human line: `both: loss 10%, delay 20ms + jitter 0-10ms`."""
        parts = []
        if self.loss:
            parts.append(f"loss {format_percent(self.loss)}")
        if self.burst_loss:
            parts.append(
                f"burst loss {format_percent(self.burst_loss)} "
                f"(mean burst {self.burst_length:g} pkts)"
            )
        if self.delay_ms or self.jitter_ms:
            text = f"delay {format_ms(self.delay_ms)}"
            if self.jitter_ms:
                text += f" + jitter 0-{format_ms(self.jitter_ms)}"
            parts.append(text)
        if self.reorder:
            parts.append(
                f"reorder {format_percent(self.reorder)} (+{format_ms(self.reorder_gap_ms)})"
            )
        if self.outage_ms:
            when = f" in {self.outage_in_s:g}s" if self.outage_in_s else " now"
            parts.append(f"outage {format_ms(self.outage_ms)}{when}")
        return f"{self.direction}: {', '.join(parts) or 'pass-through (no impairment)'}"


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _opt(name: str) -> str:
    return name.removesuffix("_ms").removesuffix("_s").replace("_", "-")


def _bounded(name: str, value: float, most: float) -> None:
    unit = "s" if name.endswith("_s") else "ms"
    if not (_finite(value) and 0.0 <= value <= most):
        raise ImpairError(f"--{_opt(name)}: {value!r} is not between 0 and {most:g} {unit}")


# --------------------------------------------------------------------------- models

DROP_REASONS = ("outage", "burst", "loss")


class Verdict(NamedTuple):
    """One packet's fate: dropped (and why), or when it is due and whether reordered."""

    drop: str | None
    due_ns: int
    reordered: bool = False


class DirectionModel:
    """The impairment chain of one direction: outage, burst loss, loss, delay, reorder.

    `decide(now_ns)` is called once per packet in arrival order; the model keeps
    only the Gilbert state, the previous due time (for FIFO order) and the
    outage window, so it is O(1) per packet.
    """

    def __init__(self, spec: ImpairSpec, direction: str) -> None:
        if direction not in DIRECTIONS:
            raise ImpairError(f"direction must be up or down, not {direction!r}")
        self.spec = spec
        self.direction = direction
        self.rng = random.Random(f"{spec.seed}/{direction}")
        self._p, self._r = spec.gilbert()
        self._bad = bool(spec.burst_loss) and self.rng.random() < spec.burst_loss
        self._delay_ns = round(spec.delay_ms * 1e6)
        self._jitter_ns = spec.jitter_ms * 1e6
        self._gap_ns = round(spec.reorder_gap_ms * 1e6)
        self._last_due = -(2**63)
        self.outage: tuple[int, int] | None = None

    def arm(self, epoch_ns: int) -> tuple[int, int] | None:
        """Start the clock of the outage: its window opens `outage_in` after `epoch_ns`."""
        if self.spec.outage_ms:
            start = epoch_ns + round(self.spec.outage_in_s * 1e9)
            self.outage = (start, start + round(self.spec.outage_ms * 1e6))
        return self.outage

    def decide(self, now_ns: int) -> Verdict:
        """The fate of the packet arriving at `now_ns` (monotonic nanoseconds)."""
        spec, rng = self.spec, self.rng
        # One draw per enabled model, always, so packet n's draws never depend on
        # what happened to the packets before it.
        u_burst = rng.random() if spec.burst_loss else 1.0
        u_loss = rng.random() if spec.loss else 1.0
        u_jitter = rng.random() if spec.jitter_ms else 0.0
        u_reorder = rng.random() if spec.reorder else 1.0

        in_burst = False
        if spec.burst_loss:
            self._bad = (u_burst >= self._r) if self._bad else (u_burst < self._p)
            in_burst = self._bad
        if self.outage is not None and self.outage[0] <= now_ns < self.outage[1]:
            return Verdict("outage", now_ns)
        if in_burst:
            return Verdict("burst", now_ns)
        if u_loss < spec.loss:
            return Verdict("loss", now_ns)
        due = now_ns + self._delay_ns
        if self._jitter_ns:
            due += round(u_jitter * self._jitter_ns)
        due = max(due, self._last_due)
        if u_reorder < spec.reorder:
            return Verdict(None, due + self._gap_ns, True)
        self._last_due = due
        return Verdict(None, due)


def simulate(
    spec: ImpairSpec, direction: str, arrivals_ns: Iterable[int], epoch_ns: int | None = None
) -> list[Verdict]:
    """Run a direction's model over arrival times (what the daemon would decide).

    `epoch_ns` arms the outage (None: not armed, no outage).
    """
    model = DirectionModel(spec, direction)
    if epoch_ns is not None:
        model.arm(epoch_ns)
    return [model.decide(t) for t in arrivals_ns]


def loss_runs(lost: Sequence[bool]) -> list[int]:
    """Lengths of the runs of consecutive losses in a loss pattern (the bursts)."""
    runs: list[int] = []
    current = 0
    for flag in lost:
        if flag:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    if current:
        runs.append(current)
    return runs


def late_arrivals(seqs: Sequence[int]) -> int:
    """How many packets arrived after a packet with a higher sequence number."""
    late, highest = 0, -1
    for s in seqs:
        if s < highest:
            late += 1
        else:
            highest = s
    return late
