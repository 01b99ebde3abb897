"""Real WebRTC calls through a real relay into a transceiver Worker.

One private network namespace holds the whole picture on its loopback: the
relay's public and tunnel addresses, the clients, the transceiver. The relay
is the userspace path (ctl.userspace.UserspaceRelay, the XDP program's rules
on sockets); the clients are aiortc peers with a tone track and the
``oai-events`` data channel; the transceiver is a Worker with the echo
backend. Every packet between client and transceiver crosses the relay: the
answer's only candidates are the relay's public addresses, and the
transceiver's only socket is its tunnel port.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import math
import os
import random
import re
import subprocess
import time
from array import array
from collections.abc import Awaitable, Callable, Iterator
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

import aioice.ice
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

from ctl import wire
from ctl.maps import RelayAddresses
from ctl.netns import in_netns
from ctl.store import MemoryState
from ctl.userspace import UserspaceRelay
from transceiver import backends
from transceiver.session import BadOffer
from transceiver.worker import AtCapacity, BackendUnavailable, Draining, Worker, WorkerConfig

NS = f"srt-tx-{os.getpid()}"
PUBLIC_PORT, TUNNEL_PORT = 3478, 3479
R4, R6 = "198.51.100.1", "2001:db8:c::1"
C4, C6 = "198.51.100.10", "2001:db8:c::10"
RI4 = "203.0.113.1"
T4 = "203.0.113.11"
ADDRESSES = (R4, C4, RI4, T4, R6, C6)
TID = 0x5A01
T_PORT = 4100
PUBLIC = [(R4, PUBLIC_PORT), (R6, PUBLIC_PORT)]

TONE_HZ = 440
TONE_AMPLITUDE = 8000
LOUD = 2000  # an echoed frame of the tone peaks well above this after two Opus passes

# Which address the client's aioice gathers (the transceiver never gathers).
_GATHER = {"host": C4}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    """A private namespace whose loopback holds every address of the picture."""
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    _ip("netns", "add", NS)
    try:
        _ip("-n", NS, "link", "set", "lo", "up")
        for addr in ADDRESSES:
            if ":" in addr:
                _ip("-n", NS, "-6", "addr", "add", f"{addr}/128", "dev", "lo", "nodad")
            else:
                _ip("-n", NS, "addr", "add", f"{addr}/32", "dev", "lo")
        yield NS
    finally:
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


@pytest.fixture(autouse=True)
def _client_gathers_one_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """aioice would offer every address of the namespace; a client has just its own."""
    monkeypatch.setattr(
        aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: [_GATHER["host"]]
    )
    _GATHER["host"] = C4


def run(ns: str, coro: Callable[[], Awaitable[None]], timeout: float = 60) -> None:
    """Run a scenario with this thread (and every socket it opens) in the namespace."""

    async def bounded() -> None:
        await asyncio.wait_for(coro(), timeout)

    with in_netns(ns):
        asyncio.run(bounded())


class ToneTrack(MediaStreamTrack):
    """A 440 Hz tone, paced in real time, for ``frames`` frames; then silence (no packets)."""

    kind = "audio"

    def __init__(self, frames: int) -> None:
        super().__init__()
        wave = [
            int(TONE_AMPLITUDE * math.sin(2 * math.pi * TONE_HZ * i / 48000)) for i in range(960)
        ]
        self._pcm = array("h", wave).tobytes()
        self._left = frames
        self._pts = 0
        self._start: float | None = None

    async def recv(self) -> AudioFrame:
        if self._left <= 0:
            await asyncio.Future()  # stop sending until the call is closed
        self._left -= 1
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        delay = self._start + self._pts / 48000 - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        frame = AudioFrame(format="s16", layout="mono", samples=960)
        frame.planes[0].update(self._pcm)
        frame.sample_rate = 48000
        frame.time_base = fractions.Fraction(1, 48000)
        frame.pts = self._pts
        self._pts += 960
        return frame


class Client:
    """A voice client: tone out, echo in, the oai-events channel."""

    def __init__(self, host: str = C4, tone_frames: int = 150) -> None:
        self.host = host
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc.addTrack(ToneTrack(tone_frames))
        self.channel = self.pc.createDataChannel("oai-events")
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.unread: list[dict[str, Any]] = []
        self.channel.on("message", lambda m: self.events.put_nowait(json.loads(m)))
        self.frames = 0
        self.loud_frames = 0
        self._reader: asyncio.Task[None] | None = None
        self.pc.on("track", self._on_track)

    def _on_track(self, track: MediaStreamTrack) -> None:
        self._reader = asyncio.ensure_future(self._read(track))

    async def _read(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self.frames += 1
            samples = array("h", bytes(frame.planes[0]))
            if max(samples) >= LOUD:
                self.loud_frames += 1

    async def offer(self) -> str:
        _GATHER["host"] = self.host
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def answer(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp, "answer"))

    async def connected(self, timeout: float = 15) -> None:
        await until(lambda: self.pc.connectionState == "connected", timeout, "client connected")
        await until(lambda: self.channel.readyState == "open", timeout, "data channel open")

    async def event(self, type_: str, timeout: float = 10) -> dict[str, Any]:
        """The first event of this type not taken yet, in arrival order.

        Events of other types are kept for later calls: the server's speech
        events and the answers to the client's events race each other.
        """
        for i, event in enumerate(self.unread):
            if event.get("type") == type_:
                return self.unread.pop(i)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            event = await asyncio.wait_for(self.events.get(), max(remaining, 0.01))
            if event.get("type") == type_:
                return event
            self.unread.append(event)

    async def close(self) -> None:
        await self.pc.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


async def until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.02)


class Bed:
    """Relay + worker, started in the namespace."""

    def __init__(self, max_calls: int = 32, backend: str = "echo") -> None:
        self.state = MemoryState(max_sessions=1024)
        self.state.put_transceiver(TID, T4, T_PORT)
        self.relay = UserspaceRelay(
            RelayAddresses(
                public_port=PUBLIC_PORT,
                tunnel_port=TUNNEL_PORT,
                public_v4=IPv4Address(R4),
                public_v6=IPv6Address(R6),
                tunnel_v4=IPv4Address(RI4),
            ),
            self.state,
        )
        self.worker = Worker(
            WorkerConfig(
                transceiver_id=TID,
                tunnel_host=T4,
                tunnel_port=T_PORT,
                relays=[(RI4, TUNNEL_PORT)],
                public_candidates=PUBLIC,
                max_calls=max_calls,
                backend=backend,
            )
        )

    async def start(self) -> None:
        await self.relay.start()
        await self.worker.start()

    async def stop(self) -> None:
        await self.worker.stop(0)
        await self.relay.close()


def answer_candidates(sdp: str) -> list[tuple[str, int, str]]:
    out = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            f = line.split()
            out.append((f[4], int(f[5]), f[7]))
    return out


def other_tasks() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


def test_a_call_connects_through_the_relay_and_echoes(netns: str) -> None:
    async def body() -> None:
        bed = Bed()
        await bed.start()
        baseline = other_tasks()
        client = Client(C4)
        offer = await client.offer()
        started = time.monotonic()
        call_id, answer = await bed.worker.create_call(offer)

        # The answer: our token ufrag, and only the relay's public addresses.
        ufrags = {x.split(":", 1)[1] for x in answer.splitlines() if x.startswith("a=ice-ufrag:")}
        assert len(ufrags) == 1 and wire.parse_server_ufrag(ufrags.pop()) == TID
        # (listed once per bundled m-line: audio and data channel)
        assert sorted(answer_candidates(answer)) == sorted(
            [(R4, PUBLIC_PORT, "host"), (R6, PUBLIC_PORT, "host")] * 2
        )
        assert T4 not in answer

        await client.answer(answer)
        await client.connected()
        setup = time.monotonic() - started

        created = await client.event("session.created")
        assert created["session"]["id"] == call_id and created["session"]["backend"] == "echo"
        client.channel.send(json.dumps({"type": "ping", "event_id": "evt_1", "n": 1}))
        echoed = await client.event("echo")
        assert echoed["event"] == {"type": "ping", "event_id": "evt_1", "n": 1}
        client.channel.send("not json")
        error = await client.event("error")
        assert error["error"]["code"] == "invalid_json"

        await until(lambda: client.loud_frames >= 25, 10, "25 echoed tone frames")
        await client.event("input_audio_buffer.speech_started")

        # Everything went through the relay, which routed by the token.
        sessions = list(bed.state.iter_sessions())
        assert [(s.client_addr, s.tid) for s in sessions] == [(ip_address(C4), TID)]
        counters = bed.relay.counters
        assert counters["fwd_to_transceiver_packets"] >= 25
        assert counters["fwd_to_client_packets"] >= 25
        mux = bed.worker.mux
        assert mux is not None
        assert mux.client_count == 1 and {host for host, _ in mux._by_addr} == {C4}
        assert mux.counters["dropped_unheard_client"] == 0
        assert mux.counters["dropped_unknown_sender"] == 0

        stats = bed.worker.stats()
        assert stats["sessions"] == 1 and stats["sessions_connected"] == 1
        assert stats["setup_seconds"]["count"] == 1
        assert 0 < stats["setup_seconds"]["recent"][0] <= setup
        assert stats["audio_frames_total"]["in"] >= 25
        assert stats["audio_frames_total"]["out"] >= 25
        assert stats["datachannel_messages_total"]["in"] == 2
        assert stats["datachannel_messages_total"]["out"] >= 4
        assert stats["backend_errors_total"] == 0

        # Hang up: the worker forgets everything, the client learns the call ended.
        assert await bed.worker.end_call(call_id)
        assert not await bed.worker.end_call(call_id)
        assert bed.worker.load == 0
        assert mux.endpoint_count == 0 and mux.client_count == 0
        await until(lambda: client.pc.connectionState == "closed", 5, "client sees the hang-up")
        await client.close()
        await asyncio.sleep(0.2)
        leaked = other_tasks() - baseline
        assert not leaked, f"tasks left after the call: {leaked}"
        stats = bed.worker.stats()
        assert stats["calls_ended_total"] == 1 and stats["calls_failed_total"] == 0
        await bed.stop()

    run(netns, body)


def test_an_ipv6_client_connects_through_the_relays_ipv6_address(netns: str) -> None:
    async def body() -> None:
        bed = Bed()
        await bed.start()
        client = Client(C6)
        call_id, answer = await bed.worker.create_call(await client.offer())
        await client.answer(answer)
        await client.connected()
        await until(lambda: client.loud_frames >= 10, 10, "10 echoed tone frames")
        assert [(s.client_addr, s.tid) for s in bed.state.iter_sessions()] == [
            (ip_address(C6), TID)
        ]
        mux = bed.worker.mux
        assert mux is not None and {a for a, _ in mux._by_addr} == {C6}
        assert await bed.worker.end_call(call_id)
        await client.close()
        await bed.stop()

    run(netns, body)


def test_twenty_concurrent_calls_all_connect_and_hear_their_echo(netns: str) -> None:
    calls = 20

    async def body() -> None:
        bed = Bed(max_calls=calls)
        await bed.start()
        baseline = other_tasks()
        clients = [Client(C4, tone_frames=150) for _ in range(calls)]
        offers = [await c.offer() for c in clients]
        started = time.monotonic()
        answers = await asyncio.gather(*(bed.worker.create_call(o) for o in offers))
        assert bed.worker.load == calls
        with pytest.raises(AtCapacity):
            await bed.worker.create_call(offers[0])
        await asyncio.gather(*(c.answer(a) for c, (_, a) in zip(clients, answers, strict=True)))
        await asyncio.gather(*(c.connected(30) for c in clients))
        all_connected = time.monotonic() - started
        await asyncio.gather(
            *(until(lambda c=c: c.loud_frames >= 10, 30, "echo on every call") for c in clients)
        )
        stats = bed.worker.stats()
        assert stats["sessions_connected"] == calls
        assert stats["setup_seconds"]["count"] == calls
        assert max(stats["setup_seconds"]["recent"]) <= all_connected
        assert len(list(bed.state.iter_sessions())) == calls
        mux = bed.worker.mux
        assert mux is not None and mux.endpoint_count == calls and mux.client_count == calls

        assert all(await asyncio.gather(*(bed.worker.end_call(cid) for cid, _ in answers)))
        assert bed.worker.load == 0 and mux.endpoint_count == 0 and mux.client_count == 0
        await asyncio.gather(*(c.close() for c in clients))
        await asyncio.sleep(0.2)
        assert not other_tasks() - baseline
        print(
            f"\n{calls} calls: all connected {all_connected:.2f}s after the first offer, "
            f"setup max {max(stats['setup_seconds']['recent']):.3f}s"
        )
        await bed.stop()

    run(netns, body, timeout=60)


def _mutations(offer: str) -> list[tuple[str, str]]:
    """Hostile or unanswerable variants of a real offer, each with what is wrong."""
    lines = offer.strip().split("\r\n")

    def without(prefix: str) -> str:
        return "\r\n".join(x for x in lines if not x.startswith(prefix)) + "\r\n"

    def replace(old: str, new: str) -> str:
        return offer.replace(old, new)

    audio_start = next(i for i, x in enumerate(lines) if x.startswith("m=audio"))
    app_start = next(i for i, x in enumerate(lines) if x.startswith("m=application"))
    audio = lines[audio_start:app_start]
    return [
        ("", "empty"),
        ("hello", "not SDP"),
        ("v=0\r\n", "no media"),
        ("v=0\r\n\x00\x01\x02", "NUL bytes"),
        ("v=0\r\n" + "a=x\r\n" * 20000, "oversized"),
        (re.sub(r"m=audio \d+", "m=audio nine", offer), "bad m= line"),
        (replace("m=audio", "m=video"), "video instead of audio"),
        ("\r\n".join(lines[:app_start] + audio + lines[app_start:]) + "\r\n", "two audio"),
        (without("a=group:BUNDLE"), "no BUNDLE"),
        (without("a=ice-ufrag"), "no ICE ufrag"),
        (re.sub(r"a=ice-pwd:\S+", "a=ice-pwd:short", offer), "ICE password too short"),
        (without("a=fingerprint"), "no fingerprint"),
        (without("a=rtcp-mux"), "no rtcp-mux"),
        (replace("opus/48000/2", "PCMU/8000").replace("a=rtpmap:96 ", "a=rtpmap:96 "), "no Opus"),
        (replace("t=0 0", "t=0 0\r\na=ice-lite"), "ice-lite"),
        (replace("a=setup:actpass", "a=setup:bogus"), "bad setup"),
        (replace("a=rtpmap:", "a=rtpmap:notanumber "), "bad rtpmap"),
    ]


def test_bad_offers_are_refused_without_leaking_and_capacity_is_enforced(netns: str) -> None:
    async def body() -> None:
        bed = Bed(max_calls=1)
        await bed.start()
        baseline = other_tasks()
        client = Client(C4)
        offer = await client.offer()
        assert "opus/48000/2" in offer and "a=setup:actpass" in offer

        mutations = _mutations(offer)
        for sdp, what in mutations:
            assert sdp != offer, f"the {what!r} mutation did not change the offer"
            try:
                call_id, _ = await bed.worker.create_call(sdp)
            except BadOffer:
                pass
            else:
                pytest.fail(f"offer with {what} was answered")
            assert bed.worker.load == 0, what
        mux = bed.worker.mux
        assert mux is not None and mux.endpoint_count == 0
        assert bed.worker.stats()["rejected_bad_offer_total"] == len(mutations)

        # mDNS candidates are not an error: they are dropped with the other candidates.
        mdns = offer.replace(
            "a=end-of-candidates",
            "a=candidate:1 1 udp 2122260223 0b4f1c2e-2d6b.local 54321 typ host\r\n"
            "a=end-of-candidates",
        )
        call_id, _ = await bed.worker.create_call(mdns)
        session = bed.worker._sessions[call_id]
        assert session._link is not None and session._link.connection.remote_candidates == []
        with pytest.raises(AtCapacity):
            await bed.worker.create_call(offer)
        assert await bed.worker.end_call(call_id)

        await client.close()
        await asyncio.sleep(0.1)
        assert not other_tasks() - baseline
        await bed.worker.stop(1.0)
        with pytest.raises(Draining):
            await bed.worker.create_call(offer)
        await bed.relay.close()

    run(netns, body)


def test_an_unanswered_call_fails_after_the_setup_timeout(netns: str) -> None:
    async def body() -> None:
        bed = Bed()
        bed.worker.config.setup_timeout = 0.5
        await bed.start()
        client = Client(C4)
        call_id, _ = await bed.worker.create_call(await client.offer())
        assert bed.worker.load == 1
        await until(lambda: bed.worker.load == 0, 5, "the unconnected call to be reaped")
        stats = bed.worker.stats()
        assert stats["calls_failed_total"] == 1 and stats["mux"]["endpoints"] == 0
        assert not await bed.worker.end_call(call_id)
        await client.close()
        await bed.stop()

    run(netns, body)


def _fuzz(rng: random.Random, offer: str) -> str:
    """A real offer with 1-3 random line deletions, duplications, truncations or edits."""
    lines = offer.strip().split("\r\n")
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(lines))
        op = rng.randrange(5)
        if op == 0 and len(lines) > 1:
            del lines[i]
        elif op == 1:
            lines.insert(i, lines[rng.randrange(len(lines))])
        elif op == 2:
            lines[i] = lines[i][: rng.randrange(len(lines[i]) + 1)]
        elif op == 3 and lines[i]:
            pos = rng.randrange(len(lines[i]))
            lines[i] = lines[i][:pos] + rng.choice(" :/0a\xe9\x7f") + lines[i][pos + 1 :]
        else:
            lines[i] += " " + rng.choice(["x", "0", "-1", "99999999999", "a=b"])
    return "\r\n".join(lines) + "\r\n"


def test_mutated_offers_are_answered_or_refused_and_never_leak(netns: str) -> None:
    """Whatever an offer looks like: an answer or BadOffer, and nothing left behind."""

    async def body() -> None:
        bed = Bed(max_calls=4)
        await bed.start()
        baseline = other_tasks()
        client = Client(C4)
        offer = await client.offer()
        rng = random.Random(0x5EED)
        outcomes = {"answered": 0, "refused": 0}
        for _ in range(300):
            try:
                call_id, _ = await bed.worker.create_call(_fuzz(rng, offer))
            except BadOffer:
                outcomes["refused"] += 1
            else:
                outcomes["answered"] += 1
                assert await bed.worker.end_call(call_id)
            mux = bed.worker.mux
            assert bed.worker.load == 0 and mux is not None and mux.endpoint_count == 0
        assert outcomes["answered"] > 0 and outcomes["refused"] > 0, outcomes
        stats = bed.worker.stats()
        assert stats["setup_errors_total"] == 0
        assert stats["rejected_bad_offer_total"] == outcomes["refused"]
        await client.close()
        await asyncio.sleep(0.2)
        assert not other_tasks() - baseline
        await bed.stop()

    run(netns, body)


class _BrokenStart(backends.EchoBackend):
    async def start(self, info: backends.SessionInfo) -> None:
        raise backends.BackendError("model service unreachable")


class _FailsOnBoom(backends.EchoBackend):
    async def on_event(self, event: dict[str, Any]) -> None:
        if event.get("type") == "boom":
            raise RuntimeError("the backend fell over")
        await super().on_event(event)


class _SlowStart(backends.EchoBackend):
    release = asyncio.Event()

    async def start(self, info: backends.SessionInfo) -> None:
        await self.release.wait()
        await super().start(info)


TEST_BACKENDS = {
    "test_broken_start": _BrokenStart,
    "test_fails_on_boom": _FailsOnBoom,
    "test_slow_start": _SlowStart,
}


@pytest.fixture
def test_backends() -> Iterator[None]:
    for name, factory in TEST_BACKENDS.items():
        backends.register_backend(name, factory)
    try:
        yield
    finally:
        for name in TEST_BACKENDS:
            backends._REGISTRY.pop(name, None)


def test_backend_failures_fail_setup_or_become_error_events(
    netns: str, test_backends: None
) -> None:
    async def body() -> None:
        bed = Bed(backend="test_broken_start")
        await bed.start()
        client = Client(C4)
        offer = await client.offer()
        with pytest.raises(BackendUnavailable, match="model service unreachable"):
            await bed.worker.create_call(offer)
        assert bed.worker.load == 0 and bed.worker.stats()["rejected_backend_total"] == 1
        await client.close()
        await bed.stop()

        bed = Bed(backend="test_fails_on_boom")
        await bed.start()
        client = Client(C4)
        call_id, answer = await bed.worker.create_call(await client.offer())
        await client.answer(answer)
        await client.connected()
        client.channel.send(json.dumps({"type": "boom", "event_id": "evt_boom"}))
        error = await client.event("error")
        assert error["error"]["code"] == "backend_error"
        assert error["error"]["event_id"] == "evt_boom"
        client.channel.send(json.dumps({"type": "still-there"}))
        assert (await client.event("echo"))["event"] == {"type": "still-there"}
        await until(lambda: client.loud_frames >= 5, 10, "echo after the backend error")
        assert bed.worker.stats()["backend_errors_total"] == 1
        assert await bed.worker.end_call(call_id)
        await client.close()
        await bed.stop()

    run(netns, body)


def test_ending_a_call_during_its_setup_is_not_a_bad_offer(netns: str, test_backends: None) -> None:
    async def body() -> None:
        _SlowStart.release = asyncio.Event()
        bed = Bed(backend="test_slow_start")
        await bed.start()
        baseline = other_tasks()
        client = Client(C4)
        setup = asyncio.ensure_future(bed.worker.create_call(await client.offer()))
        await until(lambda: bed.worker.load == 1, 5, "the call to be set up")
        (call_id,) = bed.worker._sessions
        assert await bed.worker.end_call(call_id)
        _SlowStart.release.set()
        with pytest.raises(ConnectionError, match="ended while it was being set up"):
            await setup
        stats = bed.worker.stats()
        assert bed.worker.load == 0 and stats["mux"]["endpoints"] == 0
        assert stats["setup_aborted_total"] == 1 and stats["rejected_bad_offer_total"] == 0
        await client.close()
        await asyncio.sleep(0.1)
        assert not other_tasks() - baseline
        await bed.stop()

    run(netns, body)
