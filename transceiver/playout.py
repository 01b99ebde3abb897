"""Received audio on the event loop: the jitter buffer's clock, the Opus decoder, the track.

transceiver/jitterbuffer.py decides, per 20 ms slot, what to play; this module
carries the decisions out for one received audio stream. It stands where
aiortc 1.16 has its receive path for audio (the jitter buffer that releases
a frame once 4 later ones have come, the decoder thread, the frame queue), and
is put there by transceiver/aiortc_fast.py's ``adaptive_playout`` patch:

* ``add(packet)`` is what aiortc's receiver calls for every RTP packet (its
  jitter buffer's interface); the packet goes into the JitterBuffer, stamped
  with the loop's clock;
* one timer per stream fires at the buffer's next slot; the slot is decoded
  (the packet, its FEC from the next packet, or concealment, all in libopus
  through transceiver/opus.py) and the frame goes on the track's queue, which
  the session's audio pump (or the voice client's listener) reads;
* ``put(None)`` is how aiortc stops its decoder thread; here it stops the
  timer and ends the track.

Quietness, for the buffer's "drop a quiet frame" choice, is judged on the
decoded audio: the peak of every 16th sample below ``QUIET_PEAK`` (-30 dBFS,
the level the echo backend's speech detector treats as silence).

Counters: every stream adds into a ``PlayoutCounters`` (one per worker, or
per voice-client call), which the metrics read: frames played, recovered
from FEC, concealed, late, dropped, and the histogram of how long played
packets waited in the buffer. ``register(receiver, config, counters)`` is
how a session or the client sets both for its peer connection's receiver
before aiortc starts it; receivers nobody registered use the process
defaults.
"""

from __future__ import annotations

import asyncio
import bisect
import fractions
import logging
import weakref
from dataclasses import dataclass, fields
from typing import Any

from av import AudioFrame

from transceiver import opus
from transceiver.jitterbuffer import (
    DELAY_BUCKETS,
    JitterBuffer,
    JitterConfig,
    JitterStats,
    Shrink,
    Slot,
    SlotKind,
)

log = logging.getLogger("splitrelay.transceiver.playout")

#: Peak below which a decoded frame counts as quiet (-30 dBFS; SpeechDetector's threshold).
QUIET_PEAK = 1000
_TIME_BASE = fractions.Fraction(1, opus.SAMPLE_RATE)
#: JitterStats fields summed over streams (target is a level, not a count).
_COUNTED = tuple(f.name for f in fields(JitterStats) if f.name != "target")


class PlayoutCounters:
    """Totals over every stream that reports here: the ended ones plus the live ones.

    Live streams are read at snapshot time (their JitterStats are the
    truth); an ended stream's figures are folded in once, when it stops.
    """

    def __init__(self) -> None:
        self._live: weakref.WeakSet[PlayoutStream] = weakref.WeakSet()
        self._ended = dict.fromkeys(_COUNTED, 0)
        self.decode_errors = 0
        self.delay_counts = [0] * len(DELAY_BUCKETS)
        self.delay_count = 0
        self.delay_sum = 0.0

    def observe(self, wait: float) -> None:
        index = bisect.bisect_left(DELAY_BUCKETS, wait)
        if index < len(self.delay_counts):
            self.delay_counts[index] += 1
        self.delay_count += 1
        self.delay_sum += wait

    def _add(self, stream: PlayoutStream) -> None:
        self._live.add(stream)

    def _ended_stream(self, stream: PlayoutStream) -> None:
        self._live.discard(stream)
        for name in _COUNTED:
            self._ended[name] += getattr(stream.stats, name)

    def snapshot(self) -> dict[str, Any]:
        """Plain JSON-able totals (they cross process boundaries in Worker.stats())."""
        totals = dict(self._ended)
        targets = []
        for stream in list(self._live):
            for name in _COUNTED:
                totals[name] += getattr(stream.stats, name)
            targets.append(stream.stats.target)
        cumulative, running = [], 0
        for bound, n in zip(DELAY_BUCKETS, self.delay_counts, strict=True):
            running += n
            cumulative.append([bound, running])
        return {
            **totals,
            "decode_errors": self.decode_errors,
            "streams": len(targets),
            "target_seconds_mean": sum(targets) / len(targets) if targets else 0.0,
            "delay_seconds": {
                "buckets": cumulative,
                "count": self.delay_count,
                "sum": self.delay_sum,
            },
        }


@dataclass(frozen=True)
class Registration:
    """How one receiver's stream is played: its buffer, its counters, its output channels."""

    config: JitterConfig
    counters: PlayoutCounters
    channels: int = 2


_DEFAULT = Registration(JitterConfig(), PlayoutCounters())
_registered: weakref.WeakKeyDictionary[Any, Registration] = weakref.WeakKeyDictionary()


def register(
    receiver: Any, config: JitterConfig, counters: PlayoutCounters, channels: int = 2
) -> None:
    """Play this RTCRtpReceiver's stream with ``config`` into ``counters`` (before it starts).

    ``channels`` is what the frames carry: 2 as aiortc decodes (a backend gets
    stereo), 1 for a listener that reads one channel anyway (a mono packet
    decodes alike to both, and libopus then synthesises one).
    """
    _registered[receiver] = Registration(config, counters, channels)


def default_counters() -> PlayoutCounters:
    """Where streams of receivers nobody registered report."""
    return _DEFAULT.counters


def registration(receiver: Any) -> Registration:
    """What ``register`` set for this receiver, or the process defaults."""
    return _registered.get(receiver, _DEFAULT)


def is_quiet(pcm: bytes) -> bool:
    """The frame's peak (every 16th sample, one channel of stereo) is below QUIET_PEAK."""
    samples = memoryview(pcm).cast("h")[::16]
    return not samples or max(max(samples), -min(samples)) < QUIET_PEAK


class PlayoutStream:
    """One received audio stream: buffer, decoder, slot timer, and the track's queue.

    Duck-types what aiortc's RTCRtpReceiver holds for audio: its jitter
    buffer (``add``), its decoder queue and its decoder thread (``put``,
    ``start``, ``join``, truthiness), so the receiver's own code runs
    unchanged around it.
    """

    def __init__(
        self,
        output: asyncio.Queue[Any],
        config: JitterConfig,
        counters: PlayoutCounters,
        payload_types: set[int] | None = None,
        channels: int = 2,
    ) -> None:
        self._output = output
        self._payload_types = payload_types
        self._buffer = JitterBuffer(config, has_fec=opus.packet_has_lbrr)
        self._decoder: opus.Decoder | None = opus.Decoder(channels)
        self._channels = channels
        self._layout = "stereo" if channels == 2 else "mono"
        self._samples = config.frame_samples
        self._counters = counters
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.Handle | None = None
        self._timer_at: float | None = None
        self._second_chance = False
        self._pts = 0
        counters._add(self)

    @property
    def stats(self) -> JitterStats:
        return self._buffer.stats

    @property
    def buffer(self) -> JitterBuffer:
        return self._buffer

    # -- aiortc's jitter buffer interface

    def add(self, packet: Any) -> tuple[bool, None]:
        """Take one RTP packet; frames come out on the slot clock, never from here."""
        if self._decoder is None:
            return False, None
        if self._payload_types is not None and packet.payload_type not in self._payload_types:
            self._counters.decode_errors += 1  # not Opus: nothing here could decode it
            return False, None
        self._buffer.insert(
            packet.sequence_number, packet.timestamp, packet.payload, self._loop.time()
        )
        self._arm()
        return False, None

    # -- aiortc's decoder queue and thread interface

    def put(self, task: Any) -> None:
        """aiortc feeds its decoder here; only None (stop) matters: frames came via add()."""
        if task is None:
            self.stop()

    def start(self) -> None:
        """Nothing to start: the slot timer runs on the event loop."""

    def join(self, timeout: float | None = None) -> None:
        """Nothing to wait for: stop() already ended the track."""

    def __bool__(self) -> bool:
        return self._decoder is not None

    # -- the slot clock

    def _arm(self) -> None:
        when = self._buffer.next_slot
        if when == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = None if when is None else self._loop.call_at(when, self._on_slot)

    def _on_slot(self) -> None:
        self._timer = self._timer_at = None
        if self._decoder is None:
            return
        now = self._loop.time()
        if not self._second_chance and self._buffer.missing_at(now):
            # The frame may be in a datagram already read from the socket whose task
            # (aiortc's DTLS transport) has not run yet: on a busy loop timers can
            # overtake it. Let the ready tasks run once before concealing.
            self._second_chance = True
            self._timer = self._loop.call_soon(self._on_slot)
            self._timer_at = self._buffer.next_slot  # so add() does not arm a second one
            return
        self._second_chance = False
        slot = self._buffer.pop(now)
        if slot is not None:
            self._emit(slot, now)
        self._arm()

    def _emit(self, slot: Slot, now: float) -> None:
        decoder = self._decoder
        assert decoder is not None
        counters = self._counters
        try:
            if slot.kind is SlotKind.PLAY:
                assert slot.payload is not None
                pcm = decoder.decode(slot.payload)
                if slot.shrink is not Shrink.NO and (slot.shrink is Shrink.FORCE or is_quiet(pcm)):
                    slot = self._buffer.drop(now)
                    assert slot.payload is not None
                    pcm = decoder.decode(slot.payload)
                if slot.delay is not None:
                    counters.observe(slot.delay)
            elif slot.kind is SlotKind.FEC:
                assert slot.payload is not None
                pcm = decoder.decode_fec(slot.payload, self._samples)
            else:
                pcm = decoder.conceal(self._samples)
        except opus.OpusError as exc:
            counters.decode_errors += 1
            log.debug("undecodable audio packet: %s", exc)
            pcm = decoder.conceal(self._samples)
        samples = len(pcm) // (2 * self._channels)
        frame = AudioFrame(format="s16", layout=self._layout, samples=samples)
        frame.planes[0].update(pcm)
        frame.sample_rate = opus.SAMPLE_RATE
        frame.time_base = _TIME_BASE
        frame.pts = self._pts
        self._pts += samples
        self._output.put_nowait(frame)

    def stop(self) -> None:
        """End the stream: no more slots, the track sees its end (idempotent)."""
        if self._decoder is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._timer_at = None
        self._decoder.close()
        self._decoder = None
        self._counters._ended_stream(self)
        self._output.put_nowait(None)
