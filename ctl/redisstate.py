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
from typing import Any

import redis.asyncio as aioredis

from ctl.layout import TransceiverState

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

HEARTBEAT_TTL = 10  # seconds a heartbeat record lives without refresh
HEARTBEAT_INTERVAL = 3.0
OPERATION_TIMEOUT = 0.5


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
        """Register or refresh (a heartbeat is this call with a TTL)."""
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

    async def remove_transceiver(self, tid: int) -> bool:
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(self.k_transceiver(tid))
        pipe.srem(self.k_transceivers, f"{tid:08x}")
        pipe.publish(self.k_events, f"transceiver:{tid:08x}")
        deleted, *_ = await pipe.execute()
        return bool(deleted)

    async def set_transceiver_state(self, tid: int, state: TransceiverState) -> bool:
        key = self.k_transceiver(tid)
        if not await self.r.exists(key):
            return False
        status = "active" if state is TransceiverState.ACTIVE else "draining"
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(key, mapping={"status": status, "updated": f"{time.time():.3f}"})
        pipe.publish(self.k_events, f"transceiver:{tid:08x}")
        await pipe.execute()
        return True

    async def list_transceivers(self) -> list[TransceiverRecord]:
        """Every live record; members whose record expired are dropped from the index."""
        ids = sorted(await self.r.smembers(self.k_transceivers))
        if not ids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for tid in ids:
            pipe.hgetall(f"{self.prefix}transceiver:{tid}")
        records, stale = [], []
        for tid, raw in zip(ids, await pipe.execute(), strict=True):
            if not raw:
                stale.append(tid)
                continue
            try:
                records.append(TransceiverRecord.from_fields(raw))
            except (KeyError, ValueError):
                stale.append(tid)  # a record someone wrote badly is not routable
        if stale:
            await self.r.srem(self.k_transceivers, *stale)
        return records

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

    async def touch_sessions(self, items: Iterable[tuple[str, str, float]], ttl: int) -> None:
        """Refresh TTL and last_seen of (relay, client, last_seen) triples."""
        pipe = self.r.pipeline(transaction=False)
        for relay, client, last_seen in items:
            key = self.k_session(client)
            pipe.hset(key, "last_seen", f"{last_seen:.3f}")
            pipe.expire(key, ttl)
            pipe.zadd(self.k_relay_sessions(relay), {client: last_seen})
        await pipe.execute()

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
