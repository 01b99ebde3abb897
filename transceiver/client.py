"""A voice client for `transceiver call`: WHIP-style signaling, WebRTC, latency probes.

One call: an aiortc peer connection with one send/receive audio track and the
`oai-events` data channel offers, POSTs the offer, applies the answer and
connects through whatever candidates the answer names (the relay's public
address). It then sends a marker tone (transceiver/markers.py) and pings on
the data channel, and measures, against the echo backend:

* setup: offer POSTed -> connection state "connected" (ICE + DTLS);
* audio round trip: each marker burst's send time -> its detection in the
  audio that comes back, on the client's monotonic clock;
* event round trip: a JSON event sent -> the backend's echo of it.

No ICE servers are configured: the client never sends anything to an address
other than the signaling URL and the candidates in the answer.

Every failure becomes a CallError with a one-line message; `place_calls`
never raises for a failed call, so N concurrent calls report N outcomes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import itertools
import json
import logging
import os
import time
from array import array
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.jitterbuffer import JitterBuffer
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame
from yarl import URL

from transceiver import aiortc_fast, playout
from transceiver.jitterbuffer import JitterConfig
from transceiver.markers import (
    DEFAULT_FREQUENCIES,
    DEFAULT_PERIOD,
    SAMPLE_RATE,
    ArrivalClock,
    MarkerDetector,
    MarkerSource,
    RoundTrips,
    ToneMeter,
    channel0,
    percentile,
)

log = logging.getLogger("splitrelay.transceiver.client")

# The same audio path as the transceiver's workers (adaptive jitter buffer, voice encoder),
# so what the client measures is what a browser-like client hears.
aiortc_fast.apply()

EVENTS_LABEL = "oai-events"
FRAME_SAMPLES = 960  # 20 ms at 48 kHz, aiortc's Opus frame
FRAME_SECONDS = FRAME_SAMPLES / SAMPLE_RATE
PING_TYPE = "splitrelay.ping"
DEFAULT_PATH = "/v1/calls"


class CallError(Exception):
    """A call failed; the message is one line for the operator."""


@dataclass
class CallOptions:
    """How to place a call (the `transceiver call` options)."""

    url: str
    token: str | None = None
    duration: float = 5.0
    timeout: float = 15.0  # signaling plus ICE/DTLS setup
    realtime: bool = False  # POST multipart/form-data as OpenAI's Realtime API expects
    event_interval: float = 0.25
    marker_period: float = DEFAULT_PERIOD
    require_echo: bool = True
    hangup: bool = True
    jitter: JitterConfig = field(default_factory=JitterConfig)  # the receive buffer

    def endpoint(self) -> URL:
        """The POST URL; a bare http://host:port means the default /v1/calls."""
        url = URL(self.url)
        if url.path in ("", "/"):
            url = url.with_path("/v1/realtime/calls" if self.realtime else DEFAULT_PATH)
        return url


@dataclass
class CallResult:
    """The outcome of one call; times in seconds."""

    index: int
    ok: bool = False
    error: str | None = None
    call_id: str | None = None
    signaling_seconds: float | None = None
    setup_seconds: float | None = None
    audio_rtts: list[float] = field(default_factory=list)
    # One [t, rtt_ms] per audio_rtts entry, in the same order: t is the unix time the
    # echoed marker came back, so runs of several processes share one time axis.
    samples: list[list[float]] = field(default_factory=list)
    markers_sent: int = 0
    markers_lost: int = 0
    event_rtts: list[float] = field(default_factory=list)
    events_sent: int = 0
    audio_frames_in: int = 0
    audio_frames_out: int = 0
    # The receive buffer's figures (transceiver/playout.py's PlayoutCounters.snapshot()).
    playout: dict[str, Any] = field(default_factory=dict)
    # Share of the listening time whose echoed background tone was intact (markers.ToneMeter).
    tone_intact: float | None = None


# --------------------------------------------------------------------- media


class MarkerTrack(MediaStreamTrack):
    """Outgoing audio: the marker source, paced in real time, one 20 ms frame per recv().

    Each marker's send time is the moment its frame is handed to the encoder
    plus its offset in the frame: a frame's samples are taken to span the 20 ms
    after that moment, the same convention the receive side uses.
    """

    kind = "audio"

    def __init__(self, source: MarkerSource, trips: RoundTrips) -> None:
        super().__init__()
        self.source = source
        self.trips = trips
        self.frames = 0
        self.markers = True  # False: keep the stream going but send silence, no new markers
        self._start: float | None = None
        self._loop = asyncio.get_running_loop()

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = self._loop.time()
        if self._start is None:
            self._start = now
        else:
            due = self._start + self.source.position / SAMPLE_RATE
            if due > now:
                await asyncio.sleep(due - now)
        sent_at = self._loop.time()
        start = self.source.position
        samples, markers = self.source.read(FRAME_SAMPLES)
        if self.markers:
            for marker in markers:
                self.trips.on_sent(marker.seq, sent_at + (marker.sample - start) / SAMPLE_RATE)
        else:
            samples = array("h", bytes(2 * FRAME_SAMPLES))
        frame = AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.planes[0].update(samples.tobytes())
        frame.pts = start
        frame.sample_rate = SAMPLE_RATE
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        self.frames += 1
        return frame


@dataclass
class _Listening:
    """The tone meter and when the first echoed frame came (for the meter's time base)."""

    meter: ToneMeter = field(default_factory=ToneMeter)
    first: float | None = None

    def share(self, now: float) -> float | None:
        return None if self.first is None else self.meter.share(now - self.first)


async def _listen(
    track: MediaStreamTrack,
    trips: RoundTrips,
    result: CallResult,
    loop: asyncio.AbstractEventLoop,
    listening: _Listening,
) -> None:
    """Feed received audio (channel 0) to the marker detector and the tone meter."""
    detector: MarkerDetector | None = None
    clock = ArrivalClock()
    wall_offset = time.time() - loop.time()  # loop time -> unix time, for `samples`
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        arrived = loop.time()
        if detector is None:
            detector = MarkerDetector(sample_rate=frame.sample_rate)
            listening.first = arrived
        clock.add(detector.position, arrived)
        result.audio_frames_in += 1
        samples = channel0(frame)
        if frame.sample_rate == SAMPLE_RATE:
            listening.meter.feed(samples)
        for found in detector.feed(samples):
            when = clock.time_of(found.sample, detector.sample_rate)
            if when is not None:
                rtt = trips.on_detected(found.marker_id, when)
                if rtt is not None:
                    result.samples.append([round(when + wall_offset, 4), round(rtt * 1000, 3)])


# --------------------------------------------------------------------- events


class _EventProbe:
    """Pings on the data channel; the echo backend returns each one inside an `echo` event."""

    def __init__(self, channel: RTCDataChannel, result: CallResult, interval: float) -> None:
        self.channel = channel
        self.result = result
        self.interval = interval
        self.pending: dict[str, float] = {}
        self.received = 0
        self._ids = itertools.count(1)
        self._loop = asyncio.get_running_loop()
        channel.on("message", self._on_message)

    def _on_message(self, message: str | bytes) -> None:
        self.received += 1
        if not isinstance(message, str):
            return
        try:
            event = json.loads(message)
        except ValueError:
            return
        if not isinstance(event, dict) or event.get("type") != "echo":
            return
        inner = event.get("event")
        event_id = inner.get("event_id") if isinstance(inner, dict) else None
        sent = self.pending.pop(event_id, None) if isinstance(event_id, str) else None
        if sent is not None:
            self.result.event_rtts.append(self._loop.time() - sent)

    async def run(self, until: float) -> None:
        """Ping every interval until the loop time `until`."""
        while self._loop.time() < until:
            if self.channel.readyState == "open":
                event_id = f"ping_{next(self._ids)}"
                self.pending[event_id] = self._loop.time()
                self.channel.send(json.dumps({"type": PING_TYPE, "event_id": event_id}))
                self.result.events_sent += 1
            await asyncio.sleep(self.interval)


# --------------------------------------------------------------------- signaling


async def _post_offer(
    http: aiohttp.ClientSession, options: CallOptions, offer_sdp: str
) -> tuple[str, URL | None]:
    """POST the offer; return (answer SDP, call URL from Location)."""
    url = options.endpoint()
    headers = {}
    if options.token:
        headers["Authorization"] = f"Bearer {options.token}"
    data: Any
    if options.realtime:
        data = aiohttp.FormData(default_to_multipart=True)
        data.add_field("sdp", offer_sdp)
    else:
        data = offer_sdp.encode("utf-8")
        headers["Content-Type"] = "application/sdp"
    async with http.post(url, data=data, headers=headers) as resp:
        body = await resp.read()
        if resp.status != 201:
            raise CallError(_http_error(resp, body))
        if not resp.content_type.startswith("application/sdp"):
            raise CallError(f"the server answered 201 with {resp.content_type}, not SDP")
        location = resp.headers.get("Location")
        call_url = url.join(URL(location)) if location else None
        return body.decode("utf-8", "replace"), call_url


def _http_error(resp: aiohttp.ClientResponse, body: bytes) -> str:
    """`HTTP 503 at_capacity: ... (retry after 2 s)` from the JSON error shape, if any."""
    detail = ""
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        error = json.loads(body)["error"]
        detail = f" {error['type']}: {error['message']}"
    if not detail:
        text = body.decode("utf-8", "replace").strip().splitlines()
        detail = f" {text[0][:200]}" if text else f" {resp.reason or ''}".rstrip()
    retry = resp.headers.get("Retry-After")
    suffix = f" (retry after {retry} s)" if retry else ""
    return f"HTTP {resp.status}{detail}{suffix}"


async def _hang_up(http: aiohttp.ClientSession, options: CallOptions, call_url: URL) -> None:
    headers = {"Authorization": f"Bearer {options.token}"} if options.token else {}
    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
        async with http.delete(call_url, headers=headers) as resp:
            await resp.read()


def _candidates(sdp: str) -> str:
    """The answer's candidate addresses, for a timeout message."""
    found = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            parts = line.split()
            if len(parts) >= 6:
                found.append(f"{parts[4]}:{parts[5]}")
    return ", ".join(found) or "none"


# --------------------------------------------------------------------- one call


async def place_call(
    options: CallOptions, index: int = 0, http: aiohttp.ClientSession | None = None
) -> CallResult:
    """Place one call and measure it; failures are in the result, never raised."""
    result = CallResult(index)
    own_http = http is None
    if http is None:
        http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=options.timeout))
    try:
        await _run_call(options, result, http)
    except CallError as exc:
        result.error = str(exc)
    except aiohttp.ClientConnectorError as exc:
        result.error = f"cannot reach {options.endpoint()}: {_os_reason(exc.os_error)}"
    except aiohttp.ClientError as exc:
        result.error = f"signaling failed: {type(exc).__name__}: {exc}".rstrip(": ")
    except TimeoutError:
        result.error = f"timed out after {options.timeout:g} s waiting for the signaling server"
    except OSError as exc:
        result.error = f"network error: {_os_reason(exc)}"
    except Exception as exc:  # a library bug must not take the other calls down with it
        log.debug("call %d failed", index, exc_info=True)
        result.error = f"unexpected {type(exc).__name__}: {str(exc).strip()[:200]}"
    finally:
        if own_http:
            await http.close()
    result.ok = result.error is None
    return result


def _os_reason(exc: OSError | None) -> str:
    """`Connection refused`, not asyncio's `Connect call failed ('10.0.0.1', 8080)`."""
    if exc is None:
        return "unknown error"
    if exc.errno and exc.errno > 0:  # getaddrinfo errors are negative: use their strerror
        return os.strerror(exc.errno)
    return exc.strerror or str(exc) or type(exc).__name__


async def _run_call(options: CallOptions, result: CallResult, http: aiohttp.ClientSession) -> None:
    loop = asyncio.get_running_loop()
    horizon = len(DEFAULT_FREQUENCIES) * options.marker_period
    trips = RoundTrips(count=len(DEFAULT_FREQUENCIES), horizon=horizon)
    source = MarkerSource(period=options.marker_period)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    track = MarkerTrack(source, trips)
    counters = playout.PlayoutCounters()
    listening = _Listening()
    tasks: list[asyncio.Task[None]] = []
    connected = asyncio.Event()
    failed = asyncio.Event()
    call_url: URL | None = None

    @pc.on("connectionstatechange")
    def _on_state() -> None:
        if pc.connectionState == "connected":
            connected.set()
        elif pc.connectionState in ("failed", "closed"):
            failed.set()

    @pc.on("track")
    def _on_track(remote: MediaStreamTrack) -> None:
        if remote.kind == "audio":
            tasks.append(asyncio.ensure_future(_listen(remote, trips, result, loop, listening)))

    try:
        pc.addTrack(track)
        _set_jitter_buffer(pc, options.jitter, counters)
        channel = pc.createDataChannel(EVENTS_LABEL)
        probe = _EventProbe(channel, result, options.event_interval)
        await pc.setLocalDescription(await pc.createOffer())
        started = loop.time()
        answer, call_url = await asyncio.wait_for(
            _post_offer(http, options, pc.localDescription.sdp), options.timeout
        )
        result.signaling_seconds = loop.time() - started
        if call_url is not None:
            result.call_id = call_url.name
        try:
            await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        except (ValueError, TypeError) as exc:
            raise CallError(f"the server's answer is not usable SDP: {exc}") from None
        remaining = options.timeout - (loop.time() - started)
        await _wait_connected(connected, failed, remaining, answer, options.timeout)
        result.setup_seconds = loop.time() - started

        end = loop.time() + options.duration
        tasks.append(asyncio.ensure_future(probe.run(end)))
        await _sleep_unless(failed, options.duration)
        # The tone is judged while it is sent (the tail that follows is silence).
        result.tone_intact = listening.share(loop.time())
        # No new markers; let the last ones and the pings come back before judging them lost.
        track.markers = False
        await _sleep_unless(failed, min(1.0, horizon))
        result.audio_rtts = list(trips.samples)
        result.markers_sent = trips.total_sent
        result.markers_lost = max(0, trips.total_sent - len(trips.samples))
        result.audio_frames_out = track.frames
        if failed.is_set():
            raise CallError("the WebRTC connection dropped during the call")
        if options.require_echo and not result.audio_rtts:
            raise CallError(
                f"connected, but no echoed audio came back in {options.duration:g} s "
                f"({track.frames} frames sent, {result.audio_frames_in} received)"
            )
        if options.require_echo and result.events_sent and not result.event_rtts:
            raise CallError(
                f"connected, but none of {result.events_sent} data channel events came back"
            )
    finally:
        track.stop()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        del result.samples[len(result.audio_rtts) :]  # detections after the cut-off
        result.playout = counters.snapshot()
        if call_url is not None and options.hangup:
            await _hang_up(http, options, call_url)
        with contextlib.suppress(Exception):
            await pc.close()


async def _sleep_unless(event: asyncio.Event, seconds: float) -> None:
    """Sleep, but wake up at once when `event` is set (the connection dropped)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)


def _set_jitter_buffer(
    pc: RTCPeerConnection,
    config: JitterConfig,
    counters: playout.PlayoutCounters,
    channels: int = 2,
) -> None:
    """The client's receive buffer: the adaptive one, as the workers use, or a 1-frame stock one.

    With transceiver/aiortc_fast.py's adaptive_playout in place (the pinned
    aiortc), the receiver gets ``config`` and reports to ``counters``. Without
    it (``SPLITRELAY_AIORTC_FAST=0``, the benchmarks' stock variant), aiortc's
    own buffer is lowered from 4 frames (80 ms) before decoding to 1, what a
    browser holds on a clean network, so the stock round trip is not made
    60 ms worse by the client alone. ``channels``: see playout.register.
    """
    attr = "_RTCRtpReceiver__jitter_buffer"
    adaptive = aiortc_fast.status().get("adaptive_playout", False)
    for transceiver in pc.getTransceivers():
        if transceiver.kind != "audio":
            continue
        receiver = transceiver.receiver
        if adaptive:
            playout.register(receiver, config, counters, channels)
        elif isinstance(getattr(receiver, attr, None), JitterBuffer):
            setattr(receiver, attr, JitterBuffer(capacity=16, prefetch=1))


async def _wait_connected(
    connected: asyncio.Event, failed: asyncio.Event, remaining: float, answer: str, timeout: float
) -> None:
    waiters = {
        asyncio.ensure_future(connected.wait()),
        asyncio.ensure_future(failed.wait()),
    }
    try:
        await asyncio.wait(
            waiters, timeout=max(0.0, remaining), return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for w in waiters:
            w.cancel()
    if connected.is_set():
        return
    if failed.is_set():
        raise CallError(
            f"the WebRTC connection failed (ICE/DTLS) via candidates {_candidates(answer)}"
        )
    raise CallError(
        f"timed out after {timeout:g} s waiting for the WebRTC connection "
        f"(ICE/DTLS) via candidates {_candidates(answer)}"
    )


# --------------------------------------------------------------------- many calls


async def place_calls(options: CallOptions, count: int, stagger: float = 0.0) -> list[CallResult]:
    """Place `count` concurrent calls (started `stagger` seconds apart); one result each."""
    timeout = aiohttp.ClientTimeout(total=options.timeout)
    connector = aiohttp.TCPConnector(limit=max(10, count))
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:

        async def one(i: int) -> CallResult:
            if stagger > 0:
                await asyncio.sleep(i * stagger)
            return await place_call(options, i, http)

        return list(await asyncio.gather(*(one(i) for i in range(count))))


def _distribution(values: Sequence[float]) -> dict[str, float | int | None]:
    return {
        "count": len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "max": max(values) if values else None,
    }


def summarize(results: Sequence[CallResult]) -> dict[str, Any]:
    """Percentiles over all calls, plus each call's own numbers (for --json)."""
    ok = [r for r in results if r.ok]
    audio = [x for r in results for x in r.audio_rtts]
    events = [x for r in results for x in r.event_rtts]
    return {
        "calls": len(results),
        "ok": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error}),
        "setup_seconds": _distribution([r.setup_seconds for r in results if r.setup_seconds]),
        "signaling_seconds": _distribution(
            [r.signaling_seconds for r in results if r.signaling_seconds]
        ),
        "audio_rtt_seconds": _distribution(audio),
        "markers_sent": sum(r.markers_sent for r in results),
        "markers_lost": sum(r.markers_lost for r in results),
        "event_rtt_seconds": _distribution(events),
        "events_sent": sum(r.events_sent for r in results),
        "jitter_buffer": _buffer_totals(results),
        "tone_intact": _mean([r.tone_intact for r in results if r.tone_intact is not None]),
        "per_call": [asdict(r) for r in results],
    }


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _buffer_totals(results: Sequence[CallResult]) -> dict[str, Any]:
    """The client's receive buffers over all calls: what a listener heard, frame by frame."""
    keys = ("played", "fec", "concealed", "late", "dropped", "skipped")
    totals: dict[str, Any] = {k: sum(int(r.playout.get(k, 0)) for r in results) for k in keys}
    count = sum(int(r.playout.get("delay_seconds", {}).get("count", 0)) for r in results)
    total = sum(float(r.playout.get("delay_seconds", {}).get("sum", 0.0)) for r in results)
    totals["delay_seconds_mean"] = total / count if count else None
    slots = totals["played"] + totals["fec"] + totals["concealed"]
    totals["concealed_share"] = totals["concealed"] / slots if slots else None
    return totals


def _ms(value: float | int | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f} ms"


def render_summary(summary: dict[str, Any]) -> str:
    """The human-readable summary `transceiver call` prints."""

    def line(label: str, dist: dict[str, Any], extra: str) -> str:
        return (
            f"{label:<11} p50 {_ms(dist['p50']):>9}  p95 {_ms(dist['p95']):>9}  "
            f"max {_ms(dist['max']):>9}  {extra}"
        ).rstrip()

    lines = [f"{'calls':<11} {summary['ok']} ok, {summary['failed']} failed"]
    lines.append(line("setup", summary["setup_seconds"], "(offer POSTed -> connected)"))
    lines.append(line("signaling", summary["signaling_seconds"], "(POST round trip)"))
    lines.append(
        line(
            "audio rtt",
            summary["audio_rtt_seconds"],
            f"({summary['audio_rtt_seconds']['count']} of {summary['markers_sent']} markers)",
        )
    )
    lines.append(
        line(
            "event rtt",
            summary["event_rtt_seconds"],
            f"({summary['event_rtt_seconds']['count']} of {summary['events_sent']} events)",
        )
    )
    buffer = summary.get("jitter_buffer") or {}
    if buffer.get("played"):
        share = buffer["concealed_share"] or 0.0
        lines.append(
            f"{'buffer':<11} mean {_ms(buffer['delay_seconds_mean']):>8}  "
            f"{buffer['played']} frames played, {buffer['fec']} FEC, "
            f"{buffer['concealed']} concealed ({share:.1%}), {buffer['late']} late, "
            f"{buffer['dropped']} dropped"
        )
    if summary.get("tone_intact") is not None:
        lines.append(f"{'tone':<11} {summary['tone_intact']:.1%} of the echo intact")
    return "\n".join(lines)


def failure_line(summary: dict[str, Any]) -> str | None:
    """One stderr line when any call failed, naming the (first) reason."""
    if not summary["failed"]:
        return None
    reason = summary["errors"][0] if summary["errors"] else "unknown error"
    if summary["calls"] == 1:
        return reason
    more = f" (+{len(summary['errors']) - 1} other reasons)" if len(summary["errors"]) > 1 else ""
    return f"{summary['failed']} of {summary['calls']} calls failed: {reason}{more}"
