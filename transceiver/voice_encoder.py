"""The Opus encoder aiortc's sender uses for audio: voice settings, FEC, loss from RTCP.

aiortc 1.16 encodes Opus through PyAV at 96 kbit/s stereo, with no in-band
FEC and no way to tell the encoder how lossy the path is. ``VoiceEncoder``
implements aiortc's encoder interface (``encode(frame, force_keyframe)`` ->
``(payloads, timestamp)``, ``pack``) over transceiver/opus.py's ``Encoder``
with ``VoiceSettings`` (40 kbit/s voice, mono, FEC on; opus.py says why),
and takes the loss the remote receiver reports: transceiver/aiortc_fast.py's
``loss_feedback`` patch calls ``report_loss`` with each RTCP receiver
report's fraction lost for this stream, and the encoder's expected loss
(``OPUS_SET_PACKET_LOSS_PERC``, which sizes the FEC it sends) follows it:
up at once when loss appears (the next lost packet should already be
covered), down by a fifth of the difference per report (about 5 s to forget
a lossy spell, as receiver reports come every 0.5-1.5 s).

Timestamps come from the frames' ``pts``: a track that pauses (the echo
playback when nothing is queued) and resumes with a later ``pts`` gives an
RTP timestamp that skipped as much time as it paused, as a sender with DTX
does, so the receiver's jitter buffer does not mistake the pause for delay.

Frames that are not 48 kHz s16 with 960 samples go through a libav
resampler first (as aiortc does for every frame); everything a backend or
the voice client plays needs none.
"""

from __future__ import annotations

import fractions
import math
import weakref
from typing import Any

from av import AudioResampler

from transceiver import opus

#: Share of the way from the smoothed loss to a lower report taken per report.
LOSS_DECAY = 0.2
_TIME_BASE = fractions.Fraction(1, opus.SAMPLE_RATE)
DEFAULT_SETTINGS = opus.VoiceSettings()
_registered: weakref.WeakKeyDictionary[Any, opus.VoiceSettings] = weakref.WeakKeyDictionary()


def register(sender: Any, settings: opus.VoiceSettings) -> None:
    """Encode this RTCRtpSender's Opus with ``settings`` (call it before the sender starts)."""
    _registered[sender] = settings


def registered_settings(sender: Any) -> opus.VoiceSettings | None:
    """The settings registered for ``sender``; None means VoiceSettings' defaults."""
    return _registered.get(sender)


class VoiceEncoder:
    """aiortc's Encoder interface for Opus audio; one per sender, created on its first frame."""

    def __init__(self, settings: opus.VoiceSettings | None = None) -> None:
        self.settings = settings or opus.VoiceSettings()
        self._encoder: opus.Encoder | None = None
        self._resampler: AudioResampler | None = None
        self._first_pts: int | None = None
        self._next_timestamp = 0
        self._loss = float(self.settings.min_expected_loss)
        self.reports = 0

    @property
    def expected_loss(self) -> int:
        """The loss percentage the encoder is protecting against now."""
        return self.settings.clamp_loss(self._loss)

    def encode(self, frame: Any, force_keyframe: bool = False) -> tuple[list[bytes], int | None]:
        """One packet per 20 ms frame, timestamped from the frame's pts (48 kHz units)."""
        if (
            frame.sample_rate != opus.SAMPLE_RATE
            or frame.samples != opus.FRAME_SAMPLES
            or frame.format.name != "s16"
            or frame.layout.name not in ("mono", "stereo")
        ):
            return self._encode_resampled(frame)
        channels = 2 if frame.layout.name == "stereo" else 1
        encoder = self._encoder_for(channels)
        size = opus.FRAME_SAMPLES * channels * 2
        payload = encoder.encode(memoryview(frame.planes[0])[:size])
        return [payload], self._timestamp(frame)

    def _encode_resampled(self, frame: Any) -> tuple[list[bytes], int | None]:
        if self._resampler is None:
            self._resampler = AudioResampler(
                format="s16", layout="stereo", rate=opus.SAMPLE_RATE, frame_size=opus.FRAME_SAMPLES
            )
        payloads: list[bytes] = []
        first: int | None = None
        for out in self._resampler.resample(frame):
            encoder = self._encoder_for(2)
            payloads.append(encoder.encode(memoryview(out.planes[0])[: opus.FRAME_SAMPLES * 4]))
            timestamp = self._timestamp(out)
            first = timestamp if first is None else first
        return payloads, first

    def _encoder_for(self, channels: int) -> opus.Encoder:
        encoder = self._encoder
        if encoder is None or encoder.channels != channels:
            if encoder is not None:
                encoder.close()
            encoder = self._encoder = opus.Encoder(self.settings, channels)
            encoder.set_expected_loss(self._loss)
        return encoder

    def _timestamp(self, frame: Any) -> int:
        """RTP timestamp offset of this frame: its pts in 48 kHz units, from the first frame."""
        pts = frame.pts
        if pts is not None and frame.time_base is not None:
            samples = (
                pts
                if frame.time_base == _TIME_BASE
                else round(pts * frame.time_base * opus.SAMPLE_RATE)
            )
            if self._first_pts is None:
                self._first_pts = samples
            timestamp = samples - self._first_pts
            if timestamp >= self._next_timestamp:  # never backwards: the receiver would drop it
                self._next_timestamp = timestamp + opus.FRAME_SAMPLES
                return timestamp
        timestamp = self._next_timestamp
        self._next_timestamp += opus.FRAME_SAMPLES
        return timestamp

    def pack(self, packet: Any) -> tuple[list[bytes], int]:
        """An already encoded packet (a track of packets): aiortc's OpusEncoder.pack."""
        timestamp = round(packet.pts * packet.time_base * opus.SAMPLE_RATE)
        return [bytes(packet)], timestamp

    def report_loss(self, fraction: float) -> int:
        """An RTCP report's fraction lost (0..1) for this stream; returns the loss % applied."""
        if not math.isfinite(fraction):
            return self.expected_loss
        percent = 100.0 * min(max(fraction, 0.0), 1.0)
        self.reports += 1
        if percent >= self._loss:
            self._loss = percent
        else:
            self._loss += LOSS_DECAY * (percent - self._loss)
        if self._encoder is not None:
            return self._encoder.set_expected_loss(self._loss)
        return self.expected_loss

    def close(self) -> None:
        if self._encoder is not None:
            self._encoder.close()
            self._encoder = None
