"""The Redis keys splitrelay shares between relays and transceivers.

One place knows the schema (docs/redis-schema.md): the registry of
transceivers and the client -> transceiver session mappings. Relays,
transceiver workers and `relayctl` all go through this module.
"""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from ctl.layout import TransceiverState

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

HEARTBEAT_TTL = 10  # seconds a heartbeat record lives without refresh
HEARTBEAT_INTERVAL = 3.0
OPERATION_TIMEOUT = 0.5
REMOVED = "removed"  # the status of a tombstone: an operator removed a live worker

# The registry's read-modify-write steps run as scripts: atomic, one round trip,
# and no window in which a record that just expired is recreated without a TTL.
# KEYS[1] is the record, KEYS[2] the index; see each caller for ARGV.
_HEARTBEAT = """
local status = redis.call('HGET', KEYS[1], 'status')
if status then
  if redis.call('HGET', KEYS[1], 'source') == 'operator' then return 'operator' end
  redis.call('HSET', KEYS[1], 'updated', ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  redis.call('SADD', KEYS[2], ARGV[3])
  return status
end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('PUBLISH', ARGV[4], 'transceiver:' .. ARGV[3])
return 'registered'
"""
_REMOVE = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == 'removed' then return 0 end
if redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[1])
else
  redis.call('HSET', KEYS[1], 'status', 'removed', 'updated', ARGV[2])
end
redis.call('PUBLISH', ARGV[3], 'transceiver:' .. ARGV[1])
return 1
"""
_UNREGISTER = """
if redis.call('HGET', KEYS[1], 'status') == 'removed'
   or redis.call('HGET', KEYS[1], 'source') == 'operator' then
  return 0
end
local n = redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
if n == 1 then redis.call('PUBLISH', ARGV[2], 'transceiver:' .. ARGV[1]) end
return n
"""
_SET_STATUS = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == 'removed' then return 0 end
if status ~= ARGV[1] then
  redis.call('HSET', KEYS[1], 'status', ARGV[1], 'updated', ARGV[2])
  redis.call('PUBLISH', ARGV[3], ARGV[4])
end
return 1
"""
# KEYS: session key and relay index per item; ARGV[1] the TTL, then last_seen and
# client per item. Returns the clients whose key is gone.
_TOUCH = """
local missing = {}
for i = 1, #KEYS, 2 do
  local last_seen, client = ARGV[i + 1], ARGV[i + 2]
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('HSET', KEYS[i], 'last_seen', last_seen)
    redis.call('EXPIRE', KEYS[i], ARGV[1])
    redis.call('ZADD', KEYS[i + 1], last_seen, client)
  else
    missing[#missing + 1] = client
  end
end
return missing
"""


def endpoint(addr: IPAddress | str, port: int) -> str:
    """`a.b.c.d:port` or `[v6]:port`, the form keys and fields use."""
    ip = ipaddress.ip_address(addr)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def parse_endpoint(text: str) -> tuple[IPAddress, int]:
    """The inverse of endpoint()."""
    host, _, port = text.rpartition(":")
    return ipaddress.ip_address(host.strip("[]")), int(port)


@dataclass(frozen=True)
class TransceiverRecord:
    """One registered transceiver."""

    tid: int
    addr: IPAddress
    port: int
    state: TransceiverState
    source: str = "heartbeat"

    def fields(self) -> dict[str, str]:
        return {
            "id": f"{self.tid:08x}",
            "addr": str(self.addr),
            "port": str(self.port),
            "status": "active" if self.state is TransceiverState.ACTIVE else "draining",
            "updated": f"{time.time():.3f}",
            "source": self.source,
        }

    @classmethod
    def from_fields(cls, raw: dict[str, str]) -> TransceiverRecord:
        return cls(
            tid=int(raw["id"], 16),
            addr=ipaddress.ip_address(raw["addr"]),
            port=int(raw["port"]),
            state=TransceiverState.ACTIVE
            if raw.get("status") == "active"
            else TransceiverState.DRAINING,
            source=raw.get("source", "heartbeat"),
        )


@dataclass(frozen=True)
class SessionRecord:
    """One client -> transceiver mapping as Redis stores it."""

    client_addr: IPAddress
    client_port: int
    tid: int
    taddr: IPAddress
    tport: int
    raddr: IPAddress
    rport: int
    relay: str
    created: float
    last_seen: float

    @property
    def client(self) -> str:
        return endpoint(self.client_addr, self.client_port)

    def fields(self) -> dict[str, str]:
        return {
            "tid": f"{self.tid:08x}",
            "taddr": str(self.taddr),
            "tport": str(self.tport),
            "raddr": str(self.raddr),
            "rport": str(self.rport),
            "relay": self.relay,
            "created": f"{self.created:.3f}",
            "last_seen": f"{self.last_seen:.3f}",
        }

    @classmethod
    def from_fields(cls, client: str, raw: dict[str, str]) -> SessionRecord:
        addr, port = parse_endpoint(client)
        return cls(
            client_addr=addr,
            client_port=port,
            tid=int(raw["tid"], 16),
            taddr=ipaddress.ip_address(raw["taddr"]),
            tport=int(raw["tport"]),
            raddr=ipaddress.ip_address(raw["raddr"]),
            rport=int(raw["rport"]),
            relay=raw.get("relay", ""),
            created=float(raw.get("created", 0)),
            last_seen=float(raw.get("last_seen", 0)),
        )


def connect(url: str) -> aioredis.Redis:
    """A client for redis://, rediss:// or unix:// URLs (password from URL or env)."""
    kwargs: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": OPERATION_TIMEOUT,
        "socket_connect_timeout": OPERATION_TIMEOUT,
    }
    if "@" not in url.split("//", 1)[-1] and os.environ.get("REDIS_PASSWORD"):
        kwargs["password"] = os.environ["REDIS_PASSWORD"]
    try:
        return aioredis.from_url(url, **kwargs)
    except ValueError as exc:
        raise ValueError(f"bad Redis URL {redact(url)!r}: {exc}") from None


def redact(url: str) -> str:
    """The URL without its password, for logs and status."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"


class RedisState:
    """Typed operations on the shared state (all async, all pipelined where it matters)."""

    def __init__(self, client: aioredis.Redis, prefix: str = "splitrelay:") -> None:
        self.r = client
        self.prefix = prefix
        self._scripts: dict[str, AsyncScript] = {}

    # keys
    def k_transceiver(self, tid: int) -> str:
        return f"{self.prefix}transceiver:{tid:08x}"

    @property
    def k_transceivers(self) -> str:
        return f"{self.prefix}transceivers"

    @property
    def k_events(self) -> str:
        return f"{self.prefix}events"

    def k_session(self, client: str) -> str:
        return f"{self.prefix}session:{client}"

    def k_relay_sessions(self, relay: str) -> str:
        return f"{self.prefix}relay:{relay}:sessions"

    # registry
    async def put_transceiver(
        self, rec: TransceiverRecord, ttl: int | None = HEARTBEAT_TTL
    ) -> None:
        """Write a whole record (an operator's `add`, or a test's), replacing any other.

        It replaces a tombstone too: `add` after `rm` brings a transceiver back.
        Workers do not call this every beat (see heartbeat()): a full rewrite
        would undo an operator's drain or rm.
        """
        key = self.k_transceiver(rec.tid)
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(key, mapping=rec.fields())
        if ttl is not None:
            pipe.expire(key, ttl)
        else:
            pipe.persist(key)
        pipe.sadd(self.k_transceivers, f"{rec.tid:08x}")
        pipe.publish(self.k_events, f"transceiver:{rec.tid:08x}")
        await pipe.execute()

    async def heartbeat(self, rec: TransceiverRecord, ttl: int = HEARTBEAT_TTL) -> str:
        """A worker's beat: register if absent, else refresh liveness only.

        An existing record keeps its stored status, so an operator's drain or rm
        (a tombstone) outlives the worker's beats; an operator record (no TTL)
        owns the id and is left alone. Only a (re)registration publishes an
        event: relays reconcile every half second anyway, and a message per
        beat per worker would make every relay reconcile in proportion to the
        fleet. Returns "registered", "operator" or the stored status.
        """
        fields = [x for kv in rec.fields().items() for x in kv]
        result = await self._run(
            _HEARTBEAT,
            [self.k_transceiver(rec.tid), self.k_transceivers],
            [ttl, f"{time.time():.3f}", f"{rec.tid:08x}", self.k_events, *fields],
        )
        return str(result)

    async def remove_transceiver(self, tid: int) -> bool:
        """An operator's `rm`: relays drop the transceiver and its sessions.

        A record with a TTL belongs to a live worker whose next beat would bring
        a deleted record back, so it becomes a tombstone (`status removed`),
        which the worker's beats keep alive and every reader treats as absent;
        it lapses with the worker's TTL. A record without TTL is deleted.
        False if there is no such transceiver (or it is already removed).
        """
        done = await self._run(
            _REMOVE,
            [self.k_transceiver(tid), self.k_transceivers],
            [f"{tid:08x}", f"{time.time():.3f}", self.k_events],
        )
        return bool(done)

    async def unregister_transceiver(self, tid: int) -> bool:
        """A worker leaving (it stopped, or crashed and is restarted): delete its record.

        A tombstone and an operator record are left as they are: the operator's
        word outlives a worker restart (a tombstone still lapses by its TTL).
        """
        done = await self._run(
            _UNREGISTER,
            [self.k_transceiver(tid), self.k_transceivers],
            [f"{tid:08x}", self.k_events],
        )
        return bool(done)

    async def set_transceiver_state(self, tid: int, state: TransceiverState) -> bool:
        """Set the status of an existing record (drain); False if absent or removed.

        Atomic, so a record that expires meanwhile is not recreated as a
        partial hash without TTL; publishes only when the status changes.
        """
        status = "active" if state is TransceiverState.ACTIVE else "draining"
        done = await self._run(
            _SET_STATUS,
            [self.k_transceiver(tid)],
            [status, f"{time.time():.3f}", self.k_events, f"transceiver:{tid:08x}"],
        )
        return bool(done)

    async def read_registry(self) -> tuple[list[TransceiverRecord], set[int]]:
        """Every live record, and the ids of tombstones (removed by an operator).

        Members whose record expired (or was written badly) are dropped from
        the index; tombstones stay members until they lapse.
        """
        ids = sorted(await self.r.smembers(self.k_transceivers))
        if not ids:
            return [], set()
        pipe = self.r.pipeline(transaction=False)
        for tid in ids:
            pipe.hgetall(f"{self.prefix}transceiver:{tid}")
        records: list[TransceiverRecord] = []
        removed: set[int] = set()
        stale = []
        for tid, raw in zip(ids, await pipe.execute(), strict=True):
            try:
                if raw and raw.get("status") == REMOVED:
                    removed.add(int(tid, 16))
                    continue
                if raw:
                    records.append(TransceiverRecord.from_fields(raw))
                    continue
            except (KeyError, ValueError):
                pass  # a record someone wrote badly is not routable
            stale.append(tid)
        if stale:
            await self.r.srem(self.k_transceivers, *stale)
        return records, removed

    async def list_transceivers(self) -> list[TransceiverRecord]:
        """Every live record (tombstones are not listed)."""
        records, _ = await self.read_registry()
        return records

    async def _run(self, script: str, keys: list[str], args: list[object]) -> object:
        """EVALSHA a script (loaded on first use, and again after a Redis restart)."""
        if script not in self._scripts:
            self._scripts[script] = self.r.register_script(script)
        return await self._scripts[script](keys=keys, args=args)

    # sessions
    async def put_sessions(self, records: Iterable[SessionRecord], ttl: int) -> int:
        """Write a batch in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        n = 0
        for rec in records:
            key = self.k_session(rec.client)
            pipe.hset(key, mapping=rec.fields())
            pipe.expire(key, ttl)
            pipe.zadd(self.k_relay_sessions(rec.relay), {rec.client: rec.last_seen})
            n += 1
        if n:
            await pipe.execute()
        return n

    async def touch_sessions(
        self, items: Iterable[tuple[str, str, float]], ttl: int, batch: int = 1000
    ) -> list[str]:
        """Refresh TTL and last_seen of (relay, client, last_seen) triples; return the missing.

        Only existing keys are refreshed (a script checks EXISTS): an HSET on a
        key that is gone (Redis restarted empty, or the key lapsed) would leave
        a partial hash that readers take for a miss. The caller writes the full
        record of the clients returned.
        """
        items = list(items)
        missing: list[str] = []
        for start in range(0, len(items), batch):
            keys: list[str] = []
            args: list[object] = [ttl]
            for relay, client, last_seen in items[start : start + batch]:
                keys += [self.k_session(client), self.k_relay_sessions(relay)]
                args += [f"{last_seen:.3f}", client]
            gone = await self._run(_TOUCH, keys, args)
            missing += [str(c) for c in cast("list[str]", gone)]
        return missing

    async def missing_sessions(self, clients: Iterable[str], batch: int = 1000) -> list[str]:
        """The clients without a session key (pipelined EXISTS, in batches)."""
        clients = list(clients)
        out: list[str] = []
        for start in range(0, len(clients), batch):
            chunk = clients[start : start + batch]
            pipe = self.r.pipeline(transaction=False)
            for client in chunk:
                pipe.exists(self.k_session(client))
            out += [c for c, n in zip(chunk, await pipe.execute(), strict=True) if not n]
        return out

    async def get_session(self, client: str) -> SessionRecord | None:
        raw = await self.r.hgetall(self.k_session(client))
        if not raw:
            return None
        try:
            return SessionRecord.from_fields(client, raw)
        except (KeyError, ValueError):
            return None

    async def remove_session(self, relay: str, client: str) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.delete(self.k_session(client))
        pipe.zrem(self.k_relay_sessions(relay), client)
        await pipe.execute()

    async def relay_sessions(
        self, relay: str, since: float, batch: int = 1000
    ) -> list[SessionRecord]:
        """The sessions a relay carried that were active after `since`."""
        key = self.k_relay_sessions(relay)
        await self.r.zremrangebyscore(key, "-inf", f"({since}")
        clients = await self.r.zrangebyscore(key, since, "+inf")
        out: list[SessionRecord] = []
        for start in range(0, len(clients), batch):
            chunk = clients[start : start + batch]
            pipe = self.r.pipeline(transaction=False)
            for client in chunk:
                pipe.hgetall(self.k_session(client))
            for client, raw in zip(chunk, await pipe.execute(), strict=True):
                if raw:
                    try:
                        out.append(SessionRecord.from_fields(client, raw))
                    except (KeyError, ValueError):
                        continue
        return out

    async def run_id(self) -> str:
        """The server's run id: it changes when Redis restarts (maybe empty)."""
        info = await self.r.info("server")
        return str(info.get("run_id", ""))
