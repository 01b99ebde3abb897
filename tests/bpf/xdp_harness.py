"""A harness that runs crafted packets through the relay's XDP program.

The program is compiled once per test session, with its maps pinned in a
private directory. Packets go through bpf_prog_test_run as if they arrived on
an interface of a private network namespace that holds the relay's addresses,
routes and static neighbours, so bpf_fib_lookup resolves real next hops and
the output packets carry real MAC addresses. Expected packets are built with
scapy, an independent implementation of the headers and checksums.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from ctl import wire
from ctl.bpfsys import prog_test_run, xdp_md
from ctl.layout import SessionEvent, TransceiverState
from ctl.loader import RelayProgram, remove_pins
from ctl.maps import RelayAddresses, RelayMaps
from ctl.netns import in_netns

# One namespace per test process, so concurrent runs never tear down each other's.
NETNS = f"srt-xdp-harness-{os.getpid()}"

# The relay: a public interface toward clients and an inside one toward transceivers.
PUB_IF, DC_IF = "pub0", "dc0"
PUB_MAC, DC_MAC = "02:00:00:00:01:01", "02:00:00:00:02:01"
RELAY_V4, RELAY_V6 = "198.51.100.1", "2001:db8:c::1"
TUNNEL_V4, TUNNEL_V6 = "203.0.113.1", "2001:db8:1::1"
PUBLIC_PORT, TUNNEL_PORT = 3478, 3479

# Hosts the relay reaches (static neighbours, so no ARP is needed).
CLIENT_V4, CLIENT_V6, CLIENT_MAC = "198.51.100.10", "2001:db8:c::10", "02:00:00:00:00:10"
T1_V4, T1_V6, T1_MAC = "203.0.113.11", "2001:db8:1::11", "02:00:00:00:00:11"
T2_V4, T2_MAC = "203.0.113.12", "02:00:00:00:00:12"
T_NO_NEIGH_V4 = "203.0.113.13"  # on link, but no neighbour entry: FIB says NO_NEIGH
T_NO_ROUTE_V4 = "192.0.2.20"  # no route at all: FIB says NOT_FWDED
CLIENT_NO_ROUTE_V4 = "192.0.2.30"  # a client the relay has no route back to
CLIENT_NARROW_V4 = "198.51.100.20"  # behind a route whose MTU is locked at NARROW_MTU
NARROW_MTU = 1280
LINK_MTU = 1500  # every veth in the namespace

# Transceiver ids.
TID_T1, TID_T2, TID_DRAINING, TID_T1_V6, TID_NO_NEIGH = 0xA001, 0xA002, 0xA003, 0xA006, 0xA00D
TID_NO_ROUTE = 0xA00E
TID_UNKNOWN = 0xDEAD0001


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def setup_netns() -> None:
    """The relay's side of the world in a private namespace (idempotent)."""
    teardown_netns()
    _ip("netns", "add", NETNS)
    n = ["-n", NETNS]
    for name, mac in ((PUB_IF, PUB_MAC), (DC_IF, DC_MAC)):
        _ip(*n, "link", "add", name, "address", mac, "type", "veth", "peer", "name", name + "p")
        _ip(*n, "link", "set", name + "p", "up")
        _ip(*n, "link", "set", name, "up")
    _ip(*n, "link", "set", "lo", "up")
    for dev, v4, v6 in ((PUB_IF, RELAY_V4, RELAY_V6), (DC_IF, TUNNEL_V4, TUNNEL_V6)):
        _ip(*n, "addr", "add", f"{v4}/24", "dev", dev)
        _ip(*n, "-6", "addr", "add", f"{v6}/64", "dev", dev, "nodad")
    neighbours = (
        (PUB_IF, CLIENT_V4, CLIENT_MAC),
        (PUB_IF, CLIENT_V6, CLIENT_MAC),
        (DC_IF, T1_V4, T1_MAC),
        (DC_IF, T1_V6, T1_MAC),
        (DC_IF, T2_V4, T2_MAC),
        (PUB_IF, CLIENT_NARROW_V4, CLIENT_MAC),
    )
    for dev, addr, mac in neighbours:
        _ip(*n, "neigh", "replace", addr, "lladdr", mac, "dev", dev, "nud", "permanent")
    # A path with a smaller MTU than the link's; "lock" makes the FIB report it.
    _ip(*n, "route", "add", f"{CLIENT_NARROW_V4}/32", "dev", PUB_IF, "mtu", "lock", str(NARROW_MTU))
    # bpf_fib_lookup in forwarding mode needs forwarding on the ingress device.
    for key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):
        subprocess.run(
            ["ip", "netns", "exec", NETNS, "sysctl", "-qw", f"{key}=1"],
            check=True,
            capture_output=True,
        )


def teardown_netns() -> None:
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)


@dataclass
class Result:
    """What the program did with one packet."""

    verdict: int
    packet: bytes
    counters: dict[str, int]  # deltas of the non-zero counters


class XdpHarness:
    """The loaded program, its maps, and a way to run packets through it."""

    def __init__(self, pin_dir: Path) -> None:
        self.pin_dir = pin_dir
        self.program = RelayProgram(pin_dir).load()
        self.maps = RelayMaps(pin_dir)
        with in_netns(NETNS):
            from ctl.xdp import ifindex

            self.ifindex = {PUB_IF: ifindex(PUB_IF), DC_IF: ifindex(DC_IF)}
        # The one consumer of the event ring: reset() empties it, so events
        # from earlier tests never fill it up (which would count events_lost).
        self.events: list[SessionEvent] = []
        self.program.open_events(self.events.append)

    def reset(self) -> None:
        """The standard state: addresses, six transceivers, no sessions, zero counters,
        an empty event ring."""
        self.maps.set_addresses(
            RelayAddresses(
                public_port=PUBLIC_PORT,
                tunnel_port=TUNNEL_PORT,
                public_v4=ipaddress.IPv4Address(RELAY_V4),
                public_v6=ipaddress.IPv6Address(RELAY_V6),
                tunnel_v4=ipaddress.IPv4Address(TUNNEL_V4),
                tunnel_v6=ipaddress.IPv6Address(TUNNEL_V6),
            )
        )
        self.maps.transceivers.clear()
        self.maps.put_transceiver(TID_T1, T1_V4, 4001)
        self.maps.put_transceiver(TID_T2, T2_V4, 4002)
        self.maps.put_transceiver(TID_DRAINING, T1_V4, 4003, TransceiverState.DRAINING)
        self.maps.put_transceiver(TID_T1_V6, T1_V6, 4006)
        self.maps.put_transceiver(TID_NO_NEIGH, T_NO_NEIGH_V4, 4013)
        self.maps.put_transceiver(TID_NO_ROUTE, T_NO_ROUTE_V4, 4014)
        self.maps.flush_sessions()
        self.maps.reset_counters()
        self.drain_events()

    def drain_events(self) -> list[SessionEvent]:
        """Consume every event waiting in the ring; return them."""
        self.program.poll_events(0)
        out, self.events[:] = list(self.events), []
        return out

    def run(self, packet: bytes, ingress: str = PUB_IF) -> Result:
        """Run one frame as if it arrived on `ingress`; report verdict, output, counters."""
        before = self.maps.counters_snapshot()
        with in_netns(NETNS):
            res = prog_test_run(
                self.program.prog_fd,
                packet,
                ctx=xdp_md(ingress_ifindex=self.ifindex[ingress], data_len=len(packet)),
            )
        after = self.maps.counters_snapshot()
        delta = {k: after[k] - before[k] for k in after if after[k] != before[k]}
        return Result(res.retval, res.data, delta)

    def run_quiet(self, packet: bytes, ingress: str = PUB_IF) -> int:
        """Run one frame for its side effects only (no counter snapshots); the verdict."""
        with in_netns(NETNS):
            return prog_test_run(
                self.program.prog_fd,
                packet,
                ctx=xdp_md(ingress_ifindex=self.ifindex[ingress], data_len=len(packet)),
            ).retval

    def fill_event_ring(self) -> None:
        """Create sessions, with nobody consuming events, until the ring is full."""
        port = 1
        while self.maps.counters_snapshot()["events_lost"] == 0:
            for _ in range(512):
                self.run_quiet(client_frame(binding_request(TID_T1), port=port))
                port += 1
            assert port < 60000, "the event ring never filled up"

    def close(self) -> None:
        self.maps.close()
        self.program.close()
        remove_pins(self.pin_dir)


# ----------------------------------------------------------------- packet builders


def token_ufrag(tid: int, random_part: str = "AbCd+/12") -> str:
    return wire.make_server_ufrag(tid, random_part)


def binding_request(tid: int | None = None, username: bytes | None = None) -> bytes:
    """A STUN Binding Request whose USERNAME routes to tid."""
    if username is None:
        assert tid is not None
        username = f"{token_ufrag(tid)}:cl1e".encode()
    return wire.build_binding_request(username, transaction_id=b"\x01" * 12)


def tunnel_header(client: str, client_port: int, relay_port: int = PUBLIC_PORT) -> bytes:
    """Version-1 tunnel header, built by hand (independent of ctl.wire)."""
    addr = ipaddress.ip_address(client)
    mapped = addr.packed if addr.version == 6 else b"\0" * 10 + b"\xff\xff" + addr.packed
    return b"SR\x01\x00" + client_port.to_bytes(2, "big") + relay_port.to_bytes(2, "big") + mapped


def l3(src: str, dst: str, **kw: object) -> IP | IPv6:
    """An IPv4 or IPv6 header, by the address family."""
    if ipaddress.ip_address(src).version == 6:
        return IPv6(src=src, dst=dst, **kw)
    return IP(src=src, dst=dst, **kw)


def client_frame(payload: bytes, client: str = CLIENT_V4, port: int = 50000, **ip: object) -> bytes:
    """A client's datagram to the relay's public port."""
    dst = RELAY_V6 if ":" in client else RELAY_V4
    return bytes(
        Ether(src=CLIENT_MAC, dst=PUB_MAC)
        / l3(client, dst, **ip)
        / UDP(sport=port, dport=PUBLIC_PORT)
        / Raw(payload)
    )


def tunnel_frame(
    payload: bytes,
    client: str = CLIENT_V4,
    client_port: int = 50000,
    src: str = T1_V4,
    sport: int = 4001,
    relay_port: int = PUBLIC_PORT,
) -> bytes:
    """A transceiver's tunnel datagram to the relay."""
    dst = TUNNEL_V6 if ":" in src else TUNNEL_V4
    return bytes(
        Ether(src=T1_MAC, dst=DC_MAC)
        / l3(src, dst)
        / UDP(sport=sport, dport=TUNNEL_PORT)
        / Raw(tunnel_header(client, client_port, relay_port) + payload)
    )


def expected_encap(
    payload: bytes,
    t_addr: str,
    t_port: int,
    t_mac: str,
    client: str = CLIENT_V4,
    client_port: int = 50000,
    tos: int = 0,
    src_mac: str = DC_MAC,
) -> bytes:
    """What the relay must emit toward a transceiver (out of dc0 unless src_mac says)."""
    src = TUNNEL_V6 if ":" in t_addr else TUNNEL_V4
    ip = (
        IPv6(src=src, dst=t_addr, hlim=64, tc=tos)
        if ":" in t_addr
        else IP(src=src, dst=t_addr, ttl=64, flags="DF", id=0, tos=tos)
    )
    return bytes(
        Ether(src=src_mac, dst=t_mac)
        / ip
        / UDP(sport=TUNNEL_PORT, dport=t_port)
        / Raw(tunnel_header(client, client_port) + payload)
    )


def expected_decap(payload: bytes, client: str = CLIENT_V4, client_port: int = 50000) -> bytes:
    """What the relay must emit toward a client."""
    src = RELAY_V6 if ":" in client else RELAY_V4
    ip = (
        IPv6(src=src, dst=client, hlim=64)
        if ":" in client
        else IP(src=src, dst=client, ttl=64, flags="DF", id=0)
    )
    return bytes(
        Ether(src=PUB_MAC, dst=CLIENT_MAC)
        / ip
        / UDP(sport=PUBLIC_PORT, dport=client_port)
        / Raw(payload)
    )
