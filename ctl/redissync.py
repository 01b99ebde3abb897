"""Keeping a relay's maps and Redis in step (schema: docs/redis-schema.md).

Four jobs, none of them on the packet path:
- mirror the transceiver registry into the data plane (pub/sub for speed,
  a full reconcile every half second for certainty, expiries included);
- write every session the relay learns to Redis, batched and pipelined;
- refresh the TTL of active sessions, so idle ones lapse by themselves;
- recover sessions the relay does not know from Redis, and load this relay's
  sessions at start.
Redis being down never removes anything from the data plane: the loops back
off, count failures, and write the live sessions back when Redis returns.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from redis.exceptions import RedisError

from ctl.layout import Origin, TransceiverState
from ctl.maps import IPAddress, SessionEntry, monotonic_ns
from ctl.redisstate import RedisState, SessionRecord, TransceiverRecord, endpoint
from ctl.store import RelayState

log = logging.getLogger("splitrelay.redis")

RECONCILE_INTERVAL = 0.5
WRITE_INTERVAL = 0.05
WRITE_BATCH = 256
QUEUE_LIMIT = 65536
MISS_CACHE_SECONDS = 1.0
MISS_CACHE_SIZE = 65536
BACKOFF_MIN, BACKOFF_MAX = 0.5, 10.0


def unix_time_of(mono_ns: int) -> float:
    """Wall-clock time of a monotonic timestamp from the maps (see maps.monotonic_ns)."""
    return time.time() - (monotonic_ns() - mono_ns) / 1e9


@dataclass
class SyncStats:
    """What the sync did; exported as metrics."""

    up: bool = False
    errors: int = 0
    sessions_written: int = 0
    sessions_recovered: int = 0
    sessions_loaded: int = 0
    writes_dropped: int = 0
    transceivers_removed: int = 0


class RedisSync:
    """The relay side of the shared state."""

    def __init__(
        self,
        redis: RedisState,
        state: RelayState,
        relay_id: str,
        session_ttl: int,
        static_transceivers: Iterable[int] = (),
    ) -> None:
        self.redis = redis
        self.state = state
        self.relay_id = relay_id
        self.ttl = max(1, int(session_ttl))
        self.static = set(static_transceivers)
        self.stats = SyncStats()
        self._queue: collections.deque[SessionRecord] = collections.deque()
        self._misses: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._refreshed: dict[tuple[str, int], int] = {}
        self._run_id: str | None = None
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._down_logged = False

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Load this relay's sessions, then run the loops (Redis down is fine)."""
        with contextlib.suppress(RedisError, OSError):
            await self._check_health()
            if self.stats.up:
                await self.reconcile()
                await self.load_sessions()
        for loop in (
            self._registry_loop,
            self._pubsub_loop,
            self._writer_loop,
            self._refresh_loop,
            self._health_loop,
        ):
            self._tasks.append(asyncio.create_task(loop()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(RedisError, OSError):
            await self._flush()
        with contextlib.suppress(Exception):
            await self.redis.r.aclose()

    # ------------------------------------------------------------ health
    def _failed(self, exc: BaseException) -> None:
        self.stats.errors += 1
        if self.stats.up or not self._down_logged:
            log.warning(
                "Redis unavailable (%s): sessions keep flowing, retrying",
                " ".join(str(exc).split()) or type(exc).__name__,
            )
            self._down_logged = True
        self.stats.up = False

    async def _check_health(self) -> None:
        run_id = await self.redis.run_id()
        was_up = self.stats.up
        self.stats.up = True
        if self._run_id is not None and run_id != self._run_id:
            log.warning("Redis restarted (run id changed): writing live sessions back")
            await self.write_back()
        elif not was_up and self._down_logged:
            log.warning("Redis reachable again: writing live sessions back")
            await self.write_back()
        self._down_logged = False
        self._run_id = run_id

    async def _health_loop(self) -> None:
        delay = BACKOFF_MIN
        while True:
            await asyncio.sleep(delay if not self.stats.up else 1.0)
            try:
                await self._check_health()
                delay = BACKOFF_MIN
            except (RedisError, OSError) as exc:
                self._failed(exc)
                delay = min(delay * 2, BACKOFF_MAX)

    # ------------------------------------------------------------ registry
    async def reconcile(self) -> None:
        """Make the data plane's transceivers equal to the registry (plus static ones)."""
        records = {rec.tid: rec for rec in await self.redis.list_transceivers()}
        current = {t.tid: t for t in self.state.list_transceivers()}
        for tid, rec in records.items():
            have = current.get(tid)
            if have is None or (have.addr, have.port, have.state) != (
                rec.addr,
                rec.port,
                rec.state,
            ):
                self.state.put_transceiver(tid, rec.addr, rec.port, rec.state)
        for tid in set(current) - set(records) - self.static:
            self._remove_transceiver(tid)

    def _remove_transceiver(self, tid: int) -> None:
        """A transceiver that left (or whose heartbeat expired) takes its sessions along."""
        self.state.remove_transceiver(tid)
        doomed = [s for s in self.state.iter_sessions() if s.tid == tid]
        for s in doomed:
            self.state.remove_session(s.client_addr, s.client_port)
        self.stats.transceivers_removed += 1
        log.info("transceiver %08x left the registry; %d sessions removed", tid, len(doomed))

    async def _registry_loop(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), RECONCILE_INTERVAL)
            self._wake.clear()
            if not self.stats.up:
                continue
            try:
                await self.reconcile()
            except (RedisError, OSError) as exc:
                self._failed(exc)

    async def _pubsub_loop(self) -> None:
        """Wake the reconcile at once when a writer announces a change."""
        while True:
            try:
                pubsub = self.redis.r.pubsub()
                await pubsub.subscribe(self.redis.k_events)
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._wake.set()
            except (RedisError, OSError):
                await asyncio.sleep(BACKOFF_MIN)

    # ------------------------------------------------------------ sessions out
    def on_session(self, entry: SessionEntry, _kind: str = "created") -> None:
        """A session the relay learned (kernel event or userspace): queue it for Redis."""
        record = self._record(entry)
        if record is None:
            return
        if len(self._queue) >= QUEUE_LIMIT:
            self._queue.popleft()
            self.stats.writes_dropped += 1
        self._queue.append(record)

    def _record(self, entry: SessionEntry) -> SessionRecord | None:
        owner = self.state.get_transceiver(entry.tid)
        if owner is None:
            return None
        now = time.time()
        return SessionRecord(
            client_addr=entry.client_addr,
            client_port=entry.client_port,
            tid=entry.tid,
            taddr=owner.addr,
            tport=owner.port,
            raddr=entry.relay_addr,
            rport=entry.relay_port,
            relay=self.relay_id,
            created=unix_time_of(entry.created_ns) if entry.created_ns else now,
            last_seen=unix_time_of(entry.last_seen_ns) if entry.last_seen_ns else now,
        )

    async def _flush(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(WRITE_BATCH, len(self._queue)))]
            try:
                self.stats.sessions_written += await self.redis.put_sessions(batch, self.ttl)
            except BaseException:
                self._queue.extendleft(reversed(batch))  # keep them for the next try
                raise

    async def _writer_loop(self) -> None:
        while True:
            await asyncio.sleep(WRITE_INTERVAL)
            if not self._queue or not self.stats.up:
                continue
            try:
                await self._flush()
            except (RedisError, OSError) as exc:
                self._failed(exc)

    async def write_back(self) -> int:
        """Queue every live session (after an outage or a Redis restart) and write them."""
        for entry in list(self.state.iter_sessions()):
            self.on_session(entry)
        n = len(self._queue)
        await self._flush()
        return n

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(max(0.2, self.ttl / 3))
            if not self.stats.up:
                continue
            try:
                await self.refresh_active()
            except (RedisError, OSError) as exc:
                self._failed(exc)

    async def refresh_active(self) -> int:
        """Refresh TTL and last_seen of sessions that saw packets since the last refresh."""
        items, seen = [], {}
        for entry in self.state.iter_sessions():
            key = (str(entry.client_addr), entry.client_port)
            seen[key] = entry.last_seen_ns
            if self._refreshed.get(key) != entry.last_seen_ns:
                client = endpoint(entry.client_addr, entry.client_port)
                items.append((self.relay_id, client, unix_time_of(entry.last_seen_ns)))
        if items:
            await self.redis.touch_sessions(items, self.ttl)
        self._refreshed = seen
        return len(items)

    # ------------------------------------------------------------ sessions in
    async def recover(self, addr: IPAddress | str, port: int) -> SessionEntry | None:
        """Look up a client the relay does not know; install it on a hit."""
        client = endpoint(addr, port)
        now = time.monotonic()
        expires = self._misses.get(client)
        if expires is not None and expires > now:
            return None
        if not self.stats.up:
            return None
        try:
            record = await self.redis.get_session(client)
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return None
        if record is None or self.state.get_transceiver(record.tid) is None:
            self._remember_miss(client, now)
            return None
        self._install(record)
        self.stats.sessions_recovered += 1
        return self.state.get_session(record.client_addr, record.client_port)

    def _remember_miss(self, client: str, now: float) -> None:
        self._misses[client] = now + MISS_CACHE_SECONDS
        self._misses.move_to_end(client)
        while len(self._misses) > MISS_CACHE_SIZE:
            self._misses.popitem(last=False)

    def _install(self, record: SessionRecord) -> None:
        self.state.put_session(
            record.client_addr,
            record.client_port,
            record.tid,
            record.raddr,
            record.rport,
            Origin.REDIS,
        )

    async def load_sessions(self) -> int:
        """Install this relay's recent sessions from Redis (at start).

        Sessions already in the map (a restarted daemon on pinned maps) are
        kept as they are; sessions of unregistered transceivers are skipped.
        """
        records = await self.redis.relay_sessions(self.relay_id, since=time.time() - self.ttl)
        owners = {t.tid for t in self.state.list_transceivers()}
        present = {(s.client_addr, s.client_port) for s in self.state.iter_sessions()}
        n = 0
        for record in records:
            if record.tid in owners and (record.client_addr, record.client_port) not in present:
                self._install(record)
                n += 1
        self.stats.sessions_loaded += n
        if n:
            log.info("loaded %d sessions of relay %s from Redis", n, self.relay_id)
        return n


def transceiver_record(
    tid: int, addr: IPAddress | str, port: int, draining: bool = False, source: str = "heartbeat"
) -> TransceiverRecord:
    """A registry record (for transceivers' heartbeats and the CLI)."""
    import ipaddress

    return TransceiverRecord(
        tid=tid,
        addr=ipaddress.ip_address(addr),
        port=port,
        state=TransceiverState.DRAINING if draining else TransceiverState.ACTIVE,
        source=source,
    )
