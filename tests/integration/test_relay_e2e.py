"""The relay daemon end to end, the same suite on every data path.

`relayctl run` runs in the testbed's relay namespace with native XDP, with
generic XDP, and with the userspace path alone (`--no-xdp`). Real sockets in
the client and transceiver namespaces check that the path asked for is the
one in use, that calls flow both ways, that each drop rule of the userspace
path holds on every path (nothing is delivered, and the reason is counted),
that fragments and IP options take the slow path and still arrive, that idle
sessions expire, and that the metrics equal the exact traffic sent and what
`relayctl stats` and the maps hold.

Drop reasons not exercised here, and where they are: `no_tunnel_source`,
`recovery_busy` and `internal` need a relay configuration or a failing hook
this fixture does not have (tests/integration/test_userspace.py covers them).
"""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctl import wire
from ctl.netns import in_netns
from ctl.testbed import Testbed
from ctl.xdp import info

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
    RelayProcess,
    establish,
    metric_sum,
    quiet,
    scrape_until,
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
    want = metric_sum(before, created, path="userspace") + 1
    mid = scrape_until(relay, lambda s: metric_sum(s, created, path="userspace") >= want)
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


def _overrun_length(message: bytes) -> bytes:
    """A STUN message whose header claims 40 bytes more than the datagram holds."""
    return message[:2] + (int.from_bytes(message[2:4], "big") + 40).to_bytes(2, "big") + message[4:]


def _overrun_attribute() -> bytes:
    """A Binding Request whose USERNAME length runs past the end of the message."""
    m = stun(TID_TX1)
    return m[:22] + (200).to_bytes(2, "big") + m[24:]


# (reason counted, payload): every rule of the userspace path a client can trigger
CLIENT_RULES = {
    "truncated-empty": ("truncated", lambda: b""),
    "stun_malformed-cookie": (
        "stun_malformed",
        lambda: (lambda m: m[:4] + b"\0\0\0\0" + m[8:])(stun(TID_TX1)),
    ),
    "stun_malformed-length-overrun": ("stun_malformed", lambda: _overrun_length(stun(TID_TX1))),
    "stun_malformed-attribute-overrun": ("stun_malformed", _overrun_attribute),
    "stun_no_username": (
        "stun_no_username",
        lambda: wire.build_stun_message(0x0001, [(0x8028, b"\0\0\0\0")]),
    ),
    "bad_token": ("bad_token", lambda: wire.build_binding_request(b"1ZZZZZZZZabcdefgh:abcd")),
    "bad_token-client-ufrag": (
        "bad_token",
        lambda: wire.build_binding_request(f"{wire.make_server_ufrag(TID_TX1)}:ab".encode()),
    ),
    "unknown_transceiver": ("unknown_transceiver", lambda: stun(0xDEAD)),
    "transceiver_draining": ("transceiver_draining", lambda: stun(TID_TX3)),
    "unknown_client": ("unknown_client", lambda: b"\x16\xfe\xfd" + b"\0" * 30),
}


@pytest.mark.parametrize("case", sorted(CLIENT_RULES))
def test_client_drop_rules(
    relay: RelayProcess,
    client: socket.socket,
    tx1: socket.socket,
    tx2: socket.socket,
    case: str,
) -> None:
    reason, payload = CLIENT_RULES[case]
    before = drops(relay, reason)
    client.sendto(payload(), (PUBLIC_V4, PUBLIC_PORT))
    assert quiet(tx1) and quiet(tx2, 0.05), "a dropped packet reached a transceiver"
    assert drops(relay, reason) == before + 1


def test_orphan_session(relay: RelayProcess, client: socket.socket, tx1: socket.socket) -> None:
    """A session whose transceiver left the registry: its packets go nowhere."""
    tid = 0x77
    port = client.getsockname()[1]
    assert relay.cli("transceivers", "add", f"{tid:x}", f"{TX1[0]}:{TX1[1]}").returncode == 0
    res = relay.cli(
        "sessions", "add", f"198.51.100.11:{port}", "--transceiver", f"{tid:x}",
        "--relay", f"{PUBLIC_V4}:{PUBLIC_PORT}",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert relay.cli("transceivers", "rm", f"{tid:x}").returncode == 0
    before = drops(relay, "orphan_session")
    client.sendto(b"\x80orphan", (PUBLIC_V4, PUBLIC_PORT))
    assert quiet(tx1)
    assert drops(relay, "orphan_session") == before + 1
    assert relay.cli("sessions", "rm", f"198.51.100.11:{port}").returncode == 0


def test_send_failed(relay: RelayProcess, client: socket.socket) -> None:
    """A transceiver the relay host has no route to: the kernel refuses the send."""
    tid = 0x78
    unroutable = "192.0.2.78"  # TEST-NET-1: the relay namespace has no route there
    assert relay.cli("transceivers", "add", f"{tid:x}", f"{unroutable}:4001").returncode == 0
    try:
        before = drops(relay, "send_failed")
        client.sendto(stun(tid), (PUBLIC_V4, PUBLIC_PORT))
        deadline = time.monotonic() + 2
        while drops(relay, "send_failed") == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert drops(relay, "send_failed") == before + 1
    finally:
        assert relay.cli("transceivers", "rm", f"{tid:x}").returncode == 0
        relay.cli("sessions", "rm", f"198.51.100.11:{client.getsockname()[1]}")


def test_no_public_source(relay: RelayProcess, client: socket.socket, tx1: socket.socket) -> None:
    """A session whose relay address:port is not this relay's: nobody answers from it.

    The XDP program passes the reply up (`pass_foreign_relay`) rather than send
    from an address the relay does not serve; userspace has no socket there and
    drops it, so every path ends in the same counted drop.
    """
    port = client.getsockname()[1]
    res = relay.cli(
        "sessions", "add", f"198.51.100.11:{port}", "--transceiver", f"{TID_TX1:x}",
        "--relay", f"{PUBLIC_V4}:3470",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    header = wire.TunnelHeader(ipaddress.ip_address("198.51.100.11"), port, 3470)
    before = drops(relay, "no_public_source")
    tx1.sendto(wire.encap(header, b"nowhere"), (TUNNEL_V4, TUNNEL_PORT))
    assert quiet(client)
    assert drops(relay, "no_public_source") == before + 1
    assert relay.cli("sessions", "rm", f"198.51.100.11:{port}").returncode == 0


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


def test_metrics_equal_the_traffic_and_the_maps(
    relay: RelayProcess, client: socket.socket, tx1: socket.socket
) -> None:
    """Exact packet and byte counts for known traffic, per path, in metrics and in stats."""
    packets, octets = "splitrelay_relay_packets_total", "splitrelay_relay_bytes_total"
    request = stun(TID_TX1)  # every request has this length (fixed-length ufrags)
    before = relay.scrape()
    header = establish(client, tx1)
    for _ in range(7):
        client.sendto(b"\x80" * 30, (PUBLIC_V4, PUBLIC_PORT))
        tx1.recvfrom(4096)
        tx1.sendto(wire.encap(header, b"y" * 11), (TUNNEL_V4, TUNNEL_PORT))
        client.recvfrom(4096)
    expected = {
        (packets, "to_transceiver"): 1 + 7,
        (octets, "to_transceiver"): len(request) + 7 * 30,
        (packets, "to_client"): 7,
        (octets, "to_client"): 7 * 11,
    }

    def delta(name: str, **labels: str) -> float:
        return metric_sum(samples, name, **labels) - metric_sum(before, name, **labels)

    # The userspace path counts a packet right after its send returns, so a scrape
    # may beat the last increment by a moment: wait for the counts (then exact).
    deadline = time.monotonic() + 3
    while True:
        samples = relay.scrape()
        done = all(delta(n, direction=d) == v for (n, d), v in expected.items())
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for (name, direction), value in expected.items():
        assert delta(name, direction=direction) == value, (name, direction)
        if relay.path == "userspace":  # XDP is not attached: it must not count anything
            assert delta(name, path="xdp", direction=direction) == 0, (name, direction)
            assert delta(name, path="userspace", direction=direction) == value

    # `relayctl stats` shows the same numbers: the kernel's at once, the userspace
    # path's from the run state the daemon refreshes every second.
    def forwarded(path: str) -> dict[str, float]:
        return {
            f"{d}_{m}": metric_sum(samples, f"splitrelay_relay_{m}_total", path=path, direction=d)
            for d in ("to_transceiver", "to_client")
            for m in ("packets", "bytes")
        }

    deadline = time.monotonic() + 5
    while True:
        stats = relay.cli_json("stats")
        assert stats["daemon"]["state"] == "running"  # type: ignore[index]
        if stats["userspace"]["forwarded"] == forwarded("userspace"):  # type: ignore[index]
            break
        assert time.monotonic() < deadline, (stats["userspace"], forwarded("userspace"))  # type: ignore[index]
        time.sleep(0.2)
    assert stats["xdp"]["forwarded"] == forwarded("xdp")  # type: ignore[index]
    text = relay.cli("stats").stdout
    assert "[userspace] counters of daemon pid" in text
    assert ("XDP not in use" in text) == (relay.path == "userspace")

    sessions = relay.cli_json("sessions", "ls")
    assert metric_sum(samples, "splitrelay_relay_sessions") == len(sessions)  # type: ignore[arg-type]
    mine = [s for s in sessions if s["client"].endswith(f":{client.getsockname()[1]}")]  # type: ignore[index]
    assert mine[0]["packets_to_client"] == 7
    assert mine[0]["packets_to_transceiver"] == 8


def test_the_attach_mode_is_the_one_asked_for(relay: RelayProcess, testbed: Testbed) -> None:
    """native runs native, generic runs generic, --no-xdp runs nothing: in the kernel too."""
    daemon = relay.cli_json("status")["daemon"]  # type: ignore[index]
    with in_netns(testbed.netns("relay1")):
        live = {name: info(name).mode for name in ("pub0", "dc0")}
    attached = relay.scrape()
    if relay.path == "userspace":
        assert daemon["xdp"] is False and daemon["interfaces"] == {}
        assert daemon["fallback_reason"] == "XDP disabled by --no-xdp"
        assert live == {"pub0": None, "dc0": None}
        assert metric_sum(attached, "splitrelay_relay_xdp_attached") == 0
    else:
        assert daemon["xdp"] is True and daemon["fallback_reason"] is None
        assert daemon["interfaces"] == {"pub0": relay.path, "dc0": relay.path}
        assert live == {"pub0": relay.path, "dc0": relay.path}
        gauge = "splitrelay_relay_xdp_attached"
        for name in ("pub0", "dc0"):
            assert metric_sum(attached, gauge, interface=name, mode=relay.path) == 1


def _passes(relay: RelayProcess, reason: str) -> float:
    return metric_sum(relay.scrape(), "splitrelay_relay_xdp_passes_total", reason=reason)


def test_fragments_take_the_slow_path_and_arrive(
    relay: RelayProcess, client: socket.socket, tx1: socket.socket
) -> None:
    """XDP passes IP fragments up; the kernel reassembles them and userspace relays."""
    establish(client, tx1)
    before = _passes(relay, "ip_fragment")
    big = b"\x80" + bytes(range(256)) * 12  # 3073 bytes: three fragments on a 1500 MTU
    client.sendto(big, (PUBLIC_V4, PUBLIC_PORT))
    data, _ = tx1.recvfrom(65536)
    assert wire.decap(data)[1] == big
    passed = _passes(relay, "ip_fragment") - before
    assert passed == (0 if relay.path == "userspace" else 3)


def test_ip_options_take_the_slow_path_and_arrive(
    relay: RelayProcess, testbed: Testbed, tx1: socket.socket
) -> None:
    """XDP passes packets with IP options up; userspace relays them like any other."""
    client = udp(testbed, "c1", ("198.51.100.11", 0))
    try:
        establish(client, tx1)
        client.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, b"\x01\x01\x01\x00")  # NOPs
        before = _passes(relay, "ip_options")
        client.sendto(b"\x80with-options", (PUBLIC_V4, PUBLIC_PORT))
        data, _ = tx1.recvfrom(4096)
        assert wire.decap(data)[1] == b"\x80with-options"
        assert _passes(relay, "ip_options") - before == (0 if relay.path == "userspace" else 1)
    finally:
        client.close()
