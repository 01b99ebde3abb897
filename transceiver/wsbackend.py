"""The `ws` backend: each call bridged to an external voice service over its own WebSocket.

Why a WebSocket per call: the service then needs no WebRTC at all (no ICE,
DTLS, SRTP or codec), sees one ordinary connection per call, and scales and
load-balances like any stateless HTTP service. The transceiver keeps every
piece of session state; the service keeps only what it chooses to.

The protocol (docs/backends.md, "The `ws` backend", is the reference):

* text frames are JSON objects with a string ``type``, both ways. The first
  message on every connection is ``session.start`` (call id, transceiver id,
  audio format, whether it resumes after a reconnect); every later message
  from the transceiver is a client event from the ``oai-events`` data
  channel, verbatim. Every message from the service is forwarded to the
  client, except ``audio`` (base64 PCM) and ``audio.clear`` (barge-in).
* binary frames are audio: signed 16-bit little-endian PCM in the format of
  the start message (48 kHz mono by default), 20 ms per frame from the
  transceiver; from the service any length, re-framed here.

If the connection drops mid-call the backend reconnects with backoff (a
bounded number of attempts, then an ``error`` event to the client); a service
that closes with 1000 or a 4000-4999 code ended the session on purpose and is
not called again. A service that cannot be reached when the call starts fails
the call setup (BackendError, so HTTP 503 + Retry-After).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import websockets
from av import AudioFrame
from av.audio.resampler import AudioResampler
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from transceiver.backends import (
    FRAME_SECONDS,
    SAMPLE_BYTES,
    SAMPLE_RATE,
    BackendError,
    Event,
    SessionInfo,
    register_backend,
)

__all__ = ["PROTOCOL", "AudioFormat", "WsBackend", "WsStats"]

log = logging.getLogger("splitrelay.transceiver.ws")

PROTOCOL = "splitrelay.ws.v1"
#: Bearer token for the service, read from the environment so it never appears on a
#: command line (worker processes get their spec as an argument).
ENV_TOKEN = "SPLITRELAY_TRANSCEIVER_WS_TOKEN"
SAMPLE_RATES = (8000, 16000, 24000, 48000)
FRAME_MS = 20
CONNECT_TIMEOUT = 5.0
#: Waits before each reconnection attempt; their number is the attempt budget.
RECONNECT_DELAYS: tuple[float, ...] = (0.1, 0.5, 1.0, 2.0, 4.0)
#: A connection that lived this long gets a fresh attempt budget when it drops,
#: so a service that accepts and drops at once cannot make a call retry forever.
STABLE_AFTER = 10.0
#: Keepalive pings: a dead peer that sends no FIN is noticed within two intervals.
PING_INTERVAL = 5.0
CLOSE_TIMEOUT = 1.0
#: Largest message accepted from the service (a bigger one closes the connection, 1009).
MAX_MESSAGE_BYTES = 1 << 20
#: Client events held while reconnecting, sent after the new session.start.
MAX_HELD_EVENTS = 64
#: Bytes waiting toward the service above which audio frames are dropped, not queued:
#: late audio is worse than lost audio, and a blocked on_audio would stall the call.
MAX_SEND_BUFFER = 256 * 1024
#: Audio from the service queued for playback at most; beyond it the backend stops
#: reading the socket, which pushes back on the service (TCP flow control).
OUTPUT_BUFFER_SECONDS = 10.0
#: Close codes with which the service ends a session on purpose: no reconnect.
NORMAL_CLOSURE = 1000
APPLICATION_CODES = range(4000, 5000)

_LAYOUTS = {1: "mono", 2: "stereo"}


@dataclass(frozen=True)
class AudioFormat:
    """The PCM format on the WebSocket, both ways, announced in ``session.start``."""

    sample_rate: int = SAMPLE_RATE
    channels: int = 1

    def __post_init__(self) -> None:
        if self.sample_rate not in SAMPLE_RATES:
            raise ValueError(f"sample_rate must be one of {SAMPLE_RATES}, got {self.sample_rate}")
        if self.channels not in _LAYOUTS:
            raise ValueError(f"channels must be 1 or 2, got {self.channels}")

    @property
    def frame_bytes(self) -> int:
        """Bytes of one 20 ms frame."""
        return self.sample_rate * FRAME_MS // 1000 * self.channels * SAMPLE_BYTES

    def describe(self) -> dict[str, Any]:
        return {
            "encoding": "pcm_s16le",
            "sample_rate": self.sample_rate,
            "channels": self.channels,
            "frame_ms": FRAME_MS,
        }


@dataclass
class WsStats:
    """Per-call counters of the bridge (the worker's own counters see only raised errors)."""

    audio_frames_sent: int = 0
    audio_frames_received: int = 0
    audio_frames_dropped: int = 0
    events_sent: int = 0
    events_received: int = 0
    invalid_messages: int = 0
    connection_losses: int = 0
    reconnects: int = 0


# ---------------------------------------------------------------------- audio plumbing


class _Reframer:
    """Cuts a byte stream into fixed-size frames (the remainder waits for more)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        size = self.size
        if not self._buf and len(data) == size:
            return [data]  # the common case: one whole frame, no copy
        buf = self._buf
        buf += data
        count = len(buf) // size
        if not count:
            return []
        frames = [bytes(buf[i * size : (i + 1) * size]) for i in range(count)]
        del buf[: count * size]
        return frames

    def reset(self) -> None:
        self._buf.clear()


class _Resampler:
    """s16le PCM from one rate/channel count to another, in C (libswresample via PyAV).

    The filter keeps its state across frames, so a stream converts without
    clicks at frame edges. Same format in and out is a pass-through.

    The filter holds back a few samples (its delay). The first output is
    padded with that much silence in front, so every later 20 ms frame in
    gives exactly 20 ms out: without it each frame would wait for the next
    one to fill up, 20 ms of added latency per direction.
    """

    def __init__(self, src: tuple[int, int], dst: tuple[int, int]) -> None:
        self.src = src
        self.dst = dst
        self._resampler: AudioResampler | None = None
        self._primed = False
        if src != dst:
            self._resampler = AudioResampler(format="s16", layout=_LAYOUTS[dst[1]], rate=dst[0])

    def convert(self, pcm: bytes) -> bytes:
        if self._resampler is None:
            return pcm
        rate, channels = self.src
        samples = len(pcm) // (SAMPLE_BYTES * channels)
        if not samples:
            return b""
        frame = AudioFrame(format="s16", layout=_LAYOUTS[channels], samples=samples)
        frame.planes[0].update(pcm[: samples * SAMPLE_BYTES * channels])
        frame.sample_rate = rate
        out_channels = self.dst[1]
        out = b"".join(
            bytes(f.planes[0])[: f.samples * SAMPLE_BYTES * out_channels]
            for f in self._resampler.resample(frame)
        )
        if not self._primed:
            self._primed = True
            expected = samples * self.dst[0] // rate * SAMPLE_BYTES * out_channels
            out = bytes(max(0, expected - len(out))) + out
        return out


class _Uplink:
    """Session audio (48 kHz stereo as decoded) -> 20 ms frames in the service's format."""

    def __init__(self, fmt: AudioFormat) -> None:
        self.fmt = fmt
        self._resampler: _Resampler | None = None
        self._frames = _Reframer(fmt.frame_bytes)

    def frames(self, pcm: bytes, sample_rate: int, channels: int) -> list[bytes]:
        if channels not in _LAYOUTS:
            raise BackendError(f"ws: cannot convert {channels}-channel audio")
        src = (sample_rate, channels)
        if self._resampler is None or self._resampler.src != src:
            self._resampler = _Resampler(src, (self.fmt.sample_rate, self.fmt.channels))
            self._frames.reset()
        return self._frames.feed(self._resampler.convert(pcm))


class _Downlink:
    """Service audio (any chunking, service format) -> 20 ms 48 kHz frames for audio_out."""

    def __init__(self, fmt: AudioFormat) -> None:
        self.fmt = fmt
        self.reset()

    def reset(self) -> None:
        fmt = self.fmt
        self._chunks = _Reframer(fmt.frame_bytes)
        self._resampler = _Resampler((fmt.sample_rate, fmt.channels), (SAMPLE_RATE, fmt.channels))
        self._frames = _Reframer(AudioFormat(SAMPLE_RATE, fmt.channels).frame_bytes)

    def frames(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        for chunk in self._chunks.feed(data):
            out.extend(self._frames.feed(self._resampler.convert(chunk)))
        return out


# ---------------------------------------------------------------------- the backend


def _where(url: str) -> str:
    """scheme://host:port/path of the service, never credentials or a query string."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _describe_close(code: int | None, reason: str) -> str:
    if code is None or code == 1006:
        return "connection lost without a close frame"
    return f"closed with code {code}" + (f": {reason}" if reason else "")


def public_call_id(transceiver_id: int, call_id: str) -> str:
    """The id the HTTP API uses (`Location: /v1/calls/{id}`): `<transceiver id>-<worker's id>`."""
    prefix = f"{transceiver_id:08x}-"
    return call_id if call_id.startswith(prefix) else prefix + call_id


class WsBackend:
    """One call bridged to the service at ``url`` (see the module docstring for the protocol).

    ``sample_rate``/``channels`` choose the PCM format on the socket (announced
    in ``session.start``); ``token`` (default: $SPLITRELAY_TRANSCEIVER_WS_TOKEN)
    is sent as ``Authorization: Bearer``; ``headers`` are extra handshake
    headers. The rest tune timeouts and the reconnect policy.
    """

    name = "ws"

    def __init__(
        self,
        url: str,
        *,
        sample_rate: int = SAMPLE_RATE,
        channels: int = 1,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        reconnect_delays: Sequence[float] = RECONNECT_DELAYS,
        stable_after: float = STABLE_AFTER,
        ping_interval: float | None = PING_INTERVAL,
        output_buffer: float = OUTPUT_BUFFER_SECONDS,
    ) -> None:
        parts = urlsplit(str(url))
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"the ws backend needs a ws:// or wss:// URL, got {url!r}")
        if connect_timeout <= 0:
            raise ValueError("connect_timeout must be positive")
        if any(d < 0 for d in reconnect_delays):
            raise ValueError("reconnect delays must not be negative")
        self.url = str(url)
        self.where = _where(self.url)
        self.format = AudioFormat(int(sample_rate), int(channels))
        self.output_channels = self.format.channels
        frames = max(1, round(output_buffer / FRAME_SECONDS))
        self.audio_out: asyncio.Queue[bytes] = asyncio.Queue(maxsize=frames)
        self.stats = WsStats()
        self._headers = dict(headers or {})
        token = token if token is not None else os.environ.get(ENV_TOKEN) or None
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._connect_timeout = connect_timeout
        self._delays = tuple(reconnect_delays)
        self._stable_after = stable_after
        self._ping_interval = ping_interval
        self._uplink = _Uplink(self.format)
        self._downlink = _Downlink(self.format)
        self._info: SessionInfo | None = None
        self._conn: ClientConnection | None = None  # the current connection, ready or not
        self._ws: ClientConnection | None = None  # set while events and audio may be sent
        self._held: deque[str] = deque()
        self._task: asyncio.Task[None] | None = None
        self._attempts = 0
        self._last_failure = ""
        self._pending_error: str | None = None
        self._failed: str | None = None  # gave up reconnecting
        self._ended: str | None = None  # the service ended the session
        self._closing = False

    # -- the Backend interface

    async def start(self, info: SessionInfo) -> None:
        """Connect and send session.start; BackendError if the service cannot be reached."""
        self._info = info
        ws = await self._connect(resumed=False)
        if self._closing:  # the call ended while we were connecting
            await self._close_quietly(ws)
            return
        self._ws = ws
        self._task = asyncio.create_task(self._run(ws), name=f"ws-backend {info.call_id}")

    async def on_audio(self, pcm: bytes, sample_rate: int, channels: int) -> None:
        """Send the frame to the service; dropped (not queued) while disconnected or backed up."""
        ws = self._ws
        if ws is None:
            self.stats.audio_frames_dropped += 1
        else:
            for frame in self._uplink.frames(pcm, sample_rate, channels):
                if ws.transport.get_write_buffer_size() > MAX_SEND_BUFFER:
                    self.stats.audio_frames_dropped += 1
                    continue
                try:
                    await ws.send(frame)
                except ConnectionClosed:
                    self.stats.audio_frames_dropped += 1
                    break
                self.stats.audio_frames_sent += 1
        self._raise_pending()

    async def on_event(self, event: Event) -> None:
        """Send the client event verbatim; held while reconnecting; an error once given up."""
        if self._failed or self._ended:
            raise BackendError(self._failed or self._ended)
        text = json.dumps(event, separators=(",", ":"))
        ws = self._ws
        sent = False
        if ws is not None:
            try:
                await ws.send(text)
                sent = True
            except ConnectionClosed:
                pass  # the reader sees the close and reconnects; hold the event for then
        if sent:
            self.stats.events_sent += 1
        elif len(self._held) < MAX_HELD_EVENTS:
            self._held.append(text)
        else:
            raise BackendError(
                f"the backend service is reconnecting and {MAX_HELD_EVENTS} events are "
                "already waiting: event dropped"
            )
        self._raise_pending()

    async def close(self) -> None:
        """Stop reconnecting, close the connection (1000, "call ended"); never raises."""
        if self._closing:
            return
        self._closing = True
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        conn, self._conn, self._ws = self._conn, None, None
        if conn is not None:
            await self._close_quietly(conn)
        self._held.clear()
        while not self.audio_out.empty():
            self.audio_out.get_nowait()
        self._info = None

    # -- connection

    def _start_message(self, resumed: bool) -> str:
        info = self._info
        assert info is not None
        return json.dumps(
            {
                "type": "session.start",
                "protocol": PROTOCOL,
                "call_id": public_call_id(info.transceiver_id, info.call_id),
                "transceiver_id": f"{info.transceiver_id:08x}",
                "resumed": resumed,
                "audio": self.format.describe(),
            },
            separators=(",", ":"),
        )

    async def _connect(self, resumed: bool) -> ClientConnection:
        """Open a connection and send session.start, or raise BackendError saying why.

        The message reaches the caller (HTTP 503, or an error event), so it
        names no address: the service's URL is internal and goes to the log.
        """
        reason = ""
        try:
            ws = await connect(
                self.url,
                additional_headers=self._headers or None,
                user_agent_header=f"splitrelay-transceiver websockets/{websockets.__version__}",
                compression=None,  # PCM does not compress; deflate would only cost CPU
                proxy=None,  # the service is part of the deployment: connect directly
                open_timeout=self._connect_timeout,
                ping_interval=self._ping_interval,
                ping_timeout=self._ping_interval,
                close_timeout=CLOSE_TIMEOUT,
                max_size=MAX_MESSAGE_BYTES,
                write_limit=MAX_SEND_BUFFER,
            )
        except InvalidStatus as exc:
            reason = f"refused the session: HTTP {exc.response.status_code}"
        except TimeoutError:
            reason = f"did not answer within {self._connect_timeout:g} s"
        except OSError as exc:
            # `Connection refused`, not asyncio's `Connect call failed ('10.0.0.1', 80)`.
            detail = os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__
            reason = f"cannot be reached: {detail}"
        except (InvalidHandshake, InvalidURI) as exc:
            reason = f"failed the WebSocket handshake: {exc}"
        else:
            self._conn = ws
            try:
                await ws.send(self._start_message(resumed))
                return ws
            except ConnectionClosed:
                self._conn = None
                what = _describe_close(ws.close_code, ws.close_reason or "")
                reason = f"closed the connection at once ({what})"
        if not resumed:  # _reconnect logs its own attempts
            log.warning("call %s: %s %s", self._call_id, self.where, reason)
        self._last_failure = reason
        raise BackendError(f"the backend service {reason}")

    async def _close_quietly(self, ws: ClientConnection) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(NORMAL_CLOSURE, "call ended"), 2 * CLOSE_TIMEOUT)

    async def _run(self, ws: ClientConnection) -> None:
        """Read the service until the call ends, reconnecting after unexpected losses."""
        loop = asyncio.get_running_loop()
        while True:
            opened = loop.time()
            await self._read(ws)
            self._ws = None
            if self._closing:
                return
            code, reason = ws.close_code, ws.close_reason or ""
            if code == NORMAL_CLOSURE or (code is not None and code in APPLICATION_CODES):
                self._ended = (
                    f"the backend service ended the session ({_describe_close(code, reason)})"
                )
                log.info("call %s: %s", self._call_id, self._ended)
                self._held.clear()
                return
            self.stats.connection_losses += 1
            what = _describe_close(code, reason)
            self._pending_error = (
                f"lost the connection to the backend service ({what}); reconnecting"
            )
            log.warning("call %s: %s: %s; reconnecting", self._call_id, self.where, what)
            if loop.time() - opened >= self._stable_after:
                self._attempts = 0
            new = await self._reconnect()
            if new is None:
                self._give_up()
                return
            ws = new
            try:
                while self._held:  # events the client sent meanwhile, in order, before new ones
                    await ws.send(self._held[0])
                    self._held.popleft()
                    self.stats.events_sent += 1
            except ConnectionClosed:
                continue  # _read returns at once and the loop handles the loss
            self._ws = ws

    async def _reconnect(self) -> ClientConnection | None:
        while self._attempts < len(self._delays):
            await asyncio.sleep(self._delays[self._attempts])
            self._attempts += 1
            try:
                ws = await self._connect(resumed=True)
            except BackendError:
                log.info(
                    "call %s: reconnect %d/%d to %s failed: %s",
                    self._call_id,
                    self._attempts,
                    len(self._delays),
                    self.where,
                    self._last_failure,
                )
                continue
            self.stats.reconnects += 1
            log.info("call %s: reconnected to %s", self._call_id, self.where)
            return ws
        return None

    def _give_up(self) -> None:
        attempts = len(self._delays)
        detail = self._last_failure or "no attempt allowed"
        self._failed = (
            f"lost the connection to the backend service and gave up after {attempts} "
            f"reconnection attempt{'s' if attempts != 1 else ''} (last: {detail})"
        )
        log.warning("call %s: %s", self._call_id, self._failed)
        self._held.clear()
        # Reported here, at once and with its own code, so a client can hang up.
        self._pending_error = None
        if self._info is not None:
            self._info.send_event(
                {
                    "type": "error",
                    "error": {
                        "type": "server_error",
                        "code": "backend_unavailable",
                        "message": self._failed,
                        "event_id": None,
                    },
                }
            )

    def _raise_pending(self) -> None:
        """Report a lost connection once, through the session (counted as a backend error)."""
        if self._pending_error is not None:
            message, self._pending_error = self._pending_error, None
            raise BackendError(message)

    @property
    def _call_id(self) -> str:
        return self._info.call_id if self._info is not None else "?"

    # -- from the service

    async def _read(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                try:
                    if isinstance(message, bytes):
                        await self._play(message)
                    else:
                        await self._service_text(message)
                except Exception:  # one bad message must not end the bridge
                    self.stats.invalid_messages += 1
                    log.exception("call %s: a service message failed", self._call_id)

    async def _service_text(self, text: str) -> None:
        try:
            event = json.loads(text)
        except ValueError:
            event = None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            self.stats.invalid_messages += 1
            log.debug("call %s: ignoring a service message that is not an event", self._call_id)
            return
        kind = event["type"]
        if kind == "audio":
            await self._service_audio(event)
        elif kind == "audio.clear":
            self._clear_playback()
        elif self._info is not None:
            self.stats.events_received += 1
            self._info.send_event(event)

    async def _service_audio(self, event: Event) -> None:
        data = event.get("audio")
        try:
            if not isinstance(data, str):
                raise ValueError("audio must be a base64 string")
            pcm = base64.b64decode(data, validate=True)
        except (ValueError, binascii.Error):
            self.stats.invalid_messages += 1
            log.debug("call %s: ignoring an audio event without valid base64", self._call_id)
            return
        await self._play(pcm)

    async def _play(self, data: bytes) -> None:
        """Queue service audio for playback; a full queue makes us stop reading (back-pressure)."""
        for frame in self._downlink.frames(data):
            await self.audio_out.put(frame)
            self.stats.audio_frames_received += 1

    def _clear_playback(self) -> None:
        """Barge-in: forget every frame not yet played."""
        while not self.audio_out.empty():
            self.audio_out.get_nowait()
        self._downlink.reset()


def _factory(**options: Any) -> WsBackend:
    """Build from WorkerConfig.backend_options (`url` and the keyword options of WsBackend)."""
    if "url" not in options:
        raise ValueError("the ws backend needs a url (transceiver run --ws-url)")
    return WsBackend(**options)


register_backend("ws", _factory)
