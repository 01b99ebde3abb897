"""The seam between the transceiver and aiortc: narrow, version-pinned replacements.

A worker serves many calls on one core, and a caller hears what the audio
path does to every 20 ms frame. aiortc 1.16 as released gets both wrong for
voice: several times the Opus work in Python overhead per frame, a receive
buffer that holds 80 ms on a clean link and 280 ms after one lost packet, and
an Opus encoder with no FEC and no idea of the path's loss. Each patch below
replaces one piece, guarded (see the end of this docstring).

Overhead (what goes on the wire, and every frame a track or backend sees, is
what aiortc would produce; tests/unit/test_aiortc_fast.py compares):

``audio_level``
    ``aiortc.rtp.compute_audio_level_dbov`` (the ssrc-audio-level value of
    every sent frame) iterates over every sample of the frame's plane in
    Python. The replacement computes the same value with the loop in C:
    ``math.hypot`` over the same samples gives the root of the same sum of
    squares, correct to an ulp, and whenever that could change the rounded
    level (the level within 1e-6 dB of a half) the exact integer sum is used
    instead. And the sender no longer computes it at all when the remote did
    not negotiate the extension: the value would be thrown away.

The audio path (behaviour changes, each for latency or loss):

``voice_encoder``
    ``RTCRtpSender._next_encoded_frame``: audio frames are encoded inline
    (a worker is pinned to one core, so aiortc's thread pool bought no
    parallelism, only a future, two thread switches and a loop wake-up per
    frame), and Opus by transceiver/voice_encoder.py's ``VoiceEncoder``
    (transceiver/opus.py's libopus binding: 40 kbit/s mono voice, in-band FEC,
    expected loss from RTCP) instead of aiortc's PyAV encoder at 96 kbit/s
    stereo without FEC. Frames that are already 48 kHz s16 need no
    resampler. Video is untouched.
``loss_feedback``
    ``RTCRtpSender._handle_rtcp_packet`` runs as released, then hands each
    receiver report's fraction lost for this sender's stream to its
    VoiceEncoder, which sizes its FEC from it.
``adaptive_playout``
    ``RTCRtpReceiver.receive``: for audio, aiortc's JitterBuffer (released
    once 4 later frames arrived), its decoder thread and queue are replaced
    by one transceiver/playout.py ``PlayoutStream``: the adaptive jitter
    buffer of transceiver/jitterbuffer.py on a slot timer, decoding inline
    with packet-loss concealment and FEC recovery. Its configuration and
    counters come from ``playout.register`` (the session and the voice client
    register their receivers). Video keeps aiortc's path.
``dtls_rsa_suites``
    ``RTCCertificate._create_ssl_context`` offers only ECDHE-ECDSA cipher
    suites, so when the transceiver is the DTLS client (it answers with
    ``a=setup:active``, as browsers do) a peer whose certificate is RSA
    (GStreamer's webrtcbin, so most WHIP clients) has no suite in common
    and the handshake fails. The context now also offers the ECDHE-RSA
    suites of the same strength, after the ECDSA ones; aiortc's own
    certificate stays ECDSA, so as a DTLS server it still picks ECDSA.

``opus_fec_sdp``
    aiortc's Opus codec parameters gain ``useinbandfec=1`` (RFC 7587), so
    offers and answers tell the other side this end decodes FEC, which is
    what makes a browser send it. The guard is on
    ``find_common_codecs``, whose use of the local parameters in answers
    this relies on.

Guards: every patch is checked against the pinned aiortc release
(``PINNED``) and against a SHA-256 of the source of the function it replaces
or relies on (``_ORIGINALS``). If either differs, that patch is not applied,
a warning is logged, and aiortc runs as released for that part (slower or
with its own buffer, never broken); tests/unit/test_aiortc_fast.py fails
loudly so the patch gets ported.

``SPLITRELAY_AIORTC_FAST=0`` in the environment turns every patch here off:
aiortc as released, which is what the benchmarks compare against
("stock-aiortc" in transceiver/bench.py, "stock" in transceiver/bench_latency.py).
Never set it in production.
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

#: SHA-256 of the source of each function replaced (or relied on), as in the pinned aiortc.
_ORIGINALS: dict[str, tuple[str, str]] = {
    "audio_level": (
        "aiortc.rtp:compute_audio_level_dbov",
        "d65138ae99e84548ad554b29d3e8baabf21abb366694c4eeb347c1067505acc9",
    ),
    "voice_encoder": (
        "aiortc.rtcrtpsender:RTCRtpSender._next_encoded_frame",
        "89dd9fa4fb33741cc60857f1cebae31c9a88b72da9a42f91abc6090f40cb8253",
    ),
    "loss_feedback": (
        "aiortc.rtcrtpsender:RTCRtpSender._handle_rtcp_packet",
        "a4ee4c7355f8de7a67ae75215d25d2d34931931a33b8ad2ce89ba2d9a24fc704",
    ),
    "adaptive_playout": (
        "aiortc.rtcrtpreceiver:RTCRtpReceiver.receive",
        "d6d8d8d7a0bf4e95f3fb7cb78cf275d0a5f50c4912e0cb8498272008779916ef",
    ),
    "dtls_rsa_suites": (
        "aiortc.rtcdtlstransport:RTCCertificate._create_ssl_context",
        "aac625bdc264f0a6d4aebcb325a45941aaf753b6b4d33934d311e34344abad77",
    ),
    "opus_fec_sdp": (
        "aiortc.rtcpeerconnection:find_common_codecs",
        "2415d76d0aa2c211c2f39989eede0474745a983fe0d476112986d44a14354ed7",
    ),
}

_applied: dict[str, bool] = {}
_problems: dict[str, str] = {}
#: The functions replaced, kept as they were (tests compare against them).
_saved: dict[str, Any] = {}


def enabled() -> bool:
    """Whether the patches are wanted (``SPLITRELAY_AIORTC_FAST`` is not 0)."""
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
        "voice_encoder": _patch_sender,
        "loss_feedback": _patch_loss_feedback,
        "adaptive_playout": _patch_receiver,
        "dtls_rsa_suites": _patch_dtls_ciphers,
        "opus_fec_sdp": _patch_opus_parameters,
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
            log.warning("aiortc patch %s not applied: %s", name, reason)
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


# ---------------------------------------------------------------------- sender


def _patch_sender() -> None:
    from aiortc import rtcrtpsender
    from aiortc.codecs import get_encoder
    from av import AudioFrame
    from av.frame import Frame

    from transceiver.voice_encoder import VoiceEncoder, registered_settings

    sender_cls = rtcrtpsender.RTCRtpSender
    encoded_frame = rtcrtpsender.RTCEncodedFrame

    async def _next_encoded_frame(self: Any, codec: Any) -> Any:
        """aiortc's _next_encoded_frame, audio encoded inline, Opus by VoiceEncoder."""
        data = await self._RTCRtpSender__track.recv()
        if not self._enabled:
            return None
        if not isinstance(data, AudioFrame):
            return await _video_or_packet(self, codec, data)
        if self._RTCRtpSender__encoder is None:
            self._RTCRtpSender__encoder = (
                VoiceEncoder(registered_settings(self))
                if codec.mimeType.lower() == "audio/opus"
                else get_encoder(codec)
            )
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


def _patch_loss_feedback() -> None:
    from aiortc import rtcrtpsender
    from aiortc.rtp import RtcpRrPacket, RtcpSrPacket

    from transceiver.voice_encoder import VoiceEncoder

    sender_cls = rtcrtpsender.RTCRtpSender
    stock = sender_cls._handle_rtcp_packet

    async def _handle_rtcp_packet(self: Any, packet: Any) -> None:
        """aiortc's RTCP handling, then the reported loss to this sender's VoiceEncoder."""
        await stock(self, packet)
        if isinstance(packet, (RtcpRrPacket, RtcpSrPacket)):
            encoder = self._RTCRtpSender__encoder
            if isinstance(encoder, VoiceEncoder):
                for report in packet.reports:
                    if report.ssrc == self._ssrc:
                        encoder.report_loss(report.fraction_lost / 256)

    sender_cls._handle_rtcp_packet = _handle_rtcp_packet


# ---------------------------------------------------------------------- receiver


def _patch_receiver() -> None:
    from aiortc import rtcrtpreceiver

    from transceiver import playout

    receiver_cls = rtcrtpreceiver.RTCRtpReceiver
    stock_receive = receiver_cls.receive

    async def receive(self: Any, parameters: Any) -> None:
        """aiortc's receive(); for audio, a PlayoutStream instead of buffer, thread and queue."""
        if self._RTCRtpReceiver__kind != "audio":
            await stock_receive(self, parameters)
            return
        if not self._RTCRtpReceiver__started:
            for codec in parameters.codecs:
                self._RTCRtpReceiver__codecs[codec.payloadType] = codec
            for encoding in parameters.encodings:
                if encoding.rtx:
                    self._RTCRtpReceiver__rtx_ssrc[encoding.rtx.ssrc] = encoding.ssrc
            how = playout.registration(self)
            opus_types = {
                c.payloadType for c in parameters.codecs if c.mimeType.lower() == "audio/opus"
            }
            stream = playout.PlayoutStream(
                self._track._queue, how.config, how.counters, opus_types, how.channels
            )
            self._RTCRtpReceiver__jitter_buffer = stream
            self._RTCRtpReceiver__decoder_queue = stream
            self._RTCRtpReceiver__decoder_thread = stream
            self._RTCRtpReceiver__transport._register_rtp_receiver(self, parameters)
            self._RTCRtpReceiver__rtcp_task = asyncio.ensure_future(self._run_rtcp())
            self._RTCRtpReceiver__started = True

    receiver_cls.receive = receive


# ---------------------------------------------------------------------- DTLS

#: aiortc's suites first (what it negotiates with every browser today), then the same
#: with RSA authentication, for peers whose certificate is RSA.
DTLS_CIPHERS = b":".join(
    (
        b"ECDHE-ECDSA-AES128-GCM-SHA256",
        b"ECDHE-ECDSA-CHACHA20-POLY1305",
        b"ECDHE-ECDSA-AES128-SHA",
        b"ECDHE-ECDSA-AES256-SHA",
        b"ECDHE-RSA-AES128-GCM-SHA256",
        b"ECDHE-RSA-CHACHA20-POLY1305",
        b"ECDHE-RSA-AES128-SHA",
        b"ECDHE-RSA-AES256-SHA",
    )
)


def _patch_dtls_ciphers() -> None:
    from aiortc import rtcdtlstransport

    certificate_cls = rtcdtlstransport.RTCCertificate
    stock = certificate_cls._create_ssl_context

    def _create_ssl_context(self: Any, srtp_profiles: Any) -> Any:
        """aiortc's DTLS context, also offering the ECDHE-RSA suites."""
        ctx = stock(self, srtp_profiles)
        ctx.set_cipher_list(DTLS_CIPHERS)
        return ctx

    certificate_cls._create_ssl_context = _create_ssl_context


# ---------------------------------------------------------------------- SDP


def _patch_opus_parameters() -> None:
    from aiortc import codecs

    for codec in codecs.CODECS["audio"]:
        if codec.mimeType.lower() == "audio/opus":
            codec.parameters["useinbandfec"] = 1
