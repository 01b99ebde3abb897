"""Prometheus metrics of a transceiver (splitrelay_transceiver_*), built at scrape time.

Nothing is counted here: every value comes from the workers' own stats()
(through the pool, across processes) and from the signaling layer's outcome
counters, read when Prometheus scrapes. Families are summed over workers so
dashboards need no aggregation; per-worker families carry only the worker's
transceiver id, never anything per session.

`worker_values` is the one place that knows the keys of Worker.stats(); it is
lenient (a missing key is 0) so a worker that adds or lacks a statistic never
breaks a scrape.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from transceiver.jitterbuffer import DELAY_BUCKETS
from transceiver.pool import PoolStats

PREFIX = "splitrelay_transceiver"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Offer -> connected takes one ICE + DTLS exchange: tens of milliseconds on a LAN,
# a second or more across continents or when a client is slow to check.
# (The same bounds as the worker's own histogram, transceiver/worker.py.)
SETUP_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Outcomes of POST /v1/calls, pre-created so every series exists from the first scrape.
CALL_RESULTS: tuple[str, ...] = (
    "created",
    "bad_offer",
    "unauthorized",
    "payload_too_large",
    "unsupported_media_type",
    "at_capacity",
    "draining",
    "worker_error",
    "internal_error",
)
DIRECTIONS: tuple[str, ...] = ("in", "out")

# Why the worker's tunnel socket (transceiver/mux.py) dropped a datagram: its
# `dropped_<reason>` counters, pre-created so every series exists from the first
# scrape. tests/unit/test_transceiver_metrics.py pins this list to the mux's
# COUNTER_NAMES; a reason the mux adds later is still exported (read from the
# stats), only not pre-created.
TUNNEL_DROP_REASONS: tuple[str, ...] = (
    "unknown_sender",
    "tunnel_truncated",
    "tunnel_bad_header",
    "empty_payload",
    "unknown_client",
    "stun_malformed",
    "stun_no_username",
    "unmatched_ufrag",
    "unauthenticated",
    "client_limit",
    "unheard_client",
    "not_owner",
    "send_buffer_full",
    "closed",
    "stun_unparsed",
)


# Why a worker's jitter buffers dropped received audio (transceiver/playout.py's
# counters): to shrink the buffer, a duplicate packet, a flush when the stream
# jumped, a packet libopus could not decode (or of another codec).
AUDIO_DROP_REASONS: tuple[str, ...] = ("shrink", "duplicate", "overflow", "undecodable")


@dataclass
class Histogram:
    """Cumulative bucket counts, their sum and count: the mergeable form of a histogram."""

    buckets: tuple[float, ...] = SETUP_BUCKETS
    counts: list[int] = field(default_factory=list)  # per bucket, cumulative, plus +Inf
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)

    @property
    def count(self) -> int:
        return self.counts[-1]

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.counts[-1] += 1
        self.total += value

    def merge(self, other: Histogram) -> None:
        if other.buckets != self.buckets and self.count == 0 and self.total == 0:
            # Nothing observed yet: take the other's layout (workers agree on one).
            self.buckets = other.buckets
            self.counts = [0] * len(other.counts)
        if other.buckets != self.buckets:
            # Different layouts cannot be added bucket by bucket: keep count and sum.
            self.counts[-1] += other.count
            self.total += other.total
            return
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.total += other.total

    def to_dict(self) -> dict[str, Any]:
        """JSON form, as a worker's stats() may carry it across the process boundary."""
        return {"buckets": list(self.buckets), "counts": list(self.counts), "sum": self.total}

    @classmethod
    def from_value(cls, value: Any) -> Histogram:
        """A histogram from a worker's stats.

        Accepted forms: the worker's snapshot (`{"buckets": [[bound, cumulative],
        ...], "count": n, "sum": s}`), this class's to_dict(), or a plain sequence
        of observations. Anything else is an empty histogram, never an error.
        """
        if isinstance(value, Histogram):
            return value
        with contextlib.suppress(TypeError, ValueError, KeyError, IndexError):
            if isinstance(value, Mapping) and "counts" in value:
                buckets = tuple(float(b) for b in value.get("buckets", SETUP_BUCKETS))
                counts = [int(c) for c in value["counts"]]
                if len(counts) == len(buckets) + 1:
                    return cls(buckets, counts, float(value.get("sum", 0.0)))
            if isinstance(value, Mapping) and "buckets" in value:
                pairs = [(float(b), int(c)) for b, c in value["buckets"]]
                count = int(value.get("count", pairs[-1][1] if pairs else 0))
                return cls(
                    tuple(b for b, _ in pairs),
                    [c for _, c in pairs] + [count],
                    float(value.get("sum", 0.0)),
                )
        hist = cls()
        if isinstance(value, Sequence) and not isinstance(value, str | bytes):
            for v in value:
                if isinstance(v, int | float) and math.isfinite(v) and v >= 0:
                    hist.observe(float(v))
        return hist


@dataclass
class WorkerValues:
    """The numbers the metric families need from one worker's stats()."""

    sessions: int = 0
    setup: Histogram = field(default_factory=Histogram)
    audio_frames: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DIRECTIONS, 0))
    datachannel_messages: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(DIRECTIONS, 0)
    )
    backend_errors: int = 0
    events_dropped: int = 0
    calls_connected: int = 0
    calls_ended: dict[str, int] = field(default_factory=dict)
    tunnel_packets: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DIRECTIONS, 0))
    tunnel_drops: dict[str, int] = field(default_factory=dict)
    jitter_delay: Histogram = field(default_factory=lambda: Histogram(DELAY_BUCKETS))
    jitter_streams: int = 0
    jitter_target_sum: float = 0.0  # mean target x streams, so workers can be averaged
    audio_missing: dict[str, int] = field(default_factory=dict)  # concealed, fec, skipped, late
    audio_drops: dict[str, int] = field(default_factory=dict)


def _float(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return number if math.isfinite(number) and number >= 0 else 0.0


def _playout(stats: Mapping[str, Any]) -> dict[str, Any]:
    """The jitter-buffer figures of one worker (`stats["playout"]`, PlayoutCounters.snapshot)."""
    playout = stats.get("playout")
    if not isinstance(playout, Mapping):
        return {"missing": {}, "drops": {}, "delay": Histogram(DELAY_BUCKETS), "streams": 0}
    streams = _int(playout.get("streams", 0))
    return {
        "missing": {k: _int(playout.get(k, 0)) for k in ("concealed", "fec", "skipped", "late")},
        "drops": {
            "shrink": _int(playout.get("dropped", 0)),
            "duplicate": _int(playout.get("duplicate", 0)),
            "overflow": _int(playout.get("overflow", 0)),
            "undecodable": _int(playout.get("decode_errors", 0)),
        },
        "delay": Histogram.from_value(playout.get("delay_seconds", ())),
        "streams": streams,
        "target_sum": _float(playout.get("target_seconds_mean", 0.0)) * streams,
    }


def _int(value: Any) -> int:
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


def _directional(stats: Mapping[str, Any], name: str) -> dict[str, int]:
    """`name_total: {"in": n, "out": m}`, `name: {...}`, or `name_in` / `name_out` keys."""
    nested = stats.get(f"{name}_total", stats.get(name))
    out = {}
    for d in DIRECTIONS:
        if isinstance(nested, Mapping):
            out[d] = _int(nested.get(d, 0))
        else:
            out[d] = _int(stats.get(f"{name}_{d}", 0))
    return out


def _counter(stats: Mapping[str, Any], name: str) -> int:
    return _int(stats.get(f"{name}_total", stats.get(name, 0)))


def _tunnel(stats: Mapping[str, Any]) -> tuple[dict[str, int], dict[str, int]]:
    """(packets by direction, drops by reason) from the mux's counters (`stats["mux"]`).

    rx_packets are datagrams handed to a session (in), tx_packets datagrams sent
    toward clients (out); every `dropped_<reason>` counter is a drop reason.
    """
    mux = stats.get("mux")
    if not isinstance(mux, Mapping):
        return dict.fromkeys(DIRECTIONS, 0), {}
    packets = {"in": _int(mux.get("rx_packets", 0)), "out": _int(mux.get("tx_packets", 0))}
    drops = {
        key.removeprefix("dropped_"): _int(value)
        for key, value in mux.items()
        if isinstance(key, str) and key.startswith("dropped_") and len(key) > len("dropped_")
    }
    return packets, drops


def worker_values(stats: Mapping[str, Any], calls: int) -> WorkerValues:
    """Read one Worker.stats() dict (transceiver/worker.py; keys in docs/transceiver.md)."""
    tunnel_packets, tunnel_drops = _tunnel(stats)
    playout = _playout(stats)
    return WorkerValues(
        sessions=_int(stats.get("sessions", calls)),
        setup=Histogram.from_value(stats.get("setup_seconds", ())),
        audio_frames=_directional(stats, "audio_frames"),
        datachannel_messages=_directional(stats, "datachannel_messages"),
        backend_errors=_counter(stats, "backend_errors"),
        events_dropped=_counter(stats, "events_dropped"),
        calls_connected=_counter(stats, "calls_connected"),
        calls_ended={
            "ended": _counter(stats, "calls_ended"),
            "failed": _counter(stats, "calls_failed"),
        },
        tunnel_packets=tunnel_packets,
        tunnel_drops=tunnel_drops,
        jitter_delay=playout["delay"],
        jitter_streams=playout["streams"],
        jitter_target_sum=playout.get("target_sum", 0.0),
        audio_missing=playout["missing"],
        audio_drops=playout["drops"],
    )


class TransceiverCollector(Collector):
    """The transceiver's families over one PoolStats snapshot and the signaling outcomes."""

    def __init__(self, pool: PoolStats, call_results: Mapping[str, int]) -> None:
        self.pool = pool
        self.call_results = call_results

    def collect(self) -> Iterator[Metric]:
        values = [worker_values(w.stats, w.calls) for w in self.pool.workers]
        yield GaugeMetricFamily(
            f"{PREFIX}_sessions",
            "WebRTC sessions (calls) the transceiver holds now",
            value=sum(v.sessions for v in values),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_capacity", "Calls the live workers can hold", value=self.pool.capacity
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_draining",
            "1 while the transceiver takes no new calls",
            value=int(self.pool.draining),
        )
        setup = Histogram()
        for v in values:
            setup.merge(v.setup)
        yield HistogramMetricFamily(
            f"{PREFIX}_setup_seconds",
            "Time from the SDP offer to the connected WebRTC session",
            buckets=_buckets(setup),
            sum_value=setup.total,
        )
        yield _by_direction(
            f"{PREFIX}_audio_frames",
            "Audio frames, in = from clients to the backend, out = back to clients",
            (v.audio_frames for v in values),
        )
        yield _by_direction(
            f"{PREFIX}_datachannel_messages",
            "Data channel (oai-events) messages, in = from clients, out = to clients",
            (v.datachannel_messages for v in values),
        )
        yield CounterMetricFamily(
            f"{PREFIX}_backend_errors",
            "Errors talking to the media/event backend",
            value=sum(v.backend_errors for v in values),
        )
        yield CounterMetricFamily(
            f"{PREFIX}_events_dropped",
            "Data channel events dropped (channel not open, or its buffer full)",
            value=sum(v.events_dropped for v in values),
        )
        yield CounterMetricFamily(
            f"{PREFIX}_calls_connected",
            "Calls whose ICE and DTLS connected",
            value=sum(v.calls_connected for v in values),
        )
        calls = CounterMetricFamily(
            f"{PREFIX}_calls", "Call setup requests, by outcome", labels=["result"]
        )
        results = dict.fromkeys(CALL_RESULTS, 0)
        results.update(self.call_results)
        for result, n in sorted(results.items()):
            calls.add_metric([result], n)
        yield calls
        ended = CounterMetricFamily(
            f"{PREFIX}_calls_ended",
            "Calls that ended after connecting: ended (hung up, drained) or failed",
            labels=["result"],
        )
        reasons = {"ended": 0, "failed": 0}
        for v in values:
            for reason, n in v.calls_ended.items():
                reasons[reason] = reasons.get(reason, 0) + n
        for reason, n in sorted(reasons.items()):
            ended.add_metric([reason], n)
        yield ended
        yield _by_direction(
            f"{PREFIX}_tunnel_packets",
            "Datagrams on the tunnel sockets, in = from relays to a session, out = toward clients",
            (v.tunnel_packets for v in values),
        )
        drops = CounterMetricFamily(
            f"{PREFIX}_tunnel_drops",
            "Datagrams the tunnel sockets dropped, by reason",
            labels=["reason"],
        )
        totals = dict.fromkeys(TUNNEL_DROP_REASONS, 0)
        for v in values:
            for reason, n in v.tunnel_drops.items():
                totals[reason] = totals.get(reason, 0) + n
        for reason, n in sorted(totals.items()):
            drops.add_metric([reason], n)
        yield drops
        yield from self._jitter_buffers(values)
        yield from self._per_worker(values)

    def _jitter_buffers(self, values: Sequence[WorkerValues]) -> Iterator[Metric]:
        """The received audio's adaptive jitter buffers, summed over calls and workers."""
        delay = Histogram(DELAY_BUCKETS)
        for v in values:
            delay.merge(v.jitter_delay)
        yield HistogramMetricFamily(
            f"{PREFIX}_jitter_buffer_delay_seconds",
            "Time each played audio packet waited in its call's jitter buffer",
            buckets=_buckets(delay),
            sum_value=delay.total,
        )
        streams = sum(v.jitter_streams for v in values)
        yield GaugeMetricFamily(
            f"{PREFIX}_jitter_buffer_target_seconds",
            "Mean target delay of the live calls' jitter buffers",
            value=sum(v.jitter_target_sum for v in values) / streams if streams else 0.0,
        )
        for key, name, doc in (
            ("concealed", "audio_concealed_frames", "Missing audio frames made up by Opus PLC"),
            ("fec", "audio_fec_frames", "Missing audio frames recovered from in-band FEC"),
            ("late", "audio_late_frames", "Audio packets that came after their playout slot"),
            (
                "skipped",
                "audio_skipped_frames",
                "Frames of an outage longer than the buffer conceals (nothing played)",
            ),
        ):
            yield CounterMetricFamily(
                f"{PREFIX}_{name}", doc, value=sum(v.audio_missing.get(key, 0) for v in values)
            )
        dropped = CounterMetricFamily(
            f"{PREFIX}_audio_dropped_frames",
            "Received audio frames dropped by the jitter buffers, by reason",
            labels=["reason"],
        )
        for reason in AUDIO_DROP_REASONS:
            dropped.add_metric([reason], sum(v.audio_drops.get(reason, 0) for v in values))
        yield dropped

    def _per_worker(self, values: Sequence[WorkerValues]) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            f"{PREFIX}_worker_up",
            "1 for each worker process that answers, by transceiver id",
            labels=["transceiver_id"],
        )
        sessions = GaugeMetricFamily(
            f"{PREFIX}_worker_sessions",
            "Sessions per worker (how evenly calls are spread)",
            labels=["transceiver_id"],
        )
        capacity = GaugeMetricFamily(
            f"{PREFIX}_worker_capacity", "Calls each worker may hold", labels=["transceiver_id"]
        )
        for w, v in zip(self.pool.workers, values, strict=True):
            tid = f"{w.tid:08x}"
            info.add_metric([tid], int(w.alive))
            sessions.add_metric([tid], v.sessions)
            capacity.add_metric([tid], w.capacity)
        yield from (info, sessions, capacity)


def _buckets(hist: Histogram) -> list[tuple[str, float]]:
    if len(hist.counts) != len(hist.buckets) + 1:
        return [("+Inf", hist.count)]
    out = [(_le(b), float(c)) for b, c in zip(hist.buckets, hist.counts, strict=False)]
    out.append(("+Inf", float(hist.count)))
    return out


def _le(bound: float) -> str:
    return repr(float(bound))


def _by_direction(name: str, doc: str, values: Iterable[Mapping[str, int]]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=["direction"])
    totals = dict.fromkeys(DIRECTIONS, 0)
    for v in values:
        for d in DIRECTIONS:
            totals[d] += v.get(d, 0)
    for d in DIRECTIONS:
        family.add_metric([d], totals[d])
    return family


def render(pool: PoolStats, call_results: Mapping[str, int]) -> bytes:
    """Prometheus text exposition of one snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TransceiverCollector(pool, call_results))
    return generate_latest(registry)
