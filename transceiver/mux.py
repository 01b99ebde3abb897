"""The worker's one tunnel socket, and the seam that puts aioice's ICE agents on it.

A transceiver worker owns ONE UDP socket for all of its sessions. Relays send
it every client packet wrapped in a tunnel header naming the client
(docs/wire-format.md); the worker answers the same way. aioice and aiortc
know nothing of this: each aioice ``Connection`` gathers its own sockets and
talks to clients directly. This module is the seam between the two worlds.

``TunnelMux`` (the socket side):

* accepts datagrams only from the configured relay tunnel endpoints; anything
  else is dropped and counted (``dropped_unknown_sender``);
* decapsulates with the shared codec's rules (``ctl/wire.py``); a bad header
  is dropped under the codec's reason (``dropped_tunnel_bad_header`` ...);
* hands each payload to the endpoint (one per session) that owns the client
  address. A client it has never seen is admitted only by a STUN Binding
  Request whose USERNAME starts with a server ufrag some session registered,
  and only if that session authenticates the request (MESSAGE-INTEGRITY with
  its ICE password), so a forged ufrag cannot claim an address for a session;
* sends an endpoint's packets to a client through the relay that last carried
  that client, with the header naming the client and the relay port it used.
  It never sends toward an address it has not heard from, nor toward a client
  another session owns (``dropped_unheard_client``, ``dropped_not_owner``).

``TunnelMux(..., direct=True)`` is the same mux without the relay: the socket
is the public address, clients' packets arrive as they are (no tunnel header)
from any source, and replies go straight back to the client. Admission, the
per-session ownership of client addresses and the ICE seam are unchanged. It
exists so a benchmark can compare call setup with and without the relay hop on
the very same worker code (transceiver/bench.py); production traffic always
comes through a relay.

``attach()``, ``IceLink`` and ``MuxProtocol`` (the aioice side): ``attach``
takes a fresh aioice ``Connection`` (from an aiortc peer connection, before
its answer is created) and

* sets its local ufrag to the routing token, so the relay can route the
  client's first check and the mux can find the session;
* replaces candidate gathering: the only local candidates are the relay's
  public address(es), host type, one per address family, each served by a
  ``MuxProtocol`` instead of a socket;
* registers the session with the mux as an ``IceLink``.

``MuxProtocol`` implements what aioice calls on its ``StunProtocol``
(``local_candidate``, ``request``, ``send_stun``, ``send_data``, ``close``) and
feeds received packets to the Connection exactly as ``StunProtocol`` does.
STUN transactions reuse aioice's own ``stun.Transaction`` (same retransmission
timing). A check toward an address the session has not heard from waits until
the client speaks from it, then starts at once; if it never does, the check
fails after the time a lost transaction would take. So the transceiver's
checks are only ever triggered checks toward peer-reflexive addresses, and the
session itself strips the client's candidates from the offer, so aioice never
even learns an address the relay did not carry.

The aioice/aiortc internals used here are pinned by
tests/unit/test_aioice_seam.py, and ``check_versions()`` refuses to run on
other releases than the ones the seam was built against.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from ipaddress import ip_address
from typing import Any, Protocol, TypeAlias

from aioice import Candidate, Connection, stun
from aioice.candidate import candidate_foundation, candidate_priority
from aioice.ice import validate_username

from ctl import wire

log = logging.getLogger("splitrelay.transceiver.mux")

Address: TypeAlias = tuple[str, int]

#: The releases the seam was written against; any other is refused.
SEAM_VERSIONS: dict[str, str] = {"aioice": "0.13.0", "aiortc": "1.16.0"}

#: A session may be reached from this many client addresses (interfaces,
#: families); more is either a broken client or someone spraying its ufrag.
MAX_CLIENTS_PER_SESSION = 8
#: Bytes queued in the socket transport above which sends are dropped:
#: late media is worthless, and the asyncio buffer would otherwise grow.
SEND_BUFFER_LIMIT = 1 << 20
SOCKET_BUFFER = 4 << 20

COUNTER_NAMES: tuple[str, ...] = (
    "rx_packets",
    "tx_packets",
    "clients_admitted",
    "clients_moved",
    "dropped_unknown_sender",
    *(f"dropped_{r}" for r in ("tunnel_truncated", "tunnel_bad_header")),
    "dropped_empty_payload",
    "dropped_unknown_client",
    *(f"dropped_{r}" for r in ("stun_malformed", "stun_no_username")),
    "dropped_unmatched_ufrag",
    "dropped_unauthenticated",
    "dropped_client_limit",
    "dropped_unheard_client",
    "dropped_not_owner",
    "dropped_send_buffer_full",
    "dropped_closed",
    "dropped_stun_unparsed",
    "internal_errors",
)

_HDR = wire.TUNNEL_HEADER_LEN
# Every valid version-1 header starts with these 4 bytes (flags must be 0);
# anything else goes through the codec to be dropped under its exact reason.
_V1_PREFIX = struct.pack("!HBB", wire.TUNNEL_MAGIC, wire.TUNNEL_VERSION, 0)
_BINDING_REQUEST = struct.pack("!H", wire.STUN_BINDING_REQUEST)
_protocol_ids = itertools.count()


class SeamError(RuntimeError):
    """The aioice/aiortc internals are not what the seam was built for, or it is misused."""


def check_versions() -> None:
    """Refuse to run on aioice/aiortc releases the seam was not built and tested against.

    The seam writes private attributes of aioice's Connection; a silent
    change there would misroute or drop every call, so a mismatch is fatal.
    """
    for dist, want in SEAM_VERSIONS.items():
        try:
            have = metadata.version(dist)
        except metadata.PackageNotFoundError:
            raise SeamError(f"{dist} is not installed (the transceiver needs {want})") from None
        if have != want:
            raise SeamError(
                f"{dist} {have} is installed, but the transceiver's ICE seam "
                f"(transceiver/mux.py) is built for {dist} {want}: pin it, or port the seam"
            )


class MuxEndpoint(Protocol):
    """What the mux delivers to: one per session (``IceLink`` in production)."""

    @property
    def ufrag(self) -> str:
        """The server ufrag the session answered with (the routing token)."""
        ...

    def authenticate(self, payload: bytes, addr: Address) -> bool:
        """Whether a first Binding Request from ``addr`` really is for this session."""
        ...

    def client_heard(self, addr: Address) -> None:
        """``addr`` now belongs to this session: the mux will send to it."""
        ...

    def datagram_received(self, payload: bytes, addr: Address) -> None:
        """A client payload (STUN, DTLS, SRTP, SRTCP), tunnel header removed."""
        ...

    def connection_lost(self) -> None:
        """The mux closed: nothing will be received or sent any more."""
        ...


@dataclass(slots=True, eq=False)
class _Client:
    """One client address and where replies to it go."""

    key: bytes  # client port (2 B) + mapped address (16 B), as in the tunnel header
    addr: Address  # canonical (str, port), the form aioice compares
    endpoint: MuxEndpoint
    relay: Address  # tunnel source of the relay that last carried this client
    header: bytes  # the 24-byte header to put in front of replies


class _SocketProtocol(asyncio.DatagramProtocol):
    """Forwards the socket's events to the mux (kept apart so the mux has no asyncio base)."""

    def __init__(self, mux: TunnelMux) -> None:
        self._mux = mux

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self._mux._received(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("tunnel socket error: %s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._mux._lost()


class TunnelMux:
    """One UDP socket shared by every session of a worker; see the module docstring.

    Counters are plain ints in ``counters`` (names in COUNTER_NAMES), read by
    the worker's stats(); nothing here logs per packet.
    """

    def __init__(
        self,
        relays: Iterable[Address],
        *,
        max_clients_per_session: int = MAX_CLIENTS_PER_SESSION,
        direct: bool = False,
    ) -> None:
        self._relays: set[Address] = set()
        for host, port in relays:
            canonical = str(ip_address(host))
            self._relays.add((canonical, int(port)))
            if ":" not in canonical:  # seen as IPv4-mapped on a dual-stack socket
                self._relays.add((f"::ffff:{canonical}", int(port)))
        if direct and self._relays:
            raise ValueError("a direct mux takes no relay tunnel address")
        if not self._relays and not direct:
            raise ValueError("a tunnel mux needs at least one relay tunnel address")
        self.direct = direct
        self._max_clients = max_clients_per_session
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self._transport: asyncio.DatagramTransport | None = None
        self._socket_closed: asyncio.Future[None] | None = None
        self._local: Address | None = None
        self._by_ufrag: dict[bytes, MuxEndpoint] = {}
        self._owned: dict[MuxEndpoint, set[Address]] = {}
        self._by_key: dict[bytes, _Client] = {}
        self._by_addr: dict[Address, _Client] = {}
        self._last_error_log = 0.0

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: str, port: int) -> Address:
        """Bind the tunnel socket in the calling thread's network namespace; return its address."""
        if self._transport is not None:
            raise RuntimeError("the tunnel mux is already started")
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _SocketProtocol(self), local_addr=(host, port)
        )
        self._socket_closed = loop.create_future()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        self._transport = transport
        name = transport.get_extra_info("sockname")
        self._local = (str(name[0]), int(name[1]))
        return self._local

    def close(self) -> None:
        """Close the socket and tell every endpoint (idempotent); see wait_closed()."""
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()  # the socket's connection_lost() follows a loop turn later
        self._detach_all()

    async def wait_closed(self) -> None:
        """Wait until the socket is really closed (asyncio closes it a loop turn later).

        A worker restarting on the same tunnel port must wait for this, or its
        bind fails with "address already in use".
        """
        if self._socket_closed is not None:
            await asyncio.shield(self._socket_closed)

    def _lost(self) -> None:
        """The socket is closed (by close(), or by the OS)."""
        if self._socket_closed is not None and not self._socket_closed.done():
            self._socket_closed.set_result(None)
        self._transport = None
        self._detach_all()

    def _detach_all(self) -> None:
        endpoints = list(self._owned)
        for endpoint in endpoints:
            self.unregister(endpoint)
            try:
                endpoint.connection_lost()
            except Exception:
                log.exception("endpoint failed to handle the tunnel socket closing")

    @property
    def local_address(self) -> Address | None:
        """The bound (host, port), or None before start()/after close()."""
        return self._local if self._transport is not None else None

    # ------------------------------------------------------------------ registry

    def register(self, endpoint: MuxEndpoint) -> None:
        """Make ``endpoint`` reachable by its ufrag (a client's first check names it)."""
        ufrag = endpoint.ufrag.encode("ascii")
        if ufrag in self._by_ufrag:
            raise ValueError(f"ufrag {endpoint.ufrag!r} is already registered")
        if endpoint in self._owned:
            raise ValueError("endpoint is already registered")
        self._by_ufrag[ufrag] = endpoint
        self._owned[endpoint] = set()

    def unregister(self, endpoint: MuxEndpoint) -> None:
        """Forget an endpoint and every client address it owned (idempotent)."""
        owned = self._owned.pop(endpoint, None)
        if owned is None:
            return
        ufrag = endpoint.ufrag.encode("ascii")
        if self._by_ufrag.get(ufrag) is endpoint:
            del self._by_ufrag[ufrag]
        for addr in owned:
            client = self._by_addr.pop(addr, None)
            if client is not None:
                self._by_key.pop(client.key, None)

    def has_ufrag(self, ufrag: str) -> bool:
        return ufrag.encode("ascii") in self._by_ufrag

    def owner(self, addr: Address) -> MuxEndpoint | None:
        """The endpoint that owns client ``addr``, if the mux has heard from it."""
        client = self._by_addr.get(addr)
        return None if client is None else client.endpoint

    def clients_of(self, endpoint: MuxEndpoint) -> frozenset[Address]:
        return frozenset(self._owned.get(endpoint, ()))

    @property
    def endpoint_count(self) -> int:
        return len(self._owned)

    @property
    def client_count(self) -> int:
        return len(self._by_addr)

    def stats(self) -> dict[str, int]:
        """Counters plus the current number of sessions and client addresses."""
        out = dict(self.counters)
        out["endpoints"] = len(self._owned)
        out["clients"] = len(self._by_addr)
        return out

    # ------------------------------------------------------------------ sending

    def sendto(self, endpoint: MuxEndpoint, payload: bytes, addr: Address) -> bool:
        """Send ``payload`` to client ``addr`` on behalf of ``endpoint``; False if dropped.

        The reply header names the same client and relay port as the last
        packet that relay carried from the client, so it is byte for byte
        that packet's header, kept as is.
        """
        client = self._by_addr.get(addr)
        counters = self.counters
        if client is None:
            counters["dropped_unheard_client"] += 1
            return False
        if client.endpoint is not endpoint:
            counters["dropped_not_owner"] += 1
            return False
        transport = self._transport
        if transport is None:
            counters["dropped_closed"] += 1
            return False
        if transport.get_write_buffer_size() > SEND_BUFFER_LIMIT:
            counters["dropped_send_buffer_full"] += 1
            return False
        transport.sendto(client.header + payload, client.relay)
        counters["tx_packets"] += 1
        return True

    # ------------------------------------------------------------------ receiving

    def _received(self, data: bytes, src: tuple[Any, ...]) -> None:
        try:
            self._receive(data, src)
        except Exception:  # one bad packet must never take the socket down
            self.counters["internal_errors"] += 1
            now = time.monotonic()
            if now - self._last_error_log > 60:
                self._last_error_log = now
                log.exception("tunnel packet handling failed (logged at most once a minute)")

    def _receive(self, data: bytes, src: tuple[Any, ...]) -> None:
        counters = self.counters
        if len(src) != 2:
            src = (src[0], src[1])
        if self.direct:
            self._receive_direct(data, src)
            return
        if src not in self._relays:
            counters["dropped_unknown_sender"] += 1
            return
        header = data[:_HDR]
        if len(header) < _HDR or header[:4] != _V1_PREFIX:
            try:
                wire.TunnelHeader.unpack(data)
            except wire.WireError as exc:
                counters[f"dropped_{exc.reason}"] += 1
                return
            counters["dropped_tunnel_bad_header"] += 1  # unreachable if the codec agrees
            return
        payload = data[_HDR:]
        if not payload:
            counters["dropped_empty_payload"] += 1
            return
        key = header[4:6] + header[8:]
        client = self._by_key.get(key)
        if client is None or (payload[0] <= 3 and payload[:2] == _BINDING_REQUEST):
            client = self._admit(key, header, payload, src, client)
            if client is None:
                return
        if client.header != header or client.relay != src:
            client.header = header
            client.relay = src
        counters["rx_packets"] += 1
        client.endpoint.datagram_received(payload, client.addr)

    def _receive_direct(self, data: bytes, src: Address) -> None:
        """A client's own datagram (direct mode): the source address is the client.

        The key is what a relay's header would carry for this client, so
        admission and ownership work exactly as behind a relay; replies carry
        an empty header and go back to the source.
        """
        counters = self.counters
        if not data:
            counters["dropped_empty_payload"] += 1
            return
        addr = src
        if src[0].startswith("::ffff:"):  # IPv4 on a dual-stack socket: the canonical form
            addr = (src[0][7:], src[1])
        client = self._by_addr.get(addr)
        if client is None or (data[0] <= 3 and data[:2] == _BINDING_REQUEST):
            key = int(src[1]).to_bytes(2, "big") + wire.to_mapped(addr[0])
            client = self._admit(key, b"", data, src, client)
            if client is None:
                return
        counters["rx_packets"] += 1
        client.endpoint.datagram_received(data, client.addr)

    def _admit(
        self, key: bytes, header: bytes, payload: bytes, src: Address, current: _Client | None
    ) -> _Client | None:
        """Find the session a Binding Request names; admit (or move) its client address.

        Runs for a client's first packet and for every Binding Request (one
        per consent check, about every 5 s), never for media. A known client
        whose request names another live session moves to it, as the relay
        re-routes it: a client port reused for a new call must reach the new
        call, and the move needs that session's ICE password.
        """
        counters = self.counters
        if payload[0] > 3:
            counters["dropped_unknown_client"] += 1
            return None
        try:
            msg_type, _ = wire.parse_stun_header(payload)
            if msg_type != wire.STUN_BINDING_REQUEST:
                counters["dropped_unknown_client"] += 1
                return None
            username = wire.find_username(payload)
        except wire.WireError as exc:
            counters[f"dropped_{exc.reason}"] += 1
            return None
        if username is None:
            counters["dropped_stun_no_username"] += 1
            return None
        endpoint = self._by_ufrag.get(username.partition(b":")[0])
        if endpoint is None:
            counters["dropped_unmatched_ufrag"] += 1
            return None
        if current is not None and current.endpoint is endpoint:
            return current
        owned = self._owned[endpoint]
        if len(owned) >= self._max_clients:
            counters["dropped_client_limit"] += 1
            return None
        addr = (str(wire.from_mapped(key[2:])), int.from_bytes(key[:2], "big"))
        if not endpoint.authenticate(payload, addr):
            counters["dropped_unauthenticated"] += 1
            return None
        if current is not None:
            self._owned[current.endpoint].discard(addr)
            counters["clients_moved"] += 1
        client = _Client(key, addr, endpoint, src, header)
        self._by_key[key] = client
        self._by_addr[addr] = client
        owned.add(addr)
        counters["clients_admitted"] += 1
        endpoint.client_heard(addr)
        return client


# ---------------------------------------------------------------------- aioice seam


def _family(host: str) -> int:
    return 6 if ":" in host else 4


def transaction_timeout(retransmissions: int | None) -> float:
    """How long aioice's stun.Transaction takes to give up (RFC 5389 7.2.1 timing)."""
    tries = 1 + (stun.RETRY_MAX if retransmissions is None else retransmissions)
    return stun.RETRY_RTO * (2**tries - 1)


class MuxProtocol:
    """What aioice's Connection sees as a socket: one local candidate, served by the mux.

    It implements the part of ``aioice.ice.StunProtocol`` the Connection uses
    (pinned by tests/unit/test_aioice_seam.py). Reception differs in one way:
    a payload whose first byte is above 3 is not STUN (RFC 7983), so it goes
    straight to the Connection without a STUN parse attempt per media packet.
    """

    def __init__(self, link: IceLink, candidate: Candidate) -> None:
        self.id = next(_protocol_ids)
        self.local_candidate = candidate
        self.receiver = link.connection
        self.transactions: dict[bytes, stun.Transaction] = {}
        self._link = link
        self._closed = False
        self._lost = False

    # -- from the mux

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if self._closed:
            return
        if data[0] > 3:
            self.receiver.data_received(data, self.local_candidate.component)
            return
        try:
            message = stun.parse_message(data)
        except Exception:  # aioice's parser can raise more than ValueError on hostile input
            self._link.mux.counters["dropped_stun_unparsed"] += 1
            return
        if message.message_class in (stun.Class.RESPONSE, stun.Class.ERROR):
            transaction = self.transactions.get(message.transaction_id)
            if transaction is not None:
                transaction.response_received(message, addr)
        elif message.message_class == stun.Class.REQUEST:
            self.receiver.request_received(message, addr, self)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        """The mux is gone: wake a pending recv() as a closed socket would."""
        if not self._lost:
            self._lost = True
            self.receiver.protocol_lost(self)  # type: ignore[arg-type]

    # -- what aioice's Connection calls

    async def request(
        self,
        request: stun.Message,
        addr: Address,
        integrity_key: bytes | None = None,
        retransmissions: int | None = None,
    ) -> tuple[stun.Message, Address]:
        """Run a STUN transaction, as StunProtocol.request does, toward a heard address only.

        Toward an address the session has not heard from, the transaction
        waits for the client to speak from it and then starts; if it never
        does, it fails like a transaction that got no answer.
        """
        assert request.transaction_id not in self.transactions
        if self._link.mux.owner(addr) is not self._link:
            await self._link.wait_heard(addr, transaction_timeout(retransmissions))
        if integrity_key is not None:
            request.add_message_integrity(integrity_key)
        transaction = stun.Transaction(
            request, addr, self, retransmissions=retransmissions, integrity_key=integrity_key
        )
        self.transactions[request.transaction_id] = transaction
        try:
            return await transaction.run()
        finally:
            del self.transactions[request.transaction_id]

    def send_stun(self, message: stun.Message, addr: Address) -> None:
        if not self._closed:
            self._link.mux.sendto(self._link, bytes(message), addr)

    async def send_data(self, data: bytes, addr: Address) -> None:
        if not self._closed:
            self._link.mux.sendto(self._link, data, addr)

    async def close(self) -> None:
        """Called by Connection.close(): the last one closed unregisters the session."""
        if not self._closed:
            self._closed = True
            self._link._protocol_closed(self)

    def __repr__(self) -> str:
        return f"MuxProtocol({self.id}, {self.local_candidate.host}:{self.local_candidate.port})"


class IceLink:
    """One session on the mux: its ufrag, its ICE password, its MuxProtocols.

    Created by ``attach()``. It is the session's ``MuxEndpoint``: it checks
    first requests against the Connection's password, picks the protocol of
    the client's address family, and releases checks waiting for an address.
    """

    def __init__(
        self, mux: TunnelMux, connection: Connection, candidates: Sequence[Candidate]
    ) -> None:
        self.mux = mux
        self.connection = connection
        self._ufrag = connection.local_username
        self._password = connection.local_password.encode("utf8")
        self.protocols = [MuxProtocol(self, c) for c in candidates]
        self._by_family = {_family(p.local_candidate.host): p for p in self.protocols}
        self._open_protocols = set(self.protocols)
        self._waiters: dict[Address, asyncio.Future[bool]] = {}
        self._closed = False

    @property
    def ufrag(self) -> str:
        return self._ufrag

    @property
    def closed(self) -> bool:
        return self._closed

    # -- MuxEndpoint

    def authenticate(self, payload: bytes, addr: Address) -> bool:
        """A Binding Request for our ufrag, signed with our password, from a family we serve."""
        if self._closed or _family(addr[0]) not in self._by_family:
            return False
        try:
            message = stun.parse_message(payload)
        except Exception:
            return False
        username = message.attributes.get("USERNAME")
        return (
            message.message_method == stun.Method.BINDING
            and message.message_class == stun.Class.REQUEST
            and isinstance(username, str)
            and username.partition(":")[0] == self._ufrag
            and message.check_message_integrity(self._password)
        )

    def client_heard(self, addr: Address) -> None:
        waiter = self._waiters.pop(addr, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def datagram_received(self, payload: bytes, addr: Address) -> None:
        protocol = self._by_family.get(_family(addr[0]))
        if protocol is not None:
            protocol.datagram_received(payload, addr)

    def connection_lost(self) -> None:
        self._close()
        for protocol in self.protocols:
            protocol.connection_lost(None)

    # -- for MuxProtocol

    async def wait_heard(self, addr: Address, timeout: float) -> None:
        """Wait until the mux has heard ``addr`` for this session, or raise TransactionTimeout."""
        if self._closed:
            raise stun.TransactionTimeout()
        waiter = self._waiters.get(addr)
        if waiter is None:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters[addr] = waiter
        try:
            heard = await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            raise stun.TransactionTimeout() from None
        if not heard:  # the session left the mux meanwhile
            raise stun.TransactionTimeout()

    def _protocol_closed(self, protocol: MuxProtocol) -> None:
        self._open_protocols.discard(protocol)
        if not self._open_protocols:
            self._close()

    def close(self) -> None:
        """Leave the mux (idempotent); aioice normally gets here through Connection.close()."""
        self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.mux.unregister(self)
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_result(False)
        self._waiters.clear()


def relay_candidates(public: Sequence[Address], component: int = 1) -> list[Candidate]:
    """Host candidates for the relay's public addresses, at most one per address family.

    One per family because the tunnel header names the relay port a client
    used but not the relay address: with two public addresses of one family
    the transceiver could not tell which candidate a check arrived on.
    """
    out: list[Candidate] = []
    seen: set[int] = set()
    for host, port in public:
        canonical = str(ip_address(host))
        family = _family(canonical)
        if family in seen:
            raise ValueError(f"more than one IPv{family} public candidate: give one per family")
        if not 0 < int(port) <= 0xFFFF:
            raise ValueError(f"public candidate port {port} is not in 1..65535")
        seen.add(family)
        out.append(
            Candidate(
                foundation=candidate_foundation("host", "udp", canonical),
                component=component,
                transport="udp",
                priority=candidate_priority(component, "host"),
                host=canonical,
                port=int(port),
                type="host",
            )
        )
    if not out:
        raise ValueError("no public candidate: give the relay's public address(es)")
    return out


def attach(
    connection: Connection, mux: TunnelMux, ufrag: str, public: Sequence[Address]
) -> IceLink:
    """Put an aioice Connection on the mux, before its local description is created.

    Touches these Connection internals (pinned by test_aioice_seam.py):
    ``_local_username`` (no setter exists), ``_local_candidates``,
    ``_protocols``, ``_local_candidates_start`` / ``_local_candidates_end``
    (so gather_candidates() finds gathering done and creates no socket) and
    ``_components`` (aiortc always uses one, rtcp-mux).
    """
    if connection._local_candidates_start or connection._protocols:
        raise SeamError("candidates were already gathered: attach before setLocalDescription()")
    if connection._components != {1}:
        raise SeamError(f"expected one ICE component, got {sorted(connection._components)}")
    validate_username(ufrag)
    candidates = relay_candidates(public)
    connection._local_username = ufrag
    link = IceLink(mux, connection, candidates)
    mux.register(link)
    connection._local_candidates = list(candidates)
    connection._protocols = list(link.protocols)  # type: ignore[arg-type]
    connection._local_candidates_start = True
    connection._local_candidates_end = True
    if connection.local_username != ufrag or connection.local_candidates != candidates:
        mux.unregister(link)
        raise SeamError("aioice Connection ignored the seam (local_username/local_candidates)")
    return link
