"""VoiceEncoder: aiortc's encoder interface over libopus with voice settings and loss feedback.

Real libopus (transceiver/opus.py), real PyAV frames. What the sender gets:
one packet per 20 ms frame, RTP timestamps that follow the frames' pts (a
pause moves them on), the expected loss following receiver reports, and
in-band FEC in the packets once loss is reported.
"""

from __future__ import annotations

import fractions
import math
from array import array

import pytest
from av import AudioFrame

from tests.audio import voiced_pcm
from transceiver import opus
from transceiver.voice_encoder import VoiceEncoder

TIME_BASE = fractions.Fraction(1, 48000)


def tone(k: int, channels: int = 2, samples: int = 960, rate: int = 48000) -> AudioFrame:
    """Frame k of a 300 Hz tone (voice-band, loud enough that SILK codes it)."""
    wave = [
        int(9000 * math.sin(2 * math.pi * 300 * (k * samples + i) / rate)) for i in range(samples)
    ]
    data = [s for s in wave for _ in range(channels)]
    frame = AudioFrame(format="s16", layout="stereo" if channels == 2 else "mono", samples=samples)
    frame.planes[0].update(array("h", data).tobytes())
    frame.sample_rate = rate
    frame.time_base = fractions.Fraction(1, rate)
    frame.pts = k * samples
    return frame


def test_one_packet_per_frame_timestamped_from_pts() -> None:
    encoder = VoiceEncoder()
    stamps = []
    for k in range(5):
        payloads, timestamp = encoder.encode(tone(k))
        assert len(payloads) == 1 and payloads[0]
        assert opus.packet_samples(payloads[0]) == 960
        stamps.append(timestamp)
    assert stamps == [0, 960, 1920, 2880, 3840]


def test_a_pause_in_pts_moves_the_rtp_timestamp_on() -> None:
    encoder = VoiceEncoder()
    frames = [tone(k) for k in range(3)]
    late = tone(3)
    late.pts = 3 * 960 + 4800  # played 100 ms after its slot
    frames.append(late)
    stamps = [encoder.encode(f)[1] for f in frames]
    assert stamps == [0, 960, 1920, 2880 + 4800]


def test_timestamps_never_go_backwards() -> None:
    encoder = VoiceEncoder()
    first = encoder.encode(tone(10))[1]
    again = tone(10)  # the same pts twice (a track that repeats itself)
    second = encoder.encode(again)[1]
    assert first == 0 and second == 960
    no_pts = tone(11)
    no_pts.pts = None
    assert encoder.encode(no_pts)[1] == 1920


def test_mono_frames_get_a_mono_encoder_and_stereo_ones_a_stereo_encoder() -> None:
    encoder = VoiceEncoder()
    encoder.encode(tone(0, channels=1))
    assert encoder._encoder is not None and encoder._encoder.channels == 1
    encoder.encode(tone(1, channels=2))
    assert encoder._encoder is not None and encoder._encoder.channels == 2
    encoder.close()
    assert encoder._encoder is None


def test_frames_of_another_rate_or_size_are_resampled() -> None:
    encoder = VoiceEncoder()
    payloads: list[bytes] = []
    for k in range(6):
        got, _ = encoder.encode(tone(k, samples=441, rate=44100))  # 10 ms at 44.1 kHz
        payloads.extend(got)
    # 60 ms in: the resampler emits whole 20 ms frames (it may hold the last samples back).
    assert 2 <= len(payloads) <= 3
    assert all(opus.packet_samples(p) == 960 for p in payloads)


def test_expected_loss_follows_reports_up_at_once_and_down_slowly() -> None:
    encoder = VoiceEncoder()
    encoder.encode(tone(0))
    assert encoder.expected_loss == 0
    assert encoder.report_loss(0.10) == 10
    assert encoder.report_loss(0.0) == 8  # a fifth of the way down per report
    assert encoder.report_loss(0.0) == 6
    assert encoder.report_loss(0.5) == 25  # capped where libopus' FEC gain saturates
    assert encoder.report_loss(float("nan")) == 25  # garbage changes nothing
    assert encoder._encoder is not None
    assert encoder._encoder.get_ctl(opus.OPUS_GET_PACKET_LOSS_PERC_REQUEST) == 25
    assert encoder.reports == 4


def test_loss_reported_before_the_first_frame_applies_to_the_encoder() -> None:
    encoder = VoiceEncoder()
    encoder.report_loss(0.05)
    encoder.encode(tone(0))
    assert encoder._encoder is not None
    assert encoder._encoder.get_ctl(opus.OPUS_GET_PACKET_LOSS_PERC_REQUEST) == 5


def voiced(k: int) -> AudioFrame:
    """Frame k of tests/audio.py's voice-like signal (a steady tone gets no FEC)."""
    frame = AudioFrame(format="s16", layout="mono", samples=960)
    frame.planes[0].update(voiced_pcm(k))
    frame.sample_rate = 48000
    frame.time_base = TIME_BASE
    frame.pts = k * 960
    return frame


@pytest.mark.parametrize("loss", [0.0, 0.05])
def test_fec_rides_along_only_once_loss_is_reported(loss: float) -> None:
    encoder = VoiceEncoder()
    encoder.report_loss(loss)
    packets = [encoder.encode(voiced(k))[0][0] for k in range(100)]
    with_lbrr = sum(opus.packet_has_lbrr(p) for p in packets[5:])
    if loss:
        assert with_lbrr >= 60, with_lbrr  # the voiced part of every syllable
    else:
        assert with_lbrr == 0


def test_operator_settings_replace_only_what_they_name() -> None:
    assert opus.voice_settings() == opus.VoiceSettings()
    chosen = opus.voice_settings(bitrate=64000, complexity=3)
    assert (chosen.bitrate, chosen.complexity) == (64000, 3)
    assert chosen.fec and chosen.mono  # the rest stays the voice defaults
    with pytest.raises(ValueError, match="complexity"):
        opus.voice_settings(complexity=11)
