"""An adaptive audio jitter buffer: when to play each received frame, and what to do instead.

aiortc's receive buffer releases a frame when a fixed number of later frames
has arrived (4 for audio: 80 ms on every link), and a lost packet blocks it
until the buffer overflows, after which it holds about 14 frames for the rest
of the call. This buffer does what libwebrtc's NetEQ does in every browser:
it plays on its own clock and *decides* per 20 ms slot, so its delay is the
network's jitter and nothing more, and a lost packet costs one concealed
frame, not lasting delay.

The model, in the terms the code uses:

* **Relative delay.** For each packet, ``arrival - timestamp / rate``: the
  sender's clock offset plus this packet's transit time. Its minimum over the
  last ``history`` packets is the fastest recent path; a packet's *jitter* is
  how much later than that it came. A sender whose clock drifts moves the
  minimum with it, so drift never reads as jitter for longer than the window.
* **Target delay** ``target``: the ``quantile`` (97 %) of the jitter over the
  same window, plus ``margin`` (scheduling noise), within ``[min_delay,
  max_delay]``. It rises at once (a late packet is a concealed frame) and
  falls at most ``fall_rate`` seconds per second (one quiet spell must not
  undo what a jittery link taught it). With fewer than ``MIN_SAMPLES``
  packets the largest jitter seen stands in for the quantile. Packets that
  arrive together (within ``BURST_GAP``: what a stalled link or a stalled
  event loop delivers at once) count as one sample, the first and latest
  of them: a single stall is one event, not a tenth of the window that
  would hold the target up for seconds.
* **FEC horizon.** In-band FEC (Opus LBRR) carries a lost frame inside the
  *next* packet, which helps only if that packet is here when the lost frame
  is due. While the link loses packets (``FEC_GAPS`` short gaps, of at most
  ``FEC_GAP`` frames, within ``fec_hold`` seconds) and the sender's packets
  carry FEC, the target grows by one frame, so losses are recovered instead
  of concealed. On a clean link that frame is never spent; an outage (a long
  gap, which FEC cannot fill) does not open it, and a gap whose packet turns
  up late was jitter, not loss, and no longer counts.
* **The slot clock.** Frames are played one per ``frame`` seconds of local
  time, like an audio device pulling 20 ms at a time. At each slot the
  *current delay* is how long after the fastest-path arrival the next frame
  plays. Below target, the slot waits until it reaches target (so packets
  within the target are never late). More than ``SHRINK_ABOVE`` of a frame
  above target, the buffer shrinks: one frame is dropped, preferring a quiet
  one (the caller judges quietness from the decoded audio and may decline
  for up to ``shrink_patience`` slots; after that, or over ``max_delay``, a
  frame is dropped anyway). Excess smaller than a frame, or with no second
  frame held to play instead, is shed by bringing the next slot forward (at
  most half a frame per slot): the consumers of this buffer (a backend, the
  voice client) have no sound card whose clock it must keep, so a frame
  handed over a few milliseconds early is free where NetEQ has to
  time-stretch. So a burst never becomes lasting delay, and reordering
  within the target is absorbed for free.
* **Missing frames.** A frame not here at its slot is recovered from the
  next packet's FEC when that packet is here and carries it, else concealed
  (the decoder's packet-loss concealment); a packet that arrives after its
  slot is *late* and dropped. After ``max_conceal`` of concealment in a row
  (an outage, a sender that stopped) the buffer goes idle instead of
  inventing audio, and the next packet restarts the clock at target.

Pure logic: no asyncio, no codec, no clock of its own. The caller
(transceiver/playout.py) passes ``now`` (seconds, monotonic), decodes what a
slot says, and arms a timer for ``next_slot``. That is also what makes the
behaviour testable with synthetic arrival schedules
(tests/unit/test_jitterbuffer.py).
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

#: Below this many packets in the window, the largest jitter stands in for the quantile.
MIN_SAMPLES = 20
#: Shrink (drop a frame) when the current delay exceeds the target by this share of a frame.
SHRINK_ABOVE = 0.6
#: Less excess than a frame to drop is shed by bringing the next slot this much earlier, at most.
COMPRESS_MAX = 0.5
#: Excess below this is left alone (it is scheduling noise, not delay).
COMPRESS_ABOVE = 0.001
#: A slot may fire this early (timer granularity) and still count as due.
EARLY_TOLERANCE = 0.0005
#: A packet this many frames ahead of the next one to play restarts the stream.
RESET_FRAMES = 100
#: A gap of at most this many missing frames is one FEC can help with (it rebuilds the last).
FEC_GAP = 3
#: Such gaps within fec_hold that open the FEC horizon: a lost packet or two is not a lossy link.
FEC_GAPS = 3
#: Packets arriving closer together than this came in one delivery (a burst after a stall):
#: only the first of them counts in the delay window, so one stall is one sample, not ten.
BURST_GAP = 0.002
#: Upper bounds (seconds) of the histogram of how long played packets waited (the metrics').
DELAY_BUCKETS: tuple[float, ...] = (
    0.0025,
    0.005,
    0.01,
    0.02,
    0.03,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    1.0,
)


@dataclass(frozen=True)
class JitterConfig:
    """How the buffer adapts; every field in seconds unless it says otherwise.

    The defaults are for 20 ms voice frames: ``min_delay`` 0 (a clean link
    holds nothing beyond ``margin``), ``max_delay`` 0.5 s (a buffer that needs
    more is on a link a conversation cannot use anyway), ``history`` 100
    packets (2 s: long enough for a 97 % quantile to mean something, short
    enough to follow a changing link), ``margin`` 3 ms (event-loop scheduling
    noise on a busy worker), ``fall_rate`` 0.04 (a frame of excess is shed
    within half a second of the jitter going away), ``shrink_patience`` 2
    slots (a loud stretch may delay the shedding of a frame by 40 ms, then
    it goes anyway).
    """

    min_delay: float = 0.0
    max_delay: float = 0.5
    quantile: float = 0.97
    history: int = 100
    margin: float = 0.003
    fall_rate: float = 0.04
    fec_hold: float = 10.0
    max_conceal: float = 0.1
    shrink_patience: int = 2
    frame: float = 0.020
    rate: int = 48000

    def __post_init__(self) -> None:
        if not 0 <= self.min_delay <= self.max_delay:
            raise ValueError("jitter buffer: need 0 <= min_delay <= max_delay")
        if self.max_delay > 5:
            raise ValueError("jitter buffer: max_delay above 5 s")
        if not 0.5 <= self.quantile < 1:
            raise ValueError("jitter buffer: quantile must be in [0.5, 1)")
        if self.history < MIN_SAMPLES:
            raise ValueError(f"jitter buffer: history must be at least {MIN_SAMPLES} packets")
        if self.frame <= 0 or self.rate <= 0:
            raise ValueError("jitter buffer: frame and rate must be positive")
        for name in ("margin", "fall_rate", "fec_hold", "max_conceal"):
            if getattr(self, name) < 0:
                raise ValueError(f"jitter buffer: {name} must not be negative")
        if self.shrink_patience < 0:
            raise ValueError("jitter buffer: shrink_patience must not be negative")

    @property
    def frame_samples(self) -> int:
        return round(self.frame * self.rate)


class SlotKind(Enum):
    """What to put in one slot."""

    PLAY = "play"  # decode the frame's own packet
    FEC = "fec"  # the frame is missing: decode it from the next packet's in-band FEC
    CONCEAL = "conceal"  # the frame is missing: packet-loss concealment


class Shrink(Enum):
    """Whether the caller should drop the frame a PLAY slot names (then call ``drop``)."""

    NO = "no"
    IF_QUIET = "if_quiet"  # above target: drop it if it is quiet, else keep it
    FORCE = "force"  # well above target (or patience spent): drop it, quiet or not


@dataclass(slots=True)
class Slot:
    """One slot's decision. ``payload`` is the packet to decode (PLAY, FEC), else None.

    ``delay`` is how long the played packet waited in the buffer (PLAY only).
    """

    kind: SlotKind
    payload: bytes | None = None
    delay: float | None = None
    shrink: Shrink = Shrink.NO


@dataclass(slots=True)
class JitterStats:
    """Counters since the buffer was made (frames are slots of ``config.frame``)."""

    packets: int = 0
    played: int = 0
    fec: int = 0  # frames recovered from the next packet's FEC
    concealed: int = 0  # frames made up by packet-loss concealment
    late: int = 0  # packets that came after their slot
    duplicate: int = 0
    dropped: int = 0  # frames dropped to shrink the buffer
    overflow: int = 0  # packets dropped because the buffer was full or the stream jumped
    skipped: int = 0  # frames never played nor concealed (an outage longer than max_conceal)
    resets: int = 0
    target: float = 0.0  # the target delay now


@dataclass(slots=True)
class _Packet:
    timestamp: int  # extended (unwrapped) RTP timestamp
    payload: bytes
    arrival: float
    fec: bool


class _Window:
    """The last ``size`` relative delays, kept sorted too: min and quantile in O(1)."""

    def __init__(self, size: int) -> None:
        self._order: deque[float] = deque()
        self._sorted: list[float] = []
        self._size = size

    def add(self, value: float) -> None:
        if len(self._order) == self._size:
            old = self._order.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self._order.append(value)
        bisect.insort(self._sorted, value)

    def __len__(self) -> int:
        return len(self._sorted)

    def minimum(self) -> float:
        return self._sorted[0]

    def spread(self, quantile: float) -> float:
        """Quantile minus minimum (the largest value when the window is still short)."""
        values = self._sorted
        if len(values) < MIN_SAMPLES:
            return values[-1] - values[0]
        return values[int(quantile * (len(values) - 1))] - values[0]

    def clear(self) -> None:
        self._order.clear()
        self._sorted.clear()


def _unwrap(value: int, reference: int, bits: int) -> int:
    """The extended value nearest ``reference`` whose low ``bits`` are ``value``."""
    modulus = 1 << bits
    delta = (value - reference) % modulus
    if delta >= modulus >> 1:
        delta -= modulus
    return reference + delta


class JitterBuffer:
    """One received audio stream's buffer; see the module docstring for the model.

    ``has_fec(payload)`` tells whether a packet carries in-band FEC for the
    frame before it (for Opus: transceiver/opus.py's ``packet_has_lbrr``);
    without it FEC is never used.

    The caller's loop: ``insert`` every packet as it arrives; at
    ``next_slot`` (None: idle, nothing to do until the next insert) call
    ``pop``; decode what the slot says; if the slot asks to shrink and the
    decoded frame is quiet (or ``Shrink.FORCE``), call ``drop`` for the slot's
    replacement and play that instead. Then arm the timer again.
    """

    def __init__(
        self, config: JitterConfig | None = None, has_fec: Callable[[bytes], bool] | None = None
    ) -> None:
        self.config = config or JitterConfig()
        self.stats = JitterStats(target=self.config.min_delay)
        self._has_fec = has_fec
        self._packets: dict[int, _Packet] = {}
        self._window = _Window(self.config.history)
        self._frame = self.config.frame
        self._frame_samples = self.config.frame_samples
        self._max_conceal = max(1, round(self.config.max_conceal / self._frame))
        self._highest_seq: int | None = None  # extended
        self._highest_ts = 0  # extended, of the highest sequence number
        self._next_seq = 0  # extended sequence number of the next frame to play
        self._next_ts = 0  # its (expected) extended timestamp
        self._slot: float | None = None  # local time of the next slot; None: idle
        self._target = self.config.min_delay
        self._target_at: float | None = None
        self._concealed_run = 0
        self._concealed: deque[int] = deque(maxlen=64)  # recently concealed seqs: late, not dup
        # Recent short gaps: (when the gap ended, its first and last sequence numbers).
        self._fec_gaps: deque[tuple[float, int, int]] = deque(maxlen=FEC_GAPS)
        self._fec_at: float | None = None
        self._patience = 0
        self._last_arrival: float | None = None

    # ------------------------------------------------------------------ input

    def insert(self, seq: int, timestamp: int, payload: bytes, now: float) -> None:
        """One RTP packet (16-bit sequence number, 32-bit timestamp) arrived at ``now``."""
        stats = self.stats
        stats.packets += 1
        if self._highest_seq is None:
            self._highest_seq, self._highest_ts = seq, timestamp
            ext_seq, ext_ts = seq, timestamp
            self._next_seq, self._next_ts = seq, timestamp
        else:
            ext_seq = _unwrap(seq, self._highest_seq, 16)
            ext_ts = _unwrap(timestamp, self._highest_ts, 32)
        fec = self._has_fec is not None and self._has_fec(payload)
        if fec:
            self._fec_at = now
        if self._highest_seq < ext_seq < self._next_seq and ext_ts >= self._next_ts:
            # Concealment ran past the newest packet because the sender paused (DTX, or
            # nothing to say): its timestamp is beyond what was concealed, so this is the
            # stream going on from here. (A packet whose frame was concealed is late.)
            self._next_seq, self._next_ts = ext_seq, ext_ts
        burst = self._last_arrival is not None and now - self._last_arrival < BURST_GAP
        self._last_arrival = now
        if ext_seq < self._next_seq:
            if ext_seq in self._concealed:
                stats.late += 1
                if not burst:
                    self._window.add(now - ext_ts / self.config.rate)
                self._forget_gap(ext_seq)
            else:
                stats.duplicate += 1
            return
        if ext_seq in self._packets:
            stats.duplicate += 1
            return
        if ext_seq - self._next_seq >= RESET_FRAMES:
            self._reset(ext_seq, ext_ts)
        if ext_seq > self._highest_seq:
            self._highest_seq, self._highest_ts = ext_seq, ext_ts
        if not burst or not self._window:
            self._window.add(now - ext_ts / self.config.rate)
        self._packets[ext_seq] = _Packet(ext_ts, payload, now, fec)
        if self._slot is None:
            self._restart(now)

    def _forget_gap(self, ext_seq: int) -> None:
        """A concealed frame's packet came after all: that gap was lateness, not loss."""
        for gap in list(self._fec_gaps):
            if gap[1] <= ext_seq <= gap[2]:
                self._fec_gaps.remove(gap)

    def _reset(self, ext_seq: int, ext_ts: int) -> None:
        """A jump of more than RESET_FRAMES: a new stream in all but SSRC; start over."""
        self.stats.overflow += len(self._packets)
        self.stats.resets += 1
        self._packets.clear()
        self._window.clear()
        self._concealed.clear()
        self._highest_seq, self._highest_ts = ext_seq, ext_ts
        self._next_seq, self._next_ts = ext_seq, ext_ts
        self._slot = None

    def _restart(self, now: float) -> None:
        """Leave idle: play the earliest frame held, at the target delay."""
        first = min(self._packets)
        self.stats.skipped += max(0, first - self._next_seq)
        self._next_seq = first
        self._next_ts = self._packets[first].timestamp
        self._concealed_run = 0
        self._update_target(now)
        self._slot = max(now, self._due(self._next_ts))

    # ------------------------------------------------------------------ the clock

    @property
    def next_slot(self) -> float | None:
        """Local time of the next slot; None while idle (nothing to play)."""
        return self._slot

    @property
    def target(self) -> float:
        return self._target

    @property
    def buffered(self) -> int:
        """Packets held."""
        return len(self._packets)

    def _due(self, timestamp: int) -> float:
        """When a frame with this timestamp reaches the target delay."""
        return timestamp / self.config.rate + self._window.minimum() + self._target

    def _update_target(self, now: float) -> None:
        cfg = self.config
        wanted = self._window.spread(cfg.quantile) + cfg.margin
        if self._fec_horizon(now):
            wanted += self._frame
        wanted = min(max(wanted, cfg.min_delay), cfg.max_delay)
        if wanted >= self._target or self._target_at is None:
            self._target = wanted
        else:
            fallen = self._target - cfg.fall_rate * (now - self._target_at)
            self._target = max(wanted, fallen)
        self._target_at = now
        self.stats.target = self._target

    def _fec_horizon(self, now: float) -> bool:
        """The link loses packets and the sender protects its frames: wait one frame for FEC."""
        hold = self.config.fec_hold
        gaps = self._fec_gaps
        return (
            len(gaps) == FEC_GAPS
            and now - gaps[0][0] <= hold
            and self._fec_at is not None
            and now - self._fec_at <= hold
        )

    def missing_at(self, now: float) -> bool:
        """Whether the slot due at ``now`` would find its frame missing (nothing changes).

        The caller may give packets already received, but not yet handed to
        ``insert``, one more chance before ``pop`` conceals the frame.
        """
        slot = self._slot
        if slot is None or now < slot - EARLY_TOLERANCE:
            return False
        return self._next_seq not in self._packets

    def pop(self, now: float) -> Slot | None:
        """The decision for the slot due at ``next_slot``; None if it is not due (or moved).

        Call it when the timer for ``next_slot`` fires; a None means the slot
        was postponed (the delay is below target) or the buffer went idle:
        look at ``next_slot`` again.
        """
        slot = self._slot
        if slot is None or now < slot - EARLY_TOLERANCE:
            return None
        self._update_target(now)
        packet = self._packets.get(self._next_seq)
        timestamp = self._next_ts if packet is None else packet.timestamp
        current = slot - (timestamp / self.config.rate + self._window.minimum())
        if current < self._target - EARLY_TOLERANCE:
            self._slot = slot + (self._target - current)
            return None
        if packet is None:
            return self._missing(slot)
        del self._packets[self._next_seq]
        return self._play(packet, slot, now, current)

    def _play(self, packet: _Packet, slot: float, now: float, current: float) -> Slot:
        run = self._concealed_run
        if 0 < run <= FEC_GAP:
            first = self._next_seq - run
            self._fec_gaps.append((slot, first, self._next_seq - 1))
        self._concealed_run = 0
        wait = self._played(packet, now)
        self._advance(slot, packet.timestamp)
        excess = current - self._target
        shrink = Shrink.NO
        if excess > SHRINK_ABOVE * self._frame and self._next_seq in self._packets:
            self._patience += 1
            if current > self.config.max_delay or self._patience > self.config.shrink_patience:
                shrink = Shrink.FORCE
            else:
                shrink = Shrink.IF_QUIET
        else:
            self._patience = 0
            if excess > COMPRESS_ABOVE:
                # No whole frame to drop: the next frame is simply handed over sooner.
                self._slot = slot + self._frame - min(excess, COMPRESS_MAX * self._frame)
        return Slot(SlotKind.PLAY, packet.payload, wait, shrink)

    def drop(self, now: float) -> Slot:
        """Drop the frame the last PLAY slot named; return what plays in its place.

        Only valid right after a ``pop`` whose slot asked to shrink (the next
        frame is then held). Counts one dropped frame.
        """
        packet = self._packets.pop(self._next_seq, None)
        if packet is None:
            raise RuntimeError("drop() without a frame to play instead")
        self.stats.dropped += 1
        self.stats.played -= 1  # pop() counted the dropped frame as played
        self._patience = 0
        self._step(packet.timestamp)
        return Slot(SlotKind.PLAY, packet.payload, self._played(packet, now))

    def _played(self, packet: _Packet, now: float) -> float:
        """Count one played frame; return how long its packet waited."""
        self.stats.played += 1
        return max(0.0, now - packet.arrival)

    def _missing(self, slot: float) -> Slot | None:
        """The frame due now is not here: FEC from the next packet, concealment, or idle."""
        stats = self.stats
        if self._concealed_run >= self._max_conceal:
            # An outage, not a lossy link: the short gaps at its edges are no evidence either.
            self._fec_gaps.clear()
            stats.skipped += 1
            self._concealed.append(self._next_seq)
            self._advance(slot, self._next_ts)
            self._slot = None
            if self._packets:
                self._restart(slot)
            return None
        self._concealed_run += 1
        self._concealed.append(self._next_seq)
        following = self._packets.get(self._next_seq + 1)
        self._advance(slot, self._next_ts)
        if following is not None and following.fec:
            stats.fec += 1
            return Slot(SlotKind.FEC, following.payload)
        stats.concealed += 1
        return Slot(SlotKind.CONCEAL)

    def _advance(self, slot: float, timestamp: int) -> None:
        """Move to the frame after the one with ``timestamp``, and to the next slot."""
        self._step(timestamp)
        self._slot = slot + self._frame

    def _step(self, timestamp: int) -> None:
        """Move to the frame after the one with ``timestamp`` (its own, if it is held)."""
        self._next_seq += 1
        nxt = self._packets.get(self._next_seq)
        self._next_ts = nxt.timestamp if nxt is not None else timestamp + self._frame_samples
