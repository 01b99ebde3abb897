"""Benchmark: how fast the relay's Redis side recovers and keeps up.

Two figures, from one run against a private redis-server on a unix socket:

- recovery: a fresh relay (RedisSync.load_sessions) reads N sessions of its
  relay id from Redis and installs them in the kernel session map;
- write-through: sessions created by the XDP program itself (STUN Binding
  Requests run through bpf_prog_test_run, each from a new client port) go
  through the ring buffer, the controller and the batched writer into Redis;
  the rate is sessions per second from the first creation to the last
  record in Redis, with the ring buffer's lost-event counter as a check that
  nothing was skipped.

Run: `python -m ctl.bench_redis [--sessions N] [--json]` (root).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import click

from ctl import wire
from ctl.bpfsys import prog_test_run, xdp_md
from ctl.loader import MapSizes, RelayProgram, remove_pins
from ctl.maps import RelayAddresses, RelayMaps
from ctl.netns import in_netns
from ctl.redisstate import RedisState, SessionRecord, connect
from ctl.redissync import RedisSync, transceiver_record
from ctl.store import KernelState

NETNS = "srbredis-relay"
RELAY_V4, TUNNEL_V4, T_V4 = "198.51.100.1", "203.0.113.1", "203.0.113.11"
CLIENT_NET = "198.51.100.0/24"
TID = 0xB1
CHUNK = 2048  # sessions created between two drains (what the event ring holds, with room)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _netns_up() -> None:
    """A relay namespace whose FIB resolves the transceiver (as in production)."""
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)
    _ip("netns", "add", NETNS)
    n = ["-n", NETNS]
    for name in ("pub0", "dc0"):
        _ip(*n, "link", "add", name, "type", "veth", "peer", "name", name + "p")
        _ip(*n, "link", "set", name + "p", "up")
        _ip(*n, "link", "set", name, "up")
    _ip(*n, "addr", "add", f"{RELAY_V4}/24", "dev", "pub0")
    _ip(*n, "addr", "add", f"{TUNNEL_V4}/24", "dev", "dc0")
    _ip(
        *n,
        "neigh",
        "replace",
        T_V4,
        "lladdr",
        "02:00:00:00:00:11",
        "dev",
        "dc0",
        "nud",
        "permanent",
    )
    subprocess.run(
        ["ip", "netns", "exec", NETNS, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
        check=True,
        capture_output=True,
    )


class _Redis:
    """A throwaway redis-server without persistence."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="splitrelay-bench-redis-"))
        self.sock = self.dir / "redis.sock"
        self.proc = subprocess.Popen(
            ["redis-server", "--port", "0", "--unixsocket", str(self.sock), "--save", "",
             "--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not self.sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"unix://{self.sock}"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


def _client(i: int) -> tuple[ipaddress.IPv4Address, int]:
    """A distinct client address:port for session i."""
    net = ipaddress.ip_network(CLIENT_NET)
    return net[2 + i // 50000], 10000 + i % 50000


async def bench_recovery(redis_url: str, maps: RelayMaps, n: int) -> dict[str, float]:
    """Seconds for a fresh relay to load n sessions from Redis into the kernel map."""
    redis = RedisState(connect(redis_url))
    now = time.time()
    taddr = ipaddress.ip_address(T_V4)
    raddr = ipaddress.ip_address(RELAY_V4)
    for start in range(0, n, 5000):
        batch = [
            SessionRecord(*_client(i), TID, taddr, 4001, raddr, 3478, "bench", now, now)
            for i in range(start, min(n, start + 5000))
        ]
        await redis.put_sessions(batch, 600)
    maps.flush_sessions()
    sync = RedisSync(redis, KernelState(maps), "bench", 600)
    t0 = time.perf_counter()
    loaded = await sync.load_sessions()
    elapsed = time.perf_counter() - t0
    assert loaded == n, f"loaded {loaded} of {n}"
    await redis.r.flushdb()
    await redis.r.aclose()
    return {"sessions": n, "seconds": elapsed, "sessions_per_second": n / elapsed}


def _stun_frames(n: int) -> list[bytes]:
    """n Binding Requests for TID, each from its own client address:port.

    One frame is built with scapy; the others patch its source address and
    port and recompute the IPv4 header checksum (the UDP checksum is zero,
    which IPv4 allows and the relay keeps valid as it encapsulates), because
    building 100,000 frames with scapy would take a minute.
    """
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    request = wire.build_binding_request(f"{wire.make_server_ufrag(TID)}:abcd".encode())
    template = bytearray(
        bytes(Ether() / IP(src="198.51.100.2", dst=RELAY_V4) / UDP(sport=1, dport=3478) / request)
    )
    template[40:42] = b"\x00\x00"  # UDP checksum: none
    frames = []
    for i in range(n):
        addr, port = _client(i)
        frame = bytearray(template)
        frame[26:30] = addr.packed
        frame[34:36] = port.to_bytes(2, "big")
        frame[24:26] = b"\x00\x00"
        frame[24:26] = _ipv4_checksum(frame[14:34]).to_bytes(2, "big")
        frames.append(bytes(frame))
    return frames


def _ipv4_checksum(header: bytes | bytearray) -> int:
    total = sum(int.from_bytes(header[i : i + 2], "big") for i in range(0, len(header), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


async def bench_write_through(
    redis_url: str, program: RelayProgram, maps: RelayMaps, n: int
) -> dict[str, float]:
    """Sessions per second from kernel creation to Redis, with nothing dropped.

    In production the kernel creates sessions while the controller runs; here
    both share this one thread, so sessions are created in chunks of CHUNK
    (each chunk as fast as bpf_prog_test_run goes), and after each chunk the
    controller drains: ring buffer -> session record -> batched, pipelined
    writes. The rate is over the whole run (creation included, so it is a
    lower bound on what the controller alone keeps up with), and a run
    counts only if no event was lost and the write queue dropped nothing.
    """
    redis = RedisState(connect(redis_url))
    maps.flush_sessions()
    maps.reset_counters()
    sync = RedisSync(redis, KernelState(maps), "bench", 600, static_transceivers=[TID])
    await sync.start()
    state = KernelState(maps)

    def on_event(event: object) -> None:
        entry = state.get_session(
            wire.from_mapped(bytes(event.client_addr)),  # type: ignore[attr-defined]
            int.from_bytes(event.client_port.to_bytes(2, "little"), "big"),
        )  # type: ignore[attr-defined]
        if entry is not None:
            sync.on_session(entry)

    program.open_events(on_event)
    with in_netns(NETNS):
        from ctl.xdp import ifindex

        ctx_if = ifindex("pub0")
    frames = _stun_frames(n)
    creating = 0.0
    t0 = time.perf_counter()
    for start in range(0, n, CHUNK):
        c0 = time.perf_counter()
        with in_netns(NETNS):
            for frame in frames[start : start + CHUNK]:
                prog_test_run(program.prog_fd, frame, ctx=xdp_md(ctx_if, data_len=len(frame)))
        creating += time.perf_counter() - c0
        program.poll_events(0)
        while sync._queue:
            await asyncio.sleep(0.001)
    key = redis.k_relay_sessions("bench")
    while await redis.r.zcard(key) < n - maps.counters_snapshot()["events_lost"]:
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - t0
    lost = maps.counters_snapshot()["events_lost"]
    dropped = sync.stats.writes_dropped
    await sync.stop()
    return {
        "sessions": n,
        "kernel_creation_seconds": creating,
        "seconds_to_redis": elapsed,
        "sessions_per_second": n / elapsed,
        "events_lost": lost,
        "writes_dropped": dropped,
    }


@click.command()
@click.option("--sessions", "n", default=100_000, show_default=True, type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
def main(n: int, as_json: bool) -> None:
    """Recovery and write-through speed of the relay's Redis side."""
    _netns_up()
    redis = _Redis()
    pin_dir = Path(tempfile.mkdtemp(prefix="splitrelay-bench-redis-", dir="/sys/fs/bpf"))
    program = RelayProgram(pin_dir, MapSizes(sessions=max(65536, 2 * n))).load()
    maps = RelayMaps(pin_dir)
    try:
        maps.set_addresses(
            RelayAddresses(
                public_v4=ipaddress.IPv4Address(RELAY_V4),
                tunnel_v4=ipaddress.IPv4Address(TUNNEL_V4),
            )
        )
        maps.put_transceiver(TID, T_V4, 4001)
        asyncio.run(_register(redis.url))
        recovery = asyncio.run(bench_recovery(redis.url, maps, n))
        write = asyncio.run(bench_write_through(redis.url, program, maps, n))
    finally:
        maps.close()
        program.close()
        remove_pins(pin_dir)
        redis.close()
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)
    result = {"recovery": recovery, "write_through": write}
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(
        f"recovery: {n} sessions Redis -> kernel map in {recovery['seconds']:.2f} s "
        f"({recovery['sessions_per_second']:,.0f}/s)"
    )
    click.echo(
        f"write-through: {n} kernel-created sessions in Redis after "
        f"{write['seconds_to_redis']:.2f} s ({write['sessions_per_second']:,.0f}/s; "
        f"kernel creation alone {write['kernel_creation_seconds']:.2f} s; "
        f"{write['events_lost']} events lost, {write['writes_dropped']} writes dropped)"
    )


async def _register(url: str) -> None:
    redis = RedisState(connect(url))
    await redis.put_transceiver(transceiver_record(TID, T_V4, 4001), ttl=None)
    await redis.r.aclose()


if __name__ == "__main__":
    main()
