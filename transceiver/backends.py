"""The interface between a call session and the service that does the talking.

A session (transceiver/session.py) owns everything WebRTC: ICE, DTLS, SRTP,
Opus. A backend sees only what a voice service cares about: PCM frames and
JSON events. That keeps backends small and stateless enough to scale like
ordinary services, and lets the transport change without touching them.
docs/backends.md is the user-facing description of this contract.

Audio, both ways, is 16-bit signed little-endian PCM at 48 kHz in 20 ms
frames (960 samples per channel), the format Opus decodes to and encodes
from, so the session does no resampling and no per-frame conversion:

* in: ``on_audio(pcm, 48000, 2)``, interleaved stereo, as decoded;
* out: ``audio_out``, a queue of frames with ``output_channels`` channels
  (1 or 2). The session plays them back paced in real time, one frame per
  20 ms; a backend may queue faster than real time and the queue's bound
  pushes back. When the queue is empty nothing is sent (no silence filler).

Events are JSON objects with a string ``type``, as in OpenAI's Realtime API.
Client events reach ``on_event``; a backend sends events with
``SessionInfo.send_event``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

SAMPLE_RATE = 48000
FRAME_SAMPLES = 960  # 20 ms at 48 kHz
FRAME_SECONDS = FRAME_SAMPLES / SAMPLE_RATE
INPUT_CHANNELS = 2
SAMPLE_BYTES = 2
#: Default bound of audio_out: 10 frames = 200 ms of audio queued at most.
AUDIO_OUT_FRAMES = 10
#: The echo's bound: 1 frame. What it echoes arrives on the jitter buffer's clock, one
#: frame per 20 ms, as fast as the playback pacing takes it; a second frame waiting is
#: delay that nothing would ever drain (a standing queue), so the older one is dropped.
ECHO_FRAMES = 1

Event = dict[str, Any]


def frame_bytes(channels: int) -> int:
    """Size of one 20 ms frame of s16le 48 kHz PCM with ``channels`` channels."""
    return FRAME_SAMPLES * channels * SAMPLE_BYTES


class BackendError(Exception):
    """A backend could not start or failed; the message is one line for logs and the client."""


@dataclass(frozen=True)
class SessionInfo:
    """What a backend knows about the call it serves.

    ``send_event`` queues one JSON event to the client on the ``oai-events``
    data channel; it never blocks. Events sent before the channel opens are
    held (a few dozen at most) and sent when it does; a call without a data
    channel drops them.
    """

    call_id: str
    transceiver_id: int
    send_event: Callable[[Event], None]


@runtime_checkable
class Backend(Protocol):
    """One backend instance serves one call; the session calls these in order.

    ``start`` once, before the SDP answer is returned (a backend that cannot
    start fails the call setup); then ``on_audio`` for every received frame
    and ``on_event`` for every client event, never concurrently with each
    other; ``close`` once at the end, whatever happened. An exception from
    ``on_audio`` or ``on_event`` is counted as a backend error and reported to
    the client as an ``error`` event; the call goes on.
    """

    name: str
    output_channels: int
    audio_out: asyncio.Queue[bytes]

    async def start(self, info: SessionInfo) -> None: ...

    async def on_audio(self, pcm: bytes, sample_rate: int, channels: int) -> None: ...

    async def on_event(self, event: Event) -> None: ...

    async def close(self) -> None: ...


class SpeechDetector:
    """A cheap level-based voice activity detector, for speech_started/speech_stopped events.

    Per frame it reads the peak of every 16th sample (one channel), which is
    two C-level passes over 120 values: voice onsets last far longer than the
    gaps this skips, and the hangover bridges pauses between words.
    """

    def __init__(self, threshold: int = 1000, hangover: float = 0.5) -> None:
        self.threshold = threshold
        self._hangover_frames = max(1, round(hangover / FRAME_SECONDS))
        self._quiet = 0
        self.speaking = False
        self.frames = 0

    def feed(self, pcm: bytes) -> str | None:
        """Return "started" or "stopped" on a change, else None."""
        self.frames += 1
        samples = memoryview(pcm).cast("h")[::16]
        loud = len(samples) > 0 and max(max(samples), -min(samples)) >= self.threshold
        if loud:
            self._quiet = 0
            if not self.speaking:
                self.speaking = True
                return "started"
        elif self.speaking:
            self._quiet += 1
            if self._quiet >= self._hangover_frames:
                self.speaking = False
                return "stopped"
        return None

    @property
    def audio_ms(self) -> int:
        """Milliseconds of audio fed so far (the Realtime API's audio_start_ms clock)."""
        return int(self.frames * FRAME_SECONDS * 1000)


class EchoBackend:
    """Plays the caller's audio back, unchanged: the end-to-end latency probe.

    Audio: every received frame is queued for playback at once; when the
    queue is full (ECHO_FRAMES, one frame) the older frame is dropped, so
    neither a stall nor a jitter buffer shedding its excess (it hands frames
    over early, which the pacing holds once they are 60 ms ahead) turns into
    permanent delay: the echo arrives in real time, as fast as it is played,
    so frames that piled up would otherwise stay queued, as delay, for the
    rest of the call. Events: ``input_audio_buffer.speech_started`` /
    ``speech_stopped`` from a level detector; ``session.update`` is answered
    with ``session.updated``; any other client event comes back as
    ``{"type": "echo", "event": <the event>}`` (the data channel round trip).
    """

    name = "echo"
    output_channels = INPUT_CHANNELS

    def __init__(self, max_frames: int = ECHO_FRAMES) -> None:
        self.audio_out: asyncio.Queue[bytes] = asyncio.Queue(maxsize=max_frames)
        self._info: SessionInfo | None = None
        self._vad = SpeechDetector()
        self._items = itertools.count(1)
        self._item_id = ""

    async def start(self, info: SessionInfo) -> None:
        self._info = info

    async def on_audio(self, pcm: bytes, sample_rate: int, channels: int) -> None:
        if sample_rate != SAMPLE_RATE or channels != self.output_channels:
            raise BackendError(f"echo needs {SAMPLE_RATE} Hz x{self.output_channels} audio")
        queue = self.audio_out
        if queue.full():
            queue.get_nowait()
        queue.put_nowait(pcm)
        change = self._vad.feed(pcm)
        if change is not None and self._info is not None:
            if change == "started":
                self._item_id = f"item_{next(self._items)}"
                self._info.send_event(
                    {
                        "type": "input_audio_buffer.speech_started",
                        "audio_start_ms": self._vad.audio_ms,
                        "item_id": self._item_id,
                    }
                )
            else:
                self._info.send_event(
                    {
                        "type": "input_audio_buffer.speech_stopped",
                        "audio_end_ms": self._vad.audio_ms,
                        "item_id": self._item_id,
                    }
                )

    async def on_event(self, event: Event) -> None:
        if self._info is None:
            return
        if event.get("type") == "session.update":
            session = event.get("session")
            self._info.send_event(
                {"type": "session.updated", "session": session if isinstance(session, dict) else {}}
            )
        else:
            self._info.send_event({"type": "echo", "event": event})

    async def close(self) -> None:
        self._info = None
        while not self.audio_out.empty():
            self.audio_out.get_nowait()


#: Builds one backend for one call from WorkerConfig.backend_options (keyword arguments).
BackendFactory = Callable[..., Backend]
_REGISTRY: dict[str, BackendFactory] = {"echo": EchoBackend}


def register_backend(name: str, factory: BackendFactory) -> None:
    """Make ``name`` selectable (WorkerConfig.backend); the ws backend registers here."""
    if not name or not name.isidentifier():
        raise ValueError(f"backend name {name!r} is not an identifier")
    _REGISTRY[name] = factory


def backend_names() -> list[str]:
    return sorted(_REGISTRY)


def create_backend(name: str, **options: Any) -> Backend:
    """A new backend instance for one call; ValueError names the known ones."""
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(backend_names())}")
    return factory(**options)
