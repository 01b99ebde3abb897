"""Typed access to the relay's pinned BPF maps.

Everything that reads or changes the data plane's state goes through here:
the controller, the CLI (with or without a running daemon) and the tests.
It needs no compiler: the maps are opened by path with the bpf syscall.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ctl import layout
from ctl.bpfsys import PinnedMap
from ctl.layout import (
    ConfigFlag,
    Origin,
    RelayConfig,
    Session,
    SessionKey,
    Transceiver,
    TransceiverState,
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# Linux's CLOCK_MONOTONIC_COARSE (the time module has no name for it).
CLOCK_MONOTONIC_COARSE = 6


def monotonic_ns() -> int:
    """CLOCK_MONOTONIC_COARSE in ns: the clock the XDP program's timestamps use.

    Sessions written here and by the kernel must compare correctly, so both
    sides read the same clock (one tick of resolution is plenty for expiry).
    """
    return time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)


@dataclass(frozen=True)
class RelayAddresses:
    """The relay's own addresses: public (clients) and tunnel (transceivers).

    A public address of 0.0.0.0 or :: means any local address of that family.
    """

    public_port: int = 3478
    tunnel_port: int = 3479
    public_v4: ipaddress.IPv4Address | None = None
    public_v6: ipaddress.IPv6Address | None = None
    tunnel_v4: ipaddress.IPv4Address | None = None
    tunnel_v6: ipaddress.IPv6Address | None = None

    def to_config(self) -> RelayConfig:
        """The relay_config map value."""
        cfg = RelayConfig(public_port=layout.port_be(self.public_port))
        cfg.tunnel_port = layout.port_be(self.tunnel_port)
        flags = ConfigFlag(0)
        if self.public_v4 is not None:
            flags |= ConfigFlag.PUBLIC_V4
            if self.public_v4.packed == bytes(4):
                flags |= ConfigFlag.PUBLIC_V4_ANY
            cfg.public_v4[:] = list(self.public_v4.packed)
        if self.public_v6 is not None:
            flags |= ConfigFlag.PUBLIC_V6
            if self.public_v6.packed == bytes(16):
                flags |= ConfigFlag.PUBLIC_V6_ANY
            cfg.public_v6[:] = list(self.public_v6.packed)
        if self.tunnel_v4 is not None:
            flags |= ConfigFlag.TUNNEL_V4
            cfg.tunnel_v4[:] = list(self.tunnel_v4.packed)
        if self.tunnel_v6 is not None:
            flags |= ConfigFlag.TUNNEL_V6
            cfg.tunnel_v6[:] = list(self.tunnel_v6.packed)
        cfg.flags = int(flags)
        return cfg

    @classmethod
    def from_config(cls, cfg: RelayConfig) -> RelayAddresses:
        """Read back what to_config wrote."""
        flags = ConfigFlag(cfg.flags)
        return cls(
            public_port=layout.port_host(cfg.public_port),
            tunnel_port=layout.port_host(cfg.tunnel_port),
            public_v4=ipaddress.IPv4Address(bytes(cfg.public_v4))
            if flags & ConfigFlag.PUBLIC_V4
            else None,
            public_v6=ipaddress.IPv6Address(bytes(cfg.public_v6))
            if flags & ConfigFlag.PUBLIC_V6
            else None,
            tunnel_v4=ipaddress.IPv4Address(bytes(cfg.tunnel_v4))
            if flags & ConfigFlag.TUNNEL_V4
            else None,
            tunnel_v6=ipaddress.IPv6Address(bytes(cfg.tunnel_v6))
            if flags & ConfigFlag.TUNNEL_V6
            else None,
        )


@dataclass(frozen=True)
class TransceiverEntry:
    """One transceiver as the data plane knows it."""

    tid: int
    addr: IPAddress
    port: int
    state: TransceiverState


@dataclass(frozen=True)
class SessionEntry:
    """One client session as the data plane knows it."""

    client_addr: IPAddress
    client_port: int
    tid: int
    relay_addr: IPAddress
    relay_port: int
    origin: Origin
    created_ns: int
    last_seen_ns: int
    packets_to_transceiver: int
    bytes_to_transceiver: int
    packets_to_client: int
    bytes_to_client: int

    @classmethod
    def from_raw(cls, key: SessionKey, value: Session) -> SessionEntry:
        """Decode a map entry."""
        return cls(
            client_addr=layout.addr_of(key.addr),
            client_port=layout.port_host(key.port),
            tid=value.tid,
            relay_addr=layout.addr_of(value.relay_addr),
            relay_port=layout.port_host(value.relay_port),
            origin=Origin(value.origin)
            if value.origin in Origin._value2member_map_
            else Origin.XDP,
            created_ns=value.created_ns,
            last_seen_ns=value.last_seen_ns,
            packets_to_transceiver=value.packets_to_transceiver,
            bytes_to_transceiver=value.bytes_to_transceiver,
            packets_to_client=value.packets_to_client,
            bytes_to_client=value.bytes_to_client,
        )

    def idle_seconds(self, now_ns: int | None = None) -> float:
        """Seconds since the last packet of this session."""
        return max(0, (now_ns or monotonic_ns()) - self.last_seen_ns) / 1e9


class RelayMaps:
    """The four pinned maps of one relay: config, transceivers, sessions, counters."""

    def __init__(self, pin_dir: Path) -> None:
        self.pin_dir = Path(pin_dir)
        self.config = PinnedMap.open(self.pin_dir / "config")
        self.transceivers = PinnedMap.open(self.pin_dir / "transceivers")
        self.sessions = PinnedMap.open(self.pin_dir / "sessions")
        self.counters = PinnedMap.open(self.pin_dir / "counters")

    def close(self) -> None:
        """Close the map fds; the pinned maps stay."""
        for m in (self.config, self.transceivers, self.sessions, self.counters):
            m.close()

    def __enter__(self) -> RelayMaps:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # config
    def set_addresses(self, addrs: RelayAddresses) -> None:
        """Write the relay's addresses; the program forwards nothing until then."""
        self.config.update(_u32(0), bytes(addrs.to_config()))

    def addresses(self) -> RelayAddresses:
        """The addresses the program uses now."""
        raw = self.config.lookup(_u32(0)) or bytes(RelayConfig())
        return RelayAddresses.from_config(RelayConfig.from_buffer_copy(raw))

    # transceivers
    def put_transceiver(
        self,
        tid: int,
        addr: IPAddress | str,
        port: int,
        state: TransceiverState = TransceiverState.ACTIVE,
    ) -> None:
        """Add or replace a transceiver."""
        if not 0 < tid <= 0xFFFFFFFF:
            raise ValueError(f"transceiver id {tid} out of range 1..0xffffffff")
        self.transceivers.update(_u32(tid), bytes(layout.transceiver_value(addr, port, state)))

    def remove_transceiver(self, tid: int) -> bool:
        """Remove a transceiver; its sessions stay until they expire or are flushed."""
        return self.transceivers.delete(_u32(tid))

    def transceiver(self, tid: int) -> TransceiverEntry | None:
        """One transceiver, or None."""
        raw = self.transceivers.lookup(_u32(tid))
        return None if raw is None else _transceiver_entry(tid, raw)

    def list_transceivers(self) -> list[TransceiverEntry]:
        """All transceivers, by id."""
        entries = [
            _transceiver_entry(int.from_bytes(k, "little"), v) for k, v in self.transceivers.items()
        ]
        return sorted(entries, key=lambda e: e.tid)

    # sessions
    def put_session(
        self,
        client_addr: IPAddress | str,
        client_port: int,
        tid: int,
        relay_addr: IPAddress | str,
        relay_port: int,
        origin: Origin = Origin.OPERATOR,
    ) -> None:
        """Install a session (operator, userspace path or Redis recovery)."""
        now = monotonic_ns()
        value = Session(
            tid=tid,
            relay_port=layout.port_be(relay_port),
            origin=int(origin),
            relay_addr=layout.addr16(relay_addr),
            created_ns=now,
            last_seen_ns=now,
        )
        self.sessions.update(bytes(layout.session_key(client_addr, client_port)), bytes(value))

    def session(self, client_addr: IPAddress | str, client_port: int) -> SessionEntry | None:
        """One session, or None."""
        key = layout.session_key(client_addr, client_port)
        raw = self.sessions.lookup(bytes(key))
        return None if raw is None else SessionEntry.from_raw(key, Session.from_buffer_copy(raw))

    def remove_session(self, client_addr: IPAddress | str, client_port: int) -> bool:
        """Forget a session."""
        return self.sessions.delete(bytes(layout.session_key(client_addr, client_port)))

    def iter_sessions(self) -> Iterator[SessionEntry]:
        """All sessions (a live view: entries may come and go meanwhile)."""
        for k, v in self.sessions.items():
            yield SessionEntry.from_raw(SessionKey.from_buffer_copy(k), Session.from_buffer_copy(v))

    def flush_sessions(self) -> int:
        """Remove every session; returns how many were removed."""
        return self.sessions.clear()

    # counters
    def counters_snapshot(self) -> dict[str, int]:
        """Every counter summed over CPUs, by name."""
        out: dict[str, int] = {}
        for idx, name in enumerate(layout.counter_names()):
            per_cpu = self.counters.lookup_percpu(_u32(idx)) or []
            out[name] = sum(int.from_bytes(v[:8], "little") for v in per_cpu)
        return out

    def reset_counters(self) -> None:
        """Zero every counter (tests and `relayctl stats --reset`)."""
        from ctl.bpfsys import possible_cpus

        zeros = [bytes(8)] * possible_cpus()
        for idx in range(len(layout.counter_names())):
            self.counters.update_percpu(_u32(idx), zeros)


def _u32(n: int) -> bytes:
    return n.to_bytes(4, "little")


def _transceiver_entry(tid: int, raw: bytes) -> TransceiverEntry:
    value = Transceiver.from_buffer_copy(raw)
    return TransceiverEntry(
        tid=tid,
        addr=layout.addr_of(value.addr),
        port=layout.port_host(value.port),
        state=TransceiverState(value.state),
    )
