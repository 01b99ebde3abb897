"""The userspace relay path: the XDP program's rules, on asyncio sockets.

It relays what the XDP program passes up (unknown clients, unknown
transceivers, unresolved next hops, fragments, IP options, replies for
unknown clients, long STUN) and, where XDP cannot be loaded, everything.
Every rule and every drop reason is the one bpf/relay.c applies, in the same
order, so a packet gets the same verdict whichever path sees it; where the
kernel passes a packet up, this path is the last word and drops it under the
same name (`pass_unknown_client` there is `drop_unknown_client` here).

Sockets are read with loop.add_reader and recvmsg/sendmsg rather than
asyncio datagram endpoints, for two reasons: IP_PKTINFO / IPV6_RECVPKTINFO
tell which local address a client datagram arrived on, so the reply leaves
from exactly that address even when the public socket is bound to a
wildcard; and one preallocated receive buffer plus scatter-gather sends keep
per-packet allocation to the few objects the codec needs.

Per packet there is no logging and no exception escapes a handler: a bug in
one packet is counted as `drop_internal` and logged at most once a minute.

Where the kernel has nothing to say, this path decides:

* Drops only this path can have: `no_public_source` (a session whose relay
  address/port no public socket of this relay can send from), `send_failed`
  (the kernel refused a send, e.g. a full socket buffer), `recovery_busy`
  (too many clients, or too many packets of one client, waiting for the
  recover hook) and `internal` (a bug).
* Recovery: one lookup per client at a time, bounded in time
  (`recover_timeout`); up to RECOVER_MAX_QUEUED packets of that client wait
  for it and then go on in order. A client the hook does not know is not
  looked up again for `recover_negative_ttl` seconds, so a stray sender
  cannot turn its packet rate into a Redis query rate. A recovered session
  is installed with origin REDIS; when a client packet triggered it, its
  relay address is the one that packet arrived on (replies must come from
  the address the client talks to), otherwise the one the hook returned.
* DSCP/ECN are not copied (the kernel sockets set their own); everything
  else the client sees is what the XDP program would send.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, TypeAlias

from ctl import wire
from ctl.layout import Origin, TransceiverState
from ctl.maps import RelayAddresses, SessionEntry, TransceiverEntry
from ctl.store import RelayState

log = logging.getLogger("splitrelay.userspace")

IPAddress: TypeAlias = IPv4Address | IPv6Address
_Route: TypeAlias = tuple[socket.socket, list[Any] | None]  # socket, PKTINFO (wildcard only)
RecoverHook: TypeAlias = Callable[[IPAddress, int], Awaitable[SessionEntry | None]]
SessionHook: TypeAlias = Callable[[SessionEntry, str], None]

#: Linux's IP_PKTINFO (the socket module of Python 3.11 does not export it).
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)

FORWARD_COUNTERS: tuple[str, ...] = (
    "fwd_to_transceiver_packets",
    "fwd_to_transceiver_bytes",
    "fwd_to_client_packets",
    "fwd_to_client_bytes",
    "sessions_created",
    "sessions_rerouted",
)
#: Every reason this path drops for; each is counted as drop_<reason>.
DROP_REASONS: tuple[str, ...] = tuple(
    dict.fromkeys(
        (
            "truncated",
            "stun_malformed",
            "stun_no_username",
            "bad_token",
            "unknown_transceiver",
            "transceiver_draining",
            "orphan_session",
            "unknown_client",
            "no_tunnel_source",
            "tunnel_truncated",
            "tunnel_bad_header",
            "reply_unknown_client",
            "reply_not_owner",
            "reply_port_mismatch",
            "no_public_source",
            "send_failed",
            "recovery_busy",
            "internal",
            *wire.WIRE_ERROR_REASONS,
        )
    )
)
COUNTER_NAMES: tuple[str, ...] = FORWARD_COUNTERS + tuple(f"drop_{r}" for r in DROP_REASONS)

# Tuning. Datagrams read per readiness callback: draining a burst in one call
# saves loop iterations, and the bound keeps one busy socket from starving
# the others.
RECV_BATCH = 64
RECV_BUFFER = 65536  # larger than any UDP payload, so nothing is ever truncated
SOCKET_BUFFER = 4 << 20  # best effort; the kernel caps it at net.core.[rw]mem_max
FLOW_CACHE_MAX = 65536  # parsed addresses and tunnel headers kept per relay
RECOVER_TIMEOUT = 1.0  # seconds a recovery lookup may take before the client is unknown
RECOVER_NEGATIVE_TTL = 1.0  # seconds an unknown client is not looked up again
RECOVER_MAX_PENDING = 1024  # clients being looked up at once
RECOVER_MAX_QUEUED = 8  # packets held per client while it is looked up
LOG_INTERVAL = 60.0  # seconds between two logs of the same kind of failure

_ACTIVE = TransceiverState.ACTIVE
_TUNNEL_LEN = wire.TUNNEL_HEADER_LEN
_ANC_V4 = socket.CMSG_SPACE(12)  # struct in_pktinfo
_ANC_V6 = socket.CMSG_SPACE(20)  # struct in6_pktinfo
_DROP = {r: f"drop_{r}" for r in DROP_REASONS}
_MISSING: Any = object()


class RelayError(RuntimeError):
    """The relay cannot start; the message is one line for the operator."""


@dataclass(frozen=True, slots=True)
class _ClientItem:
    """A client datagram held while its client is looked up."""

    payload: bytes
    src: tuple[Any, ...]
    relay_addr: IPAddress


@dataclass(frozen=True, slots=True)
class _TunnelItem:
    """A tunnel datagram held while the client it names is looked up."""

    datagram: bytes
    src: tuple[Any, ...]


@dataclass
class RelaySockets:
    """The relay's bound UDP sockets, before it relays on them.

    Binding is the step another process can make fail (a port in use), so the
    daemon does it before anything else changes, and hands the result to
    UserspaceRelay.
    """

    public: list[tuple[socket.socket, IPAddress]]  # (socket, bound address); wildcard = PKTINFO
    tunnel: dict[int, socket.socket]  # IP version -> tunnel socket

    def all(self) -> list[socket.socket]:
        """Every socket, public ones first."""
        return [sock for sock, _ in self.public] + list(self.tunnel.values())

    def close(self) -> None:
        """Close every socket (idempotent)."""
        for sock in self.all():
            sock.close()


def bind_sockets(addresses: RelayAddresses) -> RelaySockets:
    """Bind the public and tunnel sockets of `addresses`, or raise a one-line RelayError.

    Either every socket is bound or none stays open.
    """
    a = addresses
    for port, what in ((a.public_port, "public"), (a.tunnel_port, "tunnel")):
        if not 0 < port <= 0xFFFF:
            raise RelayError(f"the {what} port {port} is not in 1..65535")
    publics = [x for x in (a.public_v4, a.public_v6) if x is not None]
    if not publics:
        raise RelayError("no public address configured: give an IPv4 and/or IPv6 address")
    bound = RelaySockets([], {})
    try:
        for addr in publics:
            sock = _open_socket(addr, a.public_port, "public", pktinfo=addr.is_unspecified)
            bound.public.append((sock, addr))
        for tun in (a.tunnel_v4, a.tunnel_v6):
            if tun is not None:
                bound.tunnel[tun.version] = _open_socket(tun, a.tunnel_port, "tunnel")
    except BaseException:
        bound.close()
        raise
    return bound


def _open_socket(addr: IPAddress, port: int, role: str, *, pktinfo: bool = False) -> socket.socket:
    """A bound non-blocking UDP socket, or a one-line RelayError.

    SO_REUSEADDR on UDP lets every socket that sets it share a port
    silently (a second relay would steal part of the traffic), so a probe
    bind without it first turns "port in use" into a clear error.
    """
    where = f"the {role} address {_endpoint(addr, port)}"
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe.bind((str(addr), port))
        sock = socket.socket(family, socket.SOCK_DGRAM)
    except OSError as exc:
        raise RelayError(_bind_message(where, addr, exc)) from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if pktinfo:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        elif pktinfo:
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        sock.bind((str(addr), port))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise RelayError(_bind_message(where, addr, exc)) from exc
    return sock


class UserspaceRelay:
    """The relay's userspace data path: public sockets on R, tunnel sockets on Ri.

    `recover(addr, port)` is awaited for a client this relay does not know
    (a client packet that is not a routable Binding Request, or a tunnel
    packet naming it); a session it returns is installed in `state` and the
    held packets go on. `on_session(entry, kind)` hears of every session this
    path creates ("created") or moves to another transceiver ("rerouted"), so
    it can reach Redis as kernel-created sessions do. `sockets` are ones
    bind_sockets() bound earlier (the relay then owns them); without them,
    start() binds its own.
    """

    def __init__(
        self,
        addresses: RelayAddresses,
        state: RelayState,
        *,
        recover: RecoverHook | None = None,
        on_session: SessionHook | None = None,
        recover_timeout: float = RECOVER_TIMEOUT,
        recover_negative_ttl: float = RECOVER_NEGATIVE_TTL,
        sockets: RelaySockets | None = None,
    ) -> None:
        self.addresses = addresses
        self._bound = sockets
        self.state = state
        self._recover = recover
        self._on_session = on_session
        self._recover_timeout = recover_timeout
        self._negative_ttl = recover_negative_ttl
        self._public_port = addresses.public_port

        self._buf = bytearray(RECV_BUFFER)
        self._bufs = [self._buf]
        self._view = memoryview(self._buf)
        self._c: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)

        self._loop: asyncio.AbstractEventLoop | None = None
        self._sockets: list[socket.socket] = []
        # Public sockets as (socket, bound address); a wildcard one replies with PKTINFO.
        self._public: list[tuple[socket.socket, IPAddress]] = []
        self._tunnel: dict[int, socket.socket] = {}  # IP version -> tunnel socket

        # Caches of pure functions of what arrives, bounded (cleared when full).
        self._flows: dict[tuple[Any, ...], tuple[IPAddress, bytes]] = {}
        self._headers: dict[bytes, tuple[IPAddress, int, int, tuple[str, int]]] = {}
        self._ips: dict[str, IPAddress] = {}
        self._locals: dict[bytes, IPAddress] = {}
        # Reply routes by IP version, then by int(relay address): ints hash fast.
        self._routes: dict[int, dict[int, _Route | None]] = {4: {}, 6: {}}

        self._pending: dict[tuple[IPAddress, int], list[_ClientItem | _TunnelItem]] = {}
        self._negative: dict[tuple[IPAddress, int], float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._logged: dict[str, tuple[float, int]] = {}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start relaying on the sockets given at construction, or bind them now.

        RelayError says what went wrong. Sockets are created in the calling
        thread's network namespace.
        """
        if self._loop is not None:
            raise RelayError("the userspace relay is already started")
        bound = self._bound if self._bound is not None else bind_sockets(self.addresses)
        self._bound = None
        loop = asyncio.get_running_loop()
        self._sockets = bound.all()
        self._public = list(bound.public)
        self._tunnel = dict(bound.tunnel)
        self._loop = loop
        for sock, addr in self._public:
            if addr.is_unspecified:
                loop.add_reader(sock.fileno(), self._read_public_any, sock, addr.version)
            else:
                loop.add_reader(sock.fileno(), self._read_public, sock, addr)
        for sock in self._tunnel.values():
            loop.add_reader(sock.fileno(), self._read_tunnel, sock)
        a = self.addresses
        log.info(
            "userspace relay on public %s, tunnel %s",
            ", ".join(_endpoint(addr, a.public_port) for _, addr in self._public),
            ", ".join(
                _endpoint(x, a.tunnel_port) for x in (a.tunnel_v4, a.tunnel_v6) if x is not None
            )
            or "none (nothing can be forwarded)",
        )

    async def close(self) -> None:
        """Stop reading, close the sockets, cancel lookups in flight (idempotent)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._close_sockets()
        if self._bound is not None:  # given but never started
            self._bound.close()
            self._bound = None
        self._pending.clear()
        self._loop = None

    def _close_sockets(self) -> None:
        for sock in self._sockets:
            if self._loop is not None and sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets.clear()
        self._public.clear()
        self._tunnel.clear()
        for routes in self._routes.values():
            routes.clear()

    @property
    def counters(self) -> dict[str, int]:
        """A snapshot of this path's counters (names as in bpf/splitrelay.h where shared)."""
        return dict(self._c)

    # ------------------------------------------------------------------ readers

    def _read_public(self, sock: socket.socket, relay_addr: IPAddress) -> None:
        """A public socket bound to one address: that address is where clients sent to."""
        recv = sock.recvfrom_into
        buf, view = self._buf, self._view
        for _ in range(RECV_BATCH):
            try:
                n, src = recv(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._log_limited("recv", "public socket receive failed: %s", exc)
                return
            try:
                self._client_packet(view[:n], src, relay_addr, True)
            except Exception as exc:
                self._internal(exc)

    def _read_public_any(self, sock: socket.socket, version: int) -> None:
        """A wildcard public socket: PKTINFO names the address each datagram arrived on."""
        recv = sock.recvmsg_into
        bufs, view = self._bufs, self._view
        ancsize = _ANC_V6 if version == 6 else _ANC_V4
        for _ in range(RECV_BATCH):
            try:
                n, anc, _flags, src = recv(bufs, ancsize)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._log_limited("recv", "public socket receive failed: %s", exc)
                return
            try:
                relay_addr = self._arrival(anc)
                if relay_addr is None:
                    raise RuntimeError("a wildcard public socket delivered no PKTINFO")
                self._client_packet(view[:n], src, relay_addr, True)
            except Exception as exc:
                self._internal(exc)

    def _read_tunnel(self, sock: socket.socket) -> None:
        recv = sock.recvfrom_into
        buf, view = self._buf, self._view
        for _ in range(RECV_BATCH):
            try:
                n, src = recv(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._log_limited("recv", "tunnel socket receive failed: %s", exc)
                return
            try:
                self._tunnel_packet(view[:n], src, True)
            except Exception as exc:
                self._internal(exc)

    def _arrival(self, anc: list[tuple[int, int, bytes]]) -> IPAddress | None:
        """The destination address out of IP_PKTINFO / IPV6_PKTINFO ancillary data."""
        for level, kind, data in anc:
            if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
                raw = data[8:12]  # in_pktinfo.ipi_addr: the header's destination
            elif level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
                raw = data[:16]  # in6_pktinfo.ipi6_addr
            else:
                continue
            addr = self._locals.get(raw)
            if addr is None:
                addr = ip_address(raw)
                _remember(self._locals, raw, addr)
            return addr
        return None

    # ------------------------------------------------------------------ client -> transceiver

    def _client_packet(
        self,
        payload: memoryview | bytes,
        src: tuple[Any, ...],
        relay_addr: IPAddress,
        recover_ok: bool,
    ) -> None:
        """relay.c from_client(): route by STUN token or by session, then encapsulate."""
        c = self._c
        if not payload:
            c["drop_truncated"] += 1
            return
        flow = self._flows.get(src)
        if flow is None:
            flow = self._new_flow(src)
        client, header = flow
        port = src[1]
        state = self.state
        sess = state.get_session(client, port)
        tid = None
        if payload[0] <= 3:
            try:
                tid = wire.route_binding_request(payload)
            except wire.WireError as exc:
                self._drop(exc.reason)
                return
        if tid is not None and (sess is None or sess.tid != tid):
            # A new session, or a known client now routed to another owner.
            t = state.get_transceiver(tid)
            if t is None:
                c["drop_unknown_transceiver"] += 1
                return
            if t.state != _ACTIVE:
                c["drop_transceiver_draining"] += 1
                return
            sock = self._tunnel.get(t.addr.version)
            if sock is None:
                c["drop_no_tunnel_source"] += 1
                return
            kind = "created" if sess is None else "rerouted"
            entry = state.put_session(
                client, port, tid, relay_addr, self._public_port, Origin.USERSPACE
            )
            c["sessions_created" if sess is None else "sessions_rerouted"] += 1
            self._to_transceiver(sock, t, header, payload, client, port)
            self._notify(entry, kind)
            return
        if sess is None:
            if recover_ok and self._recover is not None:
                self._hold(client, port, _ClientItem(bytes(payload), src, relay_addr))
            else:
                c["drop_unknown_client"] += 1
            return
        t = state.get_transceiver(sess.tid)
        if t is None:
            c["drop_orphan_session"] += 1
            return
        sock = self._tunnel.get(t.addr.version)
        if sock is None:
            c["drop_no_tunnel_source"] += 1
            return
        self._to_transceiver(sock, t, header, payload, client, port)

    def _to_transceiver(
        self,
        sock: socket.socket,
        t: TransceiverEntry,
        header: bytes,
        payload: memoryview | bytes,
        client: IPAddress,
        port: int,
    ) -> None:
        try:
            sock.sendmsg((header, payload), (), 0, (str(t.addr), t.port))
        except OSError:
            self._c["drop_send_failed"] += 1
            return
        c = self._c
        n = len(payload)
        c["fwd_to_transceiver_packets"] += 1
        c["fwd_to_transceiver_bytes"] += n
        self.state.touch(client, port, True, n)

    def _new_flow(self, src: tuple[Any, ...]) -> tuple[IPAddress, bytes]:
        """The canonical client address and its tunnel header (a pure function of src)."""
        client = _canonical(ip_address(src[0]))
        header = wire.TunnelHeader(client, src[1], self._public_port).pack()
        flow = (client, header)
        _remember(self._flows, src, flow)
        return flow

    # ------------------------------------------------------------------ transceiver -> client

    def _tunnel_packet(
        self, datagram: memoryview | bytes, src: tuple[Any, ...], recover_ok: bool
    ) -> None:
        """relay.c from_tunnel(): only the owner may reach a client, from the exact R it used."""
        c = self._c
        key = bytes(datagram[:_TUNNEL_LEN])
        parsed = self._headers.get(key)
        if parsed is None:
            try:
                h = wire.TunnelHeader.unpack(datagram)
            except wire.WireError as exc:
                self._drop(exc.reason)
                return
            parsed = (
                h.client_addr,
                h.client_port,
                h.relay_port,
                (str(h.client_addr), h.client_port),
            )
            _remember(self._headers, key, parsed)
        client, cport, rport, dest = parsed
        state = self.state
        sess = state.get_session(client, cport)
        if sess is None:
            if recover_ok and self._recover is not None:
                self._hold(client, cport, _TunnelItem(bytes(datagram), src))
            else:
                c["drop_reply_unknown_client"] += 1
            return
        t = state.get_transceiver(sess.tid)
        if t is None or t.port != src[1] or t.addr != self._ip(src[0]):
            c["drop_reply_not_owner"] += 1
            return
        if rport != sess.relay_port:
            c["drop_reply_port_mismatch"] += 1
            return
        route = self._route(sess.relay_addr, sess.relay_port, client.version)
        if route is None:
            c["drop_no_public_source"] += 1
            return
        sock, anc = route
        payload = datagram[_TUNNEL_LEN:]
        try:
            if anc is None:
                sock.sendto(payload, dest)
            else:
                sock.sendmsg((payload,), anc, 0, dest)
        except OSError:
            c["drop_send_failed"] += 1
            return
        n = len(payload)
        c["fwd_to_client_packets"] += 1
        c["fwd_to_client_bytes"] += n
        state.touch(client, cport, False, n)

    def _route(self, relay_addr: IPAddress, relay_port: int, version: int) -> _Route | None:
        """The public socket (and PKTINFO, if wildcard) that sends from relay_addr:relay_port.

        None when this relay has no socket that can: another port, another
        family than the client's, or an address none of its sockets serves.
        """
        if relay_port != self._public_port or relay_addr.version != version:
            return None
        routes = self._routes[version]
        route = routes.get(int(relay_addr), _MISSING)
        if route is not _MISSING:
            return route
        route = None
        for sock, bound in self._public:
            if bound == relay_addr:
                route = (sock, None)
                break
        else:
            for sock, bound in self._public:
                if bound.version == version and bound.is_unspecified:
                    route = (sock, [_pktinfo(relay_addr)])
                    break
        _remember(routes, int(relay_addr), route)
        return route

    def _ip(self, host: str) -> IPAddress:
        addr = self._ips.get(host)
        if addr is None:
            addr = _canonical(ip_address(host))
            _remember(self._ips, host, addr)
        return addr

    # ------------------------------------------------------------------ recovery

    def _hold(self, client: IPAddress, port: int, item: _ClientItem | _TunnelItem) -> None:
        """Hold a packet of an unknown client and look the client up (once at a time)."""
        key = (client, port)
        queue = self._pending.get(key)
        if queue is not None:
            if len(queue) < RECOVER_MAX_QUEUED:
                queue.append(item)
            else:
                self._c["drop_recovery_busy"] += 1
            return
        until = self._negative.get(key)
        if until is not None:
            if until > time.monotonic():
                self._drop_unknown(item)
                return
            del self._negative[key]
        if len(self._pending) >= RECOVER_MAX_PENDING or self._loop is None:
            self._c["drop_recovery_busy"] += 1
            return
        self._pending[key] = [item]
        task = self._loop.create_task(self._recover_client(client, port))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _recover_client(self, client: IPAddress, port: int) -> None:
        key = (client, port)
        entry: SessionEntry | None = None
        assert self._recover is not None
        try:
            entry = await asyncio.wait_for(self._recover(client, port), self._recover_timeout)
        except asyncio.CancelledError:
            self._pending.pop(key, None)
            raise
        except Exception as exc:  # the hook's failure must not stop relaying
            self._log_limited("recover", "session recovery failed: %r", exc)
        queued = self._pending.pop(key, [])
        if entry is None:
            if len(self._negative) >= FLOW_CACHE_MAX:
                now = time.monotonic()
                self._negative = {k: t for k, t in self._negative.items() if t > now}
            if len(self._negative) < FLOW_CACHE_MAX:
                self._negative[key] = time.monotonic() + self._negative_ttl
            for item in queued:
                self._drop_unknown(item)
            return
        try:
            if self.state.get_session(client, port) is None:
                # The client's own packet says which address it talks to: replies
                # must come from there, whatever relay recorded the session.
                first = queued[0] if queued else None
                if isinstance(first, _ClientItem):
                    relay_addr, relay_port = first.relay_addr, self._public_port
                else:
                    relay_addr, relay_port = entry.relay_addr, entry.relay_port
                self.state.put_session(
                    client, port, entry.tid, relay_addr, relay_port, Origin.REDIS
                )
        except Exception as exc:
            for _ in queued:
                self._internal(exc)
            return
        for item in queued:
            try:
                if isinstance(item, _ClientItem):
                    self._client_packet(item.payload, item.src, item.relay_addr, False)
                else:
                    self._tunnel_packet(item.datagram, item.src, False)
            except Exception as exc:
                self._internal(exc)

    def _drop_unknown(self, item: _ClientItem | _TunnelItem) -> None:
        if isinstance(item, _ClientItem):
            self._c["drop_unknown_client"] += 1
        else:
            self._c["drop_reply_unknown_client"] += 1

    # ------------------------------------------------------------------ accounting

    def _drop(self, reason: str) -> None:
        name = _DROP.get(reason) or f"drop_{reason}"
        self._c[name] = self._c.get(name, 0) + 1

    def _notify(self, entry: SessionEntry, kind: str) -> None:
        if self._on_session is None:
            return
        try:
            self._on_session(entry, kind)
        except Exception as exc:  # a listener's bug must not cost the packet
            self._log_limited("on_session", "session listener failed: %r", exc)

    def _internal(self, exc: BaseException) -> None:
        self._c["drop_internal"] += 1
        self._log_limited("internal", "packet handler failed: %r", exc, exc_info=exc)

    def _log_limited(
        self, kind: str, msg: str, *args: object, exc_info: BaseException | None = None
    ) -> None:
        """Log a failure at most once per LOG_INTERVAL per kind, with the count skipped."""
        now = time.monotonic()
        last, skipped = self._logged.get(kind, (-LOG_INTERVAL, 0))
        if now - last < LOG_INTERVAL:
            self._logged[kind] = (last, skipped + 1)
            return
        self._logged[kind] = (now, 0)
        suffix = f" ({skipped} more since the last report)" if skipped else ""
        log.error(msg + suffix, *args, exc_info=exc_info)


# ---------------------------------------------------------------------- helpers


def _canonical(addr: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 as IPv4: one key per client, as in the BPF session map."""
    if isinstance(addr, IPv6Address):
        mapped = addr.ipv4_mapped
        if mapped is not None:
            return mapped
    return addr


def _pktinfo(addr: IPAddress) -> tuple[int, int, bytes]:
    """A PKTINFO control message that makes the kernel send from `addr`."""
    if addr.version == 6:
        return (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, struct.pack("=16sI", addr.packed, 0))
    # struct in_pktinfo: ifindex 0 (route decides), spec_dst = source, addr unused.
    return (socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=i4s4s", 0, addr.packed, bytes(4)))


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
    """Insert into a bounded cache: when full it starts over (cheap and amortized)."""
    if len(cache) >= FLOW_CACHE_MAX:
        cache.clear()
    cache[key] = value


def _endpoint(addr: IPAddress, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


def _bind_message(where: str, addr: IPAddress, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"cannot bind {where}: the port is already in use (is another relay running?)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot bind {where}: {addr} is not an address of this host"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (
            f"cannot bind {where}: permission denied "
            "(ports below 1024 need root or CAP_NET_BIND_SERVICE)"
        )
    if exc.errno == errno.EAFNOSUPPORT:
        return f"cannot open {where}: IPv{addr.version} is not available on this host"
    return f"cannot bind {where}: {exc.strerror or exc}"
