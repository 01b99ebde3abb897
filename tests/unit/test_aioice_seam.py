"""Pins of the aioice/aiortc internals that transceiver/mux.py's seam relies on.

The seam writes private attributes of aioice's Connection and stands in for
its StunProtocol. A release that renames or reshapes any of that would not
fail at import: calls would silently stop connecting. So every internal the
seam touches is checked here, by name, and a failure says which internal
changed and where the seam uses it. When one fails after an upgrade, read the
new aioice/aiortc source for that internal and port transceiver/mux.py (and
SEAM_VERSIONS) before changing the pin.

The behavioural tests run a real aiortc client against a real Worker over
loopback, through a ten-line relay built on ctl/wire.py.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
from collections.abc import Awaitable, Callable
from importlib import metadata
from ipaddress import ip_address
from typing import Any

import aioice
import aiortc
import pytest
from aioice import Candidate, Connection, stun
from aioice.ice import StunProtocol
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcicetransport import RTCIceGatherer, RTCIceTransport

from ctl import wire
from transceiver import mux as mux_mod
from transceiver.mux import MuxProtocol, SeamError, TunnelMux, attach, check_versions
from transceiver.worker import Worker, WorkerConfig

PUBLIC = [("198.51.100.1", 3478)]
TOKEN = wire.make_server_ufrag(0x2A, "seamTEST")


def pin(ok: bool, internal: str, use: str) -> None:
    """Fail with a message naming the internal, and what the seam does with it."""
    if not ok:
        pytest.fail(
            f"aioice/aiortc internal changed: {internal}. The ICE seam in "
            f"transceiver/mux.py {use}. Port the seam to the new release before "
            f"changing the pinned versions.",
            pytrace=False,
        )


def params(func: Any) -> list[str]:
    return [p for p in inspect.signature(func).parameters if p != "self"]


def run(coro_fn: Callable[[], Awaitable[Any]], timeout: float = 30) -> Any:
    return asyncio.run(asyncio.wait_for(coro_fn(), timeout))


# ---------------------------------------------------------------------- versions


def test_pinned_versions() -> None:
    for dist, want in mux_mod.SEAM_VERSIONS.items():
        have = metadata.version(dist)
        pin(have == want, f"{dist} version is {have}, the seam is built for {want}", "pins it")
    pin(aioice.__version__ == "0.13.0", "aioice.__version__", "is built for 0.13.0")
    pin(aiortc.__version__ == "1.16.0", "aiortc.__version__", "is built for 1.16.0")
    check_versions()


def test_check_versions_refuses_another_release(monkeypatch: pytest.MonkeyPatch) -> None:
    real = metadata.version
    monkeypatch.setattr(
        mux_mod.metadata, "version", lambda d: "0.14.0" if d == "aioice" else real(d)
    )
    with pytest.raises(SeamError, match=r"aioice 0\.14\.0 is installed.*built for aioice 0\.13\.0"):
        check_versions()


# ---------------------------------------------------------------------- aioice Connection


def test_connection_private_state_the_seam_writes() -> None:
    async def body() -> None:
        conn = Connection(ice_controlling=False)
        for name, kind in (
            ("_local_username", str),
            ("_local_candidates", list),
            ("_local_candidates_start", bool),
            ("_local_candidates_end", bool),
            ("_protocols", list),
            ("_components", set),
        ):
            pin(
                isinstance(getattr(conn, name, None), kind),
                f"aioice.Connection.{name} ({kind.__name__})",
                "writes it in attach()",
            )
        pin(conn._components == {1}, "Connection() default components", "expects one")
        conn._local_username = "probeUfrag"
        pin(
            conn.local_username == "probeUfrag",
            "Connection.local_username no longer reads _local_username",
            "sets the routing-token ufrag through _local_username",
        )
        marker = Candidate("f", 1, "udp", 1, "192.0.2.1", 9, "host")
        conn._local_candidates = [marker]
        pin(
            conn.local_candidates == [marker],
            "Connection.local_candidates no longer reads _local_candidates",
            "replaces gathering by filling _local_candidates",
        )

    run(body)


def test_gather_candidates_is_skipped_once_the_seam_filled_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pin(
        "if not self._local_candidates_start" in inspect.getsource(Connection.gather_candidates),
        "Connection.gather_candidates() no longer guards on _local_candidates_start",
        "sets _local_candidates_start so aiortc's gather() opens no socket",
    )

    async def no_sockets(*args: Any, **kwargs: Any) -> list[Candidate]:
        raise AssertionError("gathering ran: it would bind sockets on every local address")

    async def body() -> None:
        monkeypatch.setattr(Connection, "get_component_candidates", no_sockets)
        mux = TunnelMux([("127.0.0.1", 9)])
        conn = Connection(ice_controlling=False)
        link = attach(conn, mux, TOKEN, PUBLIC)
        await conn.gather_candidates()
        assert conn.local_username == TOKEN
        assert [(c.host, c.port, c.type) for c in conn.local_candidates] == [
            ("198.51.100.1", 3478, "host")
        ]
        assert conn._protocols == link.protocols
        assert mux.has_ufrag(TOKEN)
        with pytest.raises(SeamError, match="already gathered"):
            attach(conn, mux, TOKEN, PUBLIC)
        await conn.close()  # closes the MuxProtocols, which unregister the session
        assert not mux.has_ufrag(TOKEN) and link.closed

    run(body)


def test_connection_calls_only_what_mux_protocol_implements() -> None:
    """Every `protocol.<x>` the Connection uses outside gathering exists on MuxProtocol."""
    skip = {"gather_candidates", "get_component_candidates"}  # replaced by the seam
    used: set[str] = set()
    for name, member in inspect.getmembers(Connection, inspect.isfunction):
        if name in skip:
            continue
        source = inspect.getsource(member)
        used |= set(re.findall(r"\bprotocol\.(\w+)", source))
    pin(bool(used), "no protocol usage found in aioice.ice.Connection", "cannot be checked")
    missing = {attr for attr in used if not hasattr(MuxProtocol, attr)} - {"local_candidate"}
    pin(
        not missing,
        f"aioice.Connection now uses protocol attributes {sorted(missing)}",
        "implements the protocol interface in MuxProtocol",
    )
    pin(
        used <= {"local_candidate", "request", "send_stun", "send_data", "close"},
        f"aioice.Connection protocol usage is now {sorted(used)}",
        "implements local_candidate/request/send_stun/send_data/close",
    )


def test_mux_protocol_signatures_match_stun_protocol() -> None:
    for name in ("request", "send_stun", "send_data", "close", "datagram_received"):
        pin(
            params(getattr(StunProtocol, name)) == params(getattr(MuxProtocol, name)),
            f"aioice StunProtocol.{name}{inspect.signature(getattr(StunProtocol, name))}",
            f"mirrors it in MuxProtocol.{name}",
        )
        pin(
            inspect.iscoroutinefunction(getattr(StunProtocol, name))
            == inspect.iscoroutinefunction(getattr(MuxProtocol, name)),
            f"aioice StunProtocol.{name} sync/async",
            f"mirrors it in MuxProtocol.{name}",
        )


def test_connection_callbacks_the_protocol_calls() -> None:
    for name, expected in (
        ("request_received", ["message", "addr", "protocol"]),
        ("data_received", ["data", "component"]),
        ("protocol_lost", ["protocol"]),
    ):
        pin(
            params(getattr(Connection, name, None) or (lambda: None)) == expected,
            f"aioice Connection.{name}({', '.join(expected)})",
            "calls it from MuxProtocol to deliver packets",
        )


def test_stun_transaction_the_seam_reuses() -> None:
    pin(
        params(stun.Transaction.__init__)[:5]
        == ["request", "addr", "protocol", "retransmissions", "integrity_key"],
        f"aioice.stun.Transaction{inspect.signature(stun.Transaction.__init__)}",
        "creates one per STUN request, as StunProtocol.request does",
    )
    for name in ("run", "response_received"):
        pin(hasattr(stun.Transaction, name), f"stun.Transaction.{name}", "calls it")
    pin(
        (stun.RETRY_RTO, stun.RETRY_MAX) == (0.5, 6),
        "aioice.stun.RETRY_RTO/RETRY_MAX",
        "derives the wait-for-heard timeout from them",
    )
    assert mux_mod.transaction_timeout(None) == 63.5
    assert mux_mod.transaction_timeout(0) == 0.5
    for name in ("parse_message", "TransactionTimeout", "Message", "Class", "Method"):
        pin(hasattr(stun, name), f"aioice.stun.{name}", "uses it")
    pin(
        params(stun.Message.check_message_integrity) == ["key"],
        "stun.Message.check_message_integrity(key)",
        "authenticates a client's first request with it",
    )


# ---------------------------------------------------------------------- aiortc


def test_aiortc_reaches_the_connection_the_way_the_seam_expects() -> None:
    pin(
        "self._connection.gather_candidates()" in inspect.getsource(RTCIceGatherer.gather),
        "RTCIceGatherer.gather() no longer calls _connection.gather_candidates()",
        "relies on that call being a no-op after attach()",
    )
    pin(
        "Connection(" in inspect.getsource(RTCIceGatherer.__init__)
        and "components" not in inspect.getsource(RTCIceGatherer.__init__),
        "RTCIceGatherer now creates its Connection with explicit components",
        "expects a single component",
    )
    pin(
        "self._connection = gatherer._connection" in inspect.getsource(RTCIceTransport.__init__),
        "RTCIceTransport._connection",
        "reaches the aioice Connection through it",
    )
    source = inspect.getsource(RTCPeerConnection)
    pin(
        "iceGatherer.getLocalCandidates()" in source,
        "RTCPeerConnection.__connect() no longer starts ICE when local candidates exist",
        "provides local candidates without gathering",
    )
    pin(
        "await self.__gather()" in inspect.getsource(RTCPeerConnection.setLocalDescription),
        "RTCPeerConnection.setLocalDescription() gathering",
        "attaches between setRemoteDescription() and setLocalDescription()",
    )


def test_aiortc_peer_connection_exposes_one_bundled_transport(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After setRemoteDescription of a bundled offer, everything shares one ICE transport."""
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])

    async def body() -> None:
        client = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        client.addTransceiver("audio")
        client.createDataChannel("oai-events")
        await client.setLocalDescription(await client.createOffer())
        server = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        await server.setRemoteDescription(client.localDescription)
        transports = {t.receiver.transport.transport for t in server.getTransceivers()}
        transports.add(server.sctp.transport.transport)
        pin(len(transports) == 1, "aiortc BUNDLE handling", "attaches to the one ICE transport")
        ice = transports.pop()
        pin(
            isinstance(ice._connection, Connection) and not ice._connection._local_candidates_start,
            "RTCIceTransport._connection before setLocalDescription()",
            "attaches to an ungathered aioice Connection",
        )
        await server.close()
        await client.close()

    run(body)


# ---------------------------------------------------------------------- behaviour


class MiniRelay:
    """The relay's forwarding rule and nothing else, on loopback, with the shared codec."""

    def __init__(self) -> None:
        self.worker: tuple[str, int] | None = None
        self.public: asyncio.DatagramTransport | None = None
        self.tunnel: asyncio.DatagramTransport | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        relay = self

        class Public(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
                header = wire.TunnelHeader(ip_address(addr[0]), addr[1], relay.public_port)
                if relay.worker is not None and relay.tunnel is not None:
                    relay.tunnel.sendto(wire.encap(header, data), relay.worker)

        class Tunnel(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
                header, payload = wire.decap(data)
                assert relay.public is not None
                relay.public.sendto(payload, (str(header.client_addr), header.client_port))

        self.public, _ = await loop.create_datagram_endpoint(Public, local_addr=("127.0.0.1", 0))
        self.tunnel, _ = await loop.create_datagram_endpoint(Tunnel, local_addr=("127.0.0.1", 0))

    @property
    def public_port(self) -> int:
        assert self.public is not None
        return int(self.public.get_extra_info("sockname")[1])

    @property
    def tunnel_addr(self) -> tuple[str, int]:
        assert self.tunnel is not None
        host, port = self.tunnel.get_extra_info("sockname")[:2]
        return host, port

    def close(self) -> None:
        for transport in (self.public, self.tunnel):
            if transport is not None:
                transport.close()


def test_a_real_client_connects_through_the_seam(monkeypatch: pytest.MonkeyPatch) -> None:
    """ICE + DTLS + data channel through the mux; aioice never learns a signalled address."""
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])

    async def body() -> None:
        relay = MiniRelay()
        await relay.start()
        public = ("127.0.0.1", relay.public_port)
        worker = Worker(WorkerConfig(0x2A, "127.0.0.1", 0, [relay.tunnel_addr], [public], 4))
        await worker.start()
        relay.worker = worker.tunnel_address
        client = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        client.addTransceiver("audio")
        channel = client.createDataChannel("oai-events")
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        channel.on("message", lambda m: events.put_nowait(json.loads(m)))
        await client.setLocalDescription(await client.createOffer())
        assert "a=candidate:" in client.localDescription.sdp
        call_id, answer = await worker.create_call(client.localDescription.sdp)

        session = worker._sessions[call_id]
        conn = session._link.connection if session._link else None
        assert conn is not None and conn.local_username == session.ufrag
        assert conn.remote_candidates == [], "the offer's candidates must not reach aioice"
        assert f"a=ice-ufrag:{session.ufrag}" in answer
        assert wire.parse_server_ufrag(session.ufrag) == 0x2A

        await client.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        created = await asyncio.wait_for(events.get(), 10)
        assert created["type"] == "session.created" and created["session"]["id"] == call_id
        assert client.connectionState == "connected"
        assert [c.type for c in conn.remote_candidates] == ["prflx"]
        assert all(p.protocol.local_candidate.port == public[1] for p in conn._nominated.values())
        assert worker.mux is not None and worker.mux.counters["dropped_unheard_client"] == 0

        assert await worker.end_call(call_id)
        assert worker.mux.endpoint_count == 0 and worker.mux.client_count == 0
        await client.close()
        await worker.stop(0)
        relay.close()

    run(body)


def test_the_answer_offers_only_the_relays_public_addresses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """a=candidate lines: exactly the configured relay v4 and v6 addresses, never the machine's.

    The client's offer carries its own host candidate, and the machine has
    addresses of its own; neither may leak into the answer (no host, srflx or
    relay candidate of the transceiver), and the ufrag must carry the routing
    token, or the relay could not route the client's first check.
    """
    machine = set(aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True))
    machine |= {"127.0.0.1", "::1"}
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])
    tid = 0x5EA1
    public = [("198.51.100.1", 3478), ("2001:db8:c::1", 3479)]

    async def body() -> tuple[str, str]:
        worker = Worker(WorkerConfig(tid, "127.0.0.1", 0, [("127.0.0.1", 9)], public, 4))
        await worker.start()
        client = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        client.addTransceiver("audio")
        client.createDataChannel("oai-events")
        await client.setLocalDescription(await client.createOffer())
        offer = client.localDescription.sdp
        try:
            call_id, answer = await worker.create_call(offer)
            assert await worker.end_call(call_id)
        finally:
            await client.close()
            await worker.stop(0)
        return offer, answer

    offer, answer = run(body)
    assert "a=candidate:" in offer and "127.0.0.1" in offer, "the client did gather"
    lines = answer.splitlines()
    candidates = [Candidate.from_sdp(x[len("a=") :]) for x in lines if x.startswith("a=candidate:")]
    assert candidates, answer
    want = sorted((str(ip_address(h)), p) for h, p in public)
    sections = answer.split("\r\nm=")[1:]
    assert len(sections) == 2, answer  # audio and the data channel, bundled
    for section in sections:
        found = [
            Candidate.from_sdp(x[len("a=") :])
            for x in section.splitlines()
            if x.startswith("a=candidate:")
        ]
        assert sorted((str(ip_address(c.host)), c.port) for c in found) == want, section
    for c in candidates:
        assert (c.type, c.transport.lower(), c.component) == ("host", "udp", 1), c.to_sdp()
        assert c.related_address is None and c.related_port is None, c.to_sdp()
    # Nothing of the machine anywhere in the answer (candidates, c= lines, a=rtcp).
    for line in lines:
        leaked = machine.intersection(line.replace("=", " ").split())
        assert not leaked, f"the answer leaks the machine's {leaked}: {line!r}"
    for typ in ("srflx", "relay", "prflx"):
        assert f"typ {typ}" not in answer
    ufrags = {x.split(":", 1)[1] for x in lines if x.startswith("a=ice-ufrag:")}
    assert len(ufrags) == 1, ufrags
    (ufrag,) = ufrags
    assert ufrag.startswith(wire.TOKEN_VERSION + f"{tid:08x}") and len(ufrag) == wire.TOKEN_LEN
    assert wire.parse_server_ufrag(ufrag) == tid


def test_checks_toward_unheard_addresses_wait_then_time_out() -> None:
    async def body() -> None:
        mux = TunnelMux([("127.0.0.1", 9)])
        await mux.start("127.0.0.1", 0)
        conn = Connection(ice_controlling=False)
        link = attach(conn, mux, TOKEN, PUBLIC)
        protocol = link.protocols[0]
        request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(stun.TransactionTimeout):
            await protocol.request(request, ("198.51.100.10", 5000), retransmissions=0)
        assert 0.4 < loop.time() - started < 2.0
        assert mux.counters["tx_packets"] == 0 and mux.counters["dropped_unheard_client"] == 0
        assert protocol.transactions == {}

        # A waiting check is released (not failed) when the link closes meanwhile.
        waiting = asyncio.ensure_future(
            protocol.request(
                stun.Message(stun.Method.BINDING, stun.Class.REQUEST), ("198.51.100.10", 5000)
            )
        )
        await asyncio.sleep(0.05)
        link.close()
        with pytest.raises(stun.TransactionTimeout):
            await waiting
        mux.close()

    run(body)
