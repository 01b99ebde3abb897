"""A worker that stops answering leaves the registry's rotation, and comes back when it answers.

The real Supervisor with two real worker processes on loopback, and the real
WorkerRegistry hooks against a real redis-server (tests/redis_server.py), next
to a recording hook. SIGSTOP freezes one worker: its process runs but it
answers nothing, which is what a hung event loop looks like from the front.
Checked: the unhealthy hook fires for that worker only, its record turns
draining (kept, not removed: relays keep its live sessions' path), the front
gives it no calls; after SIGCONT the recovered hook fires and the record is
active again. The health logic alone (no processes) is checked with fakes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.ports import free_udp_ports
from tests.redis_server import RedisServer
from transceiver.cli import WorkerRegistry
from transceiver.supervisor import (
    Supervisor,
    SupervisorConfig,
    SupervisorError,
    SupervisorHooks,
    WorkerInfo,
)

PREFIX = "srsup:"
BASE_TID = 0xC001
TIDS = (f"{BASE_TID:08x}", f"{BASE_TID + 1:08x}")


def config(tunnel_port: int, **overrides: Any) -> SupervisorConfig:
    values: dict[str, Any] = {
        "listen_host": "127.0.0.1",
        "listen_port": 0,
        "workers": 2,
        "base_transceiver_id": BASE_TID,
        "tunnel_host": "127.0.0.1",
        "base_tunnel_port": tunnel_port,
        "relays": [("127.0.0.1", 3479)],
        "public_candidates": [("127.0.0.1", 3478)],
        "max_calls": 4,
        "drain_timeout": 2.0,
        "unhealthy_after": 1.0,
    }
    values.update(overrides)
    return SupervisorConfig(**values)


class Recorder:
    """A hook set that records (event, transceiver id)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def hook(self, name: str) -> Callable[[WorkerInfo], Awaitable[None]]:
        async def record(info: WorkerInfo) -> None:
            self.events.append((name, info.transceiver_id))

        return record

    def hooks(self, base: SupervisorHooks | None = None) -> SupervisorHooks:
        hooks = base or SupervisorHooks()
        for name in ("started", "draining", "stopped", "unhealthy", "recovered"):
            getattr(hooks, f"on_worker_{name}").append(self.hook(name))
        return hooks


async def wait_for(check: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.05)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


def test_a_frozen_worker_is_drained_in_the_registry_and_comes_back(tmp_path: Path) -> None:
    server = RedisServer().start()

    async def body() -> None:
        r = aioredis.Redis(unix_socket_path=str(server.socket_path), decode_responses=True)
        recorder = Recorder()
        registry = WorkerRegistry(server.url, PREFIX, ttl=2)
        sup = Supervisor(config(free_udp_ports("127.0.0.1", 2)), recorder.hooks(registry.hooks()))

        async def statuses() -> dict[str, str | None]:
            return {t: await r.hget(f"{PREFIX}transceiver:{t}", "status") for t in TIDS}

        async def status_is(want: dict[str, str]) -> bool:
            return await statuses() == want

        frozen = None
        try:
            await sup.start()
            await wait_for(
                lambda: status_is({t: "active" for t in TIDS}), 10, "both workers registered"
            )
            frozen = sup.handles[0].process
            assert frozen is not None
            os.kill(frozen.pid, signal.SIGSTOP)
            stopped_at = time.monotonic()

            async def unhealthy() -> bool:
                return ("unhealthy", BASE_TID) in recorder.events

            await wait_for(unhealthy, 10, "the unhealthy hook")
            assert time.monotonic() - stopped_at < 8
            await wait_for(
                lambda: status_is({TIDS[0]: "draining", TIDS[1]: "active"}),
                5,
                "the frozen worker's record to turn draining",
            )
            # Kept alive by the heartbeat, not removed and not left to expire.
            await asyncio.sleep(2.5)  # past the TTL
            assert await statuses() == {TIDS[0]: "draining", TIDS[1]: "active"}
            assert 0 < await r.ttl(f"{PREFIX}transceiver:{TIDS[0]}") <= 2
            # The front gives it no calls: only the other worker has room.
            assert [cap for _, cap in sup.pool._loads()] == [0, 4]
            assert [e for e in recorder.events if e[0] != "started"] == [("unhealthy", BASE_TID)]

            os.kill(frozen.pid, signal.SIGCONT)

            async def recovered() -> bool:
                return ("recovered", BASE_TID) in recorder.events

            await wait_for(recovered, 10, "the recovered hook")
            await wait_for(
                lambda: status_is({t: "active" for t in TIDS}), 5, "the record active again"
            )
            await asyncio.sleep(1.0)  # a heartbeat later it is still active
            assert await statuses() == {t: "active" for t in TIDS}
            assert [cap for _, cap in sup.pool._loads()] == [4, 4]

            await sup.drain()
            assert await statuses() == {t: None for t in TIDS}
            health = [e for e in recorder.events if e[0] in ("unhealthy", "recovered")]
            assert health == [("unhealthy", BASE_TID), ("recovered", BASE_TID)]
        finally:
            if frozen is not None and frozen.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(frozen.pid, signal.SIGCONT)
            await sup.close()
            for t in TIDS:
                await r.delete(f"{PREFIX}transceiver:{t}")
            await r.aclose()

    try:
        asyncio.run(asyncio.wait_for(body(), 90))
    finally:
        server.close()


class FakeProcess:
    def __init__(self) -> None:
        self.pid = 4242
        self.returncode: int | None = None


def test_health_hooks_fire_once_per_change_and_never_while_draining() -> None:
    async def body() -> None:
        recorder = Recorder()
        sup = Supervisor(config(40000, workers=1, unhealthy_after=5.0), recorder.hooks())
        try:
            (handle,) = sup.handles
            handle.process = FakeProcess()  # type: ignore[assignment]
            handle.announced = True
            handle.alive = True
            handle.last_ok = time.monotonic()
            await sup.check_health()
            assert recorder.events == []  # answered recently

            handle.alive = False
            handle.last_ok = time.monotonic() - 6
            await sup.check_health()
            await sup.check_health()
            assert recorder.events == [("unhealthy", BASE_TID)]

            handle.alive = True  # an answer came back
            handle.last_ok = time.monotonic()
            await sup.check_health()
            await sup.check_health()
            assert recorder.events == [("unhealthy", BASE_TID), ("recovered", BASE_TID)]

            # A dead process is the monitor's business (stopped hooks), not a health change.
            handle.process.returncode = 1  # type: ignore[union-attr]
            handle.last_ok = time.monotonic() - 60
            await sup.check_health()
            handle.process.returncode = None  # type: ignore[union-attr]
            handle.announced = False  # not started yet (or restarting)
            await sup.check_health()
            assert len(recorder.events) == 2

            # While draining nothing changes: the draining hooks already ran.
            handle.announced = True
            sup.pool.start_draining()
            await sup.check_health()
            assert len(recorder.events) == 2
        finally:
            sup.handles[0].process = None
            await sup.close()

    asyncio.run(body())


def test_unhealthy_after_must_be_positive() -> None:
    with pytest.raises(SupervisorError, match="unhealthy_after"):
        config(40000, unhealthy_after=0).validate()


def test_the_audio_options_reach_every_worker_config(tmp_path: Path) -> None:
    from transceiver.supervisor import SupervisorConfig, WorkerSpec, worker_config

    config = SupervisorConfig(
        listen_host="127.0.0.1",
        listen_port=0,
        workers=2,
        base_transceiver_id=0xA001,
        tunnel_host="127.0.0.1",
        base_tunnel_port=3480,
        relays=[("127.0.0.2", 3479)],
        public_candidates=[("127.0.0.3", 3478)],
        max_calls=4,
        jitter_min_delay=0.02,
        jitter_max_delay=0.2,
        opus_bitrate=48000,
        opus_complexity=3,
    )
    for spec in config.specs(tmp_path):
        # Through the JSON a worker process is started with, as in production.
        worker = worker_config(WorkerSpec.from_json(spec.to_json()))
        assert (worker.jitter.min_delay, worker.jitter.max_delay) == (0.02, 0.2)
        assert (worker.voice.bitrate, worker.voice.complexity) == (48000, 3)
    defaults = worker_config(
        SupervisorConfig(
            **{**config.__dict__, "opus_bitrate": None, "opus_complexity": None}
        ).specs(tmp_path)[0]
    )
    assert defaults.voice.bitrate == 40000 and defaults.voice.complexity == 5
