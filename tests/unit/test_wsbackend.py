"""The `ws` backend against a real WebSocket server on 127.0.0.1.

The server is a stand-in for the external voice service, written here: it
records what it receives and answers as each test tells it. The backend
under test is the real one, over real sockets: the start message, audio both
ways (binary and base64, resampled when the format says so), events both
ways, reconnection after the service drops the connection, giving up with an
`error` event, and a refused service failing the call setup.
"""

from __future__ import annotations

import array
import asyncio
import base64
import json
import math
import socket
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import pytest
from click.testing import CliRunner
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from transceiver import backends
from transceiver.backends import BackendError, SessionInfo
from transceiver.wsbackend import ENV_TOKEN, PROTOCOL, WsBackend

HOST = "127.0.0.1"
CALL_ID = "Zk3u9mAqF1x2vQ8s"
TID = 0xA001
FAST_RECONNECT = (0.05, 0.05, 0.05)


def run(coro: Coroutine[Any, Any, Any], timeout: float = 20.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def eventually(check: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Wait until `check()` holds; fail the test with `what` if it does not in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.01)


def tone(samples: int, channels: int, freq: float = 440.0, rate: int = 48000) -> bytes:
    """A sine wave, the same in every channel, as s16le PCM."""
    values = array.array("h")
    for i in range(samples):
        v = int(8000 * math.sin(2 * math.pi * freq * i / rate))
        values.extend([v] * channels)
    return values.tobytes()


def mono(pcm: bytes) -> bytes:
    """The left channel of stereo s16le (both channels of our tones are equal)."""
    return memoryview(pcm).cast("h")[::2].tobytes()


# --------------------------------------------------------------------- the fake service


@dataclass
class Peer:
    """One connection the fake service accepted."""

    ws: ServerConnection
    start: dict[str, Any]
    headers: Headers
    messages: list[str | bytes] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def audio(self) -> list[bytes]:
        return [m for m in self.messages if isinstance(m, bytes)]

    @property
    def events(self) -> list[dict[str, Any]]:
        return [json.loads(m) for m in self.messages if isinstance(m, str)]


class FakeService:
    """A voice service on 127.0.0.1: records everything; echoes audio and events if asked."""

    def __init__(self, echo: bool = False, status: HTTPStatus | None = None) -> None:
        self.echo = echo
        self.status = status
        self.peers: list[Peer] = []
        self.server: Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://{HOST}:{self.port}/v1/voice?model=test"

    async def start(self) -> FakeService:
        self.server = await serve(
            self._handle, HOST, self.port, process_request=self._refuse, compression=None
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    def _refuse(self, connection: ServerConnection, request: Request) -> Response | None:
        if self.status is not None:
            return connection.respond(self.status, "busy\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        first = await ws.recv()
        assert isinstance(first, str)
        peer = Peer(ws, json.loads(first), ws.request.headers)
        self.peers.append(peer)
        try:
            async for message in ws:
                peer.messages.append(message)
                if not self.echo:
                    continue
                if isinstance(message, bytes):
                    await ws.send(message)
                else:
                    await ws.send(json.dumps({"type": "echo", "event": json.loads(message)}))
        finally:
            peer.closed.set()

    async def peer(self, index: int = 0) -> Peer:
        await eventually(lambda: len(self.peers) > index, what=f"service connection {index}")
        return self.peers[index]


class Client:
    """What the session gives a backend: SessionInfo, and the events sent to the client."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.info = SessionInfo(CALL_ID, TID, send_event=self.events.append)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == kind]


async def bridged(
    service: FakeService, body: Callable[[WsBackend, Client], Awaitable[None]], **options: Any
) -> WsBackend:
    """Start a backend against `service`, run `body`, and always close both."""
    await service.start()
    backend = WsBackend(service.url, **options)
    client = Client()
    try:
        await backend.start(client.info)
        await body(backend, client)
    finally:
        await backend.close()
        await service.stop()
    return backend


async def next_frames(queue: asyncio.Queue[bytes], count: int) -> list[bytes]:
    return [await asyncio.wait_for(queue.get(), 5) for _ in range(count)]


# --------------------------------------------------------------------- registration


def test_registered_as_ws() -> None:
    from transceiver.supervisor import load_backends

    assert "ws" in load_backends()
    backend = backends.create_backend("ws", url="ws://127.0.0.1:9/x")
    assert isinstance(backend, WsBackend)
    assert isinstance(backend, backends.Backend)
    assert backend.output_channels == 1
    with pytest.raises(ValueError, match="ws://"):
        backends.create_backend("ws", url="http://127.0.0.1:9/")
    with pytest.raises(ValueError, match="sample_rate"):
        backends.create_backend("ws", url="ws://127.0.0.1:9/", sample_rate=44100)


# --------------------------------------------------------------------- start


def test_start_message_and_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_TOKEN, "s3cret")

    async def body(backend: WsBackend, client: Client) -> None:
        peer = await service.peer()
        assert peer.start == {
            "type": "session.start",
            "protocol": PROTOCOL,
            "call_id": f"{TID:08x}-{CALL_ID}",
            "transceiver_id": f"{TID:08x}",
            "resumed": False,
            "audio": {"encoding": "pcm_s16le", "sample_rate": 48000, "channels": 1, "frame_ms": 20},
        }
        assert peer.headers["Authorization"] == "Bearer s3cret"
        assert peer.ws.request.path == "/v1/voice?model=test"

    service = FakeService()
    run(bridged(service, body))


def test_start_message_announces_a_chosen_format() -> None:
    async def body(backend: WsBackend, client: Client) -> None:
        peer = await service.peer()
        assert peer.start["audio"]["sample_rate"] == 16000
        assert peer.start["audio"]["channels"] == 2
        assert "Authorization" not in peer.headers

    service = FakeService()
    backend = run(bridged(service, body, sample_rate=16000, channels=2, token=""))
    assert backend.output_channels == 2


# --------------------------------------------------------------------- audio


def test_audio_both_ways_as_binary_frames() -> None:
    async def body(backend: WsBackend, client: Client) -> None:
        frames = [tone(960, 2, freq=300 + 100 * i) for i in range(5)]
        for frame in frames:
            await backend.on_audio(frame, 48000, 2)
        peer = await service.peer()
        await eventually(lambda: len(peer.audio) == 5, what="5 frames at the service")
        # 48 kHz stereo as decoded -> 48 kHz mono, 20 ms per binary frame, in order.
        assert peer.audio == [mono(f) for f in frames]
        # The echo comes back into audio_out as 20 ms mono frames, unchanged.
        assert await next_frames(backend.audio_out, 5) == [mono(f) for f in frames]
        assert backend.stats.audio_frames_sent == 5
        assert backend.stats.audio_frames_received == 5

    service = FakeService(echo=True)
    run(bridged(service, body))


def test_service_audio_in_any_chunking_is_reframed_to_20ms() -> None:
    async def body(backend: WsBackend, client: Client) -> None:
        peer = await service.peer()
        pcm = tone(960 * 3, 1)  # 60 ms of 48 kHz mono
        await peer.ws.send(pcm[:1000])
        await peer.ws.send(pcm[1000:4000])
        await peer.ws.send(pcm[4000:] + b"\x01")  # a stray byte waits for more
        frames = await next_frames(backend.audio_out, 3)
        assert frames == [pcm[i * 1920 : (i + 1) * 1920] for i in range(3)]
        assert backend.audio_out.empty()

    service = FakeService()
    run(bridged(service, body))


def test_base64_audio_from_the_service() -> None:
    async def body(backend: WsBackend, client: Client) -> None:
        peer = await service.peer()
        pcm = tone(960 * 2, 1)
        await peer.ws.send(json.dumps({"type": "audio", "audio": base64.b64encode(pcm).decode()}))
        await peer.ws.send(json.dumps({"type": "audio", "audio": "not base64!"}))
        await peer.ws.send(json.dumps({"type": "marker"}))
        assert await next_frames(backend.audio_out, 2) == [pcm[:1920], pcm[1920:]]
        await eventually(lambda: bool(client.of_type("marker")), what="the marker event")
        # Audio messages are consumed by the bridge, never forwarded as events.
        assert not client.of_type("audio")
        assert backend.stats.invalid_messages == 1

    service = FakeService()
    run(bridged(service, body))


def rms(pcm: bytes) -> float:
    samples = memoryview(pcm).cast("h")
    return math.sqrt(sum(v * v for v in samples) / max(1, len(samples)))


def test_resampled_format_both_ways() -> None:
    async def body(backend: WsBackend, client: Client) -> None:
        for _ in range(10):
            await backend.on_audio(tone(960, 2), 48000, 2)
        peer = await service.peer()
        # 16 kHz mono, 640-byte frames, one out per frame in: the filter delay is not
        # allowed to hold a frame back (that would add 20 ms each way).
        await eventually(lambda: len(peer.audio) == 10, what="10 frames at 16 kHz")
        assert {len(f) for f in peer.audio} == {640}
        # The tone survives (its level; the first frame starts with the filter's delay).
        expected = rms(tone(320, 1, rate=16000))
        assert all(abs(rms(f) - expected) < 0.05 * expected for f in peer.audio[1:])
        # 200 ms at 16 kHz from the service -> exactly 10 frames of 48 kHz mono.
        await peer.ws.send(tone(3200, 1, rate=16000))
        frames = await next_frames(backend.audio_out, 10)
        assert {len(f) for f in frames} == {1920}
        assert all(abs(rms(f) - expected) < 0.05 * expected for f in frames[1:])

    service = FakeService()
    run(bridged(service, body, sample_rate=16000))


def test_audio_clear_empties_playback() -> None:
    async def body(backend: WsBackend, client: Client) -> None:
        peer = await service.peer()
        await peer.ws.send(tone(960 * 5, 1))
        await eventually(lambda: backend.audio_out.qsize() == 5, what="5 queued frames")
        await peer.ws.send(json.dumps({"type": "audio.clear"}))
        await eventually(backend.audio_out.empty, what="the queue to be cleared")
        assert not client.of_type("audio.clear")

    service = FakeService()
    run(bridged(service, body))


# --------------------------------------------------------------------- events


def test_events_both_ways() -> None:
    async def body(backend: WsBackend, client: Client) -> None:
        sent = {"type": "session.update", "event_id": "e1", "session": {"voice": "x"}}
        await backend.on_event(sent)
        await backend.on_event({"type": "splitrelay.ping", "event_id": "e2"})
        peer = await service.peer()
        await eventually(lambda: len(peer.events) == 2, what="2 events at the service")
        assert peer.events[0] == sent  # verbatim
        await eventually(lambda: len(client.of_type("echo")) == 2, what="2 echoed events")
        assert [e["event"]["event_id"] for e in client.of_type("echo")] == ["e1", "e2"]
        # Not an event: ignored, never forwarded.
        await peer.ws.send("not json")
        await peer.ws.send(json.dumps([1, 2]))
        await peer.ws.send(json.dumps({"type": 7}))
        await peer.ws.send(json.dumps({"type": "response.done", "n": 1}))
        await eventually(lambda: bool(client.of_type("response.done")), what="response.done")
        assert client.of_type("response.done") == [{"type": "response.done", "n": 1}]
        assert backend.stats.invalid_messages == 3
        assert backend.stats.events_sent == 2

    service = FakeService(echo=True)
    run(bridged(service, body))


# --------------------------------------------------------------------- losing the service


def test_reconnects_after_the_service_drops_the_connection() -> None:
    async def body(backend: WsBackend, client: Client) -> None:
        first = await service.peer(0)
        first.ws.transport.abort()  # a crash: no close frame
        await first.closed.wait()
        await eventually(lambda: backend._ws is None, what="the backend to notice")
        # The loss is reported once, through the session's error path (and counted there).
        with pytest.raises(BackendError, match="lost the connection"):
            await backend.on_event({"type": "held", "event_id": "h1"})
        await backend.on_audio(tone(960, 2), 48000, 2)  # reported already: no second raise
        second = await service.peer(1)
        assert second.start["resumed"] is True
        assert second.start["call_id"] == first.start["call_id"]
        # The event sent during the outage arrives first, after the new start message.
        await eventually(lambda: bool(second.events), what="the held event")
        assert second.events[0]["event_id"] == "h1"
        await eventually(lambda: backend._ws is not None, what="the backend to be ready")
        await backend.on_audio(tone(960, 2), 48000, 2)
        await eventually(lambda: len(second.audio) == 1, what="audio after the reconnect")
        assert backend.stats.connection_losses == 1
        assert backend.stats.reconnects == 1
        assert not client.of_type("error")

    service = FakeService()
    run(bridged(service, body, reconnect_delays=FAST_RECONNECT))


def test_reconnects_to_a_restarted_service() -> None:
    async def body(backend: WsBackend, client: Client) -> None:
        await service.peer(0)
        port = service.port
        await service.stop()  # closes with 1001 going away; attempts are refused meanwhile
        await asyncio.sleep(0.3)
        service.port = port
        await service.start()
        second = await service.peer(1)
        assert second.start["resumed"] is True
        await eventually(lambda: backend._ws is not None, what="the backend to be ready")
        # The event is delivered; the raise reports the earlier loss (once).
        with pytest.raises(BackendError, match="closed with code 1001"):
            await backend.on_event({"type": "after"})
        await backend.on_event({"type": "after2"})
        await eventually(lambda: len(second.events) == 2, what="events after the restart")
        assert backend.stats.reconnects == 1

    service = FakeService()
    run(bridged(service, body, reconnect_delays=(0.2,) * 20))


def test_gives_up_with_an_error_event() -> None:
    async def body(backend: WsBackend, client: Client) -> None:
        await service.peer(0)
        await service.stop()  # and it never comes back
        await eventually(lambda: bool(client.of_type("error")), what="the error event")
        (error,) = client.of_type("error")
        assert error["error"]["type"] == "server_error"
        assert error["error"]["code"] == "backend_unavailable"
        assert "gave up after 3 reconnection attempts" in error["error"]["message"]
        assert "(last: cannot be reached: Connection refused)" in error["error"]["message"]
        assert str(service.port) not in error["error"]["message"]
        # Audio is dropped quietly from now on; an event is an error (counted by the session).
        await backend.on_audio(tone(960, 2), 48000, 2)
        with pytest.raises(BackendError, match="gave up"):
            await backend.on_event({"type": "x"})
        assert backend.stats.reconnects == 0

    service = FakeService()
    run(bridged(service, body, reconnect_delays=FAST_RECONNECT))


def test_a_service_that_ends_the_session_is_not_called_again() -> None:
    async def body(backend: WsBackend, client: Client) -> None:
        peer = await service.peer(0)
        await peer.ws.close(4001, "conversation over")
        await eventually(lambda: backend._ended is not None, what="the end")
        await asyncio.sleep(0.2)
        assert len(service.peers) == 1
        with pytest.raises(BackendError, match="4001: conversation over"):
            await backend.on_event({"type": "x"})
        assert not client.of_type("error")

    service = FakeService()
    run(bridged(service, body, reconnect_delays=FAST_RECONNECT))


def test_close_ends_the_connection_normally() -> None:
    async def main() -> None:
        service = await FakeService().start()
        try:
            backend = WsBackend(service.url)
            await backend.start(Client().info)
            peer = await service.peer()
            await backend.close()
            await asyncio.wait_for(peer.closed.wait(), 5)
            assert peer.ws.close_code == 1000 and peer.ws.close_reason == "call ended"
            await backend.close()  # idempotent
            await WsBackend(service.url).close()  # before start: nothing to do
        finally:
            await service.stop()

    run(main())


# --------------------------------------------------------------------- refused at call start


def test_refused_connection_is_a_backend_error(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> int:
        with socket.socket() as bound:  # bound, not listening: connections are refused
            bound.bind((HOST, 0))
            port = int(bound.getsockname()[1])
            backend = WsBackend(f"ws://user:pw@{HOST}:{port}/v1?key=secret")
            with pytest.raises(BackendError) as err:
                await backend.start(Client().info)
            await backend.close()
        # The caller (HTTP 503) learns why, but not where: the service URL is internal.
        assert str(err.value) == "the backend service cannot be reached: Connection refused"
        return port

    port = run(main())
    # The log names the service, without its credentials or query string.
    assert f"ws://{HOST}:{port}/v1 cannot be reached: Connection refused" in caplog.text
    assert "secret" not in caplog.text and "pw@" not in caplog.text


def test_http_refusal_is_a_backend_error() -> None:
    async def main() -> None:
        service = await FakeService(status=HTTPStatus.SERVICE_UNAVAILABLE).start()
        try:
            backend = WsBackend(service.url)
            with pytest.raises(BackendError, match="refused the session: HTTP 503"):
                await backend.start(Client().info)
            await backend.close()
        finally:
            await service.stop()

    run(main())


def test_silent_service_times_out() -> None:
    async def main() -> None:
        async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # accept TCP, never answer the handshake
            writer.close()

        server = await asyncio.start_server(mute, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        try:
            backend = WsBackend(f"ws://{HOST}:{port}/", connect_timeout=0.3)
            with pytest.raises(BackendError, match=r"did not answer within 0\.3 s"):
                await backend.start(Client().info)
            await backend.close()
        finally:
            server.close()
            await server.wait_closed()

    run(main())


# --------------------------------------------------------------------- the CLI


def test_cli_passes_ws_options_to_the_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    import transceiver.supervisor as supervisor
    from transceiver.cli import transceiver

    seen: dict[str, Any] = {}

    class FakeSupervisor:
        def __init__(self, config: Any, hooks: Any = None) -> None:
            seen["config"], seen["hooks"] = config, hooks

        async def run(self) -> None:
            return None

    monkeypatch.setattr(supervisor, "Supervisor", FakeSupervisor)
    args = [
        "run",
        "--transceiver-id",
        "a001",
        "--tunnel",
        HOST,
        "--relay",
        f"{HOST}:3479",
        "--public",
        f"{HOST}:3478",
        "--backend",
        "ws",
        "--ws-url",
        "ws://127.0.0.1:9000/voice",
        "--ws-sample-rate",
        "16000",
    ]
    res = CliRunner(mix_stderr=False).invoke(transceiver, args, catch_exceptions=False)
    assert res.exit_code == 0, res.stderr
    assert seen["config"].backend == "ws"
    assert seen["config"].backend_options == {
        "url": "ws://127.0.0.1:9000/voice",
        "sample_rate": 16000,
    }
    assert seen["hooks"] is None  # no --redis-url, no registry
    res = CliRunner(mix_stderr=False).invoke(
        transceiver, [*args[:9], "--ws-channels", "2"], catch_exceptions=False
    )
    assert res.exit_code == 2 and "--ws-channels is only used with --backend ws" in res.stderr
