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
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctl import wire
from ctl.redisstate import RedisState, connect, endpoint
from ctl.testbed import Testbed
from tests.redis_server import RedisServer

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


def new_relay(testbed: Testbed, server: RedisServer, *extra: str) -> RelayProcess:
    pin_dir = Path(tempfile.mkdtemp(prefix="splitrelay-redis-", dir="/sys/fs/bpf"))
    pin_dir.rmdir()
    relay = RelayProcess(testbed, "native", pin_dir)
    return relay.start(["--redis-url", server.url, "--idle-timeout", "3", *extra])


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
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            roundtrip(client, tx, active_header, b"keepalive")
            time.sleep(0.25)
        assert not redis_get_session(redis_server, header_client(idle_header)), "idle lingers"
        assert redis_get_session(redis_server, header_client(active_header)), "active lapsed"
        ports = {s["client_port"] for s in relay.cli_json("sessions", "ls")}
        assert active_header.client_port in ports
        assert idle_header.client_port not in ports
    finally:
        idle.close()
        relay.cleanup()
