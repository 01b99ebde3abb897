"""Relays and Redis together on the testbed: replacement, outages, TTLs.

redis-server runs on the testbed's Redis host; relay daemons run in the relay
namespace with native XDP. Real client and transceiver sockets check what a
user would see: a replaced relay carries a live session with the client's
very next packet (no STUN in between), an outage loses nothing, and Redis
forgets idle sessions by itself.
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from ctl import wire
from ctl.redisstate import RedisState, connect, endpoint
from ctl.testbed import Testbed
from tests.redis_server import RedisServer
from transceiver.registry import Registration

from .relay_process import (
    PUBLIC_PORT,
    PUBLIC_V4,
    TID_TX1,
    TUNNEL_PORT,
    TUNNEL_V4,
    TX1,
    RelayProcess,
    stun,
    udp,
)

REDIS_HOST = "203.0.113.20"


@pytest.fixture(scope="module")
def redis_server(testbed: Testbed) -> Iterator[RedisServer]:
    server = RedisServer(host=REDIS_HOST, port=6379, netns=testbed.netns("redis")).start()
    try:
        yield server
    finally:
        server.close()


class RegistryRelay(RelayProcess):
    """A relay with no static `--transceiver`: it knows transceivers from Redis only."""

    def argv(self, extra: Sequence[str] = ()) -> list[str]:
        argv = super().argv(extra)
        while "--transceiver" in argv:
            at = argv.index("--transceiver")
            del argv[at : at + 2]
        return argv


def new_relay(
    testbed: Testbed, server: RedisServer, *extra: str, static: bool = True
) -> RelayProcess:
    pin_dir = Path(tempfile.mkdtemp(prefix="splitrelay-redis-", dir="/sys/fs/bpf"))
    pin_dir.rmdir()
    relay = (RelayProcess if static else RegistryRelay)(testbed, "native", pin_dir)
    return relay.start(["--redis-url", server.url, "--idle-timeout", "3", *extra])


class Worker:
    """A transceiver worker's real heartbeat (transceiver/registry.py), on a thread's loop.

    The test's socket in the tx1 namespace plays the worker's data path; this
    keeps its record in the registry the way `transceiver run` does (3 s beat,
    10 s TTL). `pause()` while Redis is down stops the beats without a trace in
    Redis, so the test decides when the next beat comes.
    """

    def __init__(self, server: RedisServer, tid: int, addr: tuple[str, int]) -> None:
        self.url, self.tid, self.addr = f"unix://{server.socket_path}", tid, addr
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._registration: Registration | None = None

    def _call(self, coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def resume(self) -> None:
        """Register (now) and beat."""
        self._registration = Registration(self.url, self.tid, *self.addr)
        self._call(self._registration.start())

    def pause(self) -> None:
        """Stop beating (and leave the registry, if Redis is up to hear it)."""
        if self._registration is not None:
            self._call(self._registration.stop())
            self._registration = None

    def __enter__(self) -> Worker:
        self._thread.start()
        self.resume()
        return self

    def __exit__(self, *_: object) -> None:
        try:
            self.pause()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


def redis_get_session(server: RedisServer, client: tuple[str, int]) -> dict[str, str]:
    async def get() -> dict[str, str]:
        state = RedisState(connect(f"unix://{server.socket_path}"))
        try:
            return await state.r.hgetall(state.k_session(endpoint(*client)))
        finally:
            await state.r.aclose()

    return asyncio.run(get())


def wait_until(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    pytest.fail(f"{what} within {timeout} s")


@pytest.fixture
def sockets(testbed: Testbed) -> Iterator[tuple[socket.socket, socket.socket]]:
    client = udp(testbed, "c1", ("198.51.100.11", 0))
    tx = udp(testbed, "tx1", TX1)
    yield client, tx
    client.close()
    tx.close()


def call(client: socket.socket, tx: socket.socket) -> wire.TunnelHeader:
    request = stun(TID_TX1)
    client.sendto(request, (PUBLIC_V4, PUBLIC_PORT))
    data, _ = tx.recvfrom(4096)
    header, payload = wire.decap(data)
    assert payload == request
    return header


def roundtrip(
    client: socket.socket, tx: socket.socket, header: wire.TunnelHeader, n: bytes
) -> None:
    client.sendto(b"\x80" + n, (PUBLIC_V4, PUBLIC_PORT))
    assert wire.decap(tx.recvfrom(4096)[0])[1] == b"\x80" + n
    tx.sendto(wire.encap(header, b"\x81" + n), (TUNNEL_V4, TUNNEL_PORT))
    assert client.recvfrom(4096)[0] == b"\x81" + n


@pytest.mark.parametrize("how", ["load-at-start", "lookup-on-miss"])
def test_replacement_relay_carries_the_session(
    testbed: Testbed,
    redis_server: RedisServer,
    sockets: tuple[socket.socket, socket.socket],
    how: str,
) -> None:
    client, tx = sockets
    a = new_relay(testbed, redis_server)
    try:
        header = call(client, tx)
        roundtrip(client, tx, header, b"A")
        wait_until(
            lambda: redis_get_session(redis_server, header_client(header)),
            3,
            "the session did not reach Redis",
        )
    finally:
        a.cleanup()  # stopped, detached, pins removed: nothing of A remains
    # B: the same public address; with another relay id it loads nothing at
    # start and must look the client up on its first packet
    extra = ["--relay-id", "relay-b"] if how == "lookup-on-miss" else []
    b = new_relay(testbed, redis_server, *extra)
    try:
        roundtrip(client, tx, header, b"B")  # no STUN in between
        sessions = b.cli_json("sessions", "ls")
        origin = {s["client"]: s["origin"] for s in sessions}[endpoint(*header_client(header))]
        assert origin == "redis"
    finally:
        b.cleanup()


def header_client(header: wire.TunnelHeader) -> tuple[str, int]:
    return str(header.client_addr), header.client_port


def test_redis_outage_loses_nothing(
    testbed: Testbed, redis_server: RedisServer, sockets: tuple[socket.socket, socket.socket]
) -> None:
    client, tx = sockets
    relay = new_relay(testbed, redis_server)
    try:
        header = call(client, tx)
        redis_server.stop()
        for i in range(50):  # established traffic during the outage: every packet arrives
            roundtrip(client, tx, header, i.to_bytes(2, "big"))
        # a new session still routes by its ufrag
        other = udp(testbed, "c1", ("198.51.100.11", 0))
        try:
            header2 = call(other, tx)
            roundtrip(other, tx, header2, b"new")
            redis_server.start()  # empty, no persistence
            for h in (header, header2):
                wait_until(
                    lambda h=h: redis_get_session(redis_server, header_client(h)),
                    5,
                    "live sessions were not written back",
                )
        finally:
            other.close()
    finally:
        relay.cleanup()


def test_idle_sessions_lapse_active_ones_stay(
    testbed: Testbed, redis_server: RedisServer, sockets: tuple[socket.socket, socket.socket]
) -> None:
    client, tx = sockets
    relay = new_relay(testbed, redis_server)  # idle timeout 3 s, Redis TTL 6 s
    idle = udp(testbed, "c1", ("198.51.100.11", 0))
    try:
        active_header = call(client, tx)
        idle_header = call(idle, tx)
        for h in (active_header, idle_header):
            wait_until(
                lambda h=h: redis_get_session(redis_server, header_client(h)),
                3,
                "session not in Redis",
            )
        # keep one busy until the other's key lapses (TTL 6 s; deadline generous),
        # checking at every step that the busy one never does
        deadline = time.monotonic() + 30
        while redis_get_session(redis_server, header_client(idle_header)):
            assert time.monotonic() < deadline, "the idle session's key lingers"
            roundtrip(client, tx, active_header, b"keepalive")
            assert redis_get_session(redis_server, header_client(active_header)), "active lapsed"
            time.sleep(0.25)
        for _ in range(8):  # and well past the idle one's TTL
            roundtrip(client, tx, active_header, b"keepalive")
            assert redis_get_session(redis_server, header_client(active_header)), "active lapsed"
            time.sleep(0.25)

        def ports() -> set[int]:
            return {s["client_port"] for s in relay.cli_json("sessions", "ls")}  # type: ignore[attr-defined]

        wait_until(lambda: idle_header.client_port not in ports(), 10, "the idle map entry")
        assert active_header.client_port in ports()
    finally:
        idle.close()
        relay.cleanup()


def test_empty_redis_restart_keeps_heartbeat_transceivers_forwarding(
    testbed: Testbed, redis_server: RedisServer, sockets: tuple[socket.socket, socket.socket]
) -> None:
    """Redis restarts empty under a relay that knows its transceiver from heartbeats only.

    Until the worker's next beat registers it again the registry is empty; the
    relay must not take that for the worker leaving. The beat is held back
    until the relay has surely reconciled against the empty registry (its
    session is back in Redis, then two more seconds of traffic): every packet
    keeps arriving, and the map keeps the transceiver and the very session it
    had (not one recovered from Redis afterwards).
    """
    client, tx = sockets
    tid = f"{TID_TX1:08x}"
    with Worker(redis_server, TID_TX1, TX1) as worker:
        relay = new_relay(testbed, redis_server, static=False)
        try:
            wait_until(
                lambda: [t["id"] for t in transceivers(relay)] == [tid],
                5,
                "the relay to mirror the heartbeat's transceiver",
            )
            header = call(client, tx)
            roundtrip(client, tx, header, b"before")
            key = header_client(header)
            wait_until(lambda: redis_get_session(redis_server, key), 3, "session not in Redis")
            before = session_of(relay, key)

            redis_server.stop()
            worker.pause()  # Redis is down: the beats stop without a trace
            redis_server.start()  # empty, no persistence
            deadline = time.monotonic() + 30
            n = 0
            while not redis_get_session(redis_server, key):  # the relay wrote it back
                assert time.monotonic() < deadline, "the session did not return to Redis"
                roundtrip(client, tx, header, n.to_bytes(2, "big"))  # every packet arrives
                n += 1
                time.sleep(0.1)
            assert not registered(redis_server), "nothing registers the transceiver yet"
            for i in range(20):  # 2 s: several reconciles against the empty registry
                roundtrip(client, tx, header, b"empty" + bytes([i]))
                time.sleep(0.1)
            assert [t["id"] for t in transceivers(relay)] == [tid]

            worker.resume()  # the next beat registers it again
            wait_until(lambda: registered(redis_server), 10, "the worker to register again")
            for i in range(10):
                roundtrip(client, tx, header, b"after" + bytes([i]))
                time.sleep(0.1)
            assert [t["id"] for t in transceivers(relay)] == [tid]
            after = session_of(relay, key)
            same = ("client", "origin", "created_ns")
            assert {k: after[k] for k in same} == {k: before[k] for k in same}
        finally:
            relay.cleanup()


def session_of(relay: RelayProcess, client: tuple[str, int]) -> dict[str, Any]:
    """The relay's map entry for `client` (other tests' sessions may be loaded too)."""
    sessions: list[dict[str, Any]] = relay.cli_json("sessions", "ls")  # type: ignore[assignment]
    (entry,) = [s for s in sessions if s["client"] == endpoint(*client)]
    return entry


def transceivers(relay: RelayProcess) -> list[dict[str, str]]:
    return relay.cli_json("transceivers", "ls")  # type: ignore[return-value]


def registered(server: RedisServer) -> bool:
    async def get() -> bool:
        state = RedisState(connect(f"unix://{server.socket_path}"))
        try:
            return bool(await state.list_transceivers())
        finally:
            await state.r.aclose()

    return asyncio.run(get())
