"""The Redis schema and the relay's sync loops against a real redis-server.

The data plane side is the real kernel map (KernelState over the pinned
maps of the session's XDP program): registry changes must reach it within a
second, sessions must reach Redis, and outages must not remove anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest

from ctl.layout import Origin, TransceiverState
from ctl.redisstate import REMOVED, RedisState, SessionRecord, connect, endpoint, redact
from ctl.redissync import RedisSync, transceiver_record
from ctl.store import KernelState
from tests.bpf.xdp_harness import XdpHarness
from tests.ports import free_tcp_port
from tests.redis_server import RedisServer
from transceiver.registry import Registration

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

            # a refresh of a session whose key vanished writes the whole record
            # again (never a partial hash holding only last_seen)
            await r.r.delete(r.k_session(client))
            assert await sync.refresh_active() == 1
            for _ in range(300):
                if await stored():
                    break
                await asyncio.sleep(0.01)
            rewritten = await r.r.hgetall(r.k_session(client))
            assert rewritten.keys() >= {"tid", "taddr", "tport", "raddr", "rport", "created"}

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
        # in the (pinned) map already: a session the kernel created while no
        # daemon read its event ring, so Redis never heard of it
        kstate.put_transceiver(0xA1, records[0].taddr, 4001, TransceiverState.ACTIVE)
        kstate.put_session(CLIENT, 2, 0xA1, RELAY, 3478, Origin.XDP)
        sync = RedisSync(RedisState(connect(redis_server.url)), kstate, "relay-a", 60)
        await sync.start()
        try:
            assert sync.stats.sessions_loaded == 50
            assert kstate.session_count() == 51
            assert kstate.get_session(CLIENT, 1) is None, "another relay's session"
            written = await r.get_session(endpoint(CLIENT, 2))
            assert written is not None and (written.tid, written.relay) == (0xA1, "relay-a")
        finally:
            # Bounded: a cancellation redis-py swallowed once held stop() for a minute.
            await asyncio.wait_for(sync.stop(), 10)
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


def test_relay_started_while_redis_is_down_syncs_on_first_contact(
    redis_server: RedisServer, kstate: KernelState
) -> None:
    """Down at start: the first time Redis answers, load and write back as a start would.

    The relay talks TCP to a port Redis does not listen on yet (connection
    refused: down); the test fills Redis over its unix socket meanwhile, then
    makes Redis listen on that port (CONFIG SET port, live since Redis 7).
    """

    async def scenario() -> None:
        r = RedisState(connect(redis_server.url))
        port = free_tcp_port()
        taddr = ipaddress.ip_address("203.0.113.11")
        # the previous daemon's pinned map: the transceiver and a session that
        # the kernel created while nobody read the event ring
        kstate.put_transceiver(0xA1, taddr, 4001, TransceiverState.ACTIVE)
        kstate.put_session(CLIENT, 2, 0xA1, RELAY, 3478, Origin.XDP)
        sync = RedisSync(RedisState(connect(f"redis://127.0.0.1:{port}/0")), kstate, "relay-a", 60)
        await sync.start()
        try:
            assert not sync.stats.up and sync.stats.errors > 0
            await r.put_transceiver(transceiver_record(0xA1, taddr, 4001), ttl=None)
            now = time.time()
            await r.put_sessions(
                [SessionRecord(CLIENT, 1, 0xA1, taddr, 4001, RELAY, 3478, "relay-a", now, now)],
                60,
            )
            assert sync.stats.sessions_loaded == 0
            await r.r.config_set("port", port)
            await wait_for(lambda: sync.stats.sessions_loaded == 1, 30.0)
            got = kstate.get_session(CLIENT, 1)
            assert got is not None and got.origin is Origin.REDIS
            # and the map's session Redis lacked is there now
            for _ in range(300):
                if await r.get_session(endpoint(CLIENT, 2)):
                    break
                await asyncio.sleep(0.01)
            written = await r.get_session(endpoint(CLIENT, 2))
            assert written is not None and written.relay == "relay-a"
        finally:
            await sync.stop()
            await r.r.aclose()

    run(scenario)


def test_an_empty_redis_restart_keeps_heartbeat_transceivers_and_sessions(
    redis_server: RedisServer, kstate: KernelState
) -> None:
    """Redis comes back empty: nothing leaves the map before the heartbeats re-register.

    The worker's real heartbeat (transceiver/registry.py, default 3 s beat,
    10 s TTL) registers the transceiver; after the restart the map must keep
    it and its session at every look until the beat has put it back, the
    session must be back in Redis within seconds, and a real leave after
    that must be applied at once (the grace ends for a re-registered one).
    """

    async def scenario() -> None:
        worker = Registration(redis_server.url, 0xA1, "203.0.113.11", 4001)
        await worker.start()
        sync = RedisSync(RedisState(connect(redis_server.url)), kstate, "relay-a", 60)
        await sync.start()
        r: RedisState | None = None
        try:
            await wait_for(lambda: kstate.get_transceiver(0xA1) is not None, 1.0)
            sync.on_session(kstate.put_session(CLIENT, 50000, 0xA1, RELAY, 3478, Origin.XDP))
            client = endpoint(CLIENT, 50000)
            redis_server.stop()
            redis_server.start()  # empty: no persistence
            r = RedisState(connect(redis_server.url))
            deadline = time.monotonic() + 30
            while not (await r.list_transceivers() and await r.get_session(client)):
                assert kstate.get_transceiver(0xA1) is not None, "transceiver dropped"
                assert kstate.get_session(CLIENT, 50000) is not None, "session dropped"
                assert time.monotonic() < deadline, "not back in Redis"
                await asyncio.sleep(0.05)
            (rec,) = await r.list_transceivers()
            assert rec.tid == 0xA1 and rec.source == "heartbeat"
            await wait_for(lambda: not sync._protected, 5.0)  # re-registered: no grace
            assert kstate.get_session(CLIENT, 50000) is not None
            await worker.stop()  # a real leave
            await wait_for(lambda: kstate.get_transceiver(0xA1) is None, 1.0)
            assert kstate.get_session(CLIENT, 50000) is None
        finally:
            with contextlib.suppress(Exception):
                await worker.stop()
            await sync.stop()
            if r is not None:
                await r.r.aclose()

    run(scenario)


def test_grace_ends_for_transceivers_that_never_come_back(
    redis_server: RedisServer, kstate: KernelState
) -> None:
    """An operator record lost with an empty restart stays for the grace only."""

    async def scenario() -> None:
        r = RedisState(connect(redis_server.url))
        await r.put_transceiver(transceiver_record(0xA1, "203.0.113.11", 4001), ttl=None)
        await r.r.aclose()
        sync = RedisSync(RedisState(connect(redis_server.url)), kstate, "relay-a", 60, grace=2.0)
        await sync.start()
        try:
            await wait_for(lambda: kstate.get_transceiver(0xA1) is not None, 1.0)
            redis_server.stop()
            redis_server.start()
            await wait_for(lambda: bool(sync._protected), 5.0)  # the restart was seen
            assert kstate.get_transceiver(0xA1) is not None
            await wait_for(lambda: kstate.get_transceiver(0xA1) is None, 30.0)
        finally:
            await sync.stop()

    run(scenario)


def test_an_operator_rm_of_a_live_worker_sticks(
    redis_server: RedisServer, kstate: KernelState
) -> None:
    """rm leaves a tombstone the beats keep: relays drop it, even during a grace."""

    async def scenario() -> None:
        worker = Registration(redis_server.url, 0xA1, "203.0.113.11", 4001, interval=0.2, ttl=2)
        await worker.start()
        operator = RedisState(connect(redis_server.url))
        sync = RedisSync(RedisState(connect(redis_server.url)), kstate, "relay-a", 60)
        await sync.start()
        try:
            await wait_for(lambda: kstate.get_transceiver(0xA1) is not None, 1.0)
            sync._begin_grace()  # as after a reconnect: the tombstone still counts
            assert 0xA1 in sync._protected
            assert await operator.remove_transceiver(0xA1)
            await wait_for(lambda: kstate.get_transceiver(0xA1) is None, 1.0)
            beat = float((await operator.r.hgetall(operator.k_transceiver(0xA1)))["updated"])
            # several beats later: still removed, in Redis and in the map
            while True:
                raw = await operator.r.hgetall(operator.k_transceiver(0xA1))
                if float(raw["updated"]) >= beat + 3 * 0.2:
                    break
                await asyncio.sleep(0.05)
            assert raw["status"] == REMOVED and worker.status == REMOVED
            await asyncio.sleep(2 * 0.5)  # two reconcile periods
            assert kstate.get_transceiver(0xA1) is None
        finally:
            await worker.stop()
            await sync.stop()
            await operator.r.aclose()

    run(scenario)


def test_pubsub_failures_are_counted_and_backed_off(
    redis_server: RedisServer, kstate: KernelState
) -> None:
    """The subscription loop alone against a dead Redis: errors counted, not retried at 2 Hz."""

    async def scenario() -> None:
        url = redis_server.url
        redis_server.stop()
        sync = RedisSync(RedisState(connect(url)), kstate, "relay-a", 60)
        task = asyncio.create_task(sync._pubsub_loop())
        try:
            await asyncio.sleep(3.2)  # backoff: tries at 0, 0.5, 1.5, 3.5 s; fixed 0.5 s: 7
            assert 1 <= sync.stats.errors <= 4, sync.stats.errors
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await sync.redis.r.aclose()

    run(scenario)
