"""TunnelMux in direct mode (no relay): raw client datagrams, same admission and ownership.

Direct mode exists so the benchmark can compare call setup with and without
the relay hop on the same worker code; these tests pin that it keeps the
mux's rules: only an authenticated Binding Request admits a client, only the
owner's packets reach it, and replies go straight back without a header.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ctl import wire
from transceiver.mux import TunnelMux
from transceiver.worker import WorkerConfig

from .test_mux import DTLS, UFRAG_A, UFRAG_B, FakeEndpoint, UdpPeer, binding_request, run


class Client(UdpPeer):
    """A client socket on loopback that talks to the mux directly."""

    def send(self, mux: TunnelMux, payload: bytes) -> None:
        assert self.transport is not None and mux.local_address is not None
        self.transport.sendto(payload, mux.local_address)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def _until(cond: Any, timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def test_direct_mode_admits_by_ufrag_and_replies_without_a_header() -> None:
    async def body() -> None:
        a, b = FakeEndpoint(UFRAG_A), FakeEndpoint(UFRAG_B)
        mux = TunnelMux([], direct=True)
        await mux.start("127.0.0.1", 0)
        mux.register(a)
        mux.register(b)
        client = await Client.open()
        try:
            client.send(mux, DTLS)  # unknown client, not a Binding Request: dropped
            await asyncio.sleep(0.05)
            assert mux.counters["dropped_unknown_client"] == 1 and not a.received

            request = binding_request(UFRAG_A)
            client.send(mux, request)
            await _until(lambda: len(a.received) == 1)
            assert a.received[0] == (request, client.addr)
            assert a.heard == [client.addr] and mux.owner(client.addr) is a

            client.send(mux, DTLS)  # a known client: media goes to its owner as is
            await _until(lambda: len(a.received) == 2)
            assert a.received[1] == (DTLS, client.addr) and not b.received

            assert mux.sendto(a, b"reply", client.addr)
            assert await asyncio.wait_for(client.inbox.get(), 2) == b"reply"
            assert not mux.sendto(b, b"not yours", client.addr)
            assert mux.counters["dropped_not_owner"] == 1
        finally:
            client.close()
            mux.close()

    run(body)


def test_direct_mode_refuses_a_forged_first_request() -> None:
    async def body() -> None:
        a = FakeEndpoint(UFRAG_A, accept=False)
        mux = TunnelMux([], direct=True)
        await mux.start("127.0.0.1", 0)
        mux.register(a)
        client = await Client.open()
        try:
            client.send(mux, binding_request(UFRAG_A))
            await _until(lambda: mux.counters["dropped_unauthenticated"] == 1)
            assert mux.owner(client.addr) is None and not a.received
            client.send(mux, wire.build_binding_request(b"nosuchufrag:x"))
            await _until(lambda: mux.counters["dropped_unmatched_ufrag"] == 1)
        finally:
            client.close()
            mux.close()

    run(body)


def test_direct_and_relays_do_not_mix() -> None:
    with pytest.raises(ValueError, match="no relay"):
        TunnelMux([("127.0.0.1", 3479)], direct=True)
    with pytest.raises(ValueError, match="at least one relay"):
        TunnelMux([])
    base = {
        "transceiver_id": 0x10,
        "tunnel_host": "127.0.0.1",
        "tunnel_port": 4000,
        "public_candidates": [("127.0.0.1", 4000)],
        "max_calls": 2,
    }
    assert WorkerConfig(relays=[], direct=True, **base).direct
    with pytest.raises(ValueError, match="no relay"):
        WorkerConfig(relays=[("127.0.0.1", 3479)], direct=True, **base)
    with pytest.raises(ValueError, match="no relay tunnel address"):
        WorkerConfig(relays=[], **base)
