"""The relay daemon end to end, the same suite on every data path.

`relayctl run` runs in the testbed's relay namespace with native XDP, with
generic XDP, and with the userspace path alone (`--no-xdp`). Real sockets in
the client and transceiver namespaces check that calls flow both ways, that
each drop rule holds (nothing is delivered, and the reason is counted), that
idle sessions expire, and that the metrics equal what the maps hold.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctl import wire
from ctl.testbed import Testbed

from .relay_process import (
    PATHS,
    PUBLIC_PORT,
    PUBLIC_V4,
    PUBLIC_V6,
    TID_TX1,
    TID_TX3,
    TUNNEL_PORT,
    TUNNEL_V4,
    TX1,
    TX2,
    RelayProcess,
    metric_sum,
    quiet,
    stun,
    udp,
)


@pytest.fixture(scope="module", params=list(PATHS))
def relay(request: pytest.FixtureRequest, testbed: Testbed) -> Iterator[RelayProcess]:
    pin_dir = Path(tempfile.mkdtemp(prefix="splitrelay-e2e-", dir="/sys/fs/bpf"))
    pin_dir.rmdir()  # the daemon creates it
    proc = RelayProcess(testbed, request.param, pin_dir)
    proc.start(["--idle-timeout", "2"])
    # TID_TX3 exists but drains: it keeps sessions, gets no new ones
    res = proc.cli("transceivers", "add", f"{TID_TX3:x}", f"{TX1[0]}:4003", "--draining")
    assert res.returncode == 0, res.stderr
    try:
        yield proc
    finally:
        proc.cleanup()


@pytest.fixture
def tx1(testbed: Testbed) -> Iterator[socket.socket]:
    sock = udp(testbed, "tx1", TX1)
    yield sock
    sock.close()


@pytest.fixture
def tx2(testbed: Testbed) -> Iterator[socket.socket]:
    sock = udp(testbed, "tx2", TX2)
    yield sock
    sock.close()


@pytest.fixture
def client(testbed: Testbed) -> Iterator[socket.socket]:
    sock = udp(testbed, "c1", ("198.51.100.11", 0))
    yield sock
    sock.close()


def establish(
    client: socket.socket,
    tx: socket.socket,
    tid: int = TID_TX1,
    relay: tuple[str, int] = (PUBLIC_V4, PUBLIC_PORT),
) -> wire.TunnelHeader:
    """The client's STUN request opens the session; returns the tunnel header T saw."""
    request = stun(tid)
    client.sendto(request, relay)
    data, src = tx.recvfrom(4096)
    assert src[1] == TUNNEL_PORT
    header, payload = wire.decap(data)
    assert payload == request
    return header


def drops(relay: RelayProcess, reason: str) -> float:
    return metric_sum(relay.scrape(), "splitrelay_relay_drops_total", reason=reason)


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_call_flows_both_ways(
    relay: RelayProcess, testbed: Testbed, tx1: socket.socket, family: str
) -> None:
    client_addr, public = (
        ("198.51.100.11", PUBLIC_V4) if family == "v4" else ("2001:db8:c::11", PUBLIC_V6)
    )
    client = udp(testbed, "c1", (client_addr, 0))
    try:
        header = establish(client, tx1, relay=(public, PUBLIC_PORT))
        assert (str(header.client_addr), header.client_port) == client.getsockname()[:2]
        for i in range(10):
            rtp = bytes([0x80, 111]) + i.to_bytes(2, "big") + b"x" * 40
            client.sendto(rtp, (public, PUBLIC_PORT))
            data, src = tx1.recvfrom(4096)
            assert wire.decap(data)[1] == rtp
            tx1.sendto(wire.encap(header, b"back" + rtp), src[:2])
            back, back_src = client.recvfrom(4096)
            assert (back, back_src[:2]) == (b"back" + rtp, (public, PUBLIC_PORT))
        sessions = relay.cli_json("sessions", "ls")
        mine = [s for s in sessions if s["client"].endswith(f":{client.getsockname()[1]}")]
        assert len(mine) == 1 and int(mine[0]["transceiver"], 16) == TID_TX1
    finally:
        client.close()


def test_userspace_session_goes_to_the_fast_path(
    relay: RelayProcess, testbed: Testbed, client: socket.socket, tx1: socket.socket
) -> None:
    """A session the userspace path creates is in the kernel map: XDP carries the rest.

    On the userspace-only path the same traffic must never touch XDP.
    """
    subprocess.run(["ip", "-n", testbed.netns("relay1"), "neigh", "flush", "all"], check=True)
    created = "splitrelay_relay_sessions_created_total"
    packets = "splitrelay_relay_packets_total"
    before = relay.scrape()
    establish(client, tx1)  # no neighbour: XDP passes it up, userspace forwards
    mid = relay.scrape()
    assert metric_sum(mid, created, path="userspace") == (
        metric_sum(before, created, path="userspace") + 1
    )
    for _ in range(5):
        client.sendto(b"\x80" * 20, (PUBLIC_V4, PUBLIC_PORT))
        tx1.recvfrom(4096)
    after = relay.scrape()
    xdp_delta = metric_sum(after, packets, path="xdp", direction="to_transceiver") - metric_sum(
        mid, packets, path="xdp", direction="to_transceiver"
    )
    assert xdp_delta == (0 if relay.path == "userspace" else 5)


CLIENT_RULES = {
    "stun_malformed": lambda: (lambda m: m[:4] + b"\0\0\0\0" + m[8:])(stun(TID_TX1)),
    "stun_no_username": lambda: wire.build_stun_message(0x0001, [(0x8028, b"\0\0\0\0")]),
    "bad_token": lambda: wire.build_binding_request(b"1ZZZZZZZZabcdefgh:abcd"),
    "unknown_transceiver": lambda: stun(0xDEAD),
    "transceiver_draining": lambda: stun(TID_TX3),
    "unknown_client": lambda: b"\x16\xfe\xfd" + b"\0" * 30,
}


@pytest.mark.parametrize("reason", sorted(CLIENT_RULES))
def test_client_drop_rules(
    relay: RelayProcess,
    client: socket.socket,
    tx1: socket.socket,
    tx2: socket.socket,
    reason: str,
) -> None:
    before = drops(relay, reason)
    client.sendto(CLIENT_RULES[reason](), (PUBLIC_V4, PUBLIC_PORT))
    assert quiet(tx1) and quiet(tx2, 0.05), "a dropped packet reached a transceiver"
    assert drops(relay, reason) == before + 1


def test_reply_rules(
    relay: RelayProcess,
    testbed: Testbed,
    client: socket.socket,
    tx1: socket.socket,
    tx2: socket.socket,
) -> None:
    header = establish(client, tx1)
    relay_tunnel = (TUNNEL_V4, TUNNEL_PORT)
    cases = [
        ("reply_not_owner", tx2, wire.encap(header, b"hijack")),
        ("tunnel_bad_header", tx1, b"XX" + wire.encap(header, b"x")[2:]),
        ("tunnel_truncated", tx1, wire.encap(header, b"")[:20]),
        ("reply_port_mismatch", tx1, wire.encap(
            wire.TunnelHeader(header.client_addr, header.client_port, 9999), b"x")),
        ("reply_unknown_client", tx1, wire.encap(
            wire.TunnelHeader(header.client_addr, 1, PUBLIC_PORT), b"x")),
    ]  # fmt: skip
    for reason, sender, datagram in cases:
        before = drops(relay, reason)
        sender.sendto(datagram, relay_tunnel)
        assert quiet(client), f"{reason}: the client got a packet"
        assert drops(relay, reason) == before + 1, reason
    # and the owner still gets through
    tx1.sendto(wire.encap(header, b"ok"), relay_tunnel)
    assert client.recvfrom(4096)[0] == b"ok"


def test_draining_transceiver_keeps_its_sessions(
    relay: RelayProcess, client: socket.socket, tx1: socket.socket
) -> None:
    establish(client, tx1)
    assert relay.cli("transceivers", "drain", f"{TID_TX1:x}").returncode == 0
    try:
        client.sendto(b"\x80established", (PUBLIC_V4, PUBLIC_PORT))
        assert wire.decap(tx1.recvfrom(4096)[0])[1] == b"\x80established"
    finally:
        res = relay.cli("transceivers", "add", f"{TID_TX1:x}", f"{TX1[0]}:{TX1[1]}")
        assert res.returncode == 0, res.stderr


def test_idle_session_expires(
    relay: RelayProcess, client: socket.socket, tx1: socket.socket
) -> None:
    establish(client, tx1)
    port = client.getsockname()[1]
    show = relay.cli("sessions", "show", f"198.51.100.11:{port}")
    assert show.returncode == 0, show.stderr
    deadline = time.monotonic() + 6  # idle timeout 2 s, sweep every second
    while time.monotonic() < deadline:
        if relay.cli("sessions", "show", f"198.51.100.11:{port}").returncode != 0:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the idle session did not expire")
    samples = relay.scrape()
    assert metric_sum(samples, "splitrelay_relay_sessions_expired_total") >= 1


def test_metrics_equal_the_maps(
    relay: RelayProcess, client: socket.socket, tx1: socket.socket
) -> None:
    header = establish(client, tx1)
    for _ in range(7):
        client.sendto(b"\x80" * 30, (PUBLIC_V4, PUBLIC_PORT))
        tx1.recvfrom(4096)
        tx1.sendto(wire.encap(header, b"y" * 11), (TUNNEL_V4, TUNNEL_PORT))
        client.recvfrom(4096)
    samples = relay.scrape()
    stats = relay.cli_json("stats")
    flat = stats["forwarded"]  # type: ignore[index]
    assert (
        metric_sum(samples, "splitrelay_relay_packets_total", path="xdp", direction="to_client")
        == flat["to_client_packets"]
    )
    assert (
        metric_sum(samples, "splitrelay_relay_bytes_total", path="xdp", direction="to_transceiver")
        == flat["to_transceiver_bytes"]
    )
    total_to_client = metric_sum(samples, "splitrelay_relay_packets_total", direction="to_client")
    assert total_to_client >= 7
    sessions = relay.cli_json("sessions", "ls")
    assert metric_sum(samples, "splitrelay_relay_sessions") == len(sessions)  # type: ignore[arg-type]
    mine = [s for s in sessions if s["client"].endswith(f":{client.getsockname()[1]}")]  # type: ignore[index]
    assert mine[0]["packets_to_client"] == 7
