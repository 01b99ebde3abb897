"""The registry and session operations of ctl/redisstate.py against a real redis-server.

No relay and no kernel map: what each operation leaves in Redis, and what it
announces on the events channel. The rules checked are the ones the fleet
depends on: a worker's beat refreshes liveness only (an operator's drain and
rm stick), only state changes are published, and no operation leaves a
partial hash behind (docs/redis-schema.md).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest

from ctl.layout import TransceiverState
from ctl.redisstate import REMOVED, RedisState, SessionRecord, connect, endpoint, parse_endpoint
from ctl.redissync import transceiver_record
from tests.redis_server import RedisServer

TID = 0xC1
HB = transceiver_record(TID, "203.0.113.11", 4001)


@pytest.fixture
def server() -> Iterator[RedisServer]:
    s = RedisServer().start()
    try:
        yield s
    finally:
        s.close()


def run(server: RedisServer, scenario: Callable[[RedisState], Awaitable[None]]) -> None:
    """Run `scenario` with a RedisState on `server`, closed afterwards."""

    async def main() -> None:
        state = RedisState(connect(server.url), "t:")
        try:
            await asyncio.wait_for(scenario(state), 30)
        finally:
            await state.r.aclose()

    asyncio.run(main())


class Events:
    """Messages published on the events channel while it is open."""

    def __init__(self, state: RedisState) -> None:
        self.state = state
        self.pubsub = state.r.pubsub()

    async def __aenter__(self) -> Events:
        await self.pubsub.subscribe(self.state.k_events)
        await self.pubsub.get_message(timeout=1.0)  # the subscribe confirmation
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.pubsub.aclose()

    async def drain(self) -> list[str]:
        """Everything published so far (a PING round trip flushes what is in flight)."""
        await self.state.r.ping()
        out = []
        while (msg := await self.pubsub.get_message(timeout=0.2)) is not None:
            if msg["type"] == "message":
                out.append(msg["data"])
        return out


async def record(state: RedisState) -> dict[str, str]:
    return await state.r.hgetall(state.k_transceiver(TID))


async def ids(state: RedisState) -> list[int]:
    return [r.tid for r in await state.list_transceivers()]


def test_heartbeat_registers_once_then_refreshes_liveness_only(server: RedisServer) -> None:
    async def scenario(state: RedisState) -> None:
        async with Events(state) as events:
            assert await state.heartbeat(HB, ttl=5) == "registered"
            assert await events.drain() == [f"transceiver:{TID:08x}"]
            first = await record(state)
            assert first["status"] == "active" and first["source"] == "heartbeat"
            await state.r.expire(state.k_transceiver(TID), 2)
            await asyncio.sleep(0.01)  # `updated` has millisecond resolution
            for _ in range(5):
                assert await state.heartbeat(HB, ttl=5) == "active"
            # refreshed: TTL back to 5 s, updated moved; announced: nothing
            assert await state.r.ttl(state.k_transceiver(TID)) > 2
            assert float((await record(state))["updated"]) > float(first["updated"])
            assert await events.drain() == []
            assert await ids(state) == [TID]

    run(server, scenario)


def test_an_operator_drain_outlives_the_beats(server: RedisServer) -> None:
    async def scenario(state: RedisState) -> None:
        await state.heartbeat(HB, ttl=5)
        async with Events(state) as events:
            assert await state.set_transceiver_state(TID, TransceiverState.DRAINING)
            assert await events.drain() == [f"transceiver:{TID:08x}"]
            for _ in range(3):
                assert await state.heartbeat(HB, ttl=5) == "draining"
            assert (await record(state))["status"] == "draining"
            (rec,) = await state.list_transceivers()
            assert rec.state is TransceiverState.DRAINING
            # draining again changes nothing, so it announces nothing
            assert await state.set_transceiver_state(TID, TransceiverState.DRAINING)
            assert await events.drain() == []

    run(server, scenario)


def test_an_operator_rm_of_a_live_worker_leaves_a_tombstone(server: RedisServer) -> None:
    async def scenario(state: RedisState) -> None:
        await state.heartbeat(HB, ttl=5)
        async with Events(state) as events:
            assert await state.remove_transceiver(TID)
            assert await events.drain() == [f"transceiver:{TID:08x}"]
            assert (await record(state))["status"] == REMOVED
            for _ in range(3):
                assert await state.heartbeat(HB, ttl=5) == REMOVED
            assert await events.drain() == []
        # hidden from listings but known as a tombstone; kept alive by the beats
        assert await ids(state) == []
        assert await state.read_registry() == ([], {TID})
        assert await state.r.ttl(state.k_transceiver(TID)) > 0
        # neither a drain nor a second rm nor the worker's leaving undoes it
        assert not await state.set_transceiver_state(TID, TransceiverState.DRAINING)
        assert not await state.remove_transceiver(TID)
        assert not await state.unregister_transceiver(TID)
        assert (await record(state))["status"] == REMOVED
        # an operator's add brings it back, as an operator record without TTL
        await state.put_transceiver(
            transceiver_record(TID, "203.0.113.11", 4001, source="operator"), ttl=None
        )
        assert await ids(state) == [TID]
        assert await state.r.ttl(state.k_transceiver(TID)) == -1

    run(server, scenario)


def test_a_tombstone_lapses_once_the_worker_stops_beating(server: RedisServer) -> None:
    async def scenario(state: RedisState) -> None:
        await state.heartbeat(HB, ttl=1)
        assert await state.remove_transceiver(TID)
        deadline = time.monotonic() + 10
        while await record(state):
            assert time.monotonic() < deadline, "the tombstone did not lapse"
            await asyncio.sleep(0.05)
        # the same worker starting later registers afresh
        assert await state.heartbeat(HB, ttl=5) == "registered"
        assert await ids(state) == [TID]

    run(server, scenario)


def test_operator_records_own_their_id(server: RedisServer) -> None:
    async def scenario(state: RedisState) -> None:
        op = transceiver_record(TID, "203.0.113.99", 5000, source="operator")
        await state.put_transceiver(op, ttl=None)
        before = await record(state)
        assert await state.heartbeat(HB, ttl=5) == "operator"
        assert await record(state) == before, "a beat must not touch an operator record"
        assert await state.r.ttl(state.k_transceiver(TID)) == -1
        assert not await state.unregister_transceiver(TID)
        # rm deletes an operator record outright: nobody would refresh a tombstone
        assert await state.remove_transceiver(TID)
        assert await record(state) == {}
        assert await state.r.smembers(state.k_transceivers) == set()
        assert not await state.remove_transceiver(TID)

    run(server, scenario)


def test_a_worker_leaving_deletes_its_record(server: RedisServer) -> None:
    async def scenario(state: RedisState) -> None:
        await state.heartbeat(HB, ttl=5)
        async with Events(state) as events:
            assert await state.unregister_transceiver(TID)
            assert await events.drain() == [f"transceiver:{TID:08x}"]
        assert await record(state) == {}
        assert await state.r.smembers(state.k_transceivers) == set()

    run(server, scenario)


def test_a_drain_of_an_expired_record_writes_nothing(server: RedisServer) -> None:
    async def scenario(state: RedisState) -> None:
        assert not await state.set_transceiver_state(TID, TransceiverState.DRAINING)
        assert not await state.r.exists(state.k_transceiver(TID))

    run(server, scenario)


def session(client_port: int, last_seen: float) -> SessionRecord:
    addr, _ = parse_endpoint("198.51.100.10:1")
    taddr, tport = parse_endpoint("203.0.113.11:4001")
    raddr, rport = parse_endpoint("198.51.100.1:3478")
    return SessionRecord(
        addr, client_port, TID, taddr, tport, raddr, rport, "relay-a", last_seen, last_seen
    )


def test_touch_refreshes_existing_sessions_and_never_creates_one(server: RedisServer) -> None:
    async def scenario(state: RedisState) -> None:
        now = time.time()
        await state.put_sessions([session(1, now - 5)], ttl=3)
        present, absent = endpoint("198.51.100.10", 1), endpoint("198.51.100.10", 2)
        missing = await state.touch_sessions(
            [("relay-a", present, now), ("relay-a", absent, now)], ttl=60
        )
        assert missing == [absent]
        assert not await state.r.exists(state.k_session(absent)), "a partial hash"
        got = await state.get_session(present)
        assert got is not None and got.last_seen == pytest.approx(now, abs=0.01)
        assert got.created == pytest.approx(now - 5, abs=0.01)
        assert await state.r.ttl(state.k_session(present)) > 3
        scores = await state.r.zrange(state.k_relay_sessions("relay-a"), 0, -1, withscores=True)
        assert scores == [(present, pytest.approx(now, abs=0.01))]
        assert await state.missing_sessions([present, absent]) == [absent]

    run(server, scenario)


def test_touch_in_batches(server: RedisServer) -> None:
    async def scenario(state: RedisState) -> None:
        now = time.time()
        await state.put_sessions([session(p, now - 1) for p in range(1, 2001, 2)], ttl=60)
        items = [("relay-a", endpoint("198.51.100.10", p), now) for p in range(1, 2001)]
        missing = await state.touch_sessions(items, ttl=60, batch=300)
        assert missing == [endpoint("198.51.100.10", p) for p in range(2, 2001, 2)]
        assert await state.r.zcard(state.k_relay_sessions("relay-a")) == 1000

    run(server, scenario)
