"""Worker choice, call ids and stats plumbing of the pools, and the metrics adapter.

The workers here are stand-ins with the Worker's interface (config, load,
create_call, end_call, stats): what is tested is the pool's own logic, which
worker gets a call and how worker errors become pool errors.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from transceiver import worker as worker_mod
from transceiver.metrics import Histogram, worker_values
from transceiver.pool import (
    BadOffer,
    InProcessPool,
    PoolError,
    Unavailable,
    make_call_id,
    pick_least_loaded,
    split_call_id,
)


@dataclass
class Config:
    transceiver_id: int
    max_calls: int


@dataclass
class StubWorker:
    config: Config
    calls: set[str] = field(default_factory=set)
    fail: Exception | None = None
    stopped: float | None = None
    counter: int = 0

    @property
    def load(self) -> int:
        return len(self.calls)

    async def create_call(self, offer_sdp: str) -> tuple[str, str]:
        await asyncio.sleep(0)  # let concurrent offers interleave, as real setup does
        if self.fail is not None:
            raise self.fail
        self.counter += 1
        call_id = f"c{self.counter}"
        self.calls.add(call_id)
        return call_id, f"answer from {self.config.transceiver_id:x}"

    async def end_call(self, call_id: str) -> bool:
        if call_id in self.calls:
            self.calls.discard(call_id)
            return True
        return False

    def stats(self) -> dict[str, Any]:
        return {"sessions": self.load}

    async def stop(self, drain_deadline: float) -> None:
        self.stopped = drain_deadline


def pool_of(*capacities: int) -> tuple[InProcessPool, list[StubWorker]]:
    workers = [StubWorker(Config(0xA001 + i, c)) for i, c in enumerate(capacities)]
    return InProcessPool(workers), workers  # type: ignore[arg-type]


def test_pick_least_loaded_by_ratio() -> None:
    assert pick_least_loaded([]) is None
    assert pick_least_loaded([(0, 10), (0, 10)]) == 0
    assert pick_least_loaded([(0, 10), (0, 10)], start=1) == 1
    assert pick_least_loaded([(5, 10), (1, 2)]) == 1  # equal ratio: fewer active calls wins
    assert pick_least_loaded([(5, 10), (2, 2)]) == 0  # the second is full
    assert pick_least_loaded([(3, 10), (1, 10)]) == 1
    assert pick_least_loaded([(1, 4), (1, 100)]) == 1  # relative to capacity
    assert pick_least_loaded([(10, 10), (2, 2)]) is None
    assert pick_least_loaded([(0, 0)]) is None  # a dead worker has no capacity


def test_call_ids_name_the_worker() -> None:
    call_id = make_call_id(0xA001, "Ab_-9.~x")
    assert call_id == "0000a001-Ab_-9.~x"
    assert split_call_id(call_id) == (0xA001, "Ab_-9.~x")
    assert split_call_id("0000a001-with-dashes") == (0xA001, "with-dashes")
    for bad in ("", "a001-x", "0000A001-x", "0000a001-", "0000a001-a/b", "zzzzzzzz-x"):
        assert split_call_id(bad) is None
    with pytest.raises(ValueError):
        make_call_id(1, "not/url safe")


def test_in_process_pool_spreads_concurrent_calls() -> None:
    async def main() -> None:
        pool, workers = pool_of(4, 4)
        results = await asyncio.gather(*(pool.create_call("v=0") for _ in range(6)))
        assert [w.load for w in workers] == [3, 3]
        tids = {split_call_id(call_id)[0] for call_id, _ in results}  # type: ignore[index]
        assert tids == {0xA001, 0xA002}
        await asyncio.gather(*(pool.create_call("v=0") for _ in range(2)))
        assert pool.at_capacity()
        with pytest.raises(Unavailable) as info:
            await pool.create_call("v=0")
        assert info.value.reason == "capacity"
        call_id = results[0][0]
        assert await pool.end_call(call_id)
        assert not await pool.end_call(call_id)
        assert not await pool.end_call("0000beef-c1")
        assert not await pool.end_call("garbage")
        assert not pool.at_capacity()
        stats = await pool.stats()
        assert (stats.calls, stats.capacity) == (7, 8)
        assert [w.stats for w in stats.workers] == [{"sessions": w.load} for w in workers]

    asyncio.run(main())


@pytest.mark.parametrize(
    ("error", "expected", "reason"),
    [
        (worker_mod.BadOffer("no audio"), BadOffer, None),
        (worker_mod.AtCapacity("full"), Unavailable, "capacity"),
        (worker_mod.Draining("bye"), Unavailable, "draining"),
        (RuntimeError("boom"), PoolError, None),
    ],
)
def test_worker_errors_become_pool_errors(
    error: Exception, expected: type[Exception], reason: str | None
) -> None:
    async def main() -> None:
        pool, workers = pool_of(4)
        workers[0].fail = error
        with pytest.raises(expected) as info:
            await pool.create_call("v=0")
        if reason is not None:
            assert getattr(info.value, "reason", None) == reason
        assert "boom" not in str(info.value)

    asyncio.run(main())


def test_drain_refuses_new_calls_and_stops_workers() -> None:
    async def main() -> None:
        pool, workers = pool_of(4, 4)
        await pool.drain(7.5)
        assert pool.draining
        assert [w.stopped for w in workers] == [7.5, 7.5]
        with pytest.raises(Unavailable) as info:
            await pool.create_call("v=0")
        assert info.value.reason == "draining"

    asyncio.run(main())


def test_pool_rejects_duplicate_ids() -> None:
    with pytest.raises(ValueError):
        InProcessPool([StubWorker(Config(1, 1)), StubWorker(Config(1, 1))])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        InProcessPool([])


def test_histogram_from_worker_snapshot_and_merge() -> None:
    snapshot = {
        "buckets": [[0.05, 1], [0.1, 3], [0.25, 3]],
        "count": 4,
        "sum": 1.5,
        "recent": [0.01, 0.07, 0.08, 1.34],
    }
    hist = Histogram.from_value(snapshot)
    assert hist.buckets == (0.05, 0.1, 0.25)
    assert hist.counts == [1, 3, 3, 4]
    merged = Histogram()
    merged.merge(hist)
    merged.merge(Histogram.from_value(snapshot))
    assert merged.counts == [2, 6, 6, 8] and merged.total == 3.0
    assert Histogram.from_value([0.01, 0.2, -1, "x"]).count == 2
    assert Histogram.from_value({"buckets": "garbage"}).count == 0
    assert Histogram.from_value(None).count == 0


def test_worker_values_reads_worker_stats_leniently() -> None:
    values = worker_values(
        {
            "sessions": 2,
            "audio_frames_total": {"in": 10, "out": 9},
            "datachannel_messages_total": {"in": 1, "out": 2},
            "backend_errors_total": 3,
            "events_dropped_total": 4,
            "calls_connected_total": 5,
            "calls_ended_total": 6,
            "calls_failed_total": "junk",
        },
        calls=0,
    )
    assert values.sessions == 2
    assert values.audio_frames == {"in": 10, "out": 9}
    assert values.datachannel_messages == {"in": 1, "out": 2}
    assert (values.backend_errors, values.events_dropped, values.calls_connected) == (3, 4, 5)
    assert values.calls_ended == {"ended": 6, "failed": 0}
    empty = worker_values({}, calls=7)
    assert empty.sessions == 7 and empty.audio_frames == {"in": 0, "out": 0}
