"""The adaptive jitter buffer against synthetic arrival schedules.

Each test builds a sender (a packet every 20 ms, timestamps +960), a network
(per-packet transit time, losses) and plays the result through the buffer
the way transceiver/playout.py does: packets inserted at their arrival, a
slot processed whenever its time comes (arrivals first at equal times, as
asyncio runs I/O before timers), a shrink honoured when the frame is quiet.
What is asserted is what a listener gets: the delay the buffer settles at,
and what it played, recovered, concealed, dropped or found late.
"""

from __future__ import annotations

import itertools
import random
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pytest

from transceiver.jitterbuffer import (
    JitterBuffer,
    JitterConfig,
    Shrink,
    Slot,
    SlotKind,
)

FRAME = 0.020
SAMPLES = 960


@dataclass
class Sent:
    seq: int
    ts: int
    send: float
    arrival: float | None  # None: lost
    quiet: bool = True
    fec: bool = False

    @property
    def payload(self) -> bytes:
        # The payload names the frame, so tests can tell what was played.
        flags = (b"q" if self.quiet else b"l") + (b"f" if self.fec else b"-")
        return flags + self.seq.to_bytes(4, "big")


@dataclass
class Played:
    at: float
    kind: SlotKind
    seq: int | None  # the frame's sequence number (PLAY), the FEC carrier's (FEC)
    wait: float | None
    dropped: int | None = None  # seq of the frame dropped to shrink in this slot


@dataclass
class Run:
    buffer: JitterBuffer
    played: list[Played] = field(default_factory=list)

    def kinds(self, since: float = 0.0) -> dict[SlotKind, int]:
        out = dict.fromkeys(SlotKind, 0)
        for p in self.played:
            if p.at >= since:
                out[p.kind] += 1
        return out

    def waits(self, since: float = 0.0, until: float = float("inf")) -> list[float]:
        return [p.wait for p in self.played if since <= p.at < until and p.wait is not None]

    def latency(self, sent: list[Sent], since: float = 0.0) -> list[float]:
        """Send -> play time of every frame played from its own packet."""
        send = {s.seq % 65536: s.send for s in sent}
        return [
            p.at - send[p.seq]
            for p in self.played
            if p.kind is SlotKind.PLAY and p.seq is not None and p.at >= since
        ]


def _seq(payload: bytes) -> int:
    return int.from_bytes(payload[2:6], "big")


def stream(
    count: int,
    transit: Callable[[int, random.Random], float | None],
    *,
    seed: int = 1,
    start_seq: int = 1000,
    start_ts: int = 5_000_000,
    interval: float = FRAME,
    quiet: Callable[[int], bool] = lambda i: True,
    fec: bool = False,
) -> list[Sent]:
    """`count` packets, one per `interval`; transit(i, rng) in seconds or None (lost)."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        send = 10.0 + i * interval
        t = transit(i, rng)
        out.append(
            Sent(
                seq=(start_seq + i) % 65536,
                ts=(start_ts + i * SAMPLES) % (1 << 32),
                send=send,
                arrival=None if t is None else send + t,
                quiet=quiet(i),
                fec=fec,
            )
        )
    return out


def play(sent: Iterable[Sent], config: JitterConfig | None = None, *, fec: bool = False) -> Run:
    """Drive a JitterBuffer with the arrivals, processing every slot as a timer would."""
    buffer = JitterBuffer(config, has_fec=(lambda p: p[1:2] == b"f") if fec else None)
    run = Run(buffer)
    arrivals = sorted((s for s in sent if s.arrival is not None), key=lambda s: s.arrival)
    end = (arrivals[-1].arrival if arrivals else 0.0) + 1.0
    i = 0
    while True:
        slot = buffer.next_slot
        next_arrival = arrivals[i].arrival if i < len(arrivals) else None
        if next_arrival is not None and (slot is None or next_arrival <= slot):
            packet = arrivals[i]
            buffer.insert(packet.seq, packet.ts, packet.payload, packet.arrival)
            i += 1
            continue
        if slot is None or slot > end or (i == len(arrivals) and not buffer.buffered):
            break  # idle, or the stream ended: what follows would conceal the hang-up
        result = buffer.pop(slot)
        if result is not None:
            run.played.append(_record(buffer, result, slot))
    return run


def _record(buffer: JitterBuffer, slot: Slot, now: float) -> Played:
    if slot.kind is SlotKind.CONCEAL:
        return Played(now, slot.kind, None, None)
    assert slot.payload is not None
    seq = _seq(slot.payload)
    if slot.kind is SlotKind.FEC:
        return Played(now, slot.kind, seq, None)
    quiet = slot.payload[0:1] == b"q"
    if slot.shrink is Shrink.FORCE or (slot.shrink is Shrink.IF_QUIET and quiet):
        instead = buffer.drop(now)
        assert instead.payload is not None
        return Played(now, instead.kind, _seq(instead.payload), instead.delay, dropped=seq)
    return Played(now, slot.kind, seq, slot.delay)


def constant(seconds: float) -> Callable[[int, random.Random], float]:
    return lambda i, rng: seconds


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


# ---------------------------------------------------------------------- clean link


def test_steady_link_holds_less_than_a_frame_and_settles_at_the_margin() -> None:
    sent = stream(500, constant(0.030))
    run = play(sent)
    kinds = run.kinds()
    assert kinds[SlotKind.PLAY] == 500
    assert kinds[SlotKind.CONCEAL] == kinds[SlotKind.FEC] == 0
    stats = run.buffer.stats
    assert stats.late == stats.dropped == stats.duplicate == 0
    margin = run.buffer.config.margin
    assert run.buffer.target == pytest.approx(margin)
    # Every frame waits exactly the margin: never a whole frame.
    assert max(run.waits()) == pytest.approx(margin, abs=1e-6)
    assert max(run.latency(sent)) == pytest.approx(0.030 + margin, abs=1e-6)


def test_steady_link_buffer_never_holds_more_than_one_packet() -> None:
    sent = stream(300, constant(0.005))
    buffer = JitterBuffer()
    held = []
    for s in sent:
        assert s.arrival is not None
        while buffer.next_slot is not None and buffer.next_slot < s.arrival:
            buffer.pop(buffer.next_slot)
        buffer.insert(s.seq, s.ts, s.payload, s.arrival)
        held.append(buffer.buffered)
    assert max(held) == 1


def test_floor_holds_on_a_clean_link() -> None:
    run = play(stream(300, constant(0.01)), JitterConfig(min_delay=0.040))
    assert run.buffer.target == pytest.approx(0.040)
    assert statistics.median(run.waits(since=11)) == pytest.approx(0.040, abs=1e-6)


# ---------------------------------------------------------------------- jitter


def test_uniform_jitter_settles_at_its_high_quantile() -> None:
    sent = stream(3000, lambda i, rng: 0.010 + rng.uniform(0, 0.020), seed=7)
    run = play(sent)
    cfg = run.buffer.config
    # The 97 % quantile of U(0, 20 ms) is 19.4 ms; the window is 100 packets.
    assert 0.016 + cfg.margin <= run.buffer.target <= 0.020 + cfg.margin
    stats = run.buffer.stats
    late_share = stats.late / len(sent)
    assert late_share <= 0.05, stats
    assert stats.concealed + stats.fec >= stats.late  # every late frame was covered in time
    # What a listener waits beyond the fastest path: about the target, never much more.
    lat = run.latency(sent, since=12)
    assert p(lat, 50) <= 0.010 + 0.020 + cfg.margin + 0.005
    assert max(lat) <= 0.010 + cfg.max_delay


def test_jitter_is_not_lasting_delay_when_it_goes_away() -> None:
    def transit(i: int, rng: random.Random) -> float:
        return 0.010 + (rng.uniform(0, 0.040) if i < 1000 else 0.0)

    sent = stream(2000, transit, seed=3)
    run = play(sent)
    # 20 s of jitter, then a clean link: within 5 s the buffer is back at the margin.
    assert run.waits(since=10 + 20 + 5) and max(run.waits(since=10 + 20 + 5)) <= 0.004


def test_ceiling_caps_the_target() -> None:
    sent = stream(1500, lambda i, rng: 0.010 + rng.uniform(0, 0.300), seed=5)
    run = play(sent, JitterConfig(max_delay=0.100))
    assert run.buffer.target == pytest.approx(0.100)
    waits = run.waits(since=12)
    # A faster packet than any in the window moves the reference, and the excess is
    # shed over the next slots: transiently above the ceiling, never for long.
    assert p(waits, 95) <= 0.100
    assert max(waits) <= 0.100 + 2 * FRAME


def test_a_single_spike_does_not_raise_the_target() -> None:
    sent = stream(500, lambda i, rng: 0.150 if i == 250 else 0.010)
    run = play(sent)
    assert run.buffer.stats.late == 1
    assert run.buffer.stats.concealed == 1
    assert run.buffer.target == pytest.approx(run.buffer.config.margin)


def test_reordering_within_the_target_is_absorbed() -> None:
    # Every 25th packet is held back 30 ms, behind its successor. 4 % of the packets:
    # inside the 97 % quantile's tail, so the target grows to cover them.
    sent = stream(3000, lambda i, rng: 0.010 + (0.030 if i % 25 == 0 else 0.0))
    arrivals = [s.arrival for s in sent if s.arrival is not None]
    assert any(b < a for a, b in itertools.pairwise(arrivals))  # reordered
    run = play(sent)
    assert run.buffer.target >= 0.030
    # Once the window has seen them (a few seconds), no held-back packet is late.
    assert run.kinds(since=14)[SlotKind.CONCEAL] == 0
    assert run.buffer.stats.late <= 5


# ---------------------------------------------------------------------- loss


def test_random_loss_without_fec_is_concealed_one_frame_each() -> None:
    sent = stream(2000, lambda i, rng: None if rng.random() < 0.05 else 0.010, seed=11)
    lost = sum(1 for s in sent if s.arrival is None)
    run = play(sent)
    stats = run.buffer.stats
    assert stats.concealed == lost
    assert stats.fec == 0 and stats.late == 0
    # Loss is not jitter: the delay stays at the margin.
    assert run.buffer.target == pytest.approx(run.buffer.config.margin)
    assert max(run.waits()) == pytest.approx(run.buffer.config.margin, abs=1e-6)


def test_random_loss_with_fec_waits_one_frame_and_recovers() -> None:
    sent = stream(2000, lambda i, rng: None if rng.random() < 0.05 else 0.010, seed=11, fec=True)
    lost = sum(1 for s in sent if s.arrival is None)
    run = play(sent, fec=True)
    stats = run.buffer.stats
    assert stats.fec + stats.concealed == lost
    # The first loss is concealed (nothing was held for it); the horizon covers the rest
    # except where the next packet was lost too.
    assert stats.fec >= 0.8 * lost, stats
    assert run.buffer.target == pytest.approx(FRAME + run.buffer.config.margin)


def test_fec_horizon_ends_after_the_losses_do() -> None:
    def transit(i: int, rng: random.Random) -> float | None:
        return None if i < 500 and rng.random() < 0.05 else 0.010

    sent = stream(2000, transit, seed=2, fec=True)
    run = play(sent, fec=True)
    # Losses stop at 10 s into the stream; 10 s hold, then the frame is shed.
    assert run.buffer.target == pytest.approx(run.buffer.config.margin)
    assert max(run.waits(since=10 + 10 + 10 + 2)) <= 0.004


def test_an_outage_or_one_lost_packet_does_not_open_the_fec_horizon() -> None:
    # A 300 ms outage and, 5 s later, one lost packet, from a sender whose packets carry
    # FEC: neither is a lossy link (FEC cannot fill an outage), so the delay stays clean.
    def transit(i: int, rng: random.Random) -> float | None:
        return None if 300 <= i < 315 or i == 550 else 0.010

    sent = stream(800, transit, fec=True)
    run = play(sent, fec=True)
    assert run.buffer.stats.fec == 0
    assert max(run.waits(since=10 + 315 * FRAME)) == pytest.approx(
        run.buffer.config.margin, abs=1e-6
    )


def test_burst_loss_conceals_the_burst_and_keeps_the_delay() -> None:
    bursts = {300, 301, 302, 800, 801, 802, 803}
    sent = stream(1200, lambda i, rng: None if i in bursts else 0.010)
    run = play(sent)
    stats = run.buffer.stats
    assert stats.concealed == len(bursts)
    assert stats.skipped == 0
    assert max(run.waits()) == pytest.approx(run.buffer.config.margin, abs=1e-6)


def test_long_outage_goes_idle_and_restarts_at_the_clean_delay() -> None:
    # 300 ms outage: 15 packets lost. The buffer conceals max_conceal (100 ms), then
    # stops inventing audio; the first packet after it plays at the clean delay.
    sent = stream(600, lambda i, rng: None if 300 <= i < 315 else 0.010)
    run = play(sent)
    stats = run.buffer.stats
    assert stats.concealed == 5
    assert stats.skipped == 10
    first_after = next(p for p in run.played if p.seq is not None and _seq_index(p, sent) >= 315)
    assert first_after.wait == pytest.approx(run.buffer.config.margin, abs=1e-6)
    lat = run.latency(sent)
    assert max(lat) == pytest.approx(0.010 + run.buffer.config.margin, abs=1e-6)


def _seq_index(played: Played, sent: list[Sent]) -> int:
    return next(i for i, s in enumerate(sent) if s.seq == played.seq)


def test_sender_pause_with_advancing_timestamps_is_not_jitter() -> None:
    # A sender with nothing to say for a second (DTX): timestamps advance, packets stop.
    sent = stream(300, constant(0.010))
    later = stream(300, constant(0.010), start_seq=1300, start_ts=5_000_000 + 350 * SAMPLES)
    for s in later:
        s.send += 350 * FRAME
        assert s.arrival is not None
        s.arrival += 350 * FRAME
    run = play(sent + later)
    assert run.buffer.stats.late == 0
    assert max(run.waits()) == pytest.approx(run.buffer.config.margin, abs=1e-6)


# ---------------------------------------------------------------------- drift and bursts


@pytest.mark.parametrize("ppm", [1000, -1000])
def test_sender_clock_drift_keeps_the_delay_bounded(ppm: int) -> None:
    # The sender's 20 ms is 0.1 % short (fast clock) or long (slow clock) in our time:
    # a poor sound card's crystal. 120 s of it is 6 frames too many or too few.
    interval = FRAME * (1 - ppm / 1e6)
    sent = stream(6000, constant(0.010), interval=interval)
    run = play(sent)
    stats = run.buffer.stats
    # Over the 100-packet window the drift spreads relative delays by 2 ms, which the
    # buffer takes for jitter; beyond that it follows the sender's clock by handing
    # frames over a little sooner, or waiting: nothing dropped, concealed or late.
    drift_spread = 100 * FRAME * abs(ppm) / 1e6
    bound = run.buffer.config.margin + drift_spread + 0.001
    early, late = run.waits(since=15, until=40), run.waits(since=100)
    assert max(early) <= bound and max(late) <= bound
    assert statistics.mean(late) <= statistics.mean(early) + 0.001  # it does not grow
    assert stats.dropped == stats.concealed == stats.late == 0, stats


def test_a_burst_after_a_stall_is_shed_preferring_quiet_frames() -> None:
    # The network stalls for 200 ms, then delivers what it held at once. Only every
    # third frame is quiet: the buffer must shed the backlog on quiet frames.
    sent = stream(1500, _stall, quiet=lambda i: i % 3 == 0)
    run = play(sent)
    drops = [p.dropped for p in run.played if p.dropped is not None]
    assert drops, "the backlog was never shed"
    quiet = {s.seq for s in sent if s.quiet}
    patience = run.buffer.config.shrink_patience
    # With a quiet frame every third one, patience (2 slots) is never exhausted.
    assert patience >= 2 and all(d in quiet for d in drops)
    # A stall is one late delivery, not jitter: the target never moved, and a second
    # after it the delay is back within 5 ms of its clean value.
    assert run.buffer.target == pytest.approx(run.buffer.config.margin)
    assert max(run.waits(since=10 + 310 * FRAME + 1)) <= run.buffer.config.margin + 0.005


def _stall(i: int, rng: random.Random) -> float:
    """200 ms of packets held by the network, then delivered at once."""
    stall_end = 10 + 310 * FRAME
    send = 10 + i * FRAME
    return max(0.010, stall_end - send) if 300 <= i < 310 else 0.010


def test_shrink_drops_loud_frames_when_no_quiet_one_comes() -> None:
    sent = stream(1500, _stall, quiet=lambda i: False)
    run = play(sent)
    assert run.buffer.stats.dropped >= 1
    assert max(run.waits(since=10 + 310 * FRAME + 1)) <= run.buffer.config.margin + 0.005


# ---------------------------------------------------------------------- bookkeeping


def test_late_and_duplicate_packets_are_counted_and_dropped() -> None:
    sent = stream(200, constant(0.010))
    late = sent[100]
    assert late.arrival is not None
    late.arrival += 0.5
    dup = Sent(sent[50].seq, sent[50].ts, sent[50].send, sent[50].arrival + 0.001)  # type: ignore[operator]
    run = play([*sent, dup])
    stats = run.buffer.stats
    assert stats.late == 1
    assert stats.duplicate == 1
    assert stats.concealed == 1
    assert stats.played == 199


def test_sequence_and_timestamp_wrap_around() -> None:
    sent = stream(400, constant(0.010), start_seq=65_400, start_ts=(1 << 32) - 100 * SAMPLES)
    run = play(sent)
    assert run.kinds()[SlotKind.PLAY] == 400
    assert run.buffer.stats.late == run.buffer.stats.concealed == 0
    assert [p.seq for p in run.played] == [s.seq for s in sent]


def test_a_jump_in_sequence_numbers_restarts_the_stream() -> None:
    first = stream(100, constant(0.010))
    second = stream(100, constant(0.010), start_seq=30_000, start_ts=123)
    for s in second:
        s.send += 3
        assert s.arrival is not None
        s.arrival += 3
    run = play(first + second)
    assert run.buffer.stats.resets == 1
    assert run.kinds()[SlotKind.PLAY] == 200
    assert max(run.waits()) == pytest.approx(run.buffer.config.margin, abs=1e-6)


def test_drop_without_a_replacement_is_an_error() -> None:
    buffer = JitterBuffer()
    with pytest.raises(RuntimeError):
        buffer.drop(0.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_delay": 0.2, "max_delay": 0.1},
        {"min_delay": -0.01},
        {"max_delay": 10},
        {"quantile": 1.0},
        {"history": 5},
        {"margin": -1},
        {"frame": 0},
        {"shrink_patience": -1},
    ],
)
def test_bad_config_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="jitter buffer"):
        JitterConfig(**kwargs)


def test_target_rises_fast_and_falls_slowly() -> None:
    def transit(i: int, rng: random.Random) -> float:
        return 0.010 + (rng.uniform(0, 0.040) if 500 <= i < 1000 else 0.0)

    sent = stream(2000, transit, seed=9)
    buffer = JitterBuffer()
    targets: dict[float, float] = {}
    checkpoints = [9.9, 10.5, 11.0, 19.9, 21.0, 22.0, 26.0]
    run = play(sent)  # the whole run, for the end state
    for s in sorted((s for s in sent if s.arrival is not None), key=lambda s: s.arrival or 0):
        assert s.arrival is not None
        while buffer.next_slot is not None and buffer.next_slot <= s.arrival:
            slot = buffer.pop(buffer.next_slot)
            if slot is not None and slot.shrink is not Shrink.NO:
                buffer.drop(buffer.next_slot or s.arrival)
        buffer.insert(s.seq, s.ts, s.payload, s.arrival)
        while checkpoints and s.arrival >= 10 + checkpoints[0]:
            targets[checkpoints.pop(0)] = buffer.target
    margin = buffer.config.margin
    assert targets[9.9] == pytest.approx(margin)
    assert targets[10.5] >= 0.030  # half a second of 40 ms jitter: the target is up
    assert targets[11.0] >= 0.035
    assert targets[21.0] >= 0.030  # a second of calm: still where the jitter left it
    assert targets[22.0] < targets[21.0]  # then it falls, at most fall_rate per second
    assert targets[21.0] - targets[22.0] <= buffer.config.fall_rate + 1e-9
    assert targets[26.0] == pytest.approx(margin)
    assert run.buffer.target == pytest.approx(margin)


def test_late_packets_are_jitter_not_loss_for_the_fec_horizon() -> None:
    # Every 100th packet comes 100 ms late (after its slot): concealed each time, but
    # they all arrive, so the link is not lossy and the target keeps no FEC frame.
    sent = stream(1000, lambda i, rng: 0.110 if i % 100 == 50 else 0.010, fec=True)
    run = play(sent, fec=True)
    stats = run.buffer.stats
    assert stats.late == 10 and stats.concealed == 10
    assert stats.fec == 0
    assert max(run.waits(since=12)) == pytest.approx(run.buffer.config.margin, abs=1e-6)


def test_a_packet_just_after_its_concealed_slot_is_late_not_a_new_stream() -> None:
    # Packet 200 comes 5 ms after its slot (the newest packet then being 199): it covers
    # a frame already concealed, so it is late; playing it would put the buffer a frame
    # behind (and make it drop one).
    def transit(i: int, rng: random.Random) -> float:
        return 0.010 + (0.008 if i == 200 else 0.0)

    run = play(stream(400, transit))
    stats = run.buffer.stats
    assert (stats.late, stats.concealed, stats.dropped) == (1, 1, 0), stats
