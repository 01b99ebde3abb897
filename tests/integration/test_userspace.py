"""The userspace relay path with real sockets in a private network namespace.

One namespace of our own holds every address of the picture on its loopback
(the relay's public and tunnel addresses, clients, transceivers), so traffic
is real UDP through the kernel and never leaves the namespace. The relay runs
on MemoryState; the clients and transceivers are plain sockets. Each rule of
bpf/relay.c is exercised with the counter it must move, and for every drop
the test checks that nothing at all reached a client or a transceiver.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

import pytest

from ctl import wire
from ctl.layout import Origin, TransceiverState
from ctl.maps import RelayAddresses, SessionEntry, monotonic_ns
from ctl.netns import in_netns
from ctl.store import MemoryState
from ctl.userspace import (
    COUNTER_NAMES,
    RelayError,
    UserspaceRelay,
    _bind_message,
    bind_sockets,
)

NS = f"srt-us-{os.getpid()}"
PUBLIC_PORT, TUNNEL_PORT = 3478, 3479

R4, R4B, R6, R6B = "198.51.100.1", "198.51.100.2", "2001:db8:c::1", "2001:db8:c::2"
C4, C4B, C6 = "198.51.100.10", "198.51.100.11", "2001:db8:c::10"
RI4, RI6 = "203.0.113.1", "2001:db8:1::1"
T1, T2, T1V6 = "203.0.113.11", "203.0.113.12", "2001:db8:1::11"
NOT_LOCAL = "192.0.2.99"
ADDRESSES = (R4, R4B, C4, C4B, RI4, T1, T2, R6, R6B, C6, RI6, T1V6)

TID_T1, TID_T2, TID_T1V6, TID_DRAINING, TID_UNKNOWN = 0xA001, 0xA002, 0xA006, 0xA003, 0xDEAD0001
T1_PORT, T2_PORT, T1V6_PORT, TD_PORT = 4001, 4002, 4006, 4003

DTLS = bytes([22, 0xFE, 0xFD]) + bytes(10) + b"client hello"
SRTP = bytes([0x80, 111, 0, 1]) + bytes(8) + b"opus frame"
REPLY = bytes([0x80, 111, 0, 2]) + bytes(8) + b"server audio"

SPECIFIC = RelayAddresses(
    public_port=PUBLIC_PORT,
    tunnel_port=TUNNEL_PORT,
    public_v4=IPv4Address(R4),
    public_v6=IPv6Address(R6),
    tunnel_v4=IPv4Address(RI4),
    tunnel_v6=IPv6Address(RI6),
)
WILDCARD = RelayAddresses(
    public_port=PUBLIC_PORT,
    tunnel_port=TUNNEL_PORT,
    public_v4=IPv4Address("0.0.0.0"),
    public_v6=IPv6Address("::"),
    tunnel_v4=IPv4Address(RI4),
    tunnel_v6=IPv6Address(RI6),
)


def stun(tid: int, random_part: str = "AbCd+/12") -> bytes:
    username = f"{wire.make_server_ufrag(tid, random_part)}:cl1e".encode()
    return wire.build_binding_request(username, transaction_id=b"\x01" * 12)


def header(client: str, port: int, relay_port: int = PUBLIC_PORT) -> bytes:
    """A tunnel header built by hand, independent of ctl.wire."""
    addr = ip_address(client)
    mapped = addr.packed if addr.version == 6 else bytes(10) + b"\xff\xff" + addr.packed
    return b"SR\x01\x00" + port.to_bytes(2, "big") + relay_port.to_bytes(2, "big") + mapped


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    """A private namespace whose loopback holds every address the tests use."""
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    _ip("netns", "add", NS)
    try:
        _ip("-n", NS, "link", "set", "lo", "up")
        for addr in ADDRESSES:
            if ":" in addr:
                _ip("-n", NS, "-6", "addr", "add", f"{addr}/128", "dev", "lo", "nodad")
            else:
                _ip("-n", NS, "addr", "add", f"{addr}/32", "dev", "lo")
        yield NS
    finally:
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


class Peer:
    """A client or transceiver: one non-blocking UDP socket in the test namespace."""

    def __init__(self, addr: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((addr, port))
        self.sock.setblocking(False)
        self.addr, self.port = addr, port

    def send(self, data: bytes, host: str, port: int) -> None:
        self.sock.sendto(data, (host, port))

    async def recv(self, timeout: float = 2.0) -> tuple[bytes, tuple[str, int]]:
        loop = asyncio.get_running_loop()
        data, src = await asyncio.wait_for(loop.sock_recvfrom(self.sock, 65535), timeout)
        return data, (src[0], src[1])

    def pending(self) -> list[bytes]:
        """Whatever is queued now (the relay sends synchronously, so nothing is in flight)."""
        out = []
        while True:
            try:
                out.append(self.sock.recv(65535))
            except BlockingIOError:
                return out

    def close(self) -> None:
        self.sock.close()


@dataclass
class World:
    """A running relay and the peers around it."""

    relay: UserspaceRelay
    state: MemoryState
    events: list[tuple[SessionEntry, str]]
    peers: dict[str, Peer] = field(default_factory=dict)

    def peer(self, name: str, addr: str, port: int) -> Peer:
        self.peers[name] = Peer(addr, port)
        return self.peers[name]

    def delta(self, before: dict[str, int]) -> dict[str, int]:
        now = self.relay.counters
        return {k: v - before.get(k, 0) for k, v in now.items() if v != before.get(k, 0)}

    async def until(self, name: str, at_least: int, timeout: float = 2.0) -> None:
        """Wait until a counter reaches a value: then the relay has handled the packet."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.relay.counters.get(name, 0) < at_least:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{name} stayed at {self.relay.counters.get(name, 0)}")
            await asyncio.sleep(0.002)

    async def expect(self, name: str, send: Callable[[], None]) -> dict[str, int]:
        """Send, wait for `name` to move by one, return every counter delta."""
        before = self.relay.counters
        send()
        await self.until(name, before.get(name, 0) + 1)
        return self.delta(before)

    def silent(self) -> None:
        for name, peer in self.peers.items():
            assert peer.pending() == [], f"{name} received a packet"


@contextlib.asynccontextmanager
async def world(
    addresses: RelayAddresses = SPECIFIC,
    recover: Callable[[Any, int], Awaitable[SessionEntry | None]] | None = None,
    **kw: Any,
) -> AsyncIterator[World]:
    state = MemoryState(1024)
    state.put_transceiver(TID_T1, T1, T1_PORT)
    state.put_transceiver(TID_T2, T2, T2_PORT)
    state.put_transceiver(TID_T1V6, T1V6, T1V6_PORT)
    state.put_transceiver(TID_DRAINING, T1, TD_PORT, TransceiverState.DRAINING)
    events: list[tuple[SessionEntry, str]] = []
    relay = UserspaceRelay(
        addresses, state, recover=recover, on_session=lambda e, k: events.append((e, k)), **kw
    )
    await relay.start()
    w = World(relay, state, events)
    w.peer("t1", T1, T1_PORT)
    w.peer("t2", T2, T2_PORT)
    w.peer("t1v6", T1V6, T1V6_PORT)
    w.peer("td", T1, TD_PORT)
    try:
        yield w
    finally:
        await relay.close()
        for peer in w.peers.values():
            peer.close()


def run(ns: str, coro: Callable[[], Awaitable[None]]) -> None:
    """Run a scenario with this thread (and every socket it opens) in the namespace."""

    async def bounded() -> None:
        await asyncio.wait_for(coro(), 20)

    with in_netns(ns):
        asyncio.run(bounded())


async def establish(w: World, client: Peer, relay_host: str, tid: int, t: Peer) -> None:
    """A STUN first packet creates the session; the transceiver gets it."""
    client.send(stun(tid), relay_host, PUBLIC_PORT)
    data, _ = await t.recv()
    assert data == header(client.addr, client.port) + stun(tid)


# --------------------------------------------------------------------------- first packet


@pytest.mark.parametrize(
    ("client_addr", "relay_host", "tid", "t_name", "tunnel_src"),
    [
        (C4, R4, TID_T1, "t1", RI4),
        (C6, R6, TID_T1V6, "t1v6", RI6),
        (C6, R6, TID_T1, "t1", RI4),  # a v6 client carried over a v4 tunnel
        (C4, R4, TID_T1V6, "t1v6", RI6),
    ],
)
def test_stun_first_packet_creates_session(
    netns: str, client_addr: str, relay_host: str, tid: int, t_name: str, tunnel_src: str
) -> None:
    async def scenario() -> None:
        async with world() as w:
            client = w.peer("client", client_addr, 50000)
            payload = stun(tid)
            client.send(payload, relay_host, PUBLIC_PORT)
            data, src = await w.peers[t_name].recv()
            assert data == header(client_addr, 50000) + payload
            assert src == (tunnel_src, TUNNEL_PORT)
            delta = w.delta({})
            assert delta == {
                "sessions_created": 1,
                "fwd_to_transceiver_packets": 1,
                "fwd_to_transceiver_bytes": len(payload),
            }
            entry = w.state.get_session(client_addr, 50000)
            assert entry is not None
            assert (entry.tid, entry.relay_addr, entry.relay_port, entry.origin) == (
                tid,
                ip_address(relay_host),
                PUBLIC_PORT,
                Origin.USERSPACE,
            )
            assert (entry.packets_to_transceiver, entry.bytes_to_transceiver) == (1, len(payload))
            assert [(e.client_addr, e.tid, k) for e, k in w.events] == [
                (ip_address(client_addr), tid, "created")
            ]
            w.silent()

    run(netns, scenario)


# --------------------------------------------------------------------------- both ways


@pytest.mark.parametrize(
    ("client_addr", "relay_host", "tid", "t_name"),
    [(C4, R4, TID_T1, "t1"), (C6, R6, TID_T1V6, "t1v6"), (C6, R6, TID_T1, "t1")],
)
def test_established_traffic_both_ways(
    netns: str, client_addr: str, relay_host: str, tid: int, t_name: str
) -> None:
    async def scenario() -> None:
        async with world() as w:
            client = w.peer("client", client_addr, 50001)
            t = w.peers[t_name]
            await establish(w, client, relay_host, tid, t)
            for payload in (DTLS, SRTP, wire.build_stun_message(0x0101)):  # incl. other STUN
                client.send(payload, relay_host, PUBLIC_PORT)
                data, _ = await t.recv()
                assert data == header(client_addr, 50001) + payload
            tunnel_host = RI6 if ":" in t.addr else RI4
            t.send(header(client_addr, 50001) + REPLY, tunnel_host, TUNNEL_PORT)
            data, src = await client.recv()
            assert data == REPLY
            assert src == (relay_host, PUBLIC_PORT)  # exactly where the client sent to
            entry = w.state.get_session(client_addr, 50001)
            assert entry is not None
            assert entry.packets_to_transceiver == 4 and entry.packets_to_client == 1
            assert entry.bytes_to_client == len(REPLY)
            c = w.relay.counters
            assert c["fwd_to_client_packets"] == 1 and c["fwd_to_client_bytes"] == len(REPLY)
            assert c["fwd_to_transceiver_packets"] == 4
            assert not any(v for k, v in c.items() if k.startswith("drop_"))
            w.silent()

    run(netns, scenario)


def test_wildcard_public_sockets_reply_from_the_address_used(netns: str) -> None:
    """Bound to 0.0.0.0 and ::, the relay answers from each address clients talk to."""

    async def scenario() -> None:
        async with world(WILDCARD) as w:
            t1 = w.peers["t1"]
            cases = [("a", C4, 50010, R4), ("b", C4B, 50011, R4B), ("c", C4, 50012, R4B)]
            cases += [("d", C6, 50013, R6), ("e", C6, 50014, R6B)]
            for name, addr, port, relay_host in cases:
                client = w.peer(name, addr, port)
                await establish(w, client, relay_host, TID_T1, t1)
                entry = w.state.get_session(addr, port)
                assert entry is not None and entry.relay_addr == ip_address(relay_host)
            for name, addr, port, relay_host in cases:
                client = w.peers[name]
                client.send(SRTP, relay_host, PUBLIC_PORT)
                assert (await t1.recv())[0] == header(addr, port) + SRTP
                t1.send(header(addr, port) + REPLY + name.encode(), RI4, TUNNEL_PORT)
                data, src = await client.recv()
                assert data == REPLY + name.encode()
                assert src == (relay_host, PUBLIC_PORT)
            w.silent()

    run(netns, scenario)


def test_two_relays_one_on_a_specific_address(netns: str) -> None:
    """A v4-only relay: no v6 public socket, replies via the one it has."""

    async def scenario() -> None:
        addrs = RelayAddresses(
            public_port=PUBLIC_PORT,
            tunnel_port=TUNNEL_PORT,
            public_v4=IPv4Address(R4B),
            tunnel_v4=IPv4Address(RI4),
        )
        async with world(addrs) as w:
            client = w.peer("client", C4, 50020)
            await establish(w, client, R4B, TID_T1, w.peers["t1"])
            w.peers["t1"].send(header(C4, 50020) + REPLY, RI4, TUNNEL_PORT)
            assert await client.recv() == (REPLY, (R4B, PUBLIC_PORT))

    run(netns, scenario)


# --------------------------------------------------------------------------- drops


def _bare_binding_request() -> bytes:
    return wire.build_stun_message(wire.STUN_BINDING_REQUEST, [(0x8022, b"agent")])


MALFORMED_STUN = wire.build_stun_message(0x0001)[:-1] + b"\x00\x00"  # length mismatch
BAD_TOKEN = wire.build_binding_request(b"2" + b"0" * 16 + b":cl1e")

CLIENT_DROPS = [
    ("empty", b"", R4, "drop_truncated"),
    ("malformed_stun", MALFORMED_STUN, R4, "drop_stun_malformed"),
    ("short_stun", b"\x00\x01\x00", R4, "drop_stun_malformed"),
    ("no_username", _bare_binding_request(), R4, "drop_stun_no_username"),
    ("bad_token", BAD_TOKEN, R4, "drop_bad_token"),
    ("unknown_transceiver", stun(TID_UNKNOWN), R4, "drop_unknown_transceiver"),
    ("draining", stun(TID_DRAINING), R4, "drop_transceiver_draining"),
    ("unknown_client_dtls", DTLS, R4, "drop_unknown_client"),
    ("unknown_client_other_stun", wire.build_stun_message(0x0101), R4, "drop_unknown_client"),
    ("unknown_client_v6", SRTP, R6, "drop_unknown_client"),
]


@pytest.mark.parametrize(
    ("name", "payload", "relay_host", "counter"), CLIENT_DROPS, ids=[c[0] for c in CLIENT_DROPS]
)
def test_client_drops(netns: str, name: str, payload: bytes, relay_host: str, counter: str) -> None:
    async def scenario() -> None:
        async with world() as w:
            client = w.peer("client", C6 if ":" in relay_host else C4, 50100)
            delta = await w.expect(counter, lambda: client.send(payload, relay_host, PUBLIC_PORT))
            assert delta == {counter: 1}
            assert w.state.session_count() == 0
            w.silent()

    run(netns, scenario)


def test_orphan_session_is_dropped(netns: str) -> None:
    async def scenario() -> None:
        async with world() as w:
            client = w.peer("client", C4, 50101)
            w.state.put_session(C4, 50101, 0x77, R4, PUBLIC_PORT)  # 0x77 is not registered
            delta = await w.expect(
                "drop_orphan_session", lambda: client.send(DTLS, R4, PUBLIC_PORT)
            )
            assert delta == {"drop_orphan_session": 1}
            w.silent()

    run(netns, scenario)


def test_no_tunnel_source_for_the_transceivers_family(netns: str) -> None:
    async def scenario() -> None:
        addrs = RelayAddresses(
            public_port=PUBLIC_PORT,
            tunnel_port=TUNNEL_PORT,
            public_v4=IPv4Address(R4),
            tunnel_v4=IPv4Address(RI4),  # no v6 tunnel address
        )
        async with world(addrs) as w:
            client = w.peer("client", C4, 50102)
            delta = await w.expect(
                "drop_no_tunnel_source", lambda: client.send(stun(TID_T1V6), R4, PUBLIC_PORT)
            )
            assert delta == {"drop_no_tunnel_source": 1}
            assert w.state.session_count() == 0  # as in relay.c: checked before creating
            w.state.put_session(C4, 50102, TID_T1V6, R4, PUBLIC_PORT)
            delta = await w.expect(
                "drop_no_tunnel_source", lambda: client.send(DTLS, R4, PUBLIC_PORT)
            )
            assert delta == {"drop_no_tunnel_source": 1}
            w.silent()

    run(netns, scenario)


TUNNEL_DROPS = [
    # (name, datagram, sender, tunnel host, counter)
    ("short", header(C4, 50200)[:23], "t1", RI4, "drop_tunnel_truncated"),
    ("empty", b"", "t1", RI4, "drop_tunnel_truncated"),
    ("bad_magic", b"XR" + header(C4, 50200)[2:] + REPLY, "t1", RI4, "drop_tunnel_bad_header"),
    ("bad_version", b"SR\x02" + header(C4, 50200)[3:] + REPLY, "t1", RI4, "drop_tunnel_bad_header"),
    ("flags", b"SR\x01\x80" + header(C4, 50200)[4:] + REPLY, "t1", RI4, "drop_tunnel_bad_header"),
    ("unknown_client", header(C4, 59999) + REPLY, "t1", RI4, "drop_reply_unknown_client"),
    ("not_owner", header(C4, 50200) + REPLY, "t2", RI4, "drop_reply_not_owner"),
    ("owner_addr_other_port", header(C4, 50200) + REPLY, "td", RI4, "drop_reply_not_owner"),
    ("owner_over_v6", header(C4, 50200) + REPLY, "t1v6", RI6, "drop_reply_not_owner"),
    ("port_mismatch", header(C4, 50200, 3480) + REPLY, "t1", RI4, "drop_reply_port_mismatch"),
]


@pytest.mark.parametrize(
    ("name", "datagram", "sender", "host", "counter"),
    TUNNEL_DROPS,
    ids=[c[0] for c in TUNNEL_DROPS],
)
def test_tunnel_drops(
    netns: str, name: str, datagram: bytes, sender: str, host: str, counter: str
) -> None:
    async def scenario() -> None:
        async with world() as w:
            client = w.peer("client", C4, 50200)
            await establish(w, client, R4, TID_T1, w.peers["t1"])
            peer = w.peers[sender]
            delta = await w.expect(counter, lambda: peer.send(datagram, host, TUNNEL_PORT))
            assert delta == {counter: 1}
            w.silent()

    run(netns, scenario)


def test_no_public_source_for_a_session_this_relay_cannot_answer(netns: str) -> None:
    """A session recorded on another relay address/port: never sent from a wrong one."""

    async def scenario() -> None:
        async with world() as w:
            w.peer("client", C4, 50201)
            t1 = w.peers["t1"]
            for port, relay_addr, relay_port in (
                (50201, R4B, PUBLIC_PORT),  # an address no socket of ours is bound to
                (50202, R4, 3480),  # another public port
                (50203, R6, PUBLIC_PORT),  # a v6 relay address for a v4 client
            ):
                w.state.put_session(C4, port, TID_T1, relay_addr, relay_port)
                delta = await w.expect(
                    "drop_no_public_source",
                    lambda p=port, rp=relay_port: t1.send(header(C4, p, rp) + REPLY, RI4, 3479),
                )
                assert delta == {"drop_no_public_source": 1}
            w.silent()

    run(netns, scenario)


# --------------------------------------------------------------------------- lifecycle rules


def test_draining_keeps_sessions_but_takes_no_new_ones(netns: str) -> None:
    async def scenario() -> None:
        async with world() as w:
            t1 = w.peers["t1"]
            old = w.peer("old", C4, 50300)
            await establish(w, old, R4, TID_T1, t1)
            w.state.put_transceiver(TID_T1, T1, T1_PORT, TransceiverState.DRAINING)
            old.send(SRTP, R4, PUBLIC_PORT)
            assert (await t1.recv())[0] == header(C4, 50300) + SRTP
            old.send(stun(TID_T1, "consent1"), R4, PUBLIC_PORT)  # consent check: same owner
            assert (await t1.recv())[0] == header(C4, 50300) + stun(TID_T1, "consent1")
            t1.send(header(C4, 50300) + REPLY, RI4, TUNNEL_PORT)
            assert (await old.recv())[0] == REPLY
            new = w.peer("new", C4, 50301)
            delta = await w.expect(
                "drop_transceiver_draining", lambda: new.send(stun(TID_T1), R4, PUBLIC_PORT)
            )
            assert delta == {"drop_transceiver_draining": 1}
            assert w.state.get_session(C4, 50301) is None
            w.silent()

    run(netns, scenario)


def test_reroute_moves_the_client_to_the_new_owner(netns: str) -> None:
    async def scenario() -> None:
        async with world() as w:
            t1, t2 = w.peers["t1"], w.peers["t2"]
            client = w.peer("client", C4, 50400)
            await establish(w, client, R4, TID_T1, t1)
            before = w.relay.counters
            client.send(stun(TID_T2), R4, PUBLIC_PORT)
            assert (await t2.recv())[0] == header(C4, 50400) + stun(TID_T2)
            assert w.delta(before) == {
                "sessions_rerouted": 1,
                "fwd_to_transceiver_packets": 1,
                "fwd_to_transceiver_bytes": len(stun(TID_T2)),
            }
            assert [k for _, k in w.events] == ["created", "rerouted"]
            assert w.events[-1][0].tid == TID_T2
            entry = w.state.get_session(C4, 50400)
            assert entry is not None and entry.tid == TID_T2
            client.send(DTLS, R4, PUBLIC_PORT)
            assert (await t2.recv())[0] == header(C4, 50400) + DTLS
            delta = await w.expect(
                "drop_reply_not_owner",
                lambda: t1.send(header(C4, 50400) + REPLY, RI4, TUNNEL_PORT),
            )
            assert delta == {"drop_reply_not_owner": 1}
            t2.send(header(C4, 50400) + REPLY, RI4, TUNNEL_PORT)
            assert await client.recv() == (REPLY, (R4, PUBLIC_PORT))
            w.silent()

    run(netns, scenario)


def test_reroute_to_a_draining_transceiver_is_refused(netns: str) -> None:
    async def scenario() -> None:
        async with world() as w:
            client = w.peer("client", C4, 50401)
            await establish(w, client, R4, TID_T1, w.peers["t1"])
            delta = await w.expect(
                "drop_transceiver_draining",
                lambda: client.send(stun(TID_DRAINING), R4, PUBLIC_PORT),
            )
            assert delta == {"drop_transceiver_draining": 1}
            assert w.state.get_session(C4, 50401).tid == TID_T1  # type: ignore[union-attr]
            w.silent()

    run(netns, scenario)


# --------------------------------------------------------------------------- recovery


def _recovered(client: str, port: int, tid: int, relay: str = R4) -> SessionEntry:
    now = monotonic_ns()
    return SessionEntry(
        client_addr=ip_address(client),
        client_port=port,
        tid=tid,
        relay_addr=ip_address(relay),
        relay_port=PUBLIC_PORT,
        origin=Origin.XDP,
        created_ns=now,
        last_seen_ns=now,
        packets_to_transceiver=0,
        bytes_to_transceiver=0,
        packets_to_client=0,
        bytes_to_client=0,
    )


class Directory:
    """A stand-in for Redis behind the recover hook: known sessions, calls seen."""

    def __init__(self, known: dict[tuple[str, int], SessionEntry] | None = None) -> None:
        self.known = known or {}
        self.calls: list[tuple[Any, int]] = []
        self.gate: asyncio.Event | None = None
        self.fail = False

    async def __call__(self, addr: Any, port: int) -> SessionEntry | None:
        self.calls.append((addr, port))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise ConnectionError("redis is down")
        return self.known.get((str(addr), port))


def test_recover_an_unknown_client(netns: str) -> None:
    async def scenario() -> None:
        # Recorded via R4B by another relay; this client now talks to R4 on this one.
        directory = Directory({(C4, 50500): _recovered(C4, 50500, TID_T1, relay=R4B)})
        async with world(WILDCARD, recover=directory) as w:
            t1 = w.peers["t1"]
            client = w.peer("client", C4, 50500)
            client.send(DTLS, R4, PUBLIC_PORT)
            assert (await t1.recv())[0] == header(C4, 50500) + DTLS
            assert directory.calls == [(IPv4Address(C4), 50500)]
            entry = w.state.get_session(C4, 50500)
            assert entry is not None
            assert (entry.tid, entry.origin, entry.relay_addr) == (
                TID_T1,
                Origin.REDIS,
                IPv4Address(R4),
            )
            assert w.events == []  # known to Redis already: nothing to report
            client.send(SRTP, R4, PUBLIC_PORT)  # now a known client: no second lookup
            assert (await t1.recv())[0] == header(C4, 50500) + SRTP
            assert len(directory.calls) == 1
            t1.send(header(C4, 50500) + REPLY, RI4, TUNNEL_PORT)
            assert await client.recv() == (REPLY, (R4, PUBLIC_PORT))
            c = w.relay.counters
            assert not any(v for k, v in c.items() if k.startswith("drop_"))

    run(netns, scenario)


def test_recover_for_a_reply_to_an_unknown_client(netns: str) -> None:
    async def scenario() -> None:
        directory = Directory({(C6, 50501): _recovered(C6, 50501, TID_T1, relay=R6)})
        async with world(recover=directory) as w:
            t1 = w.peers["t1"]
            client = w.peer("client", C6, 50501)
            t1.send(header(C6, 50501) + REPLY, RI4, TUNNEL_PORT)
            assert await client.recv() == (REPLY, (R6, PUBLIC_PORT))
            entry = w.state.get_session(C6, 50501)
            assert entry is not None and entry.origin is Origin.REDIS
            assert entry.relay_addr == IPv6Address(R6) and entry.packets_to_client == 1
            # A recovered session is still owner-checked.
            delta = await w.expect(
                "drop_reply_not_owner",
                lambda: w.peers["t2"].send(header(C6, 50501) + REPLY, RI4, TUNNEL_PORT),
            )
            assert delta == {"drop_reply_not_owner": 1}
            w.silent()

    run(netns, scenario)


def test_recover_miss_drops_and_is_not_repeated_at_once(netns: str) -> None:
    async def scenario() -> None:
        directory = Directory()
        async with world(recover=directory) as w:
            client = w.peer("client", C4, 50502)
            delta = await w.expect(
                "drop_unknown_client", lambda: client.send(DTLS, R4, PUBLIC_PORT)
            )
            assert delta == {"drop_unknown_client": 1}
            delta = await w.expect(
                "drop_unknown_client", lambda: client.send(DTLS, R4, PUBLIC_PORT)
            )
            assert delta == {"drop_unknown_client": 1}
            assert len(directory.calls) == 1  # negative answers are remembered briefly
            delta = await w.expect(
                "drop_reply_unknown_client",
                lambda: w.peers["t1"].send(header(C4, 50503) + REPLY, RI4, TUNNEL_PORT),
            )
            assert delta == {"drop_reply_unknown_client": 1}
            w.silent()

    run(netns, scenario)


def test_recover_hook_failure_is_a_miss(netns: str) -> None:
    async def scenario() -> None:
        directory = Directory({(C4, 50504): _recovered(C4, 50504, TID_T1)})
        directory.fail = True
        async with world(recover=directory, recover_negative_ttl=0.0) as w:
            client = w.peer("client", C4, 50504)
            delta = await w.expect(
                "drop_unknown_client", lambda: client.send(DTLS, R4, PUBLIC_PORT)
            )
            assert delta == {"drop_unknown_client": 1}
            directory.fail = False  # Redis is back
            client.send(DTLS, R4, PUBLIC_PORT)
            assert (await w.peers["t1"].recv())[0] == header(C4, 50504) + DTLS

    run(netns, scenario)


def test_packets_wait_for_the_lookup_in_order_and_bounded(netns: str) -> None:
    async def scenario() -> None:
        directory = Directory({(C4, 50505): _recovered(C4, 50505, TID_T1)})
        directory.gate = asyncio.Event()
        async with world(recover=directory) as w:
            t1 = w.peers["t1"]
            client = w.peer("client", C4, 50505)
            for i in range(10):
                client.send(SRTP + bytes([i]), R4, PUBLIC_PORT)
            await w.until("drop_recovery_busy", 2)  # 8 wait, 2 are over the bound
            assert len(directory.calls) == 1
            directory.gate.set()
            got = [(await t1.recv())[0] for _ in range(8)]
            assert got == [header(C4, 50505) + SRTP + bytes([i]) for i in range(8)]
            assert w.relay.counters["drop_recovery_busy"] == 2

    run(netns, scenario)


def test_recovery_times_out(netns: str) -> None:
    async def scenario() -> None:
        directory = Directory({(C4, 50506): _recovered(C4, 50506, TID_T1)})
        directory.gate = asyncio.Event()  # never set: Redis hangs
        async with world(recover=directory, recover_timeout=0.05) as w:
            client = w.peer("client", C4, 50506)
            delta = await w.expect(
                "drop_unknown_client", lambda: client.send(DTLS, R4, PUBLIC_PORT)
            )
            assert delta == {"drop_unknown_client": 1}
            assert w.state.get_session(C4, 50506) is None

    run(netns, scenario)


def test_a_routable_stun_request_is_not_looked_up(netns: str) -> None:
    async def scenario() -> None:
        directory = Directory()
        async with world(recover=directory) as w:
            client = w.peer("client", C4, 50507)
            await establish(w, client, R4, TID_T1, w.peers["t1"])
            delta = await w.expect(
                "drop_unknown_transceiver",
                lambda: w.peer("other", C4, 50508).send(stun(TID_UNKNOWN), R4, PUBLIC_PORT),
            )
            assert delta == {"drop_unknown_transceiver": 1}
            assert directory.calls == []

    run(netns, scenario)


# --------------------------------------------------------------------------- robustness


class _Flaky(MemoryState):
    """A state that fails for one client port: a stand-in for any bug in a handler."""

    def get_session(self, addr: Any, port: int) -> SessionEntry | None:
        if port == 50666:
            raise RuntimeError("boom")
        return super().get_session(addr, port)


def test_a_failing_packet_does_not_stop_the_relay(netns: str) -> None:
    async def scenario() -> None:
        state = _Flaky(64)
        state.put_transceiver(TID_T1, T1, T1_PORT)
        relay = UserspaceRelay(SPECIFIC, state)
        await relay.start()
        t1, bad, good = Peer(T1, T1_PORT), Peer(C4, 50666), Peer(C4, 50667)
        try:
            for _ in range(3):
                bad.send(stun(TID_T1), R4, PUBLIC_PORT)
            good.send(stun(TID_T1), R4, PUBLIC_PORT)
            data, _ = await t1.recv()
            assert data == header(C4, 50667) + stun(TID_T1)
            assert relay.counters["drop_internal"] == 3
        finally:
            await relay.close()
            for p in (t1, bad, good):
                p.close()

    run(netns, scenario)


def test_counters_start_complete_and_at_zero(netns: str) -> None:
    async def scenario() -> None:
        async with world() as w:
            c = w.relay.counters
            assert set(COUNTER_NAMES) <= set(c)
            assert all(v == 0 for v in c.values())
            c["drop_internal"] = 99  # a snapshot, not the live table
            assert w.relay.counters["drop_internal"] == 0

    run(netns, scenario)


# --------------------------------------------------------------------------- start errors


def test_port_in_use_is_a_clear_error(netns: str) -> None:
    async def scenario() -> None:
        blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # even so
        blocker.bind((R4, PUBLIC_PORT))
        try:
            relay = UserspaceRelay(SPECIFIC, MemoryState(4))
            with pytest.raises(RelayError, match=r"198\.51\.100\.1:3478.*already in use"):
                await relay.start()
            await relay.close()
        finally:
            blocker.close()
        relay = UserspaceRelay(SPECIFIC, MemoryState(4))  # and nothing was left bound
        await relay.start()
        await relay.close()

    run(netns, scenario)


def test_address_not_local_is_a_clear_error(netns: str) -> None:
    async def scenario() -> None:
        addrs = RelayAddresses(
            public_v4=IPv4Address(R4), tunnel_v4=IPv4Address(NOT_LOCAL), tunnel_port=TUNNEL_PORT
        )
        relay = UserspaceRelay(addrs, MemoryState(4))
        with pytest.raises(RelayError, match=r"192\.0\.2\.99 is not an address of this host"):
            await relay.start()
        relay = UserspaceRelay(SPECIFIC, MemoryState(4))  # the public socket was released
        await relay.start()
        await relay.close()

    run(netns, scenario)


def test_sockets_bound_ahead_are_the_ones_it_relays_on(netns: str) -> None:
    """The daemon binds first (to fail before touching anything) and starts later."""

    async def scenario() -> None:
        bound = bind_sockets(SPECIFIC)
        ports = sorted(s.getsockname()[:2] for s in bound.all())
        with pytest.raises(RelayError, match="already in use"):  # they are held
            bind_sockets(SPECIFIC)
        state = MemoryState(16)
        state.put_transceiver(TID_T1, T1, T1_PORT)
        relay = UserspaceRelay(SPECIFIC, state, sockets=bound)
        t1, client = Peer(T1, T1_PORT), Peer(C4, 40000)
        try:
            await relay.start()
            assert sorted(s.getsockname()[:2] for s in relay._sockets) == ports
            client.send(stun(TID_T1), R4, PUBLIC_PORT)
            data, _ = await t1.recv()
            assert data == header(C4, 40000) + stun(TID_T1)
        finally:
            await relay.close()
            t1.close()
            client.close()
        assert all(s.fileno() == -1 for s in bound.all())  # the relay closed them
        unused = bind_sockets(SPECIFIC)  # never started: close() still releases them
        await UserspaceRelay(SPECIFIC, MemoryState(4), sockets=unused).close()
        bind_sockets(SPECIFIC).close()

    run(netns, scenario)


def test_no_public_address_is_a_clear_error(netns: str) -> None:
    async def scenario() -> None:
        relay = UserspaceRelay(RelayAddresses(tunnel_v4=IPv4Address(RI4)), MemoryState(4))
        with pytest.raises(RelayError, match="no public address"):
            await relay.start()

    run(netns, scenario)


def test_bind_error_messages() -> None:
    addr = IPv4Address(R4)
    denied = _bind_message("the public address 198.51.100.1:80", addr, OSError(errno.EACCES, "x"))
    assert denied == (
        "cannot bind the public address 198.51.100.1:80: permission denied "
        "(ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    )
    assert "\n" not in denied
    other = _bind_message("the tunnel address x", addr, OSError(errno.ENODEV, "No such device"))
    assert other == "cannot bind the tunnel address x: No such device"
