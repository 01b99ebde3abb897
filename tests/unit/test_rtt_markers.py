"""Round-trip markers through a real Opus encoder and decoder (libopus, via av).

The voice client's latency number is only as good as these markers: each test
pushes the generated audio through the same codec settings aiortc uses, adds
a known delay (and noise, loss, odd chunking), and checks that the detector
finds every burst, names it correctly, and measures the delay to within a
millisecond.
"""

from __future__ import annotations

import fractions
import random
from array import array

import av
import pytest

from transceiver.markers import (
    DEFAULT_FREQUENCIES,
    DEFAULT_PERIOD,
    SAMPLE_RATE,
    MarkerDetector,
    MarkerSource,
    RoundTrips,
    percentile,
)

FRAME = 960  # 20 ms at 48 kHz, as aiortc sends
TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
TOLERANCE = 48  # samples: 1 ms


class OpusLink:
    """Encode mono s16 frames as aiortc does (libopus, stereo, 96 kb/s, voip), then decode."""

    def __init__(self) -> None:
        self.enc = av.CodecContext.create("libopus", "w")
        self.enc.bit_rate = 96000
        self.enc.format = "s16"
        self.enc.layout = "stereo"
        self.enc.sample_rate = SAMPLE_RATE
        self.enc.time_base = TIME_BASE
        self.enc.options = {"application": "voip"}
        self.dec = av.CodecContext.create("libopus", "r")
        self.dec.format = "s16"
        self.dec.layout = "stereo"
        self.dec.sample_rate = SAMPLE_RATE
        self.pts = 0

    def encode(self, mono: array) -> list[av.Packet]:
        stereo = array("h", bytes(len(mono) * 4))
        stereo[0::2] = mono
        stereo[1::2] = mono
        frame = av.AudioFrame(format="s16", layout="stereo", samples=len(mono))
        frame.planes[0].update(stereo.tobytes())
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self.pts
        frame.time_base = TIME_BASE
        self.pts += len(mono)
        return list(self.enc.encode(frame))

    def decode(self, packet: av.Packet | None) -> array:
        """Decoded channel 0 (a None packet asks the decoder to conceal a lost one)."""
        out = array("h")
        if packet is None:
            return out
        for frame in self.dec.decode(packet):
            samples = array("h", bytes(frame.planes[0]))[: frame.samples * 2]
            out.extend(samples[0::2])
        return out


def transmit(
    seconds: float,
    delay_samples: int,
    *,
    noise: int = 0,
    lose_every: int = 0,
    chunk: int = FRAME,
    seed: int = 1,
) -> tuple[list, list]:
    """Send `seconds` of marker audio through Opus with a delay; return (sent, detected)."""
    rng = random.Random(seed)
    source = MarkerSource()
    link = OpusLink()
    detector = MarkerDetector()
    sent, found = [], []
    received = array("h", bytes(2 * delay_samples))  # the delay: silence before the stream
    frames = round(seconds * SAMPLE_RATE / FRAME)
    for n in range(frames):
        mono, markers = source.read(FRAME)
        sent.extend(markers)
        for packet in link.encode(mono):
            if lose_every and n % lose_every == lose_every - 1:
                received.extend(array("h", bytes(2 * FRAME)))  # lost: a gap of silence
                continue
            received.extend(link.decode(packet))
        if noise:
            for i in range(len(received)):
                received[i] = max(-32768, min(32767, received[i] + rng.randint(-noise, noise)))
        while len(received) >= chunk:
            found.extend(detector.feed(received[:chunk]))
            del received[:chunk]
    found.extend(detector.feed(received))
    return sent, found


def codec_delay() -> int:
    """Opus's own delay (encoder lookahead plus decoder), measured with no added delay."""
    sent, found = transmit(2.0, 0)
    assert len(found) == len(sent) > 0
    delays = {d.sample - m.sample for m, d in zip(sent, found, strict=True)}
    assert max(delays) - min(delays) <= TOLERANCE
    return round(sum(delays) / len(delays))


@pytest.fixture(scope="module")
def opus_delay() -> int:
    delay = codec_delay()
    assert 0 <= delay <= 0.030 * SAMPLE_RATE, "Opus delay should be a few milliseconds"
    return delay


@pytest.mark.parametrize("delay_ms", [0, 7, 20, 93, 240])
def test_delay_through_opus_is_measured_to_the_millisecond(opus_delay: int, delay_ms: int) -> None:
    delay = delay_ms * SAMPLE_RATE // 1000
    sent, found = transmit(3.0, delay)
    assert len(sent) == int(3.0 / DEFAULT_PERIOD)  # one marker per period, first at 0.1 s
    assert [d.marker_id for d in found] == [m.seq % len(DEFAULT_FREQUENCIES) for m in sent]
    for marker, detection in zip(sent, found, strict=True):
        measured = detection.sample - marker.sample - opus_delay
        assert abs(measured - delay) <= TOLERANCE, (marker, detection)


def test_markers_later_than_one_period_pair_by_pitch(opus_delay: int) -> None:
    """A round trip longer than the marker period still pairs each burst with its own."""
    delay = round(0.62 * SAMPLE_RATE)  # 2.5 periods
    sent, found = transmit(4.0, delay)
    trips = RoundTrips()
    for m in sent:
        trips.on_sent(m.seq, m.sample / SAMPLE_RATE)
    for d in found:
        trips.on_detected(d.marker_id, d.sample / SAMPLE_RATE)
    expected = (delay + opus_delay) / SAMPLE_RATE
    assert trips.samples and trips.unmatched == 0
    assert all(abs(rtt - expected) <= 0.001 for rtt in trips.samples)
    assert len(trips.samples) == len(found)


def test_chunking_does_not_change_detections() -> None:
    _, by_frame = transmit(2.0, 500)
    for chunk in (1, 37, 480, 4096):
        _, found = transmit(2.0, 500, chunk=chunk)
        assert found == by_frame


def test_noise_is_tolerated(opus_delay: int) -> None:
    sent, found = transmit(3.0, 1000, noise=800)  # about -35 dBFS of white noise
    assert len(found) == len(sent)
    for marker, detection in zip(sent, found, strict=True):
        assert abs(detection.sample - marker.sample - opus_delay - 1000) <= TOLERANCE


def test_lost_packets_lose_at_most_their_markers(opus_delay: int) -> None:
    sent, found = transmit(5.0, 0, lose_every=7)
    assert len(found) >= len(sent) // 2
    trips = RoundTrips()
    for m in sent:
        trips.on_sent(m.seq, m.sample / SAMPLE_RATE)
    for d in found:
        trips.on_detected(d.marker_id, d.sample / SAMPLE_RATE)
    # Whatever was detected is either paired correctly or not at all: never a wrong RTT.
    for rtt in trips.samples:
        assert abs(rtt - opus_delay / SAMPLE_RATE) <= 0.002


def test_silence_and_background_alone_trigger_nothing() -> None:
    detector = MarkerDetector()
    assert detector.feed(array("h", bytes(2 * SAMPLE_RATE))) == []
    source = MarkerSource(first_onset=10.0)  # no burst within the first second
    mono, markers = source.read(SAMPLE_RATE)
    assert markers == []
    assert detector.feed(mono) == []


def test_source_is_continuous_across_reads() -> None:
    a = MarkerSource()
    whole, whole_markers = a.read(SAMPLE_RATE)
    b = MarkerSource()
    parts, part_markers = array("h"), []
    for size in (1, 959, 960, 7000, SAMPLE_RATE - 1 - 959 - 960 - 7000):
        samples, markers = b.read(size)
        parts.extend(samples)
        part_markers.extend(markers)
    assert parts == whole
    assert part_markers == whole_markers
    assert b.position == SAMPLE_RATE


def test_round_trips_bookkeeping() -> None:
    trips = RoundTrips(count=8, horizon=2.0)
    for seq in range(4):
        trips.on_sent(seq, seq * 0.25)
    assert trips.on_detected(1, 0.30) == pytest.approx(0.05)
    assert trips.on_detected(1, 0.31) is None  # marker 1 was already answered
    assert trips.on_detected(5, 0.40) is None  # nothing with pitch 5 was sent
    assert trips.unmatched == 2
    trips.on_sent(100, 30.0)
    assert trips.lost == 0  # the old markers were forgotten after 2 horizons
    assert 0 not in trips.sent


def test_percentile() -> None:
    assert percentile([], 50) is None
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 95) == 95.0
    assert percentile(values, 100) == 100.0
    assert percentile([3.0], 95) == 3.0


def test_arrival_clock_maps_samples_to_arrival_times() -> None:
    from transceiver.markers import ArrivalClock

    clock = ArrivalClock(keep=8)
    assert clock.time_of(0, 48000) is None  # nothing arrived yet
    for n in range(20):  # 20 frames of 960 samples, one every 20 ms from t=100 s
        clock.add(n * 960, 100.0 + n * 0.020)
    # A sample inside the newest frame: its frame's arrival plus its offset in the frame.
    assert clock.time_of(19 * 960 + 480, 48000) == pytest.approx(100.38 + 0.010)
    assert clock.time_of(15 * 960, 48000) == pytest.approx(100.30)
    # Frames trimmed away are not guessed at.
    assert clock.time_of(0, 48000) is None


def test_channel0_takes_the_first_channel_of_interleaved_frames() -> None:
    from av import AudioFrame

    from transceiver.markers import channel0

    frame = AudioFrame(format="s16", layout="stereo", samples=4)
    frame.planes[0].update(array("h", [1, -1, 2, -2, 3, -3, 4, -4]).tobytes())
    assert list(channel0(frame)) == [1, 2, 3, 4]
    mono = AudioFrame(format="s16", layout="mono", samples=3)
    mono.planes[0].update(array("h", [7, 8, 9]).tobytes())
    assert list(channel0(mono)) == [7, 8, 9]  # the samples only, not the plane's padding
