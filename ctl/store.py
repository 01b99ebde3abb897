"""The session and transceiver state the userspace relay path reads and writes.

The userspace path must see exactly the state the XDP program sees, or the two
would route the same client differently. `KernelState` therefore works on the
pinned BPF maps themselves: a session userspace creates is in the kernel map,
so the client's next packet takes the XDP fast path, and a session the kernel
created is visible here at once (nothing is cached). `MemoryState` keeps the
same state in dicts for hosts where BPF is unavailable; it is bounded and
evicts the least recently used session, as the kernel's LRU hash does.

Both implement the small `RelayState` protocol, so the relay (and the daemon,
the CLI and the tests) never care which one they hold.
"""

from __future__ import annotations

import errno
import threading
from collections import OrderedDict
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Protocol, TypeAlias, runtime_checkable

from ctl import layout
from ctl.bpfsys import BPF_EXIST, BpfError
from ctl.layout import Origin, Session, TransceiverState
from ctl.maps import RelayMaps, SessionEntry, TransceiverEntry, monotonic_ns

IPAddress: TypeAlias = IPv4Address | IPv6Address
AddrLike: TypeAlias = IPv4Address | IPv6Address | str

#: The XDP program's default bound on the transceiver map (MAX_TRANSCEIVERS).
DEFAULT_MAX_TRANSCEIVERS = 1024

#: Bytes of a session value that name its owner and its creation (tid, relay
#: port, origin, pad, relay address, created_ns): a reroute changes them.
_IDENTITY_LEN = Session.last_seen_ns.offset


class StateError(RuntimeError):
    """A state operation cannot be done (a full table, an invalid value)."""


@runtime_checkable
class RelayState(Protocol):
    """Sessions (client -> owning transceiver) and the transceiver registry.

    Addresses may be given as ipaddress objects or strings; an IPv4-mapped
    IPv6 address names the same client as its IPv4 form, as in the BPF maps.
    """

    def get_session(self, addr: AddrLike, port: int) -> SessionEntry | None:
        """The client's session, or None."""
        ...

    def put_session(
        self,
        addr: AddrLike,
        port: int,
        tid: int,
        relay_addr: AddrLike,
        relay_port: int,
        origin: Origin = Origin.OPERATOR,
    ) -> SessionEntry:
        """Create or replace a session (counters zero, created = last seen = now)."""
        ...

    def touch(self, addr: AddrLike, port: int, to_transceiver: bool, nbytes: int) -> bool:
        """Account one packet of `nbytes` payload; False if there is no such session."""
        ...

    def remove_session(self, addr: AddrLike, port: int) -> bool:
        """Forget a session; False if there was none."""
        ...

    def iter_sessions(self) -> Iterator[SessionEntry]:
        """Every session."""
        ...

    def session_count(self) -> int:
        """How many sessions there are now."""
        ...

    def get_transceiver(self, tid: int) -> TransceiverEntry | None:
        """One transceiver, or None."""
        ...

    def put_transceiver(
        self,
        tid: int,
        addr: AddrLike,
        port: int,
        state: TransceiverState = TransceiverState.ACTIVE,
    ) -> None:
        """Add or replace a transceiver."""
        ...

    def remove_transceiver(self, tid: int) -> bool:
        """Remove a transceiver (its sessions stay, orphaned, until they expire)."""
        ...

    def list_transceivers(self) -> list[TransceiverEntry]:
        """Every transceiver, by id."""
        ...


def _addr(addr: AddrLike) -> IPAddress:
    """Canonical address: IPv4 stays IPv4 and IPv4-mapped IPv6 becomes IPv4.

    One form per client means a v4 client is the same key however its address
    travelled (socket, tunnel header, Redis), exactly as in the 16-byte map key.
    """
    if type(addr) is IPv4Address:  # the common case first: one type check
        return addr
    if isinstance(addr, str):
        addr = ip_address(addr)
    if isinstance(addr, IPv6Address):
        mapped = addr.ipv4_mapped
        if mapped is not None:
            return mapped
    return addr


def _check_tid(tid: int) -> None:
    if not 0 < tid <= 0xFFFFFFFF:
        raise StateError(f"transceiver id {tid} out of range 1..0xffffffff")


def _check_port(what: str, port: int) -> None:
    if not 0 <= port <= 0xFFFF:
        raise StateError(f"{what} {port} is not a UDP port")


# --------------------------------------------------------------------------- kernel


class KernelState:
    """RelayState over the pinned BPF maps: one truth for XDP and userspace.

    Every call is a map syscall; nothing is cached, because the XDP program
    and other processes (the CLI, a restarted daemon) change the maps
    underneath. touch() is a read-modify-write of the session value; see
    its docstring for how it keeps from undoing a concurrent reroute and what
    race remains.
    """

    def __init__(self, maps: RelayMaps) -> None:
        self.maps = maps

    def get_session(self, addr: AddrLike, port: int) -> SessionEntry | None:
        return self.maps.session(_addr(addr), port)

    def put_session(
        self,
        addr: AddrLike,
        port: int,
        tid: int,
        relay_addr: AddrLike,
        relay_port: int,
        origin: Origin = Origin.OPERATOR,
    ) -> SessionEntry:
        _check_tid(tid)
        _check_port("client port", port)
        _check_port("relay port", relay_port)
        client, relay = _addr(addr), _addr(relay_addr)
        now = monotonic_ns()
        value = Session(
            tid=tid,
            relay_port=layout.port_be(relay_port),
            origin=int(origin),
            relay_addr=layout.addr16(relay),
            created_ns=now,
            last_seen_ns=now,
        )
        key = layout.session_key(client, port)
        self.maps.sessions.update(bytes(key), bytes(value))
        return SessionEntry.from_raw(key, value)

    def touch(self, addr: AddrLike, port: int, to_transceiver: bool, nbytes: int) -> bool:
        """Account one userspace packet in the session; never undo an owner change.

        The map offers userspace no compare-and-swap, so this is a
        read-modify-write of the whole value. The XDP program reroutes a client
        by replacing its value (new owner, new created_ns) while this runs, so
        the value is read again just before the write, and the write is skipped
        (the packet then goes uncounted in the session) if the session's
        identity changed meanwhile: writing would hand the client back to its
        old owner. What remains: a reroute that lands between that second read
        and the write (two consecutive syscalls, a microsecond or two) is still
        undone, until the client's next Binding Request (consent checks come
        every few seconds) routes it again; and the kernel's atomic per-packet
        adds to the counters in the same window are lost, which only affects
        statistics.
        """
        key = bytes(layout.session_key(_addr(addr), port))
        lookup = self.maps.sessions.lookup
        raw = lookup(key)
        if raw is None:
            return False
        value = Session.from_buffer_copy(raw)
        value.last_seen_ns = monotonic_ns()
        if to_transceiver:
            value.packets_to_transceiver += 1
            value.bytes_to_transceiver += nbytes
        else:
            value.packets_to_client += 1
            value.bytes_to_client += nbytes
        again = lookup(key)
        if again is None:
            return False
        if again[:_IDENTITY_LEN] != raw[:_IDENTITY_LEN]:
            return True  # rerouted (or replaced) meanwhile: the new owner's value stays
        try:
            # BPF_EXIST: a session removed meanwhile (expiry, operator, LRU) stays removed.
            self.maps.sessions.update(key, bytes(value), BPF_EXIST)
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def remove_session(self, addr: AddrLike, port: int) -> bool:
        return self.maps.remove_session(_addr(addr), port)

    def iter_sessions(self) -> Iterator[SessionEntry]:
        return self.maps.iter_sessions()

    def session_count(self) -> int:
        return sum(1 for _ in self.maps.sessions)

    def get_transceiver(self, tid: int) -> TransceiverEntry | None:
        if not 0 <= tid <= 0xFFFFFFFF:
            return None
        return self.maps.transceiver(tid)

    def put_transceiver(
        self,
        tid: int,
        addr: AddrLike,
        port: int,
        state: TransceiverState = TransceiverState.ACTIVE,
    ) -> None:
        _check_tid(tid)
        _check_port("transceiver port", port)
        self.maps.put_transceiver(tid, _addr(addr), port, state)

    def remove_transceiver(self, tid: int) -> bool:
        if not 0 <= tid <= 0xFFFFFFFF:
            return False
        return self.maps.remove_transceiver(tid)

    def list_transceivers(self) -> list[TransceiverEntry]:
        return self.maps.list_transceivers()


# --------------------------------------------------------------------------- memory


_V4_MAPPED_KEY = 0xFFFF << 32


def _key(addr: AddrLike, port: int) -> int:
    """The session key as one int: the 16-byte mapped address and the port, as in the map.

    An int hashes in nanoseconds, while an ipaddress object hashes through
    hex() on every lookup; this is the per-packet path of a BPF-less relay.
    """
    if type(addr) is not IPv4Address:
        addr = _addr(addr)
        if type(addr) is not IPv4Address:
            return (int(addr) << 16) | port
    return ((_V4_MAPPED_KEY | int(addr)) << 16) | port


class _Record:
    """A session's mutable fields; SessionEntry snapshots are built on demand."""

    __slots__ = (
        "addr",
        "bytes_to_client",
        "bytes_to_transceiver",
        "created_ns",
        "last_seen_ns",
        "origin",
        "packets_to_client",
        "packets_to_transceiver",
        "port",
        "relay_addr",
        "relay_port",
        "tid",
    )

    def __init__(
        self,
        addr: IPAddress,
        port: int,
        tid: int,
        relay_addr: IPAddress,
        relay_port: int,
        origin: Origin,
        now: int,
    ) -> None:
        self.addr = addr
        self.port = port
        self.tid = tid
        self.relay_addr = relay_addr
        self.relay_port = relay_port
        self.origin = origin
        self.created_ns = now
        self.last_seen_ns = now
        self.packets_to_transceiver = 0
        self.bytes_to_transceiver = 0
        self.packets_to_client = 0
        self.bytes_to_client = 0

    def entry(self) -> SessionEntry:
        return SessionEntry(
            client_addr=self.addr,
            client_port=self.port,
            tid=self.tid,
            relay_addr=self.relay_addr,
            relay_port=self.relay_port,
            origin=self.origin,
            created_ns=self.created_ns,
            last_seen_ns=self.last_seen_ns,
            packets_to_transceiver=self.packets_to_transceiver,
            bytes_to_transceiver=self.bytes_to_transceiver,
            packets_to_client=self.packets_to_client,
            bytes_to_client=self.bytes_to_client,
        )


class MemoryState:
    """RelayState in process memory, for relays that run without BPF.

    Sessions are bounded by `max_sessions`: adding one more evicts the least
    recently used (touched or put) session, as the kernel's LRU hash would, so
    a flood of new clients can never grow memory without limit. Transceivers
    are bounded by `max_transceivers`, like the kernel's hash map; adding
    beyond it raises StateError.

    Thread-safe: the relay mutates from its event loop while, for instance, a
    metrics thread counts sessions; a lock keeps the ordered dict consistent
    (uncontended, it costs far less than the socket calls around it).
    """

    def __init__(self, max_sessions: int, max_transceivers: int = DEFAULT_MAX_TRANSCEIVERS) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {max_sessions}")
        if max_transceivers < 1:
            raise ValueError(f"max_transceivers must be at least 1, got {max_transceivers}")
        self.max_sessions = max_sessions
        self.max_transceivers = max_transceivers
        self._sessions: OrderedDict[int, _Record] = OrderedDict()
        self._transceivers: dict[int, TransceiverEntry] = {}
        self._lock = threading.Lock()

    def get_session(self, addr: AddrLike, port: int) -> SessionEntry | None:
        key = _key(addr, port)
        with self._lock:
            rec = self._sessions.get(key)
            return None if rec is None else rec.entry()

    def put_session(
        self,
        addr: AddrLike,
        port: int,
        tid: int,
        relay_addr: AddrLike,
        relay_port: int,
        origin: Origin = Origin.OPERATOR,
    ) -> SessionEntry:
        _check_tid(tid)
        _check_port("client port", port)
        _check_port("relay port", relay_port)
        client = _addr(addr)
        rec = _Record(
            client, port, tid, _addr(relay_addr), relay_port, Origin(origin), monotonic_ns()
        )
        key = _key(client, port)
        with self._lock:
            sessions = self._sessions
            if key in sessions:
                sessions.move_to_end(key)
            else:
                while len(sessions) >= self.max_sessions:
                    sessions.popitem(last=False)
            sessions[key] = rec
            return rec.entry()

    def touch(self, addr: AddrLike, port: int, to_transceiver: bool, nbytes: int) -> bool:
        key = _key(addr, port)
        with self._lock:
            rec = self._sessions.get(key)
            if rec is None:
                return False
            rec.last_seen_ns = monotonic_ns()
            if to_transceiver:
                rec.packets_to_transceiver += 1
                rec.bytes_to_transceiver += nbytes
            else:
                rec.packets_to_client += 1
                rec.bytes_to_client += nbytes
            self._sessions.move_to_end(key)
            return True

    def remove_session(self, addr: AddrLike, port: int) -> bool:
        key = _key(addr, port)
        with self._lock:
            return self._sessions.pop(key, None) is not None

    def expire_idle(self, before_ns: int, max_examined: int) -> int:
        """Remove sessions last seen before `before_ns`; look at most at max_examined.

        The dict is in least-recently-used order and every put or touch moves a
        session to the end with last_seen = now, so the idle sessions are a
        prefix: the sweep pops from the front and stops at the first live one.
        Its cost is bounded by the idle sessions found, never the table size.
        """
        removed = 0
        with self._lock:
            sessions = self._sessions
            while removed < max_examined and sessions:
                first = next(iter(sessions.values()))
                if first.last_seen_ns >= before_ns:
                    break
                sessions.popitem(last=False)
                removed += 1
        return removed

    def iter_sessions(self) -> Iterator[SessionEntry]:
        """A snapshot, least recently used first (safe while the relay keeps running)."""
        with self._lock:
            snapshot = [rec.entry() for rec in self._sessions.values()]
        return iter(snapshot)

    def session_count(self) -> int:
        with self._lock:
            return len(self._sessions)

    def get_transceiver(self, tid: int) -> TransceiverEntry | None:
        return self._transceivers.get(tid)

    def put_transceiver(
        self,
        tid: int,
        addr: AddrLike,
        port: int,
        state: TransceiverState = TransceiverState.ACTIVE,
    ) -> None:
        _check_tid(tid)
        _check_port("transceiver port", port)
        entry = TransceiverEntry(
            tid=tid, addr=_addr(addr), port=port, state=TransceiverState(state)
        )
        with self._lock:
            if tid not in self._transceivers and len(self._transceivers) >= self.max_transceivers:
                raise StateError(
                    f"transceiver table is full ({self.max_transceivers} entries); "
                    f"cannot add {tid:#x}"
                )
            self._transceivers[tid] = entry

    def remove_transceiver(self, tid: int) -> bool:
        with self._lock:
            return self._transceivers.pop(tid, None) is not None

    def list_transceivers(self) -> list[TransceiverEntry]:
        with self._lock:
            return sorted(self._transceivers.values(), key=lambda e: e.tid)
