"""transceiver/aiortc_fast.py: the pins hold, and every fast path gives what aiortc gives.

If aiortc (or PyAV) is upgraded, the first test fails and names the patch to
port: the patches replace private functions, and a silent change there must
never reach a worker. The others compare each replacement with the aiortc
function it replaces, on the same input, for identical output; the last ones
run a real call over loopback with the patches in place.
"""

from __future__ import annotations

import asyncio
import fractions
import math
import os
import random
import subprocess
import sys
import threading
from array import array
from importlib import metadata
from typing import Any

import pytest
from av import AudioFrame

from transceiver import aiortc_fast, session  # noqa: F401  (session applies the patches)

TIME_BASE = fractions.Fraction(1, 48000)


def _frame(samples: list[int], layout: str, pts: int | None = 0) -> AudioFrame:
    frame = AudioFrame(format="s16", layout=layout, samples=960)
    frame.planes[0].update(array("h", samples).tobytes())
    frame.sample_rate = 48000
    frame.time_base = TIME_BASE
    frame.pts = pts
    return frame


def _noise(rnd: random.Random, count: int, amplitude: int) -> list[int]:
    return [max(-32768, min(32767, rnd.randint(-amplitude, amplitude))) for _ in range(count)]


# ---------------------------------------------------------------------- the guards


def test_pinned_versions_and_replaced_sources_are_unchanged() -> None:
    for dist, want in aiortc_fast.PINNED.items():
        assert metadata.version(dist) == want, (
            f"{dist} {metadata.version(dist)} is installed; transceiver/aiortc_fast.py is "
            f"written for {want}: port its patches and update PINNED and the hashes"
        )
    for name, (target, digest) in aiortc_fast._ORIGINALS.items():
        have = aiortc_fast.source_hash(aiortc_fast.original(name))
        assert have == digest, (
            f"{target} changed: the {name} patch in transceiver/aiortc_fast.py replaces "
            f"its old code; port the patch, then set its hash to {have}"
        )


def test_every_patch_is_applied_in_this_process() -> None:
    assert aiortc_fast.problems() == {}
    assert aiortc_fast.status() == dict.fromkeys(aiortc_fast._ORIGINALS, True)
    assert aiortc_fast.applied()


def test_the_environment_switch_leaves_aiortc_as_released() -> None:
    code = (
        "from transceiver import aiortc_fast, session\n"
        "from aiortc import rtp, rtcrtpreceiver, rtcrtpsender\n"
        "from aiortc.codecs import opus\n"
        "assert not aiortc_fast.applied() and aiortc_fast.status() == dict.fromkeys("
        "aiortc_fast._ORIGINALS, False)\n"
        "assert rtp.compute_audio_level_dbov.__module__ == 'aiortc.rtp'\n"
        "assert opus.OpusEncoder.encode.__module__ == 'aiortc.codecs.opus'\n"
        "assert rtcrtpsender.RTCRtpSender._next_encoded_frame.__module__ == "
        "'aiortc.rtcrtpsender'\n"
        "assert rtcrtpreceiver.RTCRtpReceiver.receive.__module__ == 'aiortc.rtcrtpreceiver'\n"
    )
    env = dict(os.environ, SPLITRELAY_AIORTC_FAST="0")
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------- audio level


def test_audio_level_is_aiortcs_for_any_frame() -> None:
    stock = aiortc_fast.original("audio_level")
    rnd = random.Random(6465)
    for i in range(600):
        layout = ("mono", "stereo")[i % 2]
        count = 960 * (1 if layout == "mono" else 2)
        amplitude = (0, 1, 2, 5, 30, 300, 3000, 20000, 32767)[i % 9]
        frame = _frame(_noise(rnd, count, amplitude), layout)
        assert aiortc_fast.compute_audio_level_dbov(frame) == stock(frame), (i, amplitude)
    assert aiortc_fast.compute_audio_level_dbov(_frame([0] * 960, "mono")) == -127
    assert aiortc_fast.compute_audio_level_dbov(_frame([32767] * 1920, "stereo")) == 0


def test_audio_level_near_a_rounding_boundary_uses_the_exact_sum() -> None:
    # The exact-sum path must agree with aiortc's arithmetic on its own.
    scale = 960 * 32767 * 32767
    for total in (0, 1, 12345, 10**9, 3 * 10**11, 2 * 960 * 32767**2):
        rms = math.sqrt(total / scale)
        want = -127 if rms <= 0 else round(min(max(20 * math.log10(rms), -127), 0))
        assert aiortc_fast._level_from_sum(total, scale) == want


# ---------------------------------------------------------------------- opus encoder


def _encode_all(encode: Any, frames: list[AudioFrame]) -> list[tuple[list[bytes], Any]]:
    from aiortc.codecs.opus import OpusEncoder

    encoder = OpusEncoder()
    return [encode(encoder, frame) for frame in frames]


@pytest.mark.parametrize("pts", ["contiguous", "offset", "gap"])
def test_opus_encoder_without_resampler_gives_the_same_packets(pts: str) -> None:
    from aiortc.codecs.opus import OpusEncoder

    def when(k: int) -> int:
        base = {"contiguous": 0, "offset": 123456, "gap": 0}[pts]
        return base + k * 960 + (48000 if pts == "gap" and k >= 20 else 0)

    rnd = random.Random(pts)
    samples = [_noise(rnd, 1920, 4000) for _ in range(40)]
    stock = _encode_all(
        aiortc_fast.original("opus_no_resample"),
        [_frame(s, "stereo", when(k)) for k, s in enumerate(samples)],
    )
    fast = _encode_all(
        OpusEncoder.encode, [_frame(s, "stereo", when(k)) for k, s in enumerate(samples)]
    )
    assert fast == stock
    assert [t for _, t in fast[:3]] == [0, 960, 1920]


def test_opus_encoder_resamples_what_needs_it_and_then_always() -> None:
    from aiortc.codecs.opus import OpusEncoder

    def half(samples: list[int], pts: int) -> AudioFrame:
        frame = AudioFrame(format="s16", layout="stereo", samples=480)
        frame.planes[0].update(array("h", samples).tobytes())
        frame.sample_rate = 48000
        frame.time_base = TIME_BASE
        frame.pts = pts
        return frame

    def stream() -> list[AudioFrame]:
        rnd = random.Random(2)
        halves = [half(_noise(rnd, 960, 3000), k * 480) for k in range(6)]
        whole = [_frame(_noise(rnd, 1920, 3000), "stereo", 2880 + k * 960) for k in range(6)]
        return halves + whole

    stock = _encode_all(aiortc_fast.original("opus_no_resample"), stream())
    encoder = OpusEncoder()
    fast = [encoder.encode(f) for f in stream()]
    assert fast == stock
    assert encoder._splitrelay_resampled  # once the resampler held samples, it stays in use

    rnd = random.Random(3)
    mono = [_frame(_noise(rnd, 960, 3000), "mono", k * 960) for k in range(5)]
    assert _encode_all(OpusEncoder.encode, mono) == _encode_all(
        aiortc_fast.original("opus_no_resample"), mono
    )


# ---------------------------------------------------------------------- inline decoder


def _opus_packets(count: int) -> list[bytes]:
    from aiortc.codecs.opus import OpusEncoder

    encoder = OpusEncoder()
    wave = [int(8000 * math.sin(2 * math.pi * 440 * i / 48000)) for i in range(960)]
    stereo = [s for s in wave for _ in range(2)]
    return [encoder.encode(_frame(stereo, "stereo", k * 960))[0][0] for k in range(count)]


def test_inline_decoder_decodes_into_the_track_queue_and_ends_it() -> None:
    from aiortc.jitterbuffer import JitterFrame
    from aiortc.rtcrtpparameters import RTCRtpCodecParameters

    codec = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2)
    packets = _opus_packets(5)

    async def body() -> None:
        output: asyncio.Queue[Any] = asyncio.Queue()
        error = threading.Event()
        decoder = aiortc_fast.InlineDecoder(output, error)
        assert decoder
        for k, packet in enumerate(packets):
            decoder.put((codec, JitterFrame(packet, k * 960)))
        frames = [output.get_nowait() for _ in range(len(packets))]
        assert all(f.samples == 960 and f.layout.name == "stereo" for f in frames)
        assert not error.is_set()
        decoder.put(None)
        assert output.get_nowait() is None
        assert not decoder  # the receiver stops feeding a stopped decoder
        decoder.put((codec, JitterFrame(packets[0], 0)))  # ignored, as after the thread ended
        assert output.empty()
        decoder.join()

    asyncio.run(body())


# ---------------------------------------------------------------------- a real call


class _Tone:
    """A 440 Hz stereo tone track, paced in real time, as a backend's playback would be."""

    def __new__(cls) -> Any:
        from aiortc.mediastreams import MediaStreamTrack

        class Tone(MediaStreamTrack):
            kind = "audio"

            def __init__(self) -> None:
                super().__init__()
                self.pts = 0

            async def recv(self) -> AudioFrame:
                await asyncio.sleep(0.02)
                wave = [
                    int(8000 * math.sin(2 * math.pi * 440 * (self.pts + i) / 48000))
                    for i in range(960)
                ]
                frame = _frame([s for s in wave for _ in range(2)], "stereo", self.pts)
                self.pts += 960
                return frame

        return Tone()


def test_a_loopback_call_carries_audio_without_codec_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import aioice.ice
    from aiortc import RTCConfiguration, RTCPeerConnection

    # Loopback only: aioice would otherwise offer every address of the machine.
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])

    async def body() -> None:
        sender = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        receiver = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        got: asyncio.Queue[Any] = asyncio.Queue()
        readers: list[asyncio.Task[None]] = []

        @receiver.on("track")
        def _on_track(track: Any) -> None:
            async def read() -> None:
                while True:
                    got.put_nowait(await track.recv())

            readers.append(asyncio.ensure_future(read()))

        sender.addTrack(_Tone())
        receiver.addTransceiver("audio", direction="recvonly")
        try:
            await sender.setLocalDescription(await sender.createOffer())
            await receiver.setRemoteDescription(sender.localDescription)
            await receiver.setLocalDescription(await receiver.createAnswer())
            await sender.setRemoteDescription(receiver.localDescription)
            frames = [await asyncio.wait_for(got.get(), 10) for _ in range(20)]
            assert all(f.samples == 960 and f.sample_rate == 48000 for f in frames)
            loud = max(max(array("h", bytes(f.planes[0]))) for f in frames[-5:])
            assert loud > 2000, "the tone did not come through the codec"
            names = {t.name for t in threading.enumerate()}
            assert "audio-decoder" not in names
            assert not any(n.startswith("asyncio_") for n in names)  # the default executor
        finally:
            await sender.close()
            await receiver.close()
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)

    asyncio.run(asyncio.wait_for(body(), 60))
