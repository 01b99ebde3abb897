"""Test signals for the audio path: what libopus codes as voice, frame by frame.

A steady tone will not do for anything that involves FEC: SILK's voice
activity detector learns it as background within a second, and libopus
sends in-band FEC only for active frames. This signal has what speech has
for the encoder: a gliding pitch (140 Hz +- 30) with harmonics, and a
syllable-rate (3 Hz) envelope.
"""

from __future__ import annotations

import math
from array import array

SAMPLE_RATE = 48000
FRAME_SAMPLES = 960


def voiced_pcm(k: int, amplitude: int = 5000) -> bytes:
    """Frame k (20 ms, mono s16le) of the voice-like signal."""
    out = []
    for i in range(FRAME_SAMPLES):
        t = (k * FRAME_SAMPLES + i) / SAMPLE_RATE
        envelope = 0.5 + 0.5 * math.sin(2 * math.pi * 3 * t)
        f0 = 140 + 30 * math.sin(2 * math.pi * 0.7 * t)
        wave = sum(a * math.sin(2 * math.pi * n * f0 * t) for n, a in ((1, 1), (2, 0.5), (3, 0.3)))
        out.append(int(amplitude * envelope * wave))
    return array("h", out).tobytes()
