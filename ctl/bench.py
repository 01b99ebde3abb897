"""`make bench`: packets per second through the XDP relay, next to an XDP ceiling.

One run measures several forwarding *paths* with the same generator, the same
frames, the same sink and the same measurement window, and prints delivered
packets per second and each path's ratio to the ceiling:

* ``ceiling``: bpf/ceiling.c in native mode, the least an XDP forwarder can do
  (rewrite both MACs, redirect). relay / ceiling is the cost of the relay's logic.
* ``relay-native``: bpf/relay.c in native (driver) mode, every packet on the
  established-session fast path (encapsulate, FIB lookup, redirect toward T).
* ``relay-generic``: the same program in generic (skb) mode.

A path is an object with ``name``, ``mode``, ``setup()``, ``teardown()`` and
``counts()``; adding one (the userspace relay) is one more entry in ``PATHS``.

Method, and why:

* Topology: the namespace testbed (prefix ``srbench``: 1 client, 1 relay,
  1 transceiver), torn down at the end, on errors and on Ctrl-C.
* Generator: trafgen transmits on ``relay1-pub``, the switch-side veth peer of the
  relay's ``pub0``, so no bridge sits in front of the relay. Every frame is the
  same static Ethernet/IPv4/UDP frame from the client 198.51.100.11:40000 to the
  relay's public 198.51.100.1:3478 with an RTP-like voice payload (first byte
  0x80) and valid IPv4 and UDP checksums, computed here once: the relay updates
  the UDP checksum incrementally, so a wrong one would stay wrong. Bounded by
  ``--num`` (packet count) and coreutils ``timeout`` (time); we also stop it
  ourselves right after the window.
* One core does it all: trafgen pins its single worker to CPU 0, and the receive
  path runs there too, because a frame sent into a veth is processed by the
  peer's NAPI poll in softirq on the sending CPU, right after the send. So
  delivered pps is what one core does when it both generates and forwards, and
  the generator's cost is in every path's number alike, which compresses the
  ratios toward 1. Two more columns do not depend on the shared part:
  ``+ns/pkt`` = 1/pps - 1/pps_ceiling, the CPU a path costs per packet over the
  ceiling, and ``rx ns/pkt`` = the softirq share of CPU 0 over the window (from
  /proc/stat, tick-sampled, so an estimate good to a few percent) times the
  window per delivered packet: the CPU the receive path alone (veth receive,
  XDP program, redirect, the sink's XDP_DROP) spends per packet. Their ratio
  (``ratios_rx_cpu`` in the JSON) is what a core doing nothing but forwarding
  would give. It also stays right when other load takes CPU time away.
  Why not give the receive path its own CPU (threaded NAPI on pub0, pinned to
  CPU 1)? We tried: trafgen was then the bottleneck at about 0.7 of the
  single-core rate (its CPU saturated while the NAPI thread stayed ~15% idle),
  so every path would have measured the generator; with 2 cores there is no
  third one for a second generator.
* trafgen's TX ring is limited to 128 frames (``-S 256KiB``): trafgen treats a
  full socket send buffer (EAGAIN) as fatal, and with the default 256 frames
  the zero-copy skbs in flight can exceed the default send buffer whenever the
  veth ring backs up. With 128 frames in flight they never do, and the
  generator simply waits for the receiver (closed loop), so offered ~ delivered
  is expected and a gap between them means frames were lost on the way.
* Session: the client is installed as an established session (put_session) and
  the transceiver 203.0.113.11:4001 registered, so every packet takes the fast
  path; the next hop's neighbour entry is installed permanently (the sink drops
  ARP replies, and a benchmark must not depend on neighbour timers).
* Sink: the xdp_pass on ``relay1-dc`` (the peer of the relay's dc0, where the
  redirect lands) is replaced by a counting XDP_DROP program (per-CPU packets and
  bytes) in native mode, so delivered packets are counted where they arrive,
  with no bridge or socket after them. Delivered pps = sink delta over the window
  (``--warmup`` s after the start, then ``--duration`` s), the same for every path.
* Checks per window: the path's own forwarded count (relay:
  fwd_to_transceiver_packets; ceiling: its packet counter) matches the sink,
  nothing was passed or dropped by the relay, the sink saw frames of the
  expected length (the relay adds the 24-byte tunnel header), the generator
  was still running at the end of the window, and its CPU was never idle
  (trafgen busy-waits, so idle time would mean the method's premise broke).
* Native versus generic on veth: a veth runs "native" XDP on frames that arrive
  as skbs (as the generator's do) by copying each into a page first, so native
  mode saves less here than on a NIC driver, where it skips the skb altogether.
  The numbers compare the relay's modes on this testbed, not on hardware.
* ``--repeat N`` interleaves the paths N times and reports the median of each
  quantity, so a slow drift (other load on the machine) hits all paths alike.
"""

from __future__ import annotations

import abc
import contextlib
import ipaddress
import json
import math
import os
import platform
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import click
from pyroute2 import IPRoute

from ctl import layout, wire, xdp
from ctl.loader import CEILING_SOURCE, RelayProgram, remove_pins
from ctl.maps import RelayAddresses, RelayMaps
from ctl.netns import in_netns, popen_in
from ctl.testbed import Testbed

PREFIX = "srbench"
RELAY_HOST, CLIENT_HOST, TRANSCEIVER_HOST = "relay1", "c1", "tx1"
CLIENT_PORT = 40000
PUBLIC_PORT = 3478
TUNNEL_PORT = 3479
TRANSCEIVER_PORT = 4001
TRANSCEIVER_ID = 0x11
RESULTS_FILE = layout.BPF_DIR.parent / "bench-results" / "xdp.json"

RTP_HEADER_LEN = 12
MIN_PAYLOAD = RTP_HEADER_LEN
# The encapsulated datagram must fit a 1500-byte MTU: IPv4 + UDP + tunnel + payload.
MAX_PAYLOAD = 1500 - 20 - 8 - wire.TUNNEL_HEADER_LEN

TRAFGEN_RING = "256KiB"  # 128 frames of 2 KiB in flight at most: see the docstring
GENERATOR_MAX_PPS = 10_000_000  # the packet-count bound assumes no faster generator
STOP_GRACE_S = 5.0
GENERATOR_CPU = 0  # trafgen pins its worker i to CPU i; with one worker, CPU 0
MAX_IDLE_SHARE = 0.05
NUD_PERMANENT = 0x80

_SINK_SRC = """
BPF_PERCPU_ARRAY(sink_stats, u64, 2);

int xdp_sink(struct xdp_md *ctx)
{
    u32 k = 0;
    u64 *n = sink_stats.lookup(&k);
    if (n)
        *n += 1;
    k = 1;
    n = sink_stats.lookup(&k);
    if (n)
        *n += ctx->data_end - ctx->data;
    return XDP_DROP;
}
"""


class BenchError(RuntimeError):
    """The benchmark could not run or measured nonsense; the message says which."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered like Ctrl-C so the same cleanup runs."""


# --------------------------------------------------------------------------- frames


@dataclass(frozen=True)
class FrameSpec:
    """Addresses and payload size of the one frame the generator repeats."""

    src_mac: str
    dst_mac: str
    src_ip: str
    dst_ip: str
    src_port: int
    dst_port: int
    payload_size: int = 160


def inet_checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum of data (odd length padded with a zero byte)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def voice_payload(size: int) -> bytes:
    """An RTP-like voice packet: version 2 (first byte 0x80), Opus payload type.

    The first byte >= 4 is what sends it down the relay's non-STUN path; the rest
    is constant filler, since the relay never reads the payload.
    """
    if not MIN_PAYLOAD <= size <= MAX_PAYLOAD:
        raise ValueError(f"payload size {size} outside {MIN_PAYLOAD}..{MAX_PAYLOAD}")
    header = struct.pack("!BBHII", 0x80, 111, 1, 960, 0x5EED5EED)
    return header + bytes((i * 7) & 0xFF for i in range(size - len(header)))


def _mac(text: str) -> bytes:
    raw = bytes.fromhex(text.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"bad MAC address {text!r}")
    return raw


def build_frame(spec: FrameSpec) -> bytes:
    """Ethernet + IPv4 (DF, TTL 64) + UDP + voice payload, both checksums valid."""
    src = ipaddress.IPv4Address(spec.src_ip).packed
    dst = ipaddress.IPv4Address(spec.dst_ip).packed
    payload = voice_payload(spec.payload_size)
    udp_len = 8 + len(payload)
    pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_UDP, udp_len)
    udp = struct.pack("!HHHH", spec.src_port, spec.dst_port, udp_len, 0) + payload
    udp_sum = inet_checksum(pseudo + udp) or 0xFFFF  # 0 would mean "no checksum"
    udp = udp[:6] + struct.pack("!H", udp_sum) + udp[8:]
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, 0x4000, 64, socket.IPPROTO_UDP, 0, src, dst
    )
    ip = ip[:10] + struct.pack("!H", inet_checksum(ip)) + ip[12:]
    return _mac(spec.dst_mac) + _mac(spec.src_mac) + b"\x08\x00" + ip + udp


def trafgen_packet(frame: bytes) -> str:
    """trafgen's configuration syntax for one static frame."""
    return "{ " + ", ".join(f"0x{b:02x}" for b in frame) + " }\n"


def mac_list(mac: str) -> str:
    """A MAC as the comma-separated byte list bpf/ceiling.c takes in its -D flags."""
    return ",".join(f"0x{b:02x}" for b in _mac(mac))


# --------------------------------------------------------------------------- topology


@dataclass(frozen=True)
class Topology:
    """Names and addresses the benchmark needs, taken from Testbed.describe()."""

    relay_ns: str
    switch_ns: str
    pub_if: str
    dc_if: str
    gen_port: str  # switch-side peer of pub_if: the generator transmits here
    sink_port: str  # switch-side peer of dc_if: the sink counts here
    client_ip: str
    client_mac: str
    public_ip: str
    public_mac: str
    tunnel_ip: str
    dc_mac: str
    transceiver_ip: str
    transceiver_mac: str

    @classmethod
    def from_describe(cls, desc: dict[str, Any]) -> Topology:
        """Read the plan of a 1-client, 1-relay, 1-transceiver testbed."""
        hosts = desc["hosts"]
        relay, client, tx = hosts[RELAY_HOST], hosts[CLIENT_HOST], hosts[TRANSCEIVER_HOST]
        pub = relay["interfaces"][relay["public"]["interface"]]
        dc = relay["interfaces"][relay["tunnel"]["interface"]]
        return cls(
            relay_ns=relay["netns"],
            switch_ns=desc["switch"]["netns"],
            pub_if=relay["public"]["interface"],
            dc_if=relay["tunnel"]["interface"],
            gen_port=pub["switch_port"],
            sink_port=dc["switch_port"],
            client_ip=client["ipv4"],
            client_mac=client["interfaces"]["eth0"]["mac"],
            public_ip=relay["public"]["ipv4"],
            public_mac=pub["mac"],
            tunnel_ip=relay["tunnel"]["ipv4"],
            dc_mac=dc["mac"],
            transceiver_ip=tx["ipv4"],
            transceiver_mac=tx["interfaces"]["eth0"]["mac"],
        )

    def frame_spec(self, payload_size: int) -> FrameSpec:
        """The client's voice frame to the relay's public address."""
        return FrameSpec(
            src_mac=self.client_mac,
            dst_mac=self.public_mac,
            src_ip=self.client_ip,
            dst_ip=self.public_ip,
            src_port=CLIENT_PORT,
            dst_port=PUBLIC_PORT,
            payload_size=payload_size,
        )


# --------------------------------------------------------------------------- generator


def trafgen_argv(dev: str, conf: Path, num: int, limit_s: float) -> list[str]:
    """trafgen bounded by packet count (--num) and time (coreutils timeout).

    One worker (trafgen pins it to CPU 0), a 128-frame TX ring (see the module
    docstring), and no changes to system socket memory or IRQ affinity.
    """
    return [
        "timeout",
        "-s",
        "INT",
        "-k",
        "2",
        f"{limit_s:.1f}",
        "trafgen",
        "--dev",
        dev,
        "--in",
        str(conf),
        "--num",
        str(num),
        "--cpus",
        "1",
        "--ring-size",
        TRAFGEN_RING,
        "--no-sock-mem",
        "--notouch-irq",
        "--no-cpu-stats",
    ]


def packet_bound(seconds: float, max_pps: int = GENERATOR_MAX_PPS) -> int:
    """The --num bound: more than any generator here can send in `seconds`."""
    return math.ceil(max_pps * seconds)


def parse_trafgen_sent(output: str) -> int | None:
    """The "N packets outgoing" trafgen prints when it stops, or None."""
    found = re.findall(r"(\d+) packets outgoing", output)
    return int(found[-1]) if found else None


class Trafgen:
    """One bounded trafgen run in the switch namespace."""

    def __init__(self, netns: str, dev: str, conf: Path, seconds: float) -> None:
        self.argv = trafgen_argv(dev, conf, packet_bound(seconds), seconds)
        self.netns = netns
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        """Start sending; returns at once."""
        self.proc = popen_in(
            self.netns,
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def running(self) -> bool:
        """True while trafgen is still sending."""
        return self.proc is not None and self.proc.poll() is None

    def cpu_ticks(self) -> int:
        """CPU time (clock ticks) of the whole process tree: timeout, trafgen, its worker.

        The worker's system time includes the softirq work done on its CPU while
        it runs, so this over the CPU's ticks is the share the generator and the
        inline receive path got; less than all of it means other load ran there.
        """
        if self.proc is None:
            return 0
        return sum(process_ticks(pid) for pid in process_tree(self.proc.pid))

    def stop(self) -> int | None:
        """Stop it (SIGINT, which timeout forwards) and return what it says it sent."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            # timeout leads its own process group, trafgen included: kill all of it.
            with contextlib.suppress(ProcessLookupError):
                if os.getpgid(proc.pid) == proc.pid:
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.kill()
            out, _ = proc.communicate()
        return parse_trafgen_sent(out or "")


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (those that still exist)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return found


def parse_stat_ticks(stat: str) -> int:
    """utime + stime (clock ticks) from the text of /proc/<pid>/stat."""
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def process_ticks(pid: int) -> int:
    """utime + stime of one process, 0 if it is gone."""
    try:
        return parse_stat_ticks(Path(f"/proc/{pid}/stat").read_text())
    except OSError:
        return 0


# --------------------------------------------------------------------------- sink


class Sink:
    """A counting XDP_DROP program on the switch port the relay redirects into."""

    def __init__(self, switch_ns: str, port: str) -> None:
        from bcc import BPF  # imported here: only a real run needs bcc

        self.switch_ns = switch_ns
        self.port = port
        self._bpf = BPF(text=_SINK_SRC.encode())
        self._fn = self._bpf.load_func(b"xdp_sink", BPF.XDP)
        self._stats = self._bpf[b"sink_stats"]

    def attach(self) -> None:
        """Replace the port's xdp_pass (native mode: the redirect needs one there)."""
        with in_netns(self.switch_ns):
            xdp.attach(self.port, int(self._fn.fd), xdp.AttachMode.NATIVE)

    def counts(self) -> tuple[int, int]:
        """(packets, bytes) dropped so far, summed over CPUs."""
        return (_percpu_sum(self._stats, 0), _percpu_sum(self._stats, 1))

    def close(self, testbed: Testbed) -> None:
        """Put the testbed's xdp_pass back and release the program."""
        with in_netns(self.switch_ns), contextlib.suppress(xdp.XdpError):
            xdp.detach(self.port)
        testbed.attach_peer_xdp_pass()
        self._bpf.cleanup()


def _percpu_sum(table: Any, key: int) -> int:
    return sum(int(v) for v in table[table.Key(key)])


# --------------------------------------------------------------------------- environment


class BenchEnv:
    """The running testbed and what paths share: programs are compiled once, lazily."""

    def __init__(self, testbed: Testbed, topo: Topology) -> None:
        self.testbed = testbed
        self.topo = topo
        self.sink: Sink | None = None
        self._relay: RelayProgram | None = None
        self._relay_maps: RelayMaps | None = None
        self._pin_dir: Path | None = None
        self._ceiling: Any = None

    def prepare(self) -> None:
        """Next-hop neighbour, sink: what every path needs before traffic."""
        self._install_neighbour()
        self.sink = Sink(self.topo.switch_ns, self.topo.sink_port)
        self.sink.attach()

    def _install_neighbour(self) -> None:
        """A permanent neighbour entry for T on dc0: resolved, and immune to timers."""
        with in_netns(self.topo.relay_ns), IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=self.topo.dc_if)[0]
            ipr.neigh(
                "replace",
                dst=self.topo.transceiver_ip,
                lladdr=self.topo.transceiver_mac,
                ifindex=idx,
                state=NUD_PERMANENT,
            )

    def ifindex(self, ifname: str) -> int:
        """Interface index inside the relay namespace."""
        with in_netns(self.topo.relay_ns):
            return xdp.ifindex(ifname)

    def relay(self) -> tuple[RelayProgram, RelayMaps]:
        """The relay program (private pins) and its maps, configured for one session."""
        if self._relay is None:
            self._pin_dir = Path(tempfile.mkdtemp(prefix="splitrelay-bench-", dir="/sys/fs/bpf"))
            self._relay = RelayProgram(self._pin_dir).load()
            self._relay_maps = RelayMaps(self._pin_dir)
            _configure_relay(self._relay_maps, self.topo)
        assert self._relay_maps is not None
        return self._relay, self._relay_maps

    def ceiling_fd(self) -> int:
        """bpf/ceiling.c compiled for dc0 and the transceiver's MAC (the next hop)."""
        if self._ceiling is None:
            from bcc import BPF

            cflags = [
                f"-DEGRESS_IFINDEX={self.ifindex(self.topo.dc_if)}",
                f"-DEGRESS_SMAC={mac_list(self.topo.dc_mac)}",
                f"-DEGRESS_DMAC={mac_list(self.topo.transceiver_mac)}",
            ]
            bpf = BPF(src_file=str(CEILING_SOURCE).encode(), cflags=cflags)
            self._ceiling = (bpf, bpf.load_func(b"xdp_ceiling", BPF.XDP))
        return int(self._ceiling[1].fd)

    def ceiling_packets(self) -> int:
        """The ceiling program's own packet counter."""
        return _percpu_sum(self._ceiling[0][b"ceiling_packets"], 0)

    def close(self) -> None:
        """Release programs, pins and the sink (safe after a partial setup)."""
        if self.sink is not None:
            with contextlib.suppress(Exception):
                self.sink.close(self.testbed)
            self.sink = None
        if self._ceiling is not None:
            self._ceiling[0].cleanup()
            self._ceiling = None
        if self._relay_maps is not None:
            self._relay_maps.close()
        if self._relay is not None:
            self._relay.close()
        if self._pin_dir is not None:
            remove_pins(self._pin_dir)
        self._relay = self._relay_maps = self._pin_dir = None


def _configure_relay(maps: RelayMaps, topo: Topology) -> None:
    """Addresses, one transceiver, and the generator's client as an established session."""
    maps.set_addresses(
        RelayAddresses(
            public_port=PUBLIC_PORT,
            tunnel_port=TUNNEL_PORT,
            public_v4=ipaddress.IPv4Address(topo.public_ip),
            tunnel_v4=ipaddress.IPv4Address(topo.tunnel_ip),
        )
    )
    maps.put_transceiver(TRANSCEIVER_ID, topo.transceiver_ip, TRANSCEIVER_PORT)
    maps.put_session(topo.client_ip, CLIENT_PORT, TRANSCEIVER_ID, topo.public_ip, PUBLIC_PORT)


# --------------------------------------------------------------------------- paths


# Verdicts background traffic on the relay's links (ARP, ICMPv6, not for the relay)
# gets; they say nothing about the measured flow.
BACKGROUND_COUNTERS = frozenset({"pass_not_ip", "pass_not_udp", "pass_not_relay"})


@dataclass(frozen=True)
class PathCounts:
    """A path's own view: packets it forwarded, and per reason those it did not."""

    forwarded: int
    diverted: dict[str, int] = field(default_factory=dict)


class BenchPath(abc.ABC):
    """One way through the relay host, from pub0 to dc0.

    name and mode label the results; overhead is what the path adds to each
    frame (the sink checks it); counts() returns the path's own counters or None.
    """

    name: str
    mode: str
    overhead: int = 0
    count_tolerance: float = 0.01  # path counter vs sink, as a share of delivered pps

    @abc.abstractmethod
    def setup(self, env: BenchEnv) -> None:
        """Make this path the one forwarding (attach, start, ...)."""

    @abc.abstractmethod
    def teardown(self, env: BenchEnv) -> None:
        """Undo setup(), leaving the relay host with no program attached."""

    def counts(self, env: BenchEnv) -> PathCounts | None:
        """Cumulative counters, read at the start and the end of the window."""
        return None


class CeilingPath(BenchPath):
    """bpf/ceiling.c in native mode on pub0: MAC rewrite and redirect, nothing else."""

    name = "ceiling"
    mode = "native"

    def setup(self, env: BenchEnv) -> None:
        fd = env.ceiling_fd()
        with in_netns(env.topo.relay_ns):
            xdp.attach(env.topo.pub_if, fd, xdp.AttachMode.NATIVE)

    def teardown(self, env: BenchEnv) -> None:
        _detach(env, [env.topo.pub_if])

    def counts(self, env: BenchEnv) -> PathCounts:
        return PathCounts(forwarded=env.ceiling_packets())


class RelayXdpPath(BenchPath):
    """bpf/relay.c attached to pub0 and dc0, as `relayctl run` attaches it."""

    overhead = wire.TUNNEL_HEADER_LEN

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.name = f"relay-{mode}"

    def setup(self, env: BenchEnv) -> None:
        program, _maps = env.relay()
        with in_netns(env.topo.relay_ns):
            for ifname in (env.topo.pub_if, env.topo.dc_if):
                xdp.detach(ifname)
                program.attach(ifname, xdp.AttachMode(self.mode))

    def teardown(self, env: BenchEnv) -> None:
        _detach(env, [env.topo.pub_if, env.topo.dc_if])

    def counts(self, env: BenchEnv) -> PathCounts:
        _program, maps = env.relay()
        snap = maps.counters_snapshot()
        diverted = {
            k: v
            for k, v in snap.items()
            if k.startswith(("pass_", "drop_")) and k not in BACKGROUND_COUNTERS
        }
        return PathCounts(forwarded=snap["fwd_to_transceiver_packets"], diverted=diverted)


class UserspacePath(BenchPath):
    """`relayctl run --no-xdp`: the Python userspace relay carries every packet.

    The daemon runs as it does in production, in the relay namespace with its
    own pin directory; the generator's client is installed as an established
    session, as for the XDP paths. Its counters come from its metrics endpoint.
    """

    name = "userspace"
    mode = "userspace"
    overhead = wire.TUNNEL_HEADER_LEN
    metrics_port = 9479
    # its counters are read over HTTP, and socket buffers hold packets in flight
    count_tolerance = 0.05

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._pin_dir: Path | None = None

    def setup(self, env: BenchEnv) -> None:
        from ctl import runstate

        topo = env.topo
        self._pin_dir = Path(tempfile.mkdtemp(prefix="splitrelay-bench-us-", dir="/sys/fs/bpf"))
        self._pin_dir.rmdir()
        relayctl = str(Path(sys.executable).with_name("relayctl"))
        argv = [
            relayctl, "--pin-dir", str(self._pin_dir), "run", "--no-xdp",
            "-i", topo.pub_if, "-i", topo.dc_if,
            "--public", topo.public_ip, "--tunnel", topo.tunnel_ip,
            "--transceiver", f"{TRANSCEIVER_ID:x}={topo.transceiver_ip}:{TRANSCEIVER_PORT}",
            "--metrics", f"{topo.public_ip}:{self.metrics_port}", "--log-level", "warning",
        ]  # fmt: skip
        self._proc = env.testbed.spawn("relay1", argv, name="bench-userspace-relay")
        deadline = time.monotonic() + 30
        while (state := runstate.load(self._pin_dir)) is None or state.pid != self._proc.pid:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError("the userspace relay did not start (see its testbed log)")
            time.sleep(0.05)
        with RelayMaps(self._pin_dir) as maps:
            maps.put_session(
                topo.client_ip, CLIENT_PORT, TRANSCEIVER_ID, topo.public_ip, PUBLIC_PORT
            )

    def teardown(self, env: BenchEnv) -> None:
        from ctl import runstate

        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self._pin_dir is not None:
            remove_pins(self._pin_dir)
            runstate.remove(self._pin_dir)
            self._pin_dir = None

    def counts(self, env: BenchEnv) -> PathCounts:
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://{env.topo.public_ip}:{self.metrics_port}/metrics"
        with in_netns(env.topo.relay_ns):
            body = urllib.request.urlopen(url, timeout=5).read().decode()
        forwarded, diverted = 0, {}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                labels = sample.labels
                if labels.get("path") != "userspace":
                    continue
                if (
                    sample.name == "splitrelay_relay_packets_total"
                    and labels.get("direction") == "to_transceiver"
                ):
                    forwarded = int(sample.value)
                elif sample.name == "splitrelay_relay_drops_total" and sample.value:
                    diverted[f"drop_{labels['reason']}"] = int(sample.value)
        return PathCounts(forwarded=forwarded, diverted=diverted)


def _detach(env: BenchEnv, ifnames: Sequence[str]) -> None:
    with in_netns(env.topo.relay_ns):
        for ifname in ifnames:
            with contextlib.suppress(xdp.XdpError):
                xdp.detach(ifname)


PATHS: list[BenchPath] = [
    CeilingPath(),
    RelayXdpPath("native"),
    RelayXdpPath("generic"),
    UserspacePath(),
]
CEILING = "ceiling"


# --------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class CpuTimes:
    """One CPU's time in clock ticks, from /proc/stat: all of it, idle, softirq."""

    total: int
    idle: int
    softirq: int


def parse_proc_stat(text: str, cpu: int) -> CpuTimes:
    """The cpuN line of /proc/stat (guest time is already inside user time)."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == f"cpu{cpu}":
            ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
            return CpuTimes(total=sum(ticks), idle=ticks[3] + ticks[4], softirq=ticks[6])
    raise BenchError(f"cpu{cpu} not in /proc/stat")


def _cpu_times(cpu: int = GENERATOR_CPU) -> CpuTimes:
    return parse_proc_stat(Path("/proc/stat").read_text(), cpu)


@dataclass(frozen=True)
class Snapshot:
    """Every counter the window needs, read as close together as possible."""

    t: float
    sink_packets: int
    sink_bytes: int
    offered: int
    path: PathCounts | None
    cpu: CpuTimes
    generator_ticks: int = 0


@dataclass(frozen=True)
class Sample:
    """One measurement window of one path."""

    delivered_pps: float
    offered_pps: float
    forwarded_pps: float | None
    diverted: dict[str, int] | None  # per reason, only the nonzero deltas
    sink_frame_bytes: float | None
    window_s: float
    generator_alive: bool
    softirq_share: float | None = None  # of the generator's CPU: the receive path's part
    idle_share: float | None = None
    generator_cpu_share: float | None = None  # below 1: other load ran on the CPU
    generator_sent: int | None = None

    @property
    def softirq_ns_per_packet(self) -> float | None:
        """CPU time the receive path (veth rx, XDP, redirect, sink) spent per packet."""
        if self.softirq_share is None or self.delivered_pps <= 0:
            return None
        return self.softirq_share * 1e9 / self.delivered_pps


def sample_from(a: Snapshot, b: Snapshot, alive: bool) -> Sample:
    """Rates over the window between two snapshots."""
    dt = b.t - a.t
    if dt <= 0:
        raise BenchError("measurement window has no length")
    pkts = b.sink_packets - a.sink_packets
    ticks = b.cpu.total - a.cpu.total
    fwd = div = None
    if a.path is not None and b.path is not None:
        fwd = (b.path.forwarded - a.path.forwarded) / dt
        div = {
            k: n - a.path.diverted.get(k, 0)
            for k, n in b.path.diverted.items()
            if n != a.path.diverted.get(k, 0)
        }
    return Sample(
        delivered_pps=pkts / dt,
        offered_pps=(b.offered - a.offered) / dt,
        forwarded_pps=fwd,
        diverted=div,
        sink_frame_bytes=(b.sink_bytes - a.sink_bytes) / pkts if pkts else None,
        window_s=dt,
        generator_alive=alive,
        softirq_share=(b.cpu.softirq - a.cpu.softirq) / ticks if ticks > 0 else None,
        idle_share=(b.cpu.idle - a.cpu.idle) / ticks if ticks > 0 else None,
        generator_cpu_share=(b.generator_ticks - a.generator_ticks) / ticks if ticks > 0 else None,
    )


def check_sample(sample: Sample, frame_bytes: int, tolerance: float = 0.01) -> list[str]:
    """What is wrong with a window (empty when it is trustworthy)."""
    problems: list[str] = []
    if sample.delivered_pps <= 0:
        problems.append("nothing delivered")
    if not sample.generator_alive:
        problems.append("generator stopped before the window ended")
    if sample.idle_share is not None and sample.idle_share > MAX_IDLE_SHARE:
        # trafgen busy-waits for free ring frames: an idle generator CPU means the
        # window did not measure what the method assumes.
        problems.append(f"generator CPU {sample.idle_share:.0%} idle")
    if sample.forwarded_pps is not None:
        # Frames in flight between the path's counter and the sink: a ring of 256.
        slack = max(tolerance * sample.delivered_pps, 512 / sample.window_s)
        if abs(sample.forwarded_pps - sample.delivered_pps) > slack:
            problems.append(
                f"path forwarded {sample.forwarded_pps:,.0f} pps, sink got "
                f"{sample.delivered_pps:,.0f} pps"
            )
    if sample.diverted:
        what = ", ".join(f"{k}={n}" for k, n in sorted(sample.diverted.items()))
        problems.append(f"packets passed or dropped by the path: {what}")
    if sample.sink_frame_bytes is not None and round(sample.sink_frame_bytes) != frame_bytes:
        problems.append(f"sink frames of {sample.sink_frame_bytes:.1f} B, expected {frame_bytes}")
    return problems


def parse_net_dev(text: str, ifname: str) -> tuple[int, int]:
    """(tx_packets, tx_dropped) of ifname from /proc/net/dev."""
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        if sep and name.strip() == ifname:
            fields = rest.split()
            return int(fields[9]), int(fields[11])
    raise BenchError(f"interface {ifname} not in /proc/net/dev")


def _offered(netns: str, port: str) -> int:
    """Frames the generator got into the veth: tx_packets + tx_dropped of its port.

    /proc/thread-self/net is the calling thread's namespace, so entering it with
    setns is enough, and the read costs no netlink round trip.
    """
    with in_netns(netns):
        text = Path("/proc/thread-self/net/dev").read_text()
    tx, dropped = parse_net_dev(text, port)
    return tx + dropped


def _snapshot(env: BenchEnv, path: BenchPath, gen: Trafgen) -> Snapshot:
    assert env.sink is not None
    sink_packets, sink_bytes = env.sink.counts()
    t = time.monotonic()
    counts = path.counts(env)
    offered = _offered(env.topo.switch_ns, env.topo.gen_port)
    return Snapshot(t, sink_packets, sink_bytes, offered, counts, _cpu_times(), gen.cpu_ticks())


def measure(env: BenchEnv, path: BenchPath, conf: Path, warmup: float, duration: float) -> Sample:
    """Set up a path, run the generator, count over the window, tear down."""
    path.setup(env)
    gen = Trafgen(env.topo.switch_ns, env.topo.gen_port, conf, warmup + duration + 2.0)
    try:
        gen.start()
        time.sleep(warmup)
        first = _snapshot(env, path, gen)
        time.sleep(duration)
        last = _snapshot(env, path, gen)
        alive = gen.running()
    finally:
        sent = gen.stop()
        path.teardown(env)
    sample = sample_from(first, last, alive)
    return Sample(**{**asdict(sample), "generator_sent": sent})


# --------------------------------------------------------------------------- results


@dataclass
class PathResult:
    """Every window of one path, and the medians reported for it."""

    name: str
    mode: str
    frame_bytes: int  # what the sink should see
    samples: list[Sample] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def median(self, attr: str) -> float | None:
        """Median of one Sample field over the repeats (None if never measured)."""
        values = [getattr(s, attr) for s in self.samples if getattr(s, attr) is not None]
        return statistics.median(values) if values else None

    @property
    def delivered(self) -> float:
        """Median delivered pps."""
        return self.median("delivered_pps") or 0.0

    @property
    def rx_ns(self) -> float | None:
        """Median receive-path CPU nanoseconds per packet (softirq estimate)."""
        return self.median("softirq_ns_per_packet")


def find_base(results: Sequence[PathResult], base: str = CEILING) -> PathResult | None:
    """The reference path's result, if it was measured and delivered anything."""
    ref = next((r for r in results if r.name == base), None)
    return ref if ref is not None and ref.delivered > 0 else None


def ratios(results: Sequence[PathResult], base: str = CEILING) -> dict[str, float]:
    """Each path's delivered pps over the ceiling's, keyed "<path>/<base>"."""
    ref = find_base(results, base)
    if ref is None:
        return {}
    return {f"{r.name}/{base}": r.delivered / ref.delivered for r in results if r.name != base}


def rx_ratios(results: Sequence[PathResult], base: str = CEILING) -> dict[str, float]:
    """The ratio a core doing only the receive path would give: base rx ns / path rx ns."""
    ref = find_base(results, base)
    if ref is None or not ref.rx_ns:
        return {}
    return {f"{r.name}/{base}": ref.rx_ns / r.rx_ns for r in results if r.name != base and r.rx_ns}


def extra_ns(result: PathResult, base: PathResult | None) -> float | None:
    """Nanoseconds per packet this path costs over the base (1/pps difference)."""
    if base is None or result.delivered <= 0:
        return None
    return 1e9 / result.delivered - 1e9 / base.delivered


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


TABLE_NOTE = (
    "+ns/pkt: CPU per packet over the ceiling's (1/pps difference).\n"
    "rx ns/pkt: CPU per packet of the receive path alone (veth rx, XDP, redirect, sink),\n"
    "  from the softirq share of the generator's CPU (tick-sampled, an estimate)."
)


def format_table(results: Sequence[PathResult], base: str = CEILING) -> str:
    """The human-readable result: one row per path (medians), then any problems."""
    ref = find_base(results, base)
    header = ("path", "mode", "delivered pps", "offered pps", "vs ceiling", "+ns/pkt", "rx ns/pkt")
    rows = [(*header, "check")]
    for r in results:
        ratio = r.delivered / ref.delivered * 100 if ref else None
        rows.append(
            (
                r.name,
                r.mode,
                _fmt(r.delivered, ",.0f"),
                _fmt(r.median("offered_pps"), ",.0f"),
                _fmt(ratio, ".1f") + (" %" if ratio is not None else ""),
                _fmt(extra_ns(r, ref), "+.0f"),
                _fmt(r.rx_ns, ".0f"),
                "ok" if not r.problems else "FAILED",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    left = {0, 1, len(widths) - 1}
    lines = [
        "  ".join(
            cell.ljust(w) if i in left else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]
    problems = [f"  {r.name}: {p}" for r in results for p in r.problems]
    return "\n".join(lines + (["problems:", *problems] if problems else []))


CONTENDED_SHARE = 0.9


def contention_note(results: Sequence[PathResult]) -> str | None:
    """A warning when other load took the generator's CPU in some windows."""
    hit = [
        f"{r.name} run {i + 1} ({s.generator_cpu_share:.0%})"
        for r in results
        for i, s in enumerate(r.samples)
        if s.generator_cpu_share is not None and s.generator_cpu_share < CONTENDED_SHARE
    ]
    if not hit:
        return None
    return (
        "note: other load shared the generator's CPU in " + ", ".join(hit) + "; those "
        "windows' pps are low, their rx ns/pkt is not affected"
    )


def _round(value: float | None, digits: int | None = None) -> float | None:
    return None if value is None else round(value, digits)


def path_json(result: PathResult, base: PathResult | None) -> dict[str, Any]:
    """One path's entry in the JSON report (medians, spread, and every window)."""
    delivered = [s.delivered_pps for s in result.samples]
    return {
        "name": result.name,
        "mode": result.mode,
        "delivered_pps": round(result.delivered),
        "offered_pps": _round(result.median("offered_pps")),
        "forwarded_pps": _round(result.median("forwarded_pps")),
        "delivered_pps_min": _round(min(delivered, default=None)),
        "delivered_pps_max": _round(max(delivered, default=None)),
        "ratio_to_ceiling": _round(result.delivered / base.delivered, 4) if base else None,
        "ns_per_packet": _round(1e9 / result.delivered, 1) if result.delivered else None,
        "extra_ns_per_packet": _round(extra_ns(result, base), 1),
        "rx_ns_per_packet": _round(result.rx_ns, 1),
        "rx_cpu_share": _round(result.median("softirq_share"), 3),
        "generator_cpu_share": _round(result.median("generator_cpu_share"), 3),
        "sink_frame_bytes": result.frame_bytes,
        "ok": not result.problems,
        "problems": result.problems,
        "samples": [
            asdict(s) | {"softirq_ns_per_packet": s.softirq_ns_per_packet} for s in result.samples
        ],
    }


def report_json(
    results: Sequence[PathResult], meta: dict[str, Any], base: str = CEILING
) -> dict[str, Any]:
    """The machine-readable report: paths, ratios, and how it was measured."""
    ref = find_base(results, base)
    return {
        "paths": [path_json(r, ref) for r in results],
        "ratios": {k: round(v, 4) for k, v in ratios(results, base).items()},
        "ratios_rx_cpu": {k: round(v, 4) for k, v in rx_ratios(results, base).items()},
        **meta,
    }


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Options:
    """What the command line chose."""

    duration: float
    warmup: float
    size: int
    repeat: int
    paths: tuple[str, ...]
    json: bool
    output: Path


def select_paths(names: Sequence[str], available: Sequence[BenchPath] = PATHS) -> list[BenchPath]:
    """The paths named, in the order of PATHS; an unknown name is an error."""
    known = {p.name: p for p in available}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BenchError(f"unknown path(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return [p for p in available if p.name in names]


def machine_info() -> dict[str, Any]:
    """What the numbers depend on besides the code."""
    jit = Path("/proc/sys/net/core/bpf_jit_enable")
    return {
        "kernel": platform.release(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "bpf_jit_enable": jit.read_text().strip() if jit.exists() else None,
        "loadavg_before": list(os.getloadavg()),
    }


def _cpu_model() -> str | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return found.group(1).strip() if found else None


@contextlib.contextmanager
def _testbed() -> Iterator[Testbed]:
    """The srbench testbed, always torn down (also on Ctrl-C)."""
    tb = Testbed(PREFIX, clients=1, relays=1, transceivers=1)
    tb.down()  # leftovers of an interrupted earlier run
    try:
        tb.up()
        yield tb
    finally:
        tb.down()


def run(opts: Options, log: TextIO = sys.stderr) -> tuple[list[PathResult], dict[str, Any]]:
    """Build the testbed, measure every selected path opts.repeat times, clean up."""
    paths = select_paths(opts.paths)
    meta = machine_info()
    with _testbed() as tb, tempfile.TemporaryDirectory(prefix="srbench-") as tmp:
        topo = Topology.from_describe(tb.describe())
        frame = build_frame(topo.frame_spec(opts.size))
        conf = Path(tmp) / "voice.trafgen"
        conf.write_text(trafgen_packet(frame))
        results = [PathResult(p.name, p.mode, len(frame) + p.overhead) for p in paths]
        env = BenchEnv(tb, topo)
        try:
            env.prepare()
            for rep in range(opts.repeat):
                for path, result in zip(paths, results, strict=True):
                    print(f"[{rep + 1}/{opts.repeat}] {path.name} ...", file=log, flush=True)
                    sample = measure(env, path, conf, opts.warmup, opts.duration)
                    result.samples.append(sample)
                    result.problems += [
                        f"run {rep + 1}: {p}"
                        for p in check_sample(sample, result.frame_bytes, path.count_tolerance)
                    ]
        finally:
            env.close()
    meta |= {
        "duration_s": opts.duration,
        "warmup_s": opts.warmup,
        "repeat": opts.repeat,
        "packet": {"udp_payload_bytes": opts.size, "frame_bytes": len(frame)},
        "generator": {
            "tool": "trafgen",
            "cpu": GENERATOR_CPU,
            "workers": 1,
            "tx_ring": TRAFGEN_RING,
            "port": topo.gen_port,
        },
        "sink": {"port": topo.sink_port, "program": "XDP_DROP counter", "mode": "native"},
        "method": "generator and receive path share one CPU; see ctl/bench.py",
        "statistic": "median over repeats",
        "loadavg_after": list(os.getloadavg()),
    }
    return results, meta


def _options(params: dict[str, Any]) -> Options:
    names = tuple(n.strip() for n in str(params["paths"]).split(",") if n.strip())
    return Options(
        params["duration"],
        params["warmup"],
        params["size"],
        params["repeat"],
        names,
        params["as_json"],
        params["output"],
    )


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """The Options a command line gives; a bad one raises a click.UsageError."""
    with bench_command.make_context("bench", list(argv or [])) as ctx:
        return _options(ctx.params)


def _terminate_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt so the testbed is torn down either way.

    Only in this process: a child forked by a library (pyroute2 does, for
    namespaces) inherits the handler, and must simply die on SIGTERM rather
    than run our cleanup a second time.
    """
    owner = os.getpid()

    def handler(sig: int, _frame: Any) -> None:
        if os.getpid() != owner:
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
            return
        raise Terminated

    signal.signal(signal.SIGTERM, handler)


def execute(opts: Options, error_prefix: str = "bench: ") -> int:
    """Run the benchmark opts describe and print its report; the exit code as main's.

    error_prefix starts each one-line error (`relayctl: error: ` or `bench: `).
    """
    if os.geteuid() != 0:
        print(f"{error_prefix}needs root (namespaces, XDP): run `sudo make bench`", file=sys.stderr)
        return 1
    _terminate_on_sigterm()
    try:
        select_paths(opts.paths)
        results, meta = run(opts)
    except KeyboardInterrupt as exc:
        print(f"{error_prefix}interrupted; testbed torn down", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
    except Exception as exc:  # one clear line, never a traceback
        print(f"{error_prefix}{exc}", file=sys.stderr)
        return 1
    report = report_json(results, meta)
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(json.dumps(report, indent=2) + "\n")
    if opts.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(results))
        print(TABLE_NOTE)
        note = contention_note(results)
        if note:
            print(textwrap.fill(note, width=100))
        print(f"median of {opts.repeat} run(s) of {opts.duration:g} s; JSON in {opts.output}")
    return 1 if any(r.problems for r in results) else 0


@click.command("bench")
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    help="Measured seconds per path and run.",
)
@click.option(
    "--warmup",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Seconds of traffic before measuring.",
)
@click.option(
    "--size",
    type=click.IntRange(MIN_PAYLOAD, MAX_PAYLOAD),
    default=160,
    show_default=True,
    help="UDP payload bytes (160 is 20 ms of voice).",
)
@click.option(
    "--repeat",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Runs per path, interleaved; medians are reported.",
)
@click.option(
    "--paths",
    default=",".join(p.name for p in PATHS),
    show_default=True,
    help="Comma-separated paths to measure.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report on stdout.")
@click.option(
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    default=RESULTS_FILE,
    show_default=True,
    help="Where to write the JSON report.",
)
@click.pass_context
def bench_command(ctx: click.Context, **params: Any) -> None:
    """Data-plane packets per second: relay XDP native and generic, userspace, XDP ceiling.

    What `sudo make bench` runs first, as `relayctl bench` (also `python -m
    ctl.bench`); the method is in ctl/bench.py. Needs root: it builds its own
    namespace testbed (prefix srbench) and always tears it down. Progress
    goes to stderr; the exit code is 1 when a check of the measurement failed.
    """
    opts = _options(params)
    try:
        select_paths(opts.paths)
    except BenchError as exc:
        raise click.BadParameter(str(exc), param_hint="'--paths'") from exc
    root = ctx.find_root()
    prefix = f"{root.info_name}: error: " if root is not ctx else "bench: "
    ctx.exit(execute(opts, error_prefix=prefix))


if __name__ == "__main__":
    bench_command(prog_name="python -m ctl.bench")
