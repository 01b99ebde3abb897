"""Narrow, version-pinned replacements of aiortc's per-frame audio work.

A worker serves many calls on one core, so what aiortc does per 20 ms frame,
per call, decides how many calls fit. Opus encoding and decoding (libopus, in
C) is the work that must be done; aiortc 1.16 adds several times that much on
top. The patches below remove that overhead and nothing else: what goes on
the wire, and every frame a track or a backend sees, is the same.

What each patch replaces, and why:

``audio_level``
    ``aiortc.rtp.compute_audio_level_dbov`` (the ssrc-audio-level value of
    every sent frame) iterates over every sample of the frame's plane in
    Python. The replacement computes the same value with the loop in C:
    ``math.hypot`` over the same samples gives the root of the same sum of
    squares, correct to an ulp, and whenever that could change the rounded
    level (the level within 1e-6 dB of a half) the exact integer sum is used
    instead. And the sender no longer computes it at all when the remote did
    not negotiate the extension: the value would be thrown away.

``opus_no_resample``
    ``OpusEncoder.encode`` passes every frame through an ``AudioResampler``
    (a libav filter graph), also when the frame already is what the encoder
    takes: 48 kHz stereo s16, 960 samples, the format of everything a backend
    plays (docs/backends.md). Such frames now go straight to the encoder
    (same packets, same timestamps: tests/unit/test_aiortc_fast.py compares
    them); any other frame, or any frame after one that needed the
    resampler, takes aiortc's path.

``inline_encode``
    ``RTCRtpSender._next_encoded_frame`` hands every audio frame to a thread
    pool (``run_in_executor``) to be encoded. A worker is pinned to one core,
    so the thread buys no parallelism; it costs a future, a queue hand-off,
    two thread switches and a wake-up of the event loop per frame, and it
    makes send timing depend on the GIL. Audio frames are now encoded inline
    (about 0.15 ms); video still goes to the executor.

``inline_decode``
    ``RTCRtpReceiver.receive`` starts one decoder *thread per call*, fed
    through a ``queue.Queue``; each decoded frame comes back with
    ``run_coroutine_threadsafe`` (a coroutine, a task, a concurrent future and
    a wake-up of the loop). For audio the frame is now decoded inline when the
    jitter buffer releases it (about 0.05 ms) and put on the track's queue
    directly. Errors, end of stream (RTCP BYE, disconnect, stop) and the
    decoder-error flag behave as before. Video keeps its thread.

Guards: every patch is checked against the pinned aiortc release
(``PINNED``) and against a SHA-256 of the source of the function it replaces
(``_ORIGINALS``). If either differs, that patch is not applied, a warning is
logged, and aiortc runs as released (slower, never wrong);
tests/unit/test_aiortc_fast.py fails loudly so the patch gets ported.

``SPLITRELAY_AIORTC_FAST=0`` in the environment turns every patch here off
(aiortc as released; the playback pacing of transceiver/session.py is not
affected): that is the "stock-aiortc" variant of the benchmark
(transceiver/bench.py, whose "before" variant also restores the old pacing,
from transceiver/bench_server.py). Never set it in production.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import math
import operator
import os
from array import array
from collections.abc import Callable
from importlib import metadata
from typing import Any

log = logging.getLogger("splitrelay.transceiver.aiortc_fast")

ENV = "SPLITRELAY_AIORTC_FAST"
PINNED: dict[str, str] = {"aiortc": "1.16.0", "av": "18.1.0"}

#: SHA-256 of the source of each replaced function, as released in the pinned aiortc.
_ORIGINALS: dict[str, tuple[str, str]] = {
    "audio_level": (
        "aiortc.rtp:compute_audio_level_dbov",
        "d65138ae99e84548ad554b29d3e8baabf21abb366694c4eeb347c1067505acc9",
    ),
    "opus_no_resample": (
        "aiortc.codecs.opus:OpusEncoder.encode",
        "b70acba9312696b8c3147c9236b9e70de5761e650c7f878d075096d6e560af58",
    ),
    "inline_encode": (
        "aiortc.rtcrtpsender:RTCRtpSender._next_encoded_frame",
        "89dd9fa4fb33741cc60857f1cebae31c9a88b72da9a42f91abc6090f40cb8253",
    ),
    "inline_decode": (
        "aiortc.rtcrtpreceiver:RTCRtpReceiver.receive",
        "d6d8d8d7a0bf4e95f3fb7cb78cf275d0a5f50c4912e0cb8498272008779916ef",
    ),
}

_applied: dict[str, bool] = {}
_problems: dict[str, str] = {}
#: The functions replaced, kept as they were (tests compare against them).
_saved: dict[str, Any] = {}


def enabled() -> bool:
    """Whether the fast paths are wanted (``SPLITRELAY_AIORTC_FAST`` is not 0)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def applied() -> bool:
    """Whether every patch is in place in this process."""
    return bool(_applied) and all(_applied.values()) and len(_applied) == len(_ORIGINALS)


def status() -> dict[str, bool]:
    """Patch name -> applied, for logs and tests."""
    return {name: _applied.get(name, False) for name in _ORIGINALS}


def problems() -> dict[str, str]:
    """Patch name -> why it was not applied (empty when all are in place or not wanted)."""
    return dict(_problems)


def _resolve(target: str) -> Any:
    module_name, _, qualname = target.partition(":")
    obj: Any = __import__(module_name, fromlist=["_"])
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def original(name: str) -> Any:
    """The aiortc function patch ``name`` replaces (or would replace), as released."""
    if name in _saved:
        return _saved[name]
    return _resolve(_ORIGINALS[name][0])


def source_hash(func: Any) -> str:
    """SHA-256 of a function's source text (what the guards compare)."""
    return hashlib.sha256(inspect.getsource(func).encode()).hexdigest()


def _versions_match() -> str | None:
    for dist, want in PINNED.items():
        try:
            have = metadata.version(dist)
        except metadata.PackageNotFoundError:
            return f"{dist} is not installed"
        if have != want:
            return f"{dist} {have} is installed, the patches are for {want}"
    return None


def apply() -> dict[str, bool]:
    """Install every patch whose guards pass (idempotent); return status().

    Does nothing when not enabled(). A patch whose original changed is skipped
    with a warning: aiortc then runs as released for that part.
    """
    if _applied or not enabled():
        return status()
    mismatch = _versions_match()
    installers: dict[str, Callable[[], None]] = {
        "audio_level": _patch_audio_level,
        "opus_no_resample": _patch_opus_encoder,
        "inline_encode": _patch_sender,
        "inline_decode": _patch_receiver,
    }
    for name, install in installers.items():
        target, digest = _ORIGINALS[name]
        reason = mismatch
        if reason is None:
            try:
                func = _resolve(target)
                have = source_hash(func)
            except (ImportError, AttributeError, OSError, TypeError) as exc:
                reason = f"cannot read {target}: {exc}"
            else:
                if have != digest:
                    reason = f"{target} is not the function this patch replaces"
                else:
                    _saved[name] = func
        if reason is not None:
            _problems[name] = reason
            _applied[name] = False
            log.warning("aiortc fast path %s not applied: %s", name, reason)
            continue
        install()
        _applied[name] = True
    return status()


# ---------------------------------------------------------------------- audio level

_MAX_SAMPLE_VALUE = 32767
_MIN_AUDIO_LEVEL = -127
_MAX_AUDIO_LEVEL = 0


def compute_audio_level_dbov(frame: Any) -> int:
    """RFC 6465 level of a frame, exactly as aiortc computes it, with the loop in C.

    aiortc sums the squares of every 16-bit sample in the plane (whatever its
    channel count, padding included) and divides by ``frame.samples``; so does
    this. ``math.hypot`` gives the root of that sum correct to within an ulp;
    only a level that lands within 1e-6 dB of a rounding boundary could round
    differently, and for those the exact integer sum decides.
    """
    samples = array("h", bytes(frame.planes[0]))
    scale = frame.samples * _MAX_SAMPLE_VALUE * _MAX_SAMPLE_VALUE
    root = math.hypot(*samples)
    if root <= 0:
        return _MIN_AUDIO_LEVEL
    db = 20 * math.log10(math.sqrt(root * root / scale))
    if abs(db - math.floor(db) - 0.5) < 1e-6:
        return _level_from_sum(sum(map(operator.mul, samples, samples)), scale)
    return round(min(max(db, _MIN_AUDIO_LEVEL), _MAX_AUDIO_LEVEL))


def _level_from_sum(total: int, scale: int) -> int:
    """aiortc's arithmetic from the exact sum of squares (its float sum is exact too)."""
    rms = math.sqrt(total / scale)
    if rms > 0:
        db = 20 * math.log10(rms)
        db = max(db, _MIN_AUDIO_LEVEL)
        db = min(db, _MAX_AUDIO_LEVEL)
    else:
        db = _MIN_AUDIO_LEVEL
    return round(db)


def _patch_audio_level() -> None:
    from aiortc import rtp

    rtp.compute_audio_level_dbov = compute_audio_level_dbov


# ---------------------------------------------------------------------- opus encoder


def _patch_opus_encoder() -> None:
    from aiortc.codecs import opus

    encoder_cls = opus.OpusEncoder
    stock_encode = encoder_cls.encode

    def encode(self: Any, frame: Any, force_keyframe: bool = False) -> tuple[list[bytes], Any]:
        """aiortc's OpusEncoder.encode, without the resampler for frames that need none."""
        if (
            getattr(self, "_splitrelay_resampled", False)
            or frame.pts is None
            or frame.samples != opus.SAMPLES_PER_FRAME
            or frame.sample_rate != opus.SAMPLE_RATE
            or frame.format.name != "s16"
            or frame.layout.name != "stereo"
        ):
            self._splitrelay_resampled = True
            return stock_encode(self, frame, force_keyframe)
        packets = self.codec.encode(frame)
        if self.first_packet_pts is None and packets:
            self.first_packet_pts = packets[0].pts
        if packets:
            return [bytes(p) for p in packets], packets[0].pts - self.first_packet_pts
        return [], None

    encoder_cls.encode = encode


# ---------------------------------------------------------------------- sender


def _patch_sender() -> None:
    from aiortc import rtcrtpsender
    from aiortc.codecs import get_encoder
    from av import AudioFrame
    from av.frame import Frame

    sender_cls = rtcrtpsender.RTCRtpSender
    encoded_frame = rtcrtpsender.RTCEncodedFrame

    async def _next_encoded_frame(self: Any, codec: Any) -> Any:
        """aiortc's _next_encoded_frame, with audio encoded inline (see the module doc)."""
        data = await self._RTCRtpSender__track.recv()
        if not self._enabled:
            return None
        if not isinstance(data, AudioFrame):
            return await _video_or_packet(self, codec, data)
        if self._RTCRtpSender__encoder is None:
            self._RTCRtpSender__encoder = get_encoder(codec)
        audio_level = None
        ids = self._RTCRtpSender__rtp_header_extensions_map._HeaderExtensionsMap__ids
        if ids.audio_level is not None:
            audio_level = compute_audio_level_dbov(data)
        force_keyframe = self._RTCRtpSender__force_keyframe
        self._RTCRtpSender__force_keyframe = False
        payloads, timestamp = self._RTCRtpSender__encoder.encode(data, force_keyframe)
        if not payloads:
            return None
        return encoded_frame(payloads, timestamp, audio_level)

    async def _video_or_packet(self: Any, codec: Any, data: Any) -> Any:
        """Everything but audio frames, exactly as aiortc does it (the frame is already read)."""
        if self._RTCRtpSender__encoder is None:
            self._RTCRtpSender__encoder = get_encoder(codec)
        if isinstance(data, Frame):
            force_keyframe = self._RTCRtpSender__force_keyframe
            self._RTCRtpSender__force_keyframe = False
            payloads, timestamp = await self._RTCRtpSender__loop.run_in_executor(
                None, self._RTCRtpSender__encoder.encode, data, force_keyframe
            )
        else:
            payloads, timestamp = self._RTCRtpSender__encoder.pack(data)
        if not payloads:
            return None
        return encoded_frame(payloads, timestamp, None)

    sender_cls._next_encoded_frame = _next_encoded_frame


# ---------------------------------------------------------------------- receiver


class InlineDecoder:
    """Stands in for the receiver's decoder thread AND its input queue, decoding on put().

    aiortc's receiver puts ``(codec, encoded_frame)`` on its decoder queue, or
    None to stop, and checks that the thread is set before feeding it; this
    object is both, so the receiver's own code runs unchanged around it. It
    does what ``aiortc.rtcrtpreceiver.decoder_worker`` does, in the caller's
    thread: one decoder per codec, a failed decode is logged and flags the
    error event, every decoded frame goes to the track's queue, and None ends
    the track (after which nothing more is decoded).
    """

    def __init__(self, output: asyncio.Queue[Any], decode_error: Any) -> None:
        self._output = output
        self._decode_error = decode_error
        self._codec_name: str | None = None
        self._decoder: Any = None
        self._stopped = False

    def put(self, task: Any) -> None:
        if self._stopped:
            return
        if task is None:
            self._stopped = True
            self._decoder = None
            self._output.put_nowait(None)
            return
        from aiortc.codecs import get_decoder
        from av import FFmpegError

        codec, encoded_frame = task
        if codec.name != self._codec_name:
            self._decoder = get_decoder(codec)
            self._codec_name = codec.name
        try:
            frames = self._decoder.decode(encoded_frame)
        except FFmpegError as exc:
            logging.getLogger("aiortc.rtcrtpreceiver").warning(
                "RTCRtpReceiver(%s) failed to decode %s frame: %s",
                codec.mimeType.split("/")[0],
                codec.name,
                exc,
            )
            self._decode_error.set()
            return
        for frame in frames:
            self._output.put_nowait(frame)

    # -- what the receiver calls on its "thread"

    def start(self) -> None:
        """Nothing to start: decoding happens in put()."""

    def join(self, timeout: float | None = None) -> None:
        """Nothing to wait for: put(None) already ended the track."""

    def __bool__(self) -> bool:
        return not self._stopped


def _patch_receiver() -> None:
    from aiortc import rtcrtpreceiver

    receiver_cls = rtcrtpreceiver.RTCRtpReceiver
    stock_receive = receiver_cls.receive

    async def receive(self: Any, parameters: Any) -> None:
        """aiortc's receive(), with an InlineDecoder instead of a thread for audio."""
        if self._RTCRtpReceiver__kind != "audio":
            await stock_receive(self, parameters)
            return
        if not self._RTCRtpReceiver__started:
            for codec in parameters.codecs:
                self._RTCRtpReceiver__codecs[codec.payloadType] = codec
            for encoding in parameters.encodings:
                if encoding.rtx:
                    self._RTCRtpReceiver__rtx_ssrc[encoding.rtx.ssrc] = encoding.ssrc
            decoder = InlineDecoder(self._track._queue, self._RTCRtpReceiver__decoder_error)
            self._RTCRtpReceiver__decoder_queue = decoder
            self._RTCRtpReceiver__decoder_thread = decoder
            self._RTCRtpReceiver__transport._register_rtp_receiver(self, parameters)
            self._RTCRtpReceiver__rtcp_task = asyncio.ensure_future(self._run_rtcp())
            self._RTCRtpReceiver__started = True

    receiver_cls.receive = receive
