"""A transceiver worker's entry in the shared registry (docs/redis-schema.md).

The heartbeat is the record's own TTL: the worker refreshes it every few
seconds, and if the worker dies the record expires, so every relay removes
the transceiver and its sessions within a TTL. A beat refreshes liveness only
(TTL and `updated`) and keeps the stored status, so an operator's
`relayctl transceivers drain` or `rm` (a tombstone) sticks while the worker
lives; the worker writes its whole record only when it is absent (first
start, expiry, or a Redis that restarted empty). Redis being unreachable is
logged once and retried; it never stops the worker's calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.exceptions import RedisError

from ctl.layout import TransceiverState
from ctl.redisstate import HEARTBEAT_INTERVAL, HEARTBEAT_TTL, REMOVED, RedisState, connect
from ctl.redissync import transceiver_record

log = logging.getLogger("splitrelay.transceiver.registry")


class Registration:
    """Keeps one worker registered while it runs."""

    def __init__(
        self,
        redis_url: str,
        tid: int,
        tunnel_addr: str,
        tunnel_port: int,
        prefix: str = "splitrelay:",
        interval: float = HEARTBEAT_INTERVAL,
        ttl: int = HEARTBEAT_TTL,
    ) -> None:
        self.redis = RedisState(connect(redis_url), prefix)
        self.tid = tid
        self.addr = tunnel_addr
        self.port = tunnel_port
        self.interval = interval
        self.ttl = ttl
        self.draining = False
        self.up = False
        self.errors = 0
        self.status = ""  # what the last beat found: registered, active, draining, removed
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Register now (best effort) and keep the heartbeat going."""
        await self._beat()
        self._task = asyncio.create_task(self._loop())

    async def _beat(self) -> None:
        """Register if the record is absent, else refresh its TTL (status untouched)."""
        record = transceiver_record(self.tid, self.addr, self.port, draining=self.draining)
        try:
            status = await self.redis.heartbeat(record, ttl=self.ttl)
        except (RedisError, OSError) as exc:
            self.errors += 1
            if self.up or self.errors == 1:
                log.warning("cannot register transceiver %08x in Redis: %s", self.tid, exc)
            self.up = False
            return
        if status == "registered":
            log.info("transceiver %08x registered at %s:%d", self.tid, self.addr, self.port)
        elif status != self.status and status in (REMOVED, "operator"):
            what = "removed" if status == REMOVED else "given an operator record"
            log.warning(
                "transceiver %08x was %s in Redis; the heartbeat leaves it so", self.tid, what
            )
        self.status = status
        self.up = True

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self._beat()

    async def drain(self) -> None:
        """No new sessions for this worker; existing ones continue.

        Sets the stored status (a tombstone stays removed); the beat after it
        re-registers the record as draining if Redis lost it.
        """
        self.draining = True
        with contextlib.suppress(RedisError, OSError):
            await self.redis.set_transceiver_state(self.tid, TransceiverState.DRAINING)
        await self._beat()

    async def activate(self) -> None:
        """Take new sessions again after drain(): the stored status goes back to active.

        The record is never removed in between (relays would drop the worker's
        live sessions), and a tombstone stays removed. An operator's drain
        made meanwhile is undone too: the record cannot tell the two apart.
        """
        self.draining = False
        with contextlib.suppress(RedisError, OSError):
            await self.redis.set_transceiver_state(self.tid, TransceiverState.ACTIVE)

    async def stop(self) -> None:
        """Leave the registry (relays drop the transceiver at once).

        A tombstone is not deleted but lapses by its TTL, so a worker that
        crashed and restarts within it stays removed, as the operator said.
        """
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(RedisError, OSError):
            await self.redis.unregister_transceiver(self.tid)
        with contextlib.suppress(Exception):
            await self.redis.r.aclose()
