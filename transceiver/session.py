"""One call: an aiortc peer connection whose ICE runs through the worker's tunnel mux.

The client offers; the session answers. Between ``setRemoteDescription`` and
``createAnswer`` the peer connection's single ICE transport is attached to the
mux (transceiver/mux.py): its ufrag becomes the routing token, its only local
candidates are the relay's public addresses. The client's own candidates are
removed from the offer before aiortc sees it: the transceiver must never send
toward an address the relay did not carry, and mDNS candidates would make
aioice query the local network. aioice learns the client's addresses from its
checks instead (peer-reflexive), which is also what the relay sees.

Media: received audio is decoded by aiortc and handed to the backend frame by
frame; the backend's ``audio_out`` is played back through a track paced at one
20 ms frame per 20 ms. Events: the ``oai-events`` data channel carries JSON
both ways (transceiver/backends.py and docs/backends.md describe the contract).

Lifecycle: new -> connecting (answer returned) -> connected (ICE + DTLS up; the
setup time, offer received to connected, is recorded) -> closed, or failed
(ICE/DTLS failure, consent lost, or no connection within the setup timeout).
Closing stops the backend, the peer connection and every task the session
started, and removes the session from the mux.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import itertools
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aioice.ice import validate_password, validate_username
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc import sdp as aiortc_sdp
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

from transceiver import aiortc_fast, backends, playout, voice_encoder
from transceiver.backends import Backend, Event, SessionInfo
from transceiver.jitterbuffer import JitterConfig
from transceiver.mux import Address, IceLink, SeamError, TunnelMux, attach
from transceiver.opus import VoiceSettings

log = logging.getLogger("splitrelay.transceiver.session")

# aiortc's audio path (overhead, jitter buffer, encoder), replaced where the pinned release
# allows (transceiver/aiortc_fast.py).
aiortc_fast.apply()

EVENTS_LABEL = "oai-events"
#: A real offer is a few kilobytes; this bounds parsing work on hostile input.
MAX_OFFER_BYTES = 64 * 1024
#: Largest client event accepted (a base64 audio append can be big).
MAX_EVENT_BYTES = 1 << 20
#: Events held until the data channel opens, and queued for the backend.
MAX_PENDING_EVENTS = 64
#: Above this many bytes buffered in the data channel, outgoing events are dropped.
MAX_CHANNEL_BUFFER = 1 << 20
DEFAULT_SETUP_TIMEOUT = 30.0
#: At most one backend-error event per this many seconds reaches the client.
BACKEND_ERROR_INTERVAL = 1.0

_TIME_BASE = fractions.Fraction(1, backends.SAMPLE_RATE)
_event_ids = itertools.count(1)


class BadOffer(ValueError):
    """The SDP offer cannot be answered; the message says why in one line (HTTP 400)."""


@dataclass(slots=True)
class SessionCounters:
    """Worker-wide totals, incremented in place by every session (one event loop, no locks)."""

    audio_frames_in: int = 0
    audio_frames_out: int = 0
    datachannel_messages_in: int = 0
    datachannel_messages_out: int = 0
    events_dropped: int = 0
    backend_errors: int = 0


# ---------------------------------------------------------------------- offers


def sanitize_offer(offer_sdp: str) -> str:
    """Check an offer is one we can answer; return it without the client's candidates.

    Accepted: one audio m-line offering Opus with rtcp-mux, at most one
    data channel m-line, bundled into one transport when there are two, ICE
    credentials and a DTLS fingerprint, full ICE (an ice-lite client would
    leave the transceiver controlling, sending checks to addresses it never
    heard from). Everything else raises BadOffer without touching aiortc.
    """
    if not isinstance(offer_sdp, str):
        raise BadOffer("the offer must be SDP text")
    if len(offer_sdp) > MAX_OFFER_BYTES:
        raise BadOffer(f"the offer is larger than {MAX_OFFER_BYTES} bytes")
    if not offer_sdp.lstrip().startswith("v=0"):
        raise BadOffer("the offer is not SDP (it must start with v=0)")
    if "\x00" in offer_sdp:
        raise BadOffer("the offer contains a NUL character")
    lines = [
        line
        for line in offer_sdp.strip().splitlines()
        if not line.startswith(("a=candidate:", "a=end-of-candidates"))
    ]
    text = "\r\n".join(line.strip() for line in lines if line.strip()) + "\r\n"
    try:
        description = aiortc_sdp.SessionDescription.parse(text)
    except Exception as exc:  # the parser raises anything from assert to IndexError
        raise BadOffer(f"the offer is not valid SDP ({type(exc).__name__}: {exc})") from None
    _check_media(description)
    return text


def _check_media(description: aiortc_sdp.SessionDescription) -> None:
    media = description.media
    kinds = [m.kind for m in media]
    if kinds.count("audio") != 1:
        raise BadOffer("the offer must have exactly one audio m-line")
    if kinds.count("application") > 1 or len(media) != 1 + kinds.count("application"):
        raise BadOffer("the offer may have only one audio and one data channel m-line")
    mids = [m.rtp.muxId for m in media]
    if any(not mid for mid in mids) or len(set(mids)) != len(mids):
        raise BadOffer("every m-line needs a distinct a=mid")
    bundles = [g for g in description.group if g.semantic == "BUNDLE"]
    if any(not g.items or not set(g.items) <= set(mids) for g in bundles):
        raise BadOffer("a=group:BUNDLE names an m-line the offer does not have")
    if len(media) > 1 and not any(set(mids) <= set(g.items) for g in bundles):
        raise BadOffer("the offer must bundle audio and data channel (a=group:BUNDLE)")
    for m in media:
        ice = m.ice
        if ice is None or not ice.usernameFragment or not ice.password:
            raise BadOffer(f"the {m.kind} m-line has no ICE ufrag/password")
        try:
            validate_username(ice.usernameFragment)
            validate_password(ice.password)
        except ValueError as exc:
            raise BadOffer(f"the {m.kind} m-line has invalid ICE credentials: {exc}") from None
        if ice.iceLite:
            raise BadOffer("ice-lite clients are not supported")
        if m.dtls is None or not m.dtls.fingerprints:
            raise BadOffer(f"the {m.kind} m-line has no DTLS fingerprint or setup")
        if m.kind == "audio":
            if m.direction not in aiortc_sdp.DIRECTIONS:
                raise BadOffer("the audio m-line has no direction (a=sendrecv ...)")
            if not m.rtcp_mux:
                raise BadOffer("the audio m-line must use rtcp-mux")
            if not any(c.mimeType.lower() == "audio/opus" for c in m.rtp.codecs):
                raise BadOffer("the audio m-line does not offer Opus")
            if "SAVPF" not in m.profile and "SAVP" not in m.profile:
                raise BadOffer(f"the audio m-line profile {m.profile} is not SRTP")
        elif "SCTP" not in m.profile:
            raise BadOffer(f"the data channel m-line profile {m.profile} is not SCTP")


def check_answer(answer_sdp: str, ufrag: str, public: Sequence[Address]) -> None:
    """The seam's contract, checked on every answer: our ufrag, only relay candidates.

    A violation is a seam bug (SeamError), not the caller's fault.
    """
    wanted = {(str(h), int(p)) for h, p in public}
    ufrags = set()
    for line in answer_sdp.splitlines():
        if line.startswith("a=ice-ufrag:"):
            ufrags.add(line.split(":", 1)[1].strip())
        elif line.startswith("a=candidate:"):
            fields = line.split()
            if len(fields) < 8 or (fields[4], int(fields[5])) not in wanted:
                raise SeamError(f"the answer advertises a non-relay candidate: {line}")
    if ufrags != {ufrag}:
        raise SeamError(f"the answer's ice-ufrag is {sorted(ufrags)}, not the token {ufrag}")


# ---------------------------------------------------------------------- media


#: How far ahead of its schedule a frame may be sent (seconds): the pacing's jitter tolerance.
PLAYBACK_BURST = 0.06


class PlaybackTrack(MediaStreamTrack):
    """Plays a backend's ``audio_out`` at real-time pace (one 20 ms frame per 20 ms).

    The pacing is a virtual schedule (GCRA, as in a token bucket): each frame
    has a due time 20 ms after the previous one's, and may go out up to
    PLAYBACK_BURST (3 frames) before it is due; a frame that comes late goes
    out at once and moves the schedule. So a backend that queues a long answer
    at once is played at speaking speed (never more than 3 frames early), one
    that pauses is not made to catch up, and audio that arrives in real time
    with some jitter (an echo, a streaming service) is sent as soon as it
    arrives: a late frame never becomes lasting delay, which a schedule
    anchored on one frame's arrival would add (by up to a frame per late
    frame, for the rest of the call).

    Timestamps follow the schedule, not the frame count: a frame that goes
    out late (the backend paused, or the loop was busy) has a pts later by
    as much, so its RTP timestamp says when it was played, as a sender with
    DTX does. The receiver's jitter buffer measures delay from arrival
    against timestamp; a pause that left the timestamps where they were
    would read to it as that much sudden delay.
    """

    kind = "audio"

    def __init__(self, queue: asyncio.Queue[bytes], channels: int, counters: SessionCounters):
        super().__init__()
        if channels not in (1, 2):
            raise ValueError(f"output_channels must be 1 or 2, got {channels}")
        self._queue = queue
        self._layout = "stereo" if channels == 2 else "mono"
        self._size = backends.frame_bytes(channels)
        self._counters = counters
        self._next: float | None = None
        self._pts = 0

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        while True:
            pcm = await self._queue.get()
            if len(pcm) == self._size:
                break
            self._counters.backend_errors += 1  # a wrong-size frame: skip it, keep playing
        now = loop.time()
        due = now if self._next is None else self._next
        early = due - PLAYBACK_BURST - now
        if early > 0:
            await asyncio.sleep(early)
            now += early
        if now > due:  # late, or after a pause: the RTP clock moves on with real time
            self._pts += round((now - due) * backends.SAMPLE_RATE)
        self._next = max(due, now) + backends.FRAME_SECONDS
        frame = AudioFrame(format="s16", layout=self._layout, samples=backends.FRAME_SAMPLES)
        frame.planes[0].update(pcm)
        frame.sample_rate = backends.SAMPLE_RATE
        frame.time_base = _TIME_BASE
        frame.pts = self._pts
        self._pts += backends.FRAME_SAMPLES
        self._counters.audio_frames_out += 1
        return frame


# ---------------------------------------------------------------------- the session


class CallSession:
    """One WebRTC call on a worker; see the module docstring for its life.

    ``on_connected`` is called once, when ICE and DTLS are up (setup_seconds
    is set); ``on_closed`` once, after cleanup, so the worker can forget the
    session; ``start`` raises BadOffer (after cleaning up) for an offer it
    cannot answer.
    """

    def __init__(
        self,
        call_id: str,
        *,
        mux: TunnelMux,
        ufrag: str,
        transceiver_id: int,
        public_candidates: Sequence[Address],
        backend: Backend,
        counters: SessionCounters,
        setup_timeout: float = DEFAULT_SETUP_TIMEOUT,
        jitter: JitterConfig | None = None,
        voice: VoiceSettings | None = None,
        playout_counters: playout.PlayoutCounters | None = None,
        offer_received: float | None = None,
        on_connected: Callable[[CallSession], None] | None = None,
        on_closed: Callable[[CallSession], None] | None = None,
    ) -> None:
        self.call_id = call_id
        self.ufrag = ufrag
        self.transceiver_id = transceiver_id
        self.state = "new"
        self.offer_received = time.monotonic() if offer_received is None else offer_received
        self.setup_seconds: float | None = None
        self.close_reason: str | None = None
        self._mux = mux
        self._public = list(public_candidates)
        self._backend = backend
        self._counters = counters
        self._setup_timeout = setup_timeout
        self._jitter = jitter or JitterConfig()
        self._voice = voice or VoiceSettings()
        self._playout = playout_counters or playout.default_counters()
        self._on_connected = on_connected
        self._on_closed = on_closed
        self._pc: RTCPeerConnection | None = None
        self._link: IceLink | None = None
        self._channel: RTCDataChannel | None = None
        self._held: list[str] = []
        self._inbox: asyncio.Queue[Event] = asyncio.Queue(maxsize=MAX_PENDING_EVENTS)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._last_error_event = -BACKEND_ERROR_INTERVAL
        self._closing = False
        self._closed = asyncio.Event()

    # -- setup

    async def start(self, offer_sdp: str) -> str:
        """Answer the offer; return the answer SDP. Cleans up on any failure."""
        try:
            return await self._start(offer_sdp)
        except BaseException:
            await self.close("setup_failed")
            raise

    async def _start(self, offer_sdp: str) -> str:
        offer = sanitize_offer(offer_sdp)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self._pc = pc
        pc.on("track", self._on_track)
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", self._on_connection_state)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        except Exception as exc:
            self._check_not_closed()
            raise BadOffer(f"the offer was rejected: {type(exc).__name__}: {exc}") from None

        dtls = [t.receiver.transport for t in pc.getTransceivers()]
        if pc.sctp is not None:
            dtls.append(pc.sctp.transport)
        transports = {d.transport for d in dtls if d is not None}
        if len(transports) != 1 or None in dtls:
            raise BadOffer("the offer's m-lines do not share one transport (BUNDLE)")
        self._link = attach(transports.pop()._connection, self._mux, self.ufrag, self._public)

        track = PlaybackTrack(
            self._backend.audio_out, self._backend.output_channels, self._counters
        )
        pc.addTrack(track)
        for transceiver in pc.getTransceivers():
            if transceiver.kind == "audio":
                playout.register(transceiver.receiver, self._jitter, self._playout)
                voice_encoder.register(transceiver.sender, self._voice)
        await self._backend.start(
            SessionInfo(self.call_id, self.transceiver_id, send_event=self.send_event)
        )
        try:
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:
            # Answering depends only on the offer once it was accepted: an odd
            # offer aiortc took but cannot answer is still the caller's fault.
            self._check_not_closed()
            log.debug("call %s: aiortc could not answer", self.call_id, exc_info=True)
            raise BadOffer(f"the offer cannot be answered: {type(exc).__name__}: {exc}") from None
        answer = pc.localDescription.sdp
        check_answer(answer, self.ufrag, self._public)
        self._check_not_closed()
        self.state = "connecting"
        loop = asyncio.get_running_loop()
        remaining = self._setup_timeout - (time.monotonic() - self.offer_received)
        self._timer = loop.call_later(max(0.0, remaining), self._setup_expired)
        self._spawn(self._event_loop())
        return answer

    def _check_not_closed(self) -> None:
        """Raise ConnectionError if the call was ended while it was being set up.

        A hang-up during setup closes the peer connection under aiortc's feet;
        what aiortc then raises is not the offer's fault.
        """
        if self._closing:
            raise ConnectionError("the call was ended while it was being set up")

    # -- peer connection events

    def _on_connection_state(self) -> None:
        pc = self._pc
        if pc is None or self._closing:
            return
        state = pc.connectionState
        if state == "connected" and self.state != "connected":
            self.state = "connected"
            self.setup_seconds = time.monotonic() - self.offer_received
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._on_connected is not None:
                self._on_connected(self)
        elif state in ("failed", "closed"):
            self._spawn(self.close("failed" if state == "failed" else "closed"))

    def _setup_expired(self) -> None:
        self._timer = None
        if self.state != "connected" and not self._closing:
            self._spawn(self.close("setup_timeout"))

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio":
            self._spawn(self._pump_audio(track))

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label != EVENTS_LABEL or self._channel is not None:
            return
        self._channel = channel
        channel.on("message", self._on_message)
        if channel.readyState == "open":
            self._channel_open()
        else:
            channel.on("open", self._channel_open)

    def _channel_open(self) -> None:
        self.send_event(
            {
                "type": "session.created",
                "session": {
                    "id": self.call_id,
                    "object": "realtime.session",
                    "backend": self._backend.name,
                    "audio": {"codec": "opus", "sample_rate": backends.SAMPLE_RATE},
                },
            }
        )
        held, self._held = self._held, []
        for text in held:
            self._send_text(text)

    # -- audio

    async def _pump_audio(self, track: MediaStreamTrack) -> None:
        """Decoded frames to the backend: one await per frame, no conversion."""
        backend = self._backend
        counters = self._counters
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            channels = 2 if frame.layout.name == "stereo" else 1
            pcm = bytes(memoryview(frame.planes[0])[: frame.samples * channels * 2])
            counters.audio_frames_in += 1
            try:
                await backend.on_audio(pcm, frame.sample_rate, channels)
            except Exception as exc:
                self._backend_failed(exc)

    # -- events

    def send_event(self, event: Event) -> None:
        """Queue one event to the client (SessionInfo.send_event); never blocks, never raises."""
        if self._closing:
            return
        if "event_id" not in event:
            event = {"event_id": f"event_{next(_event_ids)}", **event}
        try:
            text = json.dumps(event, separators=(",", ":"))
        except (TypeError, ValueError):
            self._counters.backend_errors += 1
            return
        channel = self._channel
        if channel is None or channel.readyState != "open":
            if len(self._held) < MAX_PENDING_EVENTS:
                self._held.append(text)
            else:
                self._counters.events_dropped += 1
            return
        self._send_text(text)

    def _send_text(self, text: str) -> None:
        channel = self._channel
        if channel is None or channel.readyState != "open":
            self._counters.events_dropped += 1
            return
        if channel.bufferedAmount > MAX_CHANNEL_BUFFER:
            self._counters.events_dropped += 1
            return
        channel.send(text)
        self._counters.datachannel_messages_out += 1

    def _on_message(self, message: str | bytes) -> None:
        self._counters.datachannel_messages_in += 1
        if isinstance(message, bytes):
            self._client_error("invalid_event", "binary messages are not supported")
            return
        if len(message) > MAX_EVENT_BYTES:
            self._client_error("invalid_event", f"events are limited to {MAX_EVENT_BYTES} bytes")
            return
        try:
            event = json.loads(message)
        except ValueError:
            self._client_error("invalid_json", "the event is not valid JSON")
            return
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            self._client_error("invalid_event", "an event is a JSON object with a string type")
            return
        try:
            self._inbox.put_nowait(event)
        except asyncio.QueueFull:
            self._client_error("rate_limited", "too many events queued", event.get("event_id"))

    async def _event_loop(self) -> None:
        """Client events to the backend, one at a time, in order."""
        backend = self._backend
        while True:
            event = await self._inbox.get()
            try:
                await backend.on_event(event)
            except Exception as exc:
                self._backend_failed(exc, event.get("event_id"))

    def _client_error(self, code: str, message: str, event_id: Any = None) -> None:
        self.send_event(
            {
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "code": code,
                    "message": message,
                    "event_id": event_id if isinstance(event_id, str) else None,
                },
            }
        )

    def _backend_failed(self, exc: Exception, event_id: Any = None) -> None:
        """Count every failure; tell the client at most once a second (audio fails per frame)."""
        self._counters.backend_errors += 1
        log.debug("call %s: backend error: %r", self.call_id, exc)
        now = time.monotonic()
        if now - self._last_error_event < BACKEND_ERROR_INTERVAL:
            return
        self._last_error_event = now
        self.send_event(
            {
                "type": "error",
                "error": {
                    "type": "server_error",
                    "code": "backend_error",
                    "message": str(exc) or type(exc).__name__,
                    "event_id": event_id if isinstance(event_id, str) else None,
                },
            }
        )

    # -- teardown

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self, reason: str = "ended") -> None:
        """End the call and release everything it holds (idempotent, never raises)."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        self.close_reason = reason
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self._backend.close()
        except Exception as exc:
            self._counters.backend_errors += 1
            log.debug("call %s: backend close failed: %r", self.call_id, exc)
        if self._pc is not None:
            try:
                await self._pc.close()
            except Exception:
                log.exception("call %s: closing the peer connection failed", self.call_id)
        if self._link is not None:
            self._link.close()
        self._channel = None
        self._held.clear()
        connected = self.setup_seconds is not None
        self.state = "closed" if connected or reason in ("ended", "draining") else "failed"
        self._closed.set()
        if self._on_closed is not None:
            with contextlib.suppress(Exception):
                self._on_closed(self)

    @property
    def playback_queued(self) -> int:
        """Frames waiting in the backend's audio_out: a backlog that grows means a slow loop."""
        try:
            return self._backend.audio_out.qsize()
        except Exception:  # a backend's queue is its own business; never fail a stats read
            return 0

    async def wait_closed(self) -> None:
        await self._closed.wait()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()
