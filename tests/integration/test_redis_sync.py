"""The Redis schema and the relay's sync loops against a real redis-server.

The data plane side is the real kernel map (KernelState over the pinned
maps of the session's XDP program): registry changes must reach it within a
second, sessions must reach Redis, and outages must not remove anything.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest

from ctl.layout import Origin, TransceiverState
from ctl.redisstate import RedisState, SessionRecord, connect, endpoint, redact
from ctl.redissync import RedisSync, transceiver_record
from ctl.store import KernelState
from tests.bpf.xdp_harness import XdpHarness
from tests.redis_server import RedisServer

CLIENT = ipaddress.ip_address("198.51.100.10")
RELAY = ipaddress.ip_address("198.51.100.1")


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def kstate(xdp: XdpHarness) -> KernelState:
    xdp.reset()
    xdp.maps.transceivers.clear()
    return KernelState(xdp.maps)


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro_fn(), 60))


async def wait_for(cond: Callable[[], bool], timeout: float) -> float:
    """Seconds until cond() held; fails after timeout."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def test_redact_hides_password() -> None:
    assert redact("redis://:secret@host:6379/0") == "redis://host:6379/0"
    assert redact("unix:///run/redis.sock") == "unix:///run/redis.sock"


def test_registry_changes_reach_the_map_within_a_second(
    redis_server: RedisServer, kstate: KernelState
) -> None:
    async def scenario() -> None:
        writer = RedisState(connect(redis_server.url))
        sync = RedisSync(RedisState(connect(redis_server.url)), kstate, "relay-a", 60)
        await sync.start()
        try:
            rec = transceiver_record(0xA1, "203.0.113.11", 4001)
            await writer.put_transceiver(rec, ttl=None)
            assert await wait_for(lambda: kstate.get_transceiver(0xA1) is not None, 1.0) < 1.0
            await writer.set_transceiver_state(0xA1, TransceiverState.DRAINING)
            await wait_for(
                lambda: kstate.get_transceiver(0xA1).state is TransceiverState.DRAINING, 1.0
            )
            kstate.put_session(CLIENT, 50000, 0xA1, RELAY, 3478, Origin.XDP)
            await writer.remove_transceiver(0xA1)
            await wait_for(lambda: kstate.get_transceiver(0xA1) is None, 1.0)
            assert kstate.get_session(CLIENT, 50000) is None, "its sessions go with it"
            # heartbeat expiry: a 1 s TTL record that is never refreshed
            await writer.put_transceiver(transceiver_record(0xA2, "203.0.113.12", 4002), ttl=1)
            await wait_for(lambda: kstate.get_transceiver(0xA2) is not None, 1.0)
            await wait_for(lambda: kstate.get_transceiver(0xA2) is None, 1.0 + 1.0)
        finally:
            await sync.stop()
            await writer.r.aclose()

    run(scenario)


def test_sessions_are_written_and_recovered(redis_server: RedisServer, kstate: KernelState) -> None:
    async def scenario() -> None:
        r = RedisState(connect(redis_server.url))
        await r.put_transceiver(transceiver_record(0xA1, "203.0.113.11", 4001), ttl=None)
        sync = RedisSync(RedisState(connect(redis_server.url)), kstate, "relay-a", 60)
        await sync.start()
        try:
            await wait_for(lambda: kstate.get_transceiver(0xA1) is not None, 1.0)
            entry = kstate.put_session(CLIENT, 50000, 0xA1, RELAY, 3478, Origin.XDP)
            sync.on_session(entry)
            client = endpoint(CLIENT, 50000)

            async def stored() -> SessionRecord | None:
                return await r.get_session(client)

            for _ in range(100):
                if await stored():
                    break
                await asyncio.sleep(0.01)
            rec = await stored()
            assert rec is not None
            assert (rec.tid, str(rec.taddr), rec.tport) == (0xA1, "203.0.113.11", 4001)
            assert (rec.raddr, rec.rport, rec.relay) == (RELAY, 3478, "relay-a")
            assert await r.r.ttl(r.k_session(client)) > 50

            # a relay that lost the session recovers it with the next packet
            kstate.remove_session(CLIENT, 50000)
            got = await sync.recover(CLIENT, 50000)
            assert got is not None and got.tid == 0xA1 and got.origin is Origin.REDIS
            assert kstate.get_session(CLIENT, 50000) is not None
            # a miss is remembered: no second lookup within a second
            assert await sync.recover(ipaddress.ip_address("198.51.100.99"), 1) is None
            assert "198.51.100.99:1" in sync._misses
        finally:
            await sync.stop()
            await r.r.aclose()

    run(scenario)


def test_restarted_relay_loads_its_sessions(redis_server: RedisServer, kstate: KernelState) -> None:
    async def scenario() -> None:
        r = RedisState(connect(redis_server.url))
        await r.put_transceiver(transceiver_record(0xA1, "203.0.113.11", 4001), ttl=None)
        now = time.time()
        records = [
            SessionRecord(
                CLIENT,
                50000 + i,
                0xA1,
                ipaddress.ip_address("203.0.113.11"),
                4001,
                RELAY,
                3478,
                "relay-a",
                now,
                now,
            )
            for i in range(50)
        ]
        await r.put_sessions(records, 60)
        await r.put_sessions(
            [
                SessionRecord(
                    CLIENT, 1, 0xA1, records[0].taddr, 4001, RELAY, 3478, "relay-b", now, now
                )
            ],
            60,
        )
        sync = RedisSync(RedisState(connect(redis_server.url)), kstate, "relay-a", 60)
        await sync.start()
        try:
            assert sync.stats.sessions_loaded == 50
            assert kstate.session_count() == 50
            assert kstate.get_session(CLIENT, 1) is None, "another relay's session"
        finally:
            await sync.stop()
            await r.r.aclose()

    run(scenario)


def test_redis_outage_keeps_the_map_and_writes_back(
    redis_server: RedisServer, kstate: KernelState
) -> None:
    async def scenario() -> None:
        r = RedisState(connect(redis_server.url))
        await r.put_transceiver(transceiver_record(0xA1, "203.0.113.11", 4001), ttl=None)
        sync = RedisSync(RedisState(connect(redis_server.url)), kstate, "relay-a", 60)
        await sync.start()
        try:
            await wait_for(lambda: kstate.get_transceiver(0xA1) is not None, 1.0)
            redis_server.stop()
            await wait_for(lambda: not sync.stats.up, 3.0)
            # the outage removes nothing, and new sessions still queue
            entry = kstate.put_session(CLIENT, 50001, 0xA1, RELAY, 3478, Origin.XDP)
            sync.on_session(entry)
            await asyncio.sleep(1.0)
            assert kstate.get_transceiver(0xA1) is not None
            assert sync.stats.errors > 0
            redis_server.start()  # empty: no persistence
            await wait_for(lambda: sync.stats.up, 5.0)
            r2 = RedisState(connect(redis_server.url))
            for _ in range(300):
                if await r2.get_session(endpoint(CLIENT, 50001)):
                    break
                await asyncio.sleep(0.01)
            assert await r2.get_session(endpoint(CLIENT, 50001)) is not None
            await r2.r.aclose()
        finally:
            await sync.stop()
            await r.r.aclose()

    run(scenario)
