"""Audio round-trip markers: tone bursts that survive Opus, and their detector.

The voice client measures mouth-to-ear latency through the echo backend by
sending a steady low tone with a loud, short burst every `period` seconds and
finding those bursts again in the audio that comes back. Each burst's pitch is
one of `len(frequencies)` values, chosen by its sequence number, so a burst
that comes back late is still paired with the burst that was sent, as long as
the round trip is shorter than `len(frequencies) * period` (2 s by default).

Why bursts and not a timestamp in the samples: Opus is a perceptual codec, it
keeps pitch and loudness but not sample values, so a marker must be something a
listener would hear. The onset (first sample louder than a third of the burst
amplitude) is found to the sample; the pitch, read with a Goertzel filter over
a window well inside the burst, names the marker.

Pure Python on `array('h')`: the hot path (one peak per millisecond block) runs
in C through max()/min() on slices, and the per-burst pitch check costs about a
millisecond, so dozens of concurrent calls fit in one process without numpy.
"""

from __future__ import annotations

import math
import operator
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

SAMPLE_RATE = 48000
DEFAULT_FREQUENCIES: tuple[float, ...] = (600, 900, 1200, 1500, 1800, 2100, 2400, 2700)
DEFAULT_PERIOD = 0.25  # seconds between burst onsets
BURST_SECONDS = 0.040
RAMP_SECONDS = 0.002  # raised-cosine edges: a hard edge would splash across the spectrum
BURST_AMPLITUDE = 12000
BACKGROUND_HZ = 200  # whole cycles in the pitch window: no leakage into any marker pitch
BACKGROUND_AMPLITUDE = 600
THRESHOLD = BURST_AMPLITUDE // 3

# Detector timing, in seconds.
_BLOCK_SECONDS = 0.001
_WINDOW_DELAY = 0.006  # pitch window starts this long after the onset (past the ramp and smear)
_WINDOW_SECONDS = 0.020  # whole cycles of every default frequency (multiples of 50 Hz)
_QUIET_SECONDS = 0.010  # the envelope must stay below threshold this long before a new onset
_MIN_DOMINANCE = 4.0  # winning pitch power over the runner-up, or the burst is not trusted
_MIN_PURITY = 0.5  # share of the window's energy in the winning pitch (1.0 for a pure tone)


@dataclass(frozen=True)
class Marker:
    """A burst: its sequence number and the sample index of its onset in its stream."""

    seq: int
    sample: int

    def marker_id(self, count: int) -> int:
        """The pitch index the burst carries (seq modulo the number of pitches)."""
        return self.seq % count


@dataclass(frozen=True)
class Detection:
    """A burst found in a received stream: its pitch index and onset sample index."""

    marker_id: int
    sample: int


class MarkerSource:
    """Generates mono s16 audio: a quiet background tone with a marker burst every period.

    The background keeps the stream real audio (an encoder with voice activity
    detection would otherwise send nothing between bursts), and is far below
    the detection threshold.
    """

    def __init__(
        self,
        sample_rate: int = SAMPLE_RATE,
        period: float = DEFAULT_PERIOD,
        frequencies: Sequence[float] = DEFAULT_FREQUENCIES,
        first_onset: float = 0.1,
    ) -> None:
        if period <= BURST_SECONDS + _QUIET_SECONDS:
            raise ValueError(f"marker period must exceed {BURST_SECONDS + _QUIET_SECONDS}s")
        self.sample_rate = sample_rate
        self.frequencies = tuple(frequencies)
        self.period_samples = round(period * sample_rate)
        self._first = round(first_onset * sample_rate)
        self._burst = round(BURST_SECONDS * sample_rate)
        self._ramp = max(1, round(RAMP_SECONDS * sample_rate))
        self._bursts = [self._render_burst(f) for f in self.frequencies]
        self._cross = _first_crossing(self._bursts)
        cycle = sample_rate // math.gcd(sample_rate, BACKGROUND_HZ)
        w = 2 * math.pi * BACKGROUND_HZ / sample_rate
        self._table = [round(BACKGROUND_AMPLITUDE * math.sin(w * i)) for i in range(cycle)]
        self._position = 0

    @property
    def position(self) -> int:
        """Index of the next sample `read` will return."""
        return self._position

    def read(self, count: int) -> tuple[array, list[Marker]]:
        """The next `count` samples, and the markers whose onset lies in them.

        A marker's `sample` is where its burst first crosses the detection
        threshold, which is exactly what MarkerDetector reports for the same
        burst: the two sides use one definition, so the ramp adds no bias.
        """
        start = self._position
        end = start + count
        out = array("h", self._background(start, count))
        markers: list[Marker] = []
        seq = max(0, (start - self._first - self._burst) // self.period_samples)
        while True:
            onset = self._first + seq * self.period_samples
            if onset >= end:
                break
            burst = self._bursts[seq % len(self.frequencies)]
            lo, hi = max(start, onset), min(end, onset + self._burst)
            for i in range(lo, hi):
                out[i - start] = _clip(out[i - start] + burst[i - onset])
            cross = onset + self._cross[seq % len(self.frequencies)]
            if start <= cross < end:
                markers.append(Marker(seq, cross))
            seq += 1
        self._position = end
        return out, markers

    def _background(self, start: int, count: int) -> list[int]:
        table = self._table
        size = len(table)
        offset = start % size
        reps = (offset + count) // size + 1
        return (table * reps)[offset : offset + count]

    def _render_burst(self, freq: float) -> list[int]:
        w = 2 * math.pi * freq / self.sample_rate
        n, ramp = self._burst, self._ramp
        samples = []
        for i in range(n):
            gain = 1.0
            if i < ramp:
                gain = 0.5 - 0.5 * math.cos(math.pi * i / ramp)
            elif i >= n - ramp:
                gain = 0.5 - 0.5 * math.cos(math.pi * (n - 1 - i) / ramp)
            samples.append(round(BURST_AMPLITUDE * gain * math.sin(w * i)))
        return samples


def _first_crossing(bursts: Sequence[Sequence[int]]) -> list[int]:
    """Per burst, the first index louder than the threshold (with background added, worst case).

    The background can add up to its amplitude; using the burst alone keeps the
    reference independent of the background's phase, an error below 0.1 ms.
    """
    return [next(i for i, s in enumerate(b) if abs(s) > THRESHOLD) for b in bursts]


def _clip(value: int) -> int:
    return max(-32768, min(32767, value))


@dataclass
class MarkerDetector:
    """Finds marker bursts in a mono s16 stream fed in arbitrary chunks.

    State machine: `quiet` -> an onset (first sample over the threshold after at
    least _QUIET_SECONDS below it) -> `capture` of a pitch window inside the
    burst -> report -> `refractory` until the envelope has been quiet again.
    """

    sample_rate: int = SAMPLE_RATE
    frequencies: Sequence[float] = DEFAULT_FREQUENCIES
    threshold: int = THRESHOLD
    min_spacing: float = DEFAULT_PERIOD / 2  # seconds between onsets: bursts come once a period
    _position: int = 0
    _last_onset: int | None = None
    _quiet_run: int = 0
    _onset: int | None = None
    _window: array = field(default_factory=lambda: array("h"))
    _coeffs: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._block = max(1, round(_BLOCK_SECONDS * self.sample_rate))
        self._quiet_needed = round(_QUIET_SECONDS * self.sample_rate)
        self._spacing = round(self.min_spacing * self.sample_rate)
        self._win_delay = round(_WINDOW_DELAY * self.sample_rate)
        self._win_len = round(_WINDOW_SECONDS * self.sample_rate)
        self._coeffs = [
            2.0 * math.cos(2 * math.pi * f / self.sample_rate) for f in self.frequencies
        ]
        # The stream starts quiet: a burst at sample 0 counts.
        self._quiet_run = self._quiet_needed

    @property
    def position(self) -> int:
        """Index of the next sample `feed` expects."""
        return self._position

    def feed(self, samples: Sequence[int]) -> list[Detection]:
        """Consume the next samples of the stream; return the bursts completed in them."""
        found: list[Detection] = []
        base = self._position
        n = len(samples)
        i = 0
        while i < n:
            if self._onset is not None:
                i = self._capture(samples, base, i, found)
                continue
            j = min(n, i + self._block)
            chunk = samples[i:j]
            peak = max(max(chunk), -min(chunk))
            if peak <= self.threshold:
                self._quiet_run += j - i
            elif self._quiet_run >= self._quiet_needed and self._spaced(base + i):
                k = next(k for k in range(i, j) if abs(samples[k]) > self.threshold)
                self._onset = self._last_onset = base + k
                self._window = array("h")
                i = k
                continue
            else:
                self._quiet_run = 0
            i = j
        self._position = base + n
        return found

    def _spaced(self, index: int) -> bool:
        """False this soon after the last onset: a gap inside a burst (a lost packet)
        must not make its second half count as another marker."""
        return self._last_onset is None or index - self._last_onset >= self._spacing

    def _capture(self, samples: Sequence[int], base: int, i: int, found: list[Detection]) -> int:
        """Collect the pitch window of the current burst; classify it once complete."""
        assert self._onset is not None
        want_from = self._onset + self._win_delay
        abs_i = base + i
        if abs_i < want_from:
            skip = min(len(samples) - i, want_from - abs_i)
            return i + skip
        need = self._win_len - len(self._window)
        take = samples[i : i + need]
        self._window.extend(take)
        i += len(take)
        if len(self._window) >= self._win_len:
            marker_id = self._classify(self._window)
            if marker_id is not None:
                found.append(Detection(marker_id, self._onset))
            self._onset = None
            self._quiet_run = 0
        return i

    def _classify(self, window: Sequence[int]) -> int | None:
        """Goertzel power at each pitch; the winner must dominate and hold most of the energy.

        For a pure tone of N samples, Goertzel power equals N/2 times the window's
        energy; a window cut by a lost packet or full of codec garbage falls far
        short of that, and is discarded rather than misnamed.
        """
        powers = [_goertzel(window, c) for c in self._coeffs]
        ranked = sorted(range(len(powers)), key=powers.__getitem__, reverse=True)
        best = ranked[0]
        runner_up = powers[ranked[1]] if len(ranked) > 1 else 0.0
        if powers[best] <= 0 or powers[best] < _MIN_DOMINANCE * runner_up:
            return None
        energy = float(sum(map(operator.mul, window, window)))
        if powers[best] < _MIN_PURITY * energy * len(window) / 2:
            return None
        return best


def _goertzel(window: Sequence[int], coeff: float) -> float:
    s1 = s2 = 0.0
    for x in window:
        s1, s2 = x + coeff * s1 - s2, s1
    return s1 * s1 + s2 * s2 - coeff * s1 * s2


@dataclass
class RoundTrips:
    """Pairs sent markers with detections and keeps the round-trip times.

    Times are seconds on one clock (the client's monotonic clock). A detection
    is paired with the most recent unanswered marker of the same pitch sent
    before it and no longer ago than the ambiguity horizon.
    """

    count: int = len(DEFAULT_FREQUENCIES)
    horizon: float = len(DEFAULT_FREQUENCIES) * DEFAULT_PERIOD
    sent: dict[int, float] = field(default_factory=dict)
    samples: list[float] = field(default_factory=list)
    unmatched: int = 0
    total_sent: int = 0
    _answered: set[int] = field(default_factory=set)

    def on_sent(self, seq: int, when: float) -> None:
        self.sent[seq] = when
        self.total_sent += 1
        # Forget markers beyond the horizon: bounded memory on long calls.
        for old in [s for s, t in self.sent.items() if when - t > 2 * self.horizon]:
            del self.sent[old]
            self._answered.discard(old)

    def on_detected(self, marker_id: int, when: float) -> float | None:
        """Record a detection; return its round trip, or None if it matches nothing sent."""
        best: int | None = None
        for seq, t in self.sent.items():
            if seq % self.count != marker_id or seq in self._answered:
                continue
            if t <= when and when - t < self.horizon and (best is None or seq > best):
                best = seq
        if best is None:
            self.unmatched += 1
            return None
        self._answered.add(best)
        rtt = when - self.sent[best]
        self.samples.append(rtt)
        return rtt

    @property
    def lost(self) -> int:
        """Markers sent long enough ago that they should have come back, but did not."""
        if not self.sent:
            return 0
        latest = max(self.sent.values())
        return sum(
            1
            for s, t in self.sent.items()
            if s not in self._answered and latest - t >= self.horizon
        )


class ToneMeter:
    """How much of a received stream still carries the background tone: a quality check.

    A buffer that drops or conceals too much could look fast by latency
    alone; this is what it costs the listener. Each received 20 ms frame
    (at 48 kHz exactly 4 cycles of the 200 Hz background) is correlated with
    a 200 Hz sine and cosine, two dot products in C; the frame is *intact*
    when the tone's amplitude is at least half what was sent (6 dB), which a
    frame that is silence, a decayed concealment or codec noise is not. The
    share is taken over the listening time (``share(seconds)``), so frames
    that never came count against it as much as broken ones.
    """

    def __init__(self, sample_rate: int = SAMPLE_RATE, frame_seconds: float = 0.020) -> None:
        self.frame_samples = round(sample_rate * frame_seconds)
        self.frame_seconds = frame_seconds
        w = 2 * math.pi * BACKGROUND_HZ / sample_rate
        self._cos = array("d", (math.cos(w * i) for i in range(self.frame_samples)))
        self._sin = array("d", (math.sin(w * i) for i in range(self.frame_samples)))
        self._pending = array("h")
        self.frames = 0
        self.intact = 0

    def feed(self, samples: array) -> None:
        """Consume mono s16 samples (any chunking); judge every whole frame."""
        self._pending.extend(samples)
        n = self.frame_samples
        while len(self._pending) >= n:
            frame = self._pending[:n]
            del self._pending[:n]
            c = sum(map(operator.mul, frame, self._cos))
            s = sum(map(operator.mul, frame, self._sin))
            amplitude = 2 * math.hypot(c, s) / n
            self.frames += 1
            if amplitude >= BACKGROUND_AMPLITUDE / 2:
                self.intact += 1

    def share(self, seconds: float) -> float | None:
        """Intact frames per frame period of ``seconds`` of listening (None: nothing to judge)."""
        periods = max(self.frames, round(seconds / self.frame_seconds))
        return self.intact / periods if periods else None


class ArrivalClock:
    """Maps a received sample index to the time its frame arrived (plus its offset).

    A detector reports a marker by sample index; the round trip needs the time
    that sample arrived. The clock keeps the start index and arrival time of
    the last frames (at most `keep`, trimmed by half at a time so the append is
    cheap) and looks up from the newest end, where a just-detected marker lies.
    """

    def __init__(self, keep: int = 64) -> None:
        self._keep = keep
        self._starts: list[int] = []
        self._times: list[float] = []

    def add(self, start: int, when: float) -> None:
        self._starts.append(start)
        self._times.append(when)
        if len(self._starts) > self._keep:
            half = self._keep // 2
            del self._starts[:half], self._times[:half]

    def time_of(self, index: int, sample_rate: int) -> float | None:
        starts = self._starts
        for i in range(len(starts) - 1, -1, -1):
            if starts[i] <= index:
                return self._times[i] + (index - starts[i]) / sample_rate
        return None


def channel0(frame: Any) -> array:
    """The first channel of a received s16 audio frame (interleaved), as array('h').

    Reads only the frame's samples from its plane (which may be padded), with
    no copy of the whole plane.
    """
    channels = len(frame.layout.channels)
    pcm = array("h")
    pcm.frombytes(memoryview(frame.planes[0])[: frame.samples * channels * 2])
    return pcm[0::channels] if channels > 1 else pcm


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]
