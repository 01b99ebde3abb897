"""PlaybackTrack pacing: real time on average, never lasting delay from a late frame.

The track plays a backend's audio_out one 20 ms frame per 20 ms. Audio that
arrives in real time (an echo, a streaming service) must go out as it arrives
even after a hiccup; a backend that queues a long answer at once must be
played at speaking speed; one that pauses must not be rushed afterwards.
Timings use the event loop's clock with tolerances for a busy machine.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

from transceiver import backends
from transceiver.session import PLAYBACK_BURST, PlaybackTrack, SessionCounters

FRAME = backends.FRAME_SECONDS
PCM = bytes(backends.frame_bytes(2))
BURST_FRAMES = round(PLAYBACK_BURST / FRAME)


def run(body: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(body(), 20))


async def _collect(track: PlaybackTrack, count: int, out: list[float]) -> None:
    loop = asyncio.get_running_loop()
    for _ in range(count):
        frame = await track.recv()
        assert frame.samples == backends.FRAME_SAMPLES
        out.append(loop.time())


def test_a_late_frame_does_not_delay_the_frames_after_it() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        track = PlaybackTrack(queue, 2, SessionCounters())
        sent: list[float] = []
        arrived: list[float] = []
        reader = asyncio.ensure_future(_collect(track, 30, sent))
        start = loop.time()
        for k in range(30):
            due = start + k * FRAME + (0.05 if k == 10 else 0.0)  # frame 10 is 50 ms late
            await asyncio.sleep(max(0.0, due - loop.time()))
            arrived.append(loop.time())
            queue.put_nowait(PCM)
        await reader
        waits = [s - a for s, a in zip(sent, arrived, strict=True)]
        # Every frame, the late one and those behind it included, leaves as it arrives.
        assert max(waits[12:]) < 0.010, waits

    run(body)


def test_a_long_answer_queued_at_once_is_played_at_speaking_speed() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        for _ in range(20):
            queue.put_nowait(PCM)
        track = PlaybackTrack(queue, 2, SessionCounters())
        sent: list[float] = []
        start = loop.time()
        await _collect(track, 20, sent)
        early = [t - start for t in sent]
        assert sum(1 for t in early if t < FRAME / 2) <= BURST_FRAMES + 1  # at most the burst
        paced = 20 - 1 - BURST_FRAMES
        assert early[-1] >= paced * FRAME - 0.005, early
        assert early[-1] < paced * FRAME + 0.1, early

    run(body)


def test_a_pause_is_not_made_up_for_by_rushing() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        track = PlaybackTrack(queue, 1, SessionCounters())
        sent: list[float] = []
        queue.put_nowait(bytes(backends.frame_bytes(1)))
        await _collect(track, 1, sent)
        await asyncio.sleep(0.3)  # the backend pauses, then queues 10 frames at once
        resume = loop.time()
        for _ in range(10):
            queue.put_nowait(bytes(backends.frame_bytes(1)))
        await _collect(track, 10, sent)
        after = [t - resume for t in sent[1:]]
        assert sum(1 for t in after if t < FRAME / 2) <= BURST_FRAMES + 1, after
        assert after[-1] >= (10 - 1 - BURST_FRAMES) * FRAME - 0.005, after

    run(body)


def test_wrong_size_frames_are_skipped_and_counted() -> None:
    async def body() -> None:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        counters = SessionCounters()
        track = PlaybackTrack(queue, 2, counters)
        queue.put_nowait(b"short")
        queue.put_nowait(PCM)
        frame = await track.recv()
        assert frame.samples == backends.FRAME_SAMPLES and frame.layout.name == "stereo"
        assert counters.backend_errors == 1 and counters.audio_frames_out == 1

    run(body)


def test_timestamps_follow_the_clock_across_a_pause() -> None:
    async def body() -> None:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        track = PlaybackTrack(queue, 2, SessionCounters())
        pts = []
        for _ in range(5):
            queue.put_nowait(PCM)
            pts.append((await track.recv()).pts)
            await asyncio.sleep(FRAME)
        await asyncio.sleep(0.2)  # nothing to play for 200 ms: 10 frames of silence
        for _ in range(5):
            queue.put_nowait(PCM)
            pts.append((await track.recv()).pts)
        steps = [b - a for a, b in itertools.pairwise(pts)]
        samples = backends.FRAME_SAMPLES
        # In real time: a frame each, plus however late the loop woke (a busy machine).
        assert all(samples <= step <= samples + 0.010 * backends.SAMPLE_RATE for step in steps[:4])
        # The pause: 200 ms beyond the 6th frame's own slot, as the clock saw it.
        assert 0.2 * backends.SAMPLE_RATE <= steps[4] - samples <= 0.29 * backends.SAMPLE_RATE
        assert steps[5:] == [samples] * 4  # queued at once: played early, one frame each

    run(body)
