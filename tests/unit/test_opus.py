"""transceiver/opus.py against the real libopus (Debian's libopus0), no mocks.

If libopus is missing these tests fail with the module's message naming the
package; they never skip. Two independent oracles check the binding: PyAV's
libopus decoder (aiortc's path) must produce the same PCM from the same
packets, and the opus_packet_has_lbrr of the libopus 1.6 that PyAV bundles
must agree with the pure-Python packet_has_lbrr.
"""

from __future__ import annotations

import ctypes
import gc
import glob
import math
import os
import random
from array import array
from pathlib import Path

import av
import numpy as np
import pytest

from transceiver import markers, opus

SR = opus.SAMPLE_RATE
N = opus.FRAME_SAMPLES


# ---------------------------------------------------------------------- signals


def speech_like(seconds: float, seed: int = 7) -> np.ndarray:
    """Mono int16 voice-like audio: formant-shaped harmonics with pitch glides and pauses."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    f0, amp = np.zeros(n), np.zeros(n)
    formants = [np.zeros(n) for _ in range(3)]
    vowels = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480)]
    t = 0
    while t < n:
        for _ in range(int(rng.integers(1, 4))):
            k = min(n - t, int(rng.uniform(0.15, 0.3) * SR))
            if k <= 0:
                break
            f0[t : t + k] = rng.uniform(100, 200) * (
                1 + rng.uniform(-0.2, 0.2) * np.linspace(0, 1, k)
            )
            a, b = vowels[rng.integers(len(vowels))], vowels[rng.integers(len(vowels))]
            w = np.linspace(0, 1, k)
            for i in range(3):
                formants[i][t : t + k] = a[i] + (b[i] - a[i]) * w
            amp[t : t + k] = np.sin(np.pi * w) ** 0.5
            t += k
        t += int(rng.uniform(0.08, 0.25) * SR)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    out = np.zeros(n)
    for h in range(1, 30):
        fh = h * f0
        gain = sum(
            1.0 / (1 + ((fh - fc) / bw) ** 2)
            for fc, bw in zip(formants, (80, 100, 140), strict=True)
        )
        out += gain * (fh < 7000) * np.sin(h * phase) / h**0.3
    out *= amp
    return np.clip(out * 9000 / np.max(np.abs(out)), -32768, 32767).astype(np.int16)


def tone(seconds: float, freq: float = 440.0, amplitude: int = 8000) -> np.ndarray:
    t = np.arange(int(seconds * SR))
    return (amplitude * np.sin(2 * np.pi * freq * t / SR)).astype(np.int16)


def frames_of(mono: np.ndarray, samples: int = N, channels: int = 2) -> list[bytes]:
    """Interleaved s16 frames of `samples`, the mono signal on every channel."""
    usable = len(mono) // samples * samples
    frames = []
    for i in range(0, usable, samples):
        chunk = mono[i : i + samples]
        frames.append((np.repeat(chunk, channels) if channels > 1 else chunk).tobytes())
    return frames


def encode_all(
    frames: list[bytes], settings: opus.VoiceSettings, loss: float, **kw: int
) -> list[bytes]:
    enc = opus.Encoder(settings, channels=kw.get("channels", 2))
    enc.set_expected_loss(loss)
    samples = kw.get("samples", N)
    return [enc.encode(f, samples) for f in frames]


def left(pcm: bytes, channels: int = 2) -> np.ndarray:
    return np.frombuffer(pcm, dtype=np.int16)[0::channels].astype(np.float64)


def snr_db(ref: np.ndarray, test: np.ndarray) -> float:
    noise = float(np.dot(ref - test, ref - test))
    return 10 * math.log10(float(np.dot(ref, ref)) / max(noise, 1e-9))


# ---------------------------------------------------------------------- oracles


@pytest.fixture(scope="module")
def lib() -> ctypes.CDLL:
    """Debian's libopus, through the module; fails (never skips) with its message."""
    try:
        return opus.library()
    except opus.OpusError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def bundled() -> ctypes.CDLL:
    """The libopus PyAV 18.1.0 bundles (1.6.1): it has opus_packet_has_lbrr."""
    libs = os.path.join(os.path.dirname(os.path.dirname(av.__file__)), "av.libs")
    found = sorted(glob.glob(os.path.join(libs, "libopus-*.so*")))
    if not found:
        pytest.fail(f"PyAV's bundled libopus not found in {libs} (av 18.1.0 wheels ship it)")
    bundled = ctypes.CDLL(found[0])
    bundled.opus_packet_has_lbrr.argtypes = [ctypes.c_char_p, ctypes.c_int32]
    bundled.opus_packet_has_lbrr.restype = ctypes.c_int
    return bundled


def c_parse_ok(lib: ctypes.CDLL, data: bytes) -> bool:
    f = lib.opus_packet_parse
    f.argtypes = [
        ctypes.c_char_p,
        ctypes.c_int32,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    f.restype = ctypes.c_int
    sizes = (ctypes.c_int16 * 48)()
    return len(data) > 0 and f(data, len(data), None, None, ctypes.addressof(sizes), None) > 0


def c_nb_samples(lib: ctypes.CDLL, data: bytes) -> int:
    f = lib.opus_packet_get_nb_samples
    f.argtypes = [ctypes.c_char_p, ctypes.c_int32, ctypes.c_int32]
    f.restype = ctypes.c_int
    return f(data, len(data), SR)


def pyav_decode(packets: list[bytes]) -> bytes:
    codec = av.CodecContext.create("libopus", "r")
    codec.format = "s16"
    codec.layout = "stereo"
    codec.sample_rate = SR
    out = []
    for p in packets:
        for frame in codec.decode(av.Packet(p)):
            out.append(memoryview(frame.planes[0])[: frame.samples * 4].tobytes())
    return b"".join(out)


# ---------------------------------------------------------------------- the library


def test_library_loads_once_and_reports_its_version(lib: ctypes.CDLL) -> None:
    assert opus.library() is lib
    assert opus.version().startswith("libopus ")


def test_a_missing_library_names_the_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(opus, "_lib", None)
    monkeypatch.setattr(opus, "_api_cache", None)
    monkeypatch.setattr(opus, "_candidates", lambda: ["libopus-definitely-missing.so.0"])
    with pytest.raises(opus.OpusError, match=r"libopus not found: install Debian's libopus0"):
        opus.library()
    with pytest.raises(opus.OpusError, match="libopus0"):
        opus.Decoder()


def test_the_bootstrap_installs_libopus0_at_runtime() -> None:
    text = (Path(__file__).resolve().parents[2] / "ctl" / "bootstrap.sh").read_text()
    runtime = text.split("PACKAGES=(", 1)[1].split(")", 1)[0]
    assert "libopus0" in runtime.split()


# ---------------------------------------------------------------------- encoder settings


def test_default_settings_read_back_through_the_get_ctls() -> None:
    s = opus.VoiceSettings()
    with opus.Encoder(s) as enc:
        assert enc.get_ctl(opus.OPUS_GET_APPLICATION_REQUEST) == opus.OPUS_APPLICATION_VOIP
        assert enc.get_ctl(opus.OPUS_GET_SIGNAL_REQUEST) == opus.OPUS_SIGNAL_VOICE
        assert enc.get_ctl(opus.OPUS_GET_BITRATE_REQUEST) == s.bitrate == 40000
        assert enc.get_ctl(opus.OPUS_GET_COMPLEXITY_REQUEST) == s.complexity == 5
        assert enc.get_ctl(opus.OPUS_GET_VBR_REQUEST) == 1
        assert enc.get_ctl(opus.OPUS_GET_VBR_CONSTRAINT_REQUEST) == 1
        assert enc.get_ctl(opus.OPUS_GET_INBAND_FEC_REQUEST) == 1
        assert enc.get_ctl(opus.OPUS_GET_PACKET_LOSS_PERC_REQUEST) == 0
        assert enc.get_ctl(opus.OPUS_GET_DTX_REQUEST) == 0
        assert enc.get_ctl(opus.OPUS_GET_FORCE_CHANNELS_REQUEST) == 1
        assert enc.get_ctl(opus.OPUS_GET_MAX_BANDWIDTH_REQUEST) == opus.OPUS_BANDWIDTH_FULLBAND
        assert enc.get_ctl(opus.OPUS_GET_SAMPLE_RATE_REQUEST) == SR
        # 2.5 ms of CELT overlap plus 4 ms of delay compensation
        assert enc.lookahead_samples == 312


def test_other_settings_read_back() -> None:
    s = opus.VoiceSettings(
        bitrate=24000,
        complexity=2,
        fec=False,
        min_expected_loss=3,
        max_expected_loss=12,
        mono=False,
        dtx=True,
        max_bandwidth=opus.OPUS_BANDWIDTH_WIDEBAND,
    )
    with opus.Encoder(s, channels=1) as enc:
        assert enc.get_ctl(opus.OPUS_GET_BITRATE_REQUEST) == 24000
        assert enc.get_ctl(opus.OPUS_GET_COMPLEXITY_REQUEST) == 2
        assert enc.get_ctl(opus.OPUS_GET_INBAND_FEC_REQUEST) == 0
        assert enc.get_ctl(opus.OPUS_GET_PACKET_LOSS_PERC_REQUEST) == 3
        assert enc.get_ctl(opus.OPUS_GET_DTX_REQUEST) == 1
        assert enc.get_ctl(opus.OPUS_GET_FORCE_CHANNELS_REQUEST) == opus.OPUS_AUTO
        assert enc.get_ctl(opus.OPUS_GET_MAX_BANDWIDTH_REQUEST) == opus.OPUS_BANDWIDTH_WIDEBAND


def test_set_expected_loss_clamps_and_applies_at_run_time() -> None:
    enc = opus.Encoder(opus.VoiceSettings(min_expected_loss=1, max_expected_loss=20))
    for given, applied in [(0, 1), (-5, 1), (2.4, 2), (2.6, 3), (7, 7), (20, 20), (55, 20)]:
        assert enc.set_expected_loss(given) == applied
        assert enc.get_ctl(opus.OPUS_GET_PACKET_LOSS_PERC_REQUEST) == applied
        assert enc.expected_loss == applied
    assert enc.set_expected_loss(float("inf")) == 20
    assert enc.set_expected_loss(float("-inf")) == 1
    assert enc.set_expected_loss(float("nan")) == 1
    enc.encode(b"\0" * N * 4)  # still encodes after the changes


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bitrate": 100},
        {"bitrate": 600000},
        {"complexity": 11},
        {"complexity": -1},
        {"min_expected_loss": 30, "max_expected_loss": 20},
        {"max_expected_loss": 101},
        {"max_bandwidth": 7},
    ],
)
def test_invalid_settings_are_refused(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        opus.VoiceSettings(**kwargs)


@pytest.mark.parametrize("channels", [0, 3])
def test_channel_counts_are_checked(channels: int) -> None:
    with pytest.raises(ValueError):
        opus.Encoder(channels=channels)
    with pytest.raises(ValueError):
        opus.Decoder(channels=channels)


# ---------------------------------------------------------------------- encode / decode


@pytest.mark.parametrize("samples", [120, 240, 480, 960, 1920, 2880, 3840, 4800, 5760])
@pytest.mark.parametrize("channels", [1, 2])
def test_every_frame_size_round_trips_with_the_right_length(samples: int, channels: int) -> None:
    enc = opus.Encoder(channels=channels)
    dec = opus.Decoder(channels=channels)
    for frame in frames_of(speech_like(0.5), samples, channels)[:4]:
        packet = enc.encode(frame, samples)
        assert opus.packet_samples(packet) == samples
        pcm = dec.decode(packet)
        assert len(pcm) == samples * channels * 2
        assert dec.get_ctl(opus.OPUS_GET_LAST_PACKET_DURATION_REQUEST) == samples
    assert len(dec.conceal(samples)) == samples * channels * 2
    assert len(dec.decode_fec(packet, samples)) == samples * channels * 2


def test_any_buffer_encodes_like_bytes() -> None:
    frames = frames_of(speech_like(1.0))
    a, b, c = opus.Encoder(), opus.Encoder(), opus.Encoder()
    for frame in frames:
        pcm = array("h")
        pcm.frombytes(frame)
        assert a.encode(frame) == b.encode(memoryview(frame)) == c.encode(pcm)
    mono = opus.Encoder(channels=1)
    assert mono.encode(bytearray(N * 2))


@pytest.mark.parametrize("size", [0, 1, N * 4 - 2, N * 4 + 2, N * 2])
def test_wrong_pcm_sizes_raise_value_error(size: int) -> None:
    enc = opus.Encoder()
    with pytest.raises(ValueError, match="pcm holds"):
        enc.encode(b"\0" * size)
    with pytest.raises(ValueError, match="pcm holds"):
        enc.encode(memoryview(bytearray(size)))


def test_a_size_libopus_does_not_take_is_an_opus_error() -> None:
    enc = opus.Encoder()
    with pytest.raises(opus.OpusError, match="opus_encode") as info:
        enc.encode(b"\0" * 1000 * 4, 1000)
    assert info.value.code == opus.OPUS_BAD_ARG
    with pytest.raises(ValueError):
        enc.encode(b"\0" * 6000 * 4, 6000)  # beyond 120 ms: refused before C


def test_mono_forcing_makes_mono_packets_that_decode_to_both_channels() -> None:
    frames = frames_of(tone(0.4))
    forced = encode_all(frames, opus.VoiceSettings(), 0)
    assert all(p[0] & 0x04 == 0 for p in forced)  # TOC stereo bit clear
    pcm = np.frombuffer(b"".join(opus.Decoder(2).decode(p) for p in forced), dtype=np.int16)
    assert np.array_equal(pcm[0::2], pcm[1::2])
    # Different channels, no forcing, enough rate: libopus codes stereo.
    lr = np.stack([tone(0.4, 440), tone(0.4, 660)], axis=1).reshape(-1)
    stereo = [
        lr[i : i + 2 * N].astype(np.int16).tobytes() for i in range(0, len(lr) - 2 * N + 1, 2 * N)
    ]
    free = encode_all(stereo, opus.VoiceSettings(mono=False), 0)
    assert any(p[0] & 0x04 for p in free)


def test_dtx_packets_are_tiny_in_silence_and_still_decode() -> None:
    enc = opus.Encoder(opus.VoiceSettings(dtx=True))
    dec = opus.Decoder()
    packets = [enc.encode(b"\0" * N * 4) for _ in range(50)]
    assert min(map(len, packets[-20:])) <= 2
    for p in packets:
        assert not opus.packet_has_lbrr(p)
        assert opus.packet_samples(p) == N
        assert len(dec.decode(p)) == N * 4


def test_decode_matches_pyav_libopus_decoder() -> None:
    """The same packets through PyAV's libopus (another libopus version) give the same PCM."""
    frames = frames_of(speech_like(3.0))
    packets = encode_all(frames, opus.VoiceSettings(), 10)
    dec = opus.Decoder()
    ours = b"".join(dec.decode(p) for p in packets)
    theirs = pyav_decode(packets)
    assert len(ours) == len(theirs) == len(frames) * N * 4
    a = np.frombuffer(ours, dtype=np.int16).astype(np.int32)
    b = np.frombuffer(theirs, dtype=np.int16).astype(np.int32)
    assert np.max(np.abs(a - b)) <= 4
    assert snr_db(a.astype(float), b.astype(float)) > 60
    # and the decoded audio is the signal: strongly correlated with the input
    src = np.frombuffer(b"".join(frames), dtype=np.int16)[0::2].astype(float)
    delay = opus.Encoder().lookahead_samples
    out = a[0::2].astype(float)[delay:]
    src = src[: len(out)]
    assert np.dot(src, out) / math.sqrt(np.dot(src, src) * np.dot(out, out)) > 0.8


def test_pyav_packets_decode_here_too() -> None:
    """The reverse direction: aiortc's encoder (PyAV, CELT at 96k stereo) -> this decoder."""
    from fractions import Fraction

    codec = av.CodecContext.create("libopus", "w")
    codec.bit_rate = 96000
    codec.format = "s16"
    codec.layout = "stereo"
    codec.sample_rate = SR
    codec.time_base = Fraction(1, SR)
    codec.options = {"application": "voip"}
    packets = []
    for i, frame in enumerate(frames_of(speech_like(1.0))):
        f = av.AudioFrame(format="s16", layout="stereo", samples=N)
        f.planes[0].update(frame)
        f.sample_rate = SR
        f.pts = i * N
        packets += [bytes(p) for p in codec.encode(f)]
    dec = opus.Decoder()
    ours = b"".join(dec.decode(p) for p in packets)
    theirs = pyav_decode(packets)
    a = np.frombuffer(ours, dtype=np.int16).astype(float)
    b = np.frombuffer(theirs, dtype=np.int16).astype(float)
    assert len(a) == len(b) and snr_db(a, b) > 60
    assert not any(map(opus.packet_has_lbrr, packets))  # CELT: never LBRR


# ---------------------------------------------------------------------- bad input


def _valid_packet() -> bytes:
    return encode_all(frames_of(tone(0.1)), opus.VoiceSettings(), 0)[-1]


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x03",  # code 3 without its frame count byte
        b"\x03\x00",  # code 3 with zero frames
        b"\x03\x3f" + b"\0" * 10,  # 63 frames of 20 ms: more than 120 ms
        b"\x01\x00\x00\x00",  # code 1 with an odd payload
        b"\x02\xfc",  # code 2, truncated two-byte length
        b"\x02\x10\x00",  # code 2, first frame longer than the packet
        b"\x00" + b"\x55" * 1276,  # one frame over the 1275-byte limit
        b"\x03\x41\xff",  # padding runs past the end
        b"\x03\x82\x05\x00",  # VBR frame length past the end
    ],
)
def test_malformed_packets_raise_and_keep_the_decoder_state(payload: bytes) -> None:
    good = frames_of(speech_like(1.0))
    packets = encode_all(good, opus.VoiceSettings(), 5)
    clean, dirty = opus.Decoder(), opus.Decoder()
    for i, p in enumerate(packets):
        if i % 5 == 2:
            with pytest.raises(opus.OpusError):
                dirty.decode(payload)
        assert dirty.decode(p) == clean.decode(p)
    assert not opus.packet_has_lbrr(payload)
    assert opus.packet_samples(payload) == 0
    if payload:
        with pytest.raises(opus.OpusError):
            dirty.decode_fec(payload)


def test_decode_errors_carry_libopus_message_and_code() -> None:
    with pytest.raises(opus.OpusError, match=r"opus_decode: corrupted stream \(-4\)") as info:
        opus.Decoder().decode(b"\x03\x00")
    assert info.value.code == opus.OPUS_INVALID_PACKET
    with pytest.raises(opus.OpusError, match="empty"):
        opus.Decoder().decode_fec(b"")


@pytest.mark.parametrize("samples", [0, -960, 100, 961, 5880, 6000])
def test_plc_and_fec_durations_are_checked_before_c(samples: int) -> None:
    dec = opus.Decoder()
    with pytest.raises(ValueError, match="multiple of 120"):
        dec.conceal(samples)
    with pytest.raises(ValueError, match="multiple of 120"):
        dec.decode_fec(_valid_packet(), samples)


def test_random_garbage_never_crashes() -> None:
    rng = random.Random(1234)
    good = _valid_packet()
    dec = opus.Decoder()
    for _ in range(3000):
        kind = rng.random()
        if kind < 0.4:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 80)))
        elif kind < 0.8:  # a real packet with a few bytes flipped or cut
            data = bytearray(good[: rng.randrange(1, len(good) + 1)])
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.getrandbits(8)
            data = bytes(data)
        else:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1200, 5000)))
        try:
            pcm = dec.decode(data)
        except opus.OpusError:
            pcm = None
        if pcm is not None:
            assert len(pcm) % 4 == 0 and len(pcm) // 4 == opus.packet_samples(data)
        assert isinstance(opus.packet_has_lbrr(data), bool)
        assert opus.packet_samples(data) >= 0
    assert len(dec.decode(good)) == N * 4


@pytest.mark.parametrize("value", [None, 5, 3.5, "x", object()])
def test_packet_helpers_never_raise(value: object) -> None:
    assert opus.packet_has_lbrr(value) is False  # type: ignore[arg-type]
    assert opus.packet_samples(value) == 0  # type: ignore[arg-type]


def test_packet_helpers_take_any_buffer() -> None:
    p = encode_all(frames_of(tone(0.2)), opus.VoiceSettings(), 10)[-1]
    for form in (p, bytearray(p), memoryview(p)):
        assert opus.packet_has_lbrr(form)
        assert opus.packet_samples(form) == N


# ---------------------------------------------------------------------- lifecycle


def test_close_is_idempotent_and_closed_objects_refuse_work() -> None:
    enc, dec = opus.Encoder(), opus.Decoder()
    packet = enc.encode(b"\0" * N * 4)
    for obj in (enc, dec):
        obj.close()
        obj.close()
        assert obj.closed
    with pytest.raises(opus.OpusError, match="closed"):
        enc.encode(b"\0" * N * 4)
    with pytest.raises(opus.OpusError, match="closed"):
        enc.set_expected_loss(5)
    with pytest.raises(opus.OpusError, match="closed"):
        enc.get_ctl(opus.OPUS_GET_BITRATE_REQUEST)
    for call in (
        lambda: dec.decode(packet),
        dec.conceal,
        lambda: dec.decode_fec(packet),
        dec.reset,
    ):
        with pytest.raises(opus.OpusError, match="closed"):
            call()


def test_many_objects_are_freed_by_the_collector() -> None:
    for _ in range(2000):
        opus.Decoder()
        with opus.Encoder():
            pass
    gc.collect()


def test_reset_forgets_history() -> None:
    packets = encode_all(frames_of(speech_like(1.0)), opus.VoiceSettings(), 0)
    fresh, used = opus.Decoder(), opus.Decoder()
    for p in packets[:20]:
        used.decode(p)
    used.reset()
    assert [used.decode(p) for p in packets[20:30]] == [fresh.decode(p) for p in packets[20:30]]
    enc = opus.Encoder()
    enc.encode(frames_of(tone(0.1))[0])
    enc.reset()
    assert enc.get_ctl(opus.OPUS_GET_BITRATE_REQUEST) == 40000


# ---------------------------------------------------------------------- FEC / LBRR


def _active(frames: list[bytes]) -> list[bool]:
    """Frames loud enough to be speech (the encoder sends no LBRR in pauses)."""
    return [float(np.sqrt(np.mean(left(f) ** 2))) > 1000 for f in frames]


@pytest.mark.parametrize("loss", [3, 10, 25])
def test_fec_with_expected_loss_puts_lbrr_in_speech_and_tone_packets(loss: int) -> None:
    """LBRR rides in the packet *after* the frame it protects, and only for active frames.

    SILK's voice activity detector decides what is active: speech is, and so
    are the marker bursts; a perfectly steady tone is not for long (the VAD
    takes it for background noise after about half a second).
    """
    speech = frames_of(speech_like(4.0))
    packets = encode_all(speech, opus.VoiceSettings(), loss)
    active = _active(speech)
    carried = [opus.packet_has_lbrr(packets[i + 1]) for i in range(len(speech) - 1) if active[i]]
    assert sum(carried) >= 0.85 * len(carried)
    pcm, _ = markers.MarkerSource().read(SR * 4)
    bursts = frames_of(np.frombuffer(pcm.tobytes(), dtype=np.int16))
    packets = encode_all(bursts, opus.VoiceSettings(), loss)
    loud = [i for i, f in enumerate(bursts[:-1]) if np.max(np.abs(left(f))) > markers.THRESHOLD]
    assert len(loud) > 30
    assert all(opus.packet_has_lbrr(packets[i + 1]) for i in loud)
    # the quiet background between bursts carries none
    assert sum(map(opus.packet_has_lbrr, packets)) < 0.4 * len(packets)


@pytest.mark.parametrize(
    ("settings", "loss"),
    [(opus.VoiceSettings(fec=False), 10), (opus.VoiceSettings(), 0)],
)
def test_no_lbrr_without_fec_or_without_expected_loss(
    settings: opus.VoiceSettings, loss: int
) -> None:
    packets = encode_all(frames_of(speech_like(3.0)), settings, loss)
    assert not any(map(opus.packet_has_lbrr, packets))


def test_expected_loss_switches_lbrr_on_and_off_at_run_time() -> None:
    enc = opus.Encoder()
    frames = frames_of(speech_like(6.0))
    active = _active(frames)
    got = []
    for i, frame in enumerate(frames):
        if i in (0, 200):
            enc.set_expected_loss(0)
        elif i == 100:
            enc.set_expected_loss(8)
        got.append(opus.packet_has_lbrr(enc.encode(frame)))
    assert not any(got[:100]) and not any(got[201:])
    protected = [got[i + 1] for i in range(101, 199) if active[i]]
    assert len(protected) > 40 and sum(protected) >= 0.85 * len(protected)


def _lbrr_cases() -> list[tuple[str, list[bytes]]]:
    speech = speech_like(2.0)
    marker_pcm, _ = markers.MarkerSource().read(SR * 2)
    marker = np.frombuffer(marker_pcm.tobytes(), dtype=np.int16)
    wb = opus.OPUS_BANDWIDTH_WIDEBAND
    cases: list[tuple[str, list[bytes]]] = []
    for name, signal in (("speech", speech), ("marker", marker), ("tone", tone(2.0))):
        for fec, loss in ((True, 10), (False, 10), (True, 0)):
            s = opus.VoiceSettings(fec=fec)
            cases.append((f"{name} fec={fec} loss={loss}", encode_all(frames_of(signal), s, loss)))
        # SILK-only 10/40/60 ms packets (one, two and three SILK frames), and
        # hybrid 40 ms (code 3, two frames).
        for samples, bw in (
            (480, wb),
            (1920, wb),
            (2880, wb),
            (1920, opus.OPUS_BANDWIDTH_FULLBAND),
        ):
            s = opus.VoiceSettings(max_bandwidth=bw)
            cases.append(
                (
                    f"{name} {samples} bw={bw}",
                    encode_all(frames_of(signal, samples), s, 10, samples=samples),
                )
            )
        # stereo streams: LBRR flags of the mid and the side channel
        lr = np.stack([signal, np.roll(signal, 240) // 2], axis=1).reshape(-1).astype(np.int16)
        st = [lr[i : i + 2 * N].tobytes() for i in range(0, len(lr) - 2 * N + 1, 2 * N)]
        for bw in (wb, opus.OPUS_BANDWIDTH_FULLBAND):
            s = opus.VoiceSettings(mono=False, bitrate=64000, max_bandwidth=bw)
            cases.append((f"{name} stereo bw={bw}", encode_all(st, s, 10)))
    return cases


def test_packet_has_lbrr_agrees_with_libopus_1_6(bundled: ctypes.CDLL) -> None:
    seen = {True: 0, False: 0}
    stereo = silk_multi = 0
    for name, packets in _lbrr_cases():
        for p in packets:
            want = bundled.opus_packet_has_lbrr(p, len(p)) > 0
            assert opus.packet_has_lbrr(p) == want, (name, p[:4].hex())
            seen[want] += 1
            stereo += bool(p[0] & 0x04 and want)
            silk_multi += bool(p[0] < 0x60 and opus.packet_samples(p) > N and want)
        if "fec=False" in name or "loss=0" in name:
            assert not any(map(opus.packet_has_lbrr, packets)), name
    assert seen[True] > 500 and seen[False] > 500
    assert stereo > 20 and silk_multi > 20


def test_packet_parsing_agrees_with_libopus_on_fuzzed_packets(
    lib: ctypes.CDLL, bundled: ctypes.CDLL
) -> None:
    rng = random.Random(99)
    real = [p for _, ps in _lbrr_cases()[:6] for p in ps[::7]]
    valid = 0
    for i in range(20000):
        if i % 2:
            body = bytearray(rng.choice(real))
            body[0] = (body[0] & 0xFC) | rng.randrange(4)  # another framing code
            if body[0] & 3 == 3 and len(body) > 1 and rng.random() < 0.7:
                body[1] = rng.choice([0x01, 0x02, 0x03, 0x41, 0x42, 0x81, 0x82, 0xC2, 0x83])
            cut = rng.randrange(1, len(body) + 1)
            data = bytes(body[:cut])
        else:
            size = rng.choice([1, 2, 3, 4, 5, 8, 20, 300, 1277, 2600])
            data = bytes(rng.getrandbits(8) for _ in range(size))
        parses = c_parse_ok(lib, data)
        assert (opus.packet_samples(data) > 0) == parses, data[:8].hex()
        if parses:
            valid += 1
            assert opus.packet_samples(data) == c_nb_samples(lib, data)
            first = opus._first_frame(data)
            assert first is not None
            if first[2] > 0:  # libopus would read past an empty first frame
                want = bundled.opus_packet_has_lbrr(data, len(data)) > 0
                assert opus.packet_has_lbrr(data) == want, data[:8].hex()
        else:
            assert not opus.packet_has_lbrr(data)
    assert valid > 3000


def _decode_with_losses(packets: list[bytes], lost: set[int], mode: str) -> list[bytes]:
    dec = opus.Decoder()
    out = []
    for i, p in enumerate(packets):
        if i not in lost:
            out.append(dec.decode(p))
        elif mode == "fec":
            out.append(dec.decode_fec(packets[i + 1]))
        else:
            out.append(dec.conceal())
    return out


def test_decode_fec_rebuilds_lost_frames_far_better_than_concealment() -> None:
    frames = frames_of(speech_like(8.0, seed=3))
    packets = encode_all(frames, opus.VoiceSettings(), 10)
    active = _active(frames)
    lost = {i for i in range(5, len(packets) - 1, 7) if active[i] and active[i - 1]}
    assert len(lost) > 25
    ref = _decode_with_losses(packets, set(), "clean")
    fec = _decode_with_losses(packets, lost, "fec")
    plc = _decode_with_losses(packets, lost, "plc")
    fec_snr, plc_snr, fec_corr, plc_corr = [], [], [], []
    for i in sorted(lost):
        r, f, c = left(ref[i]), left(fec[i]), left(plc[i])
        fec_snr.append(snr_db(r, f))
        plc_snr.append(snr_db(r, c))
        fec_corr.append(float(np.dot(r, f) / math.sqrt(np.dot(r, r) * np.dot(f, f))))
        plc_corr.append(float(np.dot(r, c) / math.sqrt(np.dot(r, r) * max(np.dot(c, c), 1.0))))
    assert np.mean(fec_snr) > np.mean(plc_snr) + 6
    assert np.mean(fec_corr) > 0.85 > np.mean(plc_corr) + 0.2
    assert sum(f > c for f, c in zip(fec_snr, plc_snr, strict=True)) >= 0.9 * len(lost)
    # and the frame after the gap is closer to the real stream, too
    after = [
        snr_db(left(ref[i + 1]), left(fec[i + 1])) - snr_db(left(ref[i + 1]), left(plc[i + 1]))
        for i in lost
    ]
    assert np.mean(after) > 3


def test_decode_fec_without_lbrr_is_concealment() -> None:
    packets = encode_all(frames_of(speech_like(1.0)), opus.VoiceSettings(fec=False), 10)
    a, b = opus.Decoder(), opus.Decoder()
    for p in packets[:20]:
        a.decode(p)
        b.decode(p)
    assert a.decode_fec(packets[20]) == b.conceal()


def test_markers_survive_losing_their_pitch_window_only_with_fec() -> None:
    """Drop, for every marker burst, the frame its detector reads the pitch from.

    transceiver/markers.py is how the project measures round trips; with FEC
    each burst comes back at the same onset, with concealment none does.
    """
    pcm, sent = markers.MarkerSource().read(SR * 6)
    frames = frames_of(np.frombuffer(pcm.tobytes(), dtype=np.int16))
    enc = opus.Encoder()
    enc.set_expected_loss(10)
    packets = [enc.encode(f) for f in frames]
    delay = enc.lookahead_samples
    lost = {(m.sample + delay + 480) // N for m in sent}

    def heard(mode: str) -> int:
        out = array("h")
        out.frombytes(b"".join(_decode_with_losses(packets, lost, mode)))
        detector = markers.MarkerDetector()
        found = detector.feed(out[0::2])
        count = len(markers.DEFAULT_FREQUENCIES)
        return sum(
            any(
                d.marker_id == m.marker_id(count) and abs(d.sample - m.sample - delay) < 48
                for d in found
            )
            for m in sent
        )

    assert len(sent) == 24
    assert heard("fec") == len(sent)
    assert heard("plc") <= len(sent) // 4
