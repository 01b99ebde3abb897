"""Keeping a relay's maps and Redis in step (schema: docs/redis-schema.md).

Four jobs, none of them on the packet path:
- mirror the transceiver registry into the data plane (pub/sub for speed,
  a full reconcile every half second for certainty, expiries included);
- write every session the relay learns to Redis, batched and pipelined;
- refresh the TTL of active sessions, so idle ones lapse by themselves;
- recover sessions the relay does not know from Redis, and load this relay's
  sessions the first time Redis is reachable (at start, or later if it was
  down then), writing back the map's sessions Redis lacks.
Redis being down never removes anything from the data plane: the loops back
off, count failures, and write the live sessions back when Redis returns. A
Redis that returns (maybe empty) does not remove anything either until the
workers' heartbeats had one TTL to register again (the grace, below).
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
from ctl.redisstate import (
    HEARTBEAT_TTL,
    RedisState,
    SessionRecord,
    TransceiverRecord,
    endpoint,
)
from ctl.store import RelayState

log = logging.getLogger("splitrelay.redis")

RECONCILE_INTERVAL = 0.5
WRITE_INTERVAL = 0.05
WRITE_BATCH = 256
QUEUE_LIMIT = 65536
MISS_CACHE_SECONDS = 1.0
MISS_CACHE_SIZE = 65536
BACKOFF_MIN, BACKOFF_MAX = 0.5, 10.0
CANCEL_WAIT, CANCEL_RETRIES = 0.5, 10  # stop(): how long, how often to wait for a task


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


async def _finish_cancelled(task: asyncio.Task[None]) -> None:
    """Wait for a cancelled task to end, cancelling it again if it swallowed the first.

    redis-py can lose a cancellation that lands inside one of its internal
    timeouts (a pub/sub read, for one); the task then waits for its next
    message, which could be never. Each retry is bounded, so stop() is too.
    """
    for _ in range(CANCEL_RETRIES):
        done, _pending = await asyncio.wait({task}, timeout=CANCEL_WAIT)
        if done:
            break
        task.cancel()
    if task.done() and not task.cancelled() and task.exception() is not None:
        log.debug("a Redis sync task failed on its way out", exc_info=task.exception())


class RedisSync:
    """The relay side of the shared state."""

    def __init__(
        self,
        redis: RedisState,
        state: RelayState,
        relay_id: str,
        session_ttl: int,
        static_transceivers: Iterable[int] = (),
        grace: float = HEARTBEAT_TTL,
    ) -> None:
        self.redis = redis
        self.state = state
        self.relay_id = relay_id
        self.ttl = max(1, int(session_ttl))
        self.static = set(static_transceivers)
        self.grace = grace
        self.stats = SyncStats()
        self._queue: collections.deque[SessionRecord] = collections.deque()
        self._misses: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._refreshed: dict[tuple[str, int], int] = {}
        self._run_id: str | None = None
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._down_logged = False
        self._synced = False  # the first contact's load and write-back are done
        # Transceivers in the map when Redis came back (or was first reached):
        # not removed before _grace_until unless the registry says so
        # explicitly (a tombstone), since their heartbeats may not have
        # re-registered in a Redis that restarted empty.
        self._protected: set[int] = set()
        self._grace_until = 0.0

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Sync with Redis if it is up (else on first contact), then run the loops."""
        try:
            await self._check_health()
        except (RedisError, OSError) as exc:
            self._failed(exc)
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
            await _finish_cancelled(task)
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
        """Note Redis is up; on first contact, a reconnect or a restart, sync with it.

        First contact (at start, or later if Redis was down then): mirror the
        registry, write back the map's sessions Redis lacks (the kernel may have
        created sessions while no daemon read its event ring, which is not
        pinned), and load this relay's sessions. Later reconnects and restarts
        write every live session back. All of them start the grace.
        """
        run_id = await self.redis.run_id()
        restarted = self._run_id is not None and run_id != self._run_id
        if restarted or not self.stats.up:
            self._begin_grace()
        self.stats.up = True
        if not self._synced:
            await self.reconcile()
            await self.write_missing()
            await self.load_sessions()
            self._synced = True
        elif restarted:
            log.warning("Redis restarted (run id changed): writing live sessions back")
            await self.write_back()
        elif self._down_logged:
            log.warning("Redis reachable again: writing live sessions back")
            await self.write_back()
        self._down_logged = False
        self._run_id = run_id

    def _begin_grace(self) -> None:
        """Hold back removals of the map's registry transceivers for one heartbeat TTL."""
        now = time.monotonic()
        if not self._grace_active(now):
            self._protected = set()
        fresh = {t.tid for t in self.state.list_transceivers()} - self.static
        if fresh - self._protected:
            log.info(
                "keeping %d transceivers for %g s while their heartbeats re-register",
                len(fresh),
                self.grace,
            )
        self._protected |= fresh
        self._grace_until = now + self.grace

    def _grace_active(self, now: float) -> bool:
        return bool(self._protected) and now < self._grace_until

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
        """Make the data plane's transceivers equal to the registry (plus static ones).

        Before removing anything it makes sure Redis did not restart behind
        its back (the client reconnects by itself, so the health loop may not
        have noticed yet): an empty registry after a restart is not a fleet
        that left. During the grace a missing transceiver stays unless the
        registry holds its tombstone (an operator's rm).
        """
        found, tombstones = await self.redis.read_registry()
        records = {rec.tid: rec for rec in found}
        current = {t.tid: t for t in self.state.list_transceivers()}
        for tid, rec in records.items():
            have = current.get(tid)
            if have is None or (have.addr, have.port, have.state) != (
                rec.addr,
                rec.port,
                rec.state,
            ):
                self.state.put_transceiver(tid, rec.addr, rec.port, rec.state)
        self._protected -= set(records)  # registered again: later removals are real
        gone = set(current) - set(records) - self.static
        if (
            gone
            and not self._grace_active(time.monotonic())
            and self._run_id is not None
            and await self.redis.run_id() != self._run_id
        ):
            self._begin_grace()  # the health loop writes the sessions back
        if gone and self._grace_active(time.monotonic()):
            gone -= self._protected - tombstones
        for tid in gone:
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
        """Wake the reconcile at once when a writer announces a change.

        A lost subscription is a Redis failure like any other: counted, and
        retried with the same backoff (0.5 s doubling to 10 s, reset once
        subscribed), so a long outage costs a few attempts, not two a second.
        """
        delay = BACKOFF_MIN
        while True:
            pubsub = self.redis.r.pubsub()
            try:
                await pubsub.subscribe(self.redis.k_events)
                delay = BACKOFF_MIN
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._wake.set()
            except (RedisError, OSError) as exc:
                self._failed(exc)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # stop() re-cancels if this ever hangs
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

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

    async def write_missing(self) -> int:
        """Write the map's sessions that Redis lacks (at first contact).

        A pinned map outlives the daemon, but its event ring does not: sessions
        the kernel created while no daemon read it (a controller restart, or a
        start while Redis was down) reached Redis by no other way. Sessions
        Redis has are left alone: another relay may have written them since.
        """
        entries = {endpoint(e.client_addr, e.client_port): e for e in self.state.iter_sessions()}
        missing = await self.redis.missing_sessions(entries)
        for client in missing:
            self.on_session(entries[client])
        await self._flush()
        if missing:
            log.info("wrote %d sessions of the map that Redis lacked", len(missing))
        return len(missing)

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
        """Refresh TTL and last_seen of sessions that saw packets since the last refresh.

        An active session whose key is gone (Redis restarted empty, or lost the
        write) is written whole again: a refresh never creates a partial key.
        """
        items, seen, active = [], {}, {}
        for entry in self.state.iter_sessions():
            key = (str(entry.client_addr), entry.client_port)
            seen[key] = entry.last_seen_ns
            if self._refreshed.get(key) != entry.last_seen_ns:
                client = endpoint(entry.client_addr, entry.client_port)
                active[client] = entry
                items.append((self.relay_id, client, unix_time_of(entry.last_seen_ns)))
        if items:
            for client in await self.redis.touch_sessions(items, self.ttl):
                self.on_session(active[client])
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
