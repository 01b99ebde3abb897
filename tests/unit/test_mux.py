"""TunnelMux on real loopback sockets: demultiplexing, admission, relay tracking, refusals.

A "relay" here is a plain UDP socket on 127.0.0.1 that sends tunnel datagrams
built with ctl/wire.py, so every test checks the mux against the shared codec.
Endpoints are small fakes: the aioice side has its own tests (test_aioice_seam.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from ipaddress import ip_address
from typing import Any, Self

import pytest

from ctl import wire
from transceiver.mux import COUNTER_NAMES, TunnelMux

UFRAG_A = wire.make_server_ufrag(7, "AAAAAAAA")
UFRAG_B = wire.make_server_ufrag(7, "BBBBBBBB")
C1 = ("198.51.100.10", 50000)
C2 = ("198.51.100.11", 50001)
C6 = ("2001:db8:c::10", 40000)
DTLS = bytes([22, 254, 253]) + b"client hello"


def run(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(coro_fn(), 20))


async def until(cond: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


class FakeEndpoint:
    """Records what the mux does to it; accepts first requests unless told otherwise."""

    def __init__(self, ufrag: str, accept: bool = True) -> None:
        self._ufrag = ufrag
        self.accept = accept
        self.received: list[tuple[bytes, tuple[str, int]]] = []
        self.heard: list[tuple[str, int]] = []
        self.authenticated: list[tuple[str, int]] = []
        self.lost = False

    @property
    def ufrag(self) -> str:
        return self._ufrag

    def authenticate(self, payload: bytes, addr: tuple[str, int]) -> bool:
        self.authenticated.append(addr)
        return self.accept

    def client_heard(self, addr: tuple[str, int]) -> None:
        self.heard.append(addr)

    def datagram_received(self, payload: bytes, addr: tuple[str, int]) -> None:
        self.received.append((payload, addr))

    def connection_lost(self) -> None:
        self.lost = True


class UdpPeer(asyncio.DatagramProtocol):
    """A UDP socket on loopback that collects what it receives (a relay's or a client's)."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    @classmethod
    async def open(cls) -> Self:
        loop = asyncio.get_running_loop()
        _, peer = await loop.create_datagram_endpoint(cls, local_addr=("127.0.0.1", 0))
        return peer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.inbox.put_nowait(data)

    @property
    def addr(self) -> tuple[str, int]:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return host, port


class Relay(UdpPeer):
    """A fake relay tunnel socket: sends tunnel datagrams, collects what the mux sends back."""

    def send(
        self, mux: TunnelMux, client: tuple[str, int], payload: bytes, relay_port: int = 3478
    ) -> None:
        header = wire.TunnelHeader(ip_address(client[0]), client[1], relay_port)
        self.send_raw(mux, wire.encap(header, payload))

    def send_raw(self, mux: TunnelMux, datagram: bytes) -> None:
        assert self.transport is not None and mux.local_address is not None
        self.transport.sendto(datagram, mux.local_address)

    async def recv(self, timeout: float = 2.0) -> bytes:
        return await asyncio.wait_for(self.inbox.get(), timeout)

    async def nothing(self, wait: float = 0.2) -> None:
        await asyncio.sleep(wait)
        assert self.inbox.empty(), f"unexpected datagram {self.inbox.get_nowait()!r}"

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def binding_request(ufrag: str) -> bytes:
    return wire.build_binding_request(f"{ufrag}:cli1".encode())


async def setup(
    *endpoints: FakeEndpoint, relays: int = 1, **kw: Any
) -> tuple[TunnelMux, list[Relay]]:
    peers = [await Relay.open() for _ in range(relays)]
    mux = TunnelMux([p.addr for p in peers], **kw)
    await mux.start("127.0.0.1", 0)
    for endpoint in endpoints:
        mux.register(endpoint)
    return mux, peers


async def teardown(mux: TunnelMux, peers: list[Relay]) -> None:
    mux.close()
    for peer in peers:
        peer.close()


def test_first_binding_request_admits_the_client_by_ufrag() -> None:
    async def body() -> None:
        a, b = FakeEndpoint(UFRAG_A), FakeEndpoint(UFRAG_B)
        mux, (relay,) = await setup(a, b)
        request = binding_request(UFRAG_A)
        relay.send(mux, C1, request)
        await until(lambda: a.received)
        assert a.received == [(request, C1)]
        assert a.heard == [C1] and a.authenticated == [C1]
        assert b.received == [] and b.authenticated == []
        assert mux.owner(C1) is a
        assert mux.clients_of(a) == {C1}
        assert mux.counters["clients_admitted"] == 1
        assert mux.counters["rx_packets"] == 1
        await teardown(mux, [relay])

    run(body)


def test_demultiplexes_later_packets_by_client_address() -> None:
    async def body() -> None:
        a, b = FakeEndpoint(UFRAG_A), FakeEndpoint(UFRAG_B)
        mux, (relay,) = await setup(a, b)
        relay.send(mux, C1, binding_request(UFRAG_A))
        relay.send(mux, C2, binding_request(UFRAG_B))
        await until(lambda: a.received and b.received)
        relay.send(mux, C1, DTLS + b"-1")
        relay.send(mux, C2, DTLS + b"-2")
        relay.send(mux, C1, bytes([128]) + b"srtp")
        await until(lambda: len(a.received) == 3 and len(b.received) == 2)
        assert [p for p, _ in a.received[1:]] == [DTLS + b"-1", bytes([128]) + b"srtp"]
        assert all(addr == C1 for _, addr in a.received)
        assert b.received[1] == (DTLS + b"-2", C2)
        # A consent check (Binding Request naming the owner) still goes to the owner.
        relay.send(mux, C1, binding_request(UFRAG_A))
        await until(lambda: len(a.received) == 4)
        assert a.authenticated == [C1], "a known client is not re-authenticated"
        await teardown(mux, [relay])

    run(body)


def test_ipv6_clients_are_named_canonically() -> None:
    async def body() -> None:
        a = FakeEndpoint(UFRAG_A)
        mux, (relay,) = await setup(a)
        relay.send(mux, ("2001:0db8:000c::0010", C6[1]), binding_request(UFRAG_A))
        await until(lambda: a.received)
        assert a.received[0][1] == C6
        assert mux.sendto(a, b"reply", C6)
        datagram = await relay.recv()
        header, payload = wire.decap(datagram)
        assert (str(header.client_addr), header.client_port) == C6 and payload == b"reply"
        await teardown(mux, [relay])

    run(body)


def test_unknown_clients_unmatched_and_unauthenticated_requests_are_dropped() -> None:
    async def body() -> None:
        a = FakeEndpoint(UFRAG_A)
        refusing = FakeEndpoint(UFRAG_B, accept=False)
        mux, (relay,) = await setup(a, refusing)
        relay.send(mux, C1, DTLS)  # media from a client nobody owns
        relay.send(mux, C1, binding_request(wire.make_server_ufrag(7, "ZZZZZZZZ")))
        relay.send(mux, C1, wire.build_stun_message(0x0101))  # a response, not a request
        relay.send(mux, C1, b"\x00\x01\x00\x00garbage")  # STUN-looking, malformed
        relay.send(mux, C1, wire.build_stun_message(0x0001))  # no USERNAME
        relay.send(mux, C2, binding_request(UFRAG_B))  # the session refuses it
        relay.send(mux, C2, DTLS)  # so C2 stays unknown
        await until(lambda: sum(mux.counters.values()) >= 7)
        c = mux.counters
        assert c["dropped_unknown_client"] == 3
        assert c["dropped_unmatched_ufrag"] == 1
        assert c["dropped_stun_malformed"] == 1
        assert c["dropped_stun_no_username"] == 1
        assert c["dropped_unauthenticated"] == 1
        assert refusing.authenticated == [C2] and refusing.received == []
        assert a.received == [] and mux.client_count == 0
        await teardown(mux, [relay])

    run(body)


def test_datagrams_from_unknown_senders_are_ignored() -> None:
    async def body() -> None:
        a = FakeEndpoint(UFRAG_A)
        mux, (relay,) = await setup(a)
        stranger = await Relay.open()  # same host, another port: not a configured relay
        stranger.send(mux, C1, binding_request(UFRAG_A))
        await until(lambda: mux.counters["dropped_unknown_sender"] == 1)
        assert a.received == [] and a.authenticated == [] and mux.client_count == 0
        relay.send(mux, C1, binding_request(UFRAG_A))
        await until(lambda: a.received)
        stranger.send(mux, C1, DTLS)  # even for a known client
        await until(lambda: mux.counters["dropped_unknown_sender"] == 2)
        assert len(a.received) == 1
        await stranger.nothing()
        await teardown(mux, [relay, stranger])

    run(body)


def test_bad_tunnel_headers_are_dropped_by_the_codec_reason() -> None:
    async def body() -> None:
        a = FakeEndpoint(UFRAG_A)
        mux, (relay,) = await setup(a)
        good = wire.encap(wire.TunnelHeader(ip_address(C1[0]), C1[1], 3478), DTLS)
        relay.send_raw(mux, good[:10])  # truncated
        relay.send_raw(mux, b"XX" + good[2:])  # magic
        relay.send_raw(mux, good[:2] + b"\x02" + good[3:])  # version
        relay.send_raw(mux, good[:3] + b"\x01" + good[4:])  # a flag
        relay.send_raw(mux, good[:24])  # no payload
        await until(lambda: sum(mux.counters.values()) >= 5)
        assert mux.counters["dropped_tunnel_truncated"] == 1
        assert mux.counters["dropped_tunnel_bad_header"] == 3
        assert mux.counters["dropped_empty_payload"] == 1
        assert a.received == []
        await teardown(mux, [relay])

    run(body)


def test_never_sends_toward_a_client_it_has_not_heard_from() -> None:
    async def body() -> None:
        a, b = FakeEndpoint(UFRAG_A), FakeEndpoint(UFRAG_B)
        mux, (relay,) = await setup(a, b)
        assert not mux.sendto(a, b"check", C1)
        assert mux.counters["dropped_unheard_client"] == 1
        relay.send(mux, C2, binding_request(UFRAG_B))
        await until(lambda: b.received)
        assert not mux.sendto(a, b"hijack", C2), "C2 belongs to another session"
        assert mux.counters["dropped_not_owner"] == 1
        assert mux.counters["tx_packets"] == 0
        await relay.nothing()
        await teardown(mux, [relay])

    run(body)


def test_replies_go_through_the_relay_that_last_carried_the_client() -> None:
    async def body() -> None:
        a = FakeEndpoint(UFRAG_A)
        mux, (r1, r2) = await setup(a, relays=2)
        r1.send(mux, C1, binding_request(UFRAG_A), relay_port=3478)
        await until(lambda: a.received)
        assert mux.sendto(a, b"answer-1", C1)
        header, payload = wire.decap(await r1.recv())
        assert header == wire.TunnelHeader(ip_address(C1[0]), C1[1], 3478)
        assert payload == b"answer-1"
        # The client's packets now arrive through the second relay, on another port.
        r2.send(mux, C1, DTLS, relay_port=3479)
        await until(lambda: len(a.received) == 2)
        assert mux.sendto(a, b"answer-2", C1)
        header, payload = wire.decap(await r2.recv())
        assert header == wire.TunnelHeader(ip_address(C1[0]), C1[1], 3479)
        assert payload == b"answer-2"
        await r1.nothing()
        assert mux.counters["tx_packets"] == 2
        await teardown(mux, [r1, r2])

    run(body)


def test_unregister_forgets_the_session_and_its_clients() -> None:
    async def body() -> None:
        a = FakeEndpoint(UFRAG_A)
        mux, (relay,) = await setup(a)
        relay.send(mux, C1, binding_request(UFRAG_A))
        await until(lambda: a.received)
        mux.unregister(a)
        mux.unregister(a)  # idempotent
        assert mux.endpoint_count == 0 and mux.client_count == 0 and not mux.has_ufrag(UFRAG_A)
        assert not mux.sendto(a, b"late", C1)
        relay.send(mux, C1, DTLS)
        relay.send(mux, C1, binding_request(UFRAG_A))
        await until(lambda: mux.counters["dropped_unmatched_ufrag"] == 1)
        assert mux.counters["dropped_unknown_client"] == 1 and len(a.received) == 1
        await relay.nothing()
        await teardown(mux, [relay])

    run(body)


def test_a_request_naming_another_session_moves_the_client() -> None:
    async def body() -> None:
        a, b = FakeEndpoint(UFRAG_A), FakeEndpoint(UFRAG_B)
        mux, (relay,) = await setup(a, b)
        relay.send(mux, C1, binding_request(UFRAG_A))
        await until(lambda: a.received)
        b.accept = False
        relay.send(mux, C1, binding_request(UFRAG_B))  # not authenticated: no move
        await until(lambda: mux.counters["dropped_unauthenticated"] == 1)
        assert mux.owner(C1) is a
        b.accept = True
        relay.send(mux, C1, binding_request(UFRAG_B))
        await until(lambda: b.received)
        relay.send(mux, C1, DTLS)
        await until(lambda: len(b.received) == 2)
        assert mux.owner(C1) is b and mux.clients_of(a) == frozenset()
        assert mux.counters["clients_moved"] == 1 and len(a.received) == 1
        assert not mux.sendto(a, b"stale", C1) and mux.sendto(b, b"fresh", C1)
        await teardown(mux, [relay])

    run(body)


def test_clients_per_session_are_bounded() -> None:
    async def body() -> None:
        a = FakeEndpoint(UFRAG_A)
        mux, (relay,) = await setup(a, max_clients_per_session=2)
        for port in (1000, 1001, 1002):
            relay.send(mux, ("198.51.100.10", port), binding_request(UFRAG_A))
        await until(lambda: mux.counters["dropped_client_limit"] == 1)
        assert mux.client_count == 2
        await teardown(mux, [relay])

    run(body)


def test_close_tells_every_endpoint_and_counters_are_stable() -> None:
    async def body() -> None:
        a, b = FakeEndpoint(UFRAG_A), FakeEndpoint(UFRAG_B)
        mux, (relay,) = await setup(a, b)
        assert set(mux.stats()) == {*COUNTER_NAMES, "endpoints", "clients"}
        with pytest.raises(ValueError, match="already registered"):
            mux.register(FakeEndpoint(UFRAG_A))
        mux.close()
        assert a.lost and b.lost and mux.local_address is None and mux.endpoint_count == 0
        assert not mux.sendto(a, b"x", C1)
        relay.close()

    run(body)


def test_a_mux_without_relays_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one relay"):
        TunnelMux([])
