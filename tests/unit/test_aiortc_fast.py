"""transceiver/aiortc_fast.py: the pins hold, and every patch does what it says.

If aiortc (or PyAV) is upgraded, the first test fails and names the patch to
port: the patches replace private functions, and a silent change there must
never reach a worker. The overhead patch (audio_level) is compared with the
aiortc function it replaces, on the same input, for identical output; the
audio-path patches are checked in a real call over loopback: the adaptive
buffer plays the audio, the voice encoder sends it, receiver reports reach
the encoder, and the SDP offers FEC. The buffer, the encoder and the codec
have their own tests (test_jitterbuffer.py, test_playout.py,
test_voice_encoder.py, test_opus.py).
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
from transceiver.jitterbuffer import JitterConfig

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
        "assert not aiortc_fast.applied() and aiortc_fast.status() == dict.fromkeys("
        "aiortc_fast._ORIGINALS, False)\n"
        "assert rtp.compute_audio_level_dbov.__module__ == 'aiortc.rtp'\n"
        "assert rtcrtpsender.RTCRtpSender._next_encoded_frame.__module__ == "
        "'aiortc.rtcrtpsender'\n"
        "assert rtcrtpsender.RTCRtpSender._handle_rtcp_packet.__module__ == "
        "'aiortc.rtcrtpsender'\n"
        "assert rtcrtpreceiver.RTCRtpReceiver.receive.__module__ == 'aiortc.rtcrtpreceiver'\n"
        "from aiortc.codecs import CODECS\n"
        "assert 'useinbandfec' not in CODECS['audio'][0].parameters\n"
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


# ---------------------------------------------------------------------- a real call


class _Tone:
    """A 450 Hz stereo tone track (9 cycles a frame), paced in real time on a schedule."""

    def __new__(cls) -> Any:
        from aiortc.mediastreams import MediaStreamTrack

        wave = [int(8000 * math.sin(2 * math.pi * 450 * i / 48000)) for i in range(960)]
        stereo = [s for s in wave for _ in range(2)]

        class Tone(MediaStreamTrack):
            kind = "audio"

            def __init__(self) -> None:
                super().__init__()
                self.pts = 0
                self.start: float | None = None

            async def recv(self) -> AudioFrame:
                loop = asyncio.get_running_loop()
                if self.start is None:
                    self.start = loop.time()
                due = self.start + self.pts / 48000
                await asyncio.sleep(max(0.0, due - loop.time()))
                frame = _frame(stereo, "stereo", self.pts)
                self.pts += 960
                return frame

        return Tone()


def test_a_loopback_call_plays_through_the_adaptive_buffer_and_the_voice_encoder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import aioice.ice
    from aiortc import RTCConfiguration, RTCPeerConnection
    from aiortc.rtp import RtcpReceiverInfo, RtcpRrPacket

    from transceiver import opus, playout
    from transceiver.voice_encoder import VoiceEncoder

    # Loopback only: aioice would otherwise offer every address of the machine.
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])

    async def body() -> None:
        sender = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        receiver = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        got: asyncio.Queue[Any] = asyncio.Queue()
        readers: list[asyncio.Task[None]] = []
        counters = playout.PlayoutCounters()

        @receiver.on("track")
        def _on_track(track: Any) -> None:
            async def read() -> None:
                while True:
                    got.put_nowait(await track.recv())

            readers.append(asyncio.ensure_future(read()))

        sender.addTrack(_Tone())
        receiver.addTransceiver("audio", direction="recvonly")
        for transceiver in receiver.getTransceivers():
            playout.register(transceiver.receiver, JitterConfig(), counters)
        try:
            await sender.setLocalDescription(await sender.createOffer())
            assert "useinbandfec=1" in sender.localDescription.sdp
            await receiver.setRemoteDescription(sender.localDescription)
            await receiver.setLocalDescription(await receiver.createAnswer())
            assert "useinbandfec=1" in receiver.localDescription.sdp
            await sender.setRemoteDescription(receiver.localDescription)
            frames = [await asyncio.wait_for(got.get(), 10) for _ in range(20)]
            assert all(f.samples == 960 and f.sample_rate == 48000 for f in frames)
            loud = max(max(array("h", bytes(f.planes[0]))) for f in frames[-5:])
            assert loud > 2000, "the tone did not come through the codec"

            names = {t.name for t in threading.enumerate()}
            assert "audio-decoder" not in names
            assert not any(n.startswith("asyncio_") for n in names)  # the default executor
            stream = receiver.getTransceivers()[0].receiver._RTCRtpReceiver__jitter_buffer
            assert isinstance(stream, playout.PlayoutStream)
            snapshot = counters.snapshot()
            assert snapshot["streams"] == 1
            # Every frame that came out was played from its packet or made up for one the
            # loop delivered late (a busy machine); most were played.
            assert snapshot["played"] + snapshot["concealed"] + snapshot["fec"] >= 20, snapshot
            assert snapshot["played"] >= 10, snapshot
            # Over loopback the buffer holds the margin and no more.
            assert snapshot["delay_seconds"]["sum"] / snapshot["delay_seconds"]["count"] < 0.02

            rtp_sender = sender.getTransceivers()[0].sender
            encoder = rtp_sender._RTCRtpSender__encoder
            assert isinstance(encoder, VoiceEncoder)
            assert encoder.expected_loss == 0
            report = RtcpReceiverInfo(
                ssrc=rtp_sender._ssrc,
                fraction_lost=64,  # 25 %
                packets_lost=5,
                highest_sequence=100,
                jitter=0,
                lsr=0,
                dlsr=0,
            )
            await rtp_sender._handle_rtcp_packet(RtcpRrPacket(ssrc=1, reports=[report]))
            assert encoder.expected_loss == 25
            assert encoder._encoder is not None
            assert encoder._encoder.get_ctl(opus.OPUS_GET_PACKET_LOSS_PERC_REQUEST) == 25
        finally:
            await sender.close()
            await receiver.close()
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
        assert counters.snapshot()["streams"] == 0  # the stream ended with the call

    asyncio.run(asyncio.wait_for(body(), 60))


def test_dtls_offers_ecdhe_rsa_next_to_ecdsa() -> None:
    from aiortc.rtcdtlstransport import SRTP_AES128_CM_SHA1_80, RTCCertificate
    from OpenSSL import SSL

    certificate = RTCCertificate.generateCertificate()
    ctx = certificate._create_ssl_context([SRTP_AES128_CM_SHA1_80])
    # (TLS 1.3 suites come first in the list and do not apply to DTLS 1.2.)
    ciphers = [c for c in SSL.Connection(ctx, None).get_cipher_list() if c.startswith("ECDHE")]
    # ECDSA first (what every browser gets today), then RSA for RSA-certificate peers.
    assert ciphers[:2] == ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"]
    assert {"ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-SHA"} <= set(ciphers)
