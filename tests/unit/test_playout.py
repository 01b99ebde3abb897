"""PlayoutStream: the jitter buffer on the event loop, decoding with libopus into the track.

Real Opus packets (transceiver/opus.py, FEC on), real RTP packet objects
(aiortc's RtpPacket), a real asyncio loop whose timers deliver them on a
schedule; the frames are read from the queue the way aiortc's track reads
them. The buffer's policy has its own tests (test_jitterbuffer.py); these
check that its decisions are carried out: what comes out, how many, decoded
how, and counted where.
"""

from __future__ import annotations

import asyncio
from array import array
from collections.abc import Callable
from typing import Any

from aiortc.rtp import RtpPacket

from tests.audio import voiced_pcm
from transceiver import opus
from transceiver.jitterbuffer import JitterConfig
from transceiver.playout import PlayoutCounters, PlayoutStream, is_quiet

FRAME = 0.020
PT = 111


def packets(count: int, loud: Callable[[int], bool] = lambda k: True) -> list[RtpPacket]:
    encoder = opus.Encoder(opus.VoiceSettings(min_expected_loss=10), channels=1)
    out = []
    for k in range(count):
        payload = encoder.encode(voiced_pcm(k, 5000 if loud(k) else 100))
        out.append(
            RtpPacket(
                payload_type=PT,
                sequence_number=(4000 + k) % 65536,
                timestamp=(123_456 + 960 * k) % (1 << 32),
                payload=payload,
            )
        )
    encoder.close()
    return out


def play(
    schedule: list[tuple[float, RtpPacket]],
    *,
    config: JitterConfig | None = None,
    payload_types: set[int] | None = None,
    tail: float = 0.3,
) -> tuple[list[Any], PlayoutCounters, PlayoutStream]:
    """Deliver each packet at its offset (seconds) and collect the frames until the end."""

    async def body() -> tuple[list[Any], PlayoutCounters, PlayoutStream]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        counters = PlayoutCounters()
        stream = PlayoutStream(
            queue, config or JitterConfig(), counters, payload_types or {PT}, channels=2
        )
        start = loop.time() + 0.05
        for offset, packet in schedule:
            loop.call_at(start + offset, stream.add, packet)
        end = start + max(offset for offset, _ in schedule) + tail
        frames: list[Any] = []
        while loop.time() < end:
            try:
                frames.append(await asyncio.wait_for(queue.get(), end - loop.time()))
            except TimeoutError:
                break
        stream.put(None)
        while not queue.empty():
            frames.append(queue.get_nowait())
        return frames, counters, stream

    return asyncio.run(asyncio.wait_for(body(), 60))


def test_steady_packets_come_out_one_frame_each_decoded_to_stereo() -> None:
    sent = packets(50)
    frames, counters, stream = play([(k * FRAME, p) for k, p in enumerate(sent)])
    assert frames[-1] is None  # put(None) ended the track
    audio = frames[:-1]
    snapshot = counters.snapshot()
    # Every packet played; the end of the stream adds concealment until put(None).
    assert snapshot["played"] == 50
    assert len(audio) == 50 + snapshot["concealed"]
    assert all(f.samples == 960 and f.layout.name == "stereo" for f in audio)
    assert all(f.sample_rate == 48000 for f in audio)
    assert [f.pts for f in audio] == [960 * k for k in range(len(audio))]
    loud = [max(array("h", bytes(f.planes[0]))) for f in audio[5:45]]
    assert sum(peak > 1000 for peak in loud) >= 25, "the voice did not come through the decoder"
    # One frame at most waits in the buffer, on a loaded machine too.
    delays = snapshot["delay_seconds"]
    assert delays["count"] == 50 and delays["sum"] / 50 < FRAME
    assert snapshot["streams"] == 0  # stopped: folded into the totals
    assert not stream


def test_a_lost_packet_on_a_lossy_link_is_recovered_from_fec() -> None:
    sent = packets(110)
    lost = {21, 38, 54, 88}  # 88: where the signal's syllable envelope peaks
    schedule = [(k * FRAME, p) for k, p in enumerate(sent) if k not in lost]
    frames, counters, _ = play(schedule)
    snapshot = counters.snapshot()
    # The first three losses are concealed (the buffer held nothing for them) and show
    # a lossy link: the buffer waits a frame longer, so the fourth lost frame is rebuilt
    # from the FEC in the packet after it.
    assert snapshot["fec"] == 1
    assert snapshot["played"] == 106
    audio = frames[:-1]
    rebuilt = audio[88]  # the frame in slot 88: a slot per frame, lost or not
    assert max(array("h", bytes(rebuilt.planes[0]))) > 1000  # voice, not silence


def test_packets_of_another_payload_type_are_counted_not_played() -> None:
    sent = packets(20)
    for packet in sent[5:10]:
        packet.payload_type = 0  # PCMU
    _, counters, _ = play([(k * FRAME, p) for k, p in enumerate(sent)])
    snapshot = counters.snapshot()
    assert snapshot["decode_errors"] == 5
    assert snapshot["played"] == 15


def test_a_corrupt_packet_is_concealed_and_counted() -> None:
    sent = packets(20)
    sent[7].payload = b"\xff" * 3  # a code-3 TOC promising frames that are not there
    frames, counters, _ = play([(k * FRAME, p) for k, p in enumerate(sent)])
    snapshot = counters.snapshot()
    assert snapshot["decode_errors"] == 1
    assert len([f for f in frames if f is not None]) >= 20


def test_a_backlog_is_shed_on_quiet_frames() -> None:
    # A stall: packets 20..34 held back 300 ms, then delivered at once. Every frame
    # after the first 20 alternates loud and quiet; the buffer drops quiet ones.
    sent = packets(120, loud=lambda k: k < 20 or k % 2 == 0)

    def when(k: int) -> float:
        return max(k * FRAME, 35 * FRAME) if 20 <= k < 35 else k * FRAME

    _, counters, stream = play([(when(k), p) for k, p in enumerate(sent)])
    snapshot = counters.snapshot()
    assert snapshot["dropped"] >= 1
    assert stream.stats.dropped == snapshot["dropped"]
    # Frames that were dropped were quiet ones: every loud packet after the stall
    # that was not late was played.
    late = snapshot["late"] + snapshot["skipped"]
    assert snapshot["played"] + snapshot["dropped"] + late >= 118


def test_is_quiet_reads_the_peak() -> None:
    assert is_quiet(bytes(3840))
    assert is_quiet(array("h", [900, -900] * 1920).tobytes())
    assert not is_quiet(array("h", [0] * 16 + [-5000] + [0] * 3823).tobytes())
    assert is_quiet(b"")
