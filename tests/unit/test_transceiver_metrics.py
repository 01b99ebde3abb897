"""Tunnel socket drops and packets in /metrics: from the mux's counters to the scrape.

A real Worker on loopback (its tunnel socket accepts only one relay address),
behind the InProcessPool and the signaling app, and datagrams sent to its
tunnel port by hand: each one the mux drops must appear in /metrics under
`splitrelay_transceiver_tunnel_drops_total{reason}` with the right count.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from ipaddress import ip_address
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from ctl import wire
from transceiver import metrics, mux
from transceiver.pool import InProcessPool, PoolStats, WorkerSnapshot
from transceiver.signaling import make_app
from transceiver.worker import Worker, WorkerConfig

PUBLIC = [("198.51.100.1", 3478)]


def run(coro_fn: Callable[[], Awaitable[Any]], timeout: float = 30) -> Any:
    return asyncio.run(asyncio.wait_for(coro_fn(), timeout))


def samples(text: str, family: str) -> dict[tuple[tuple[str, str], ...], float]:
    """{labels: value} of one family's `_total` samples in a Prometheus text scrape."""
    for fam in text_string_to_metric_families(text):
        if fam.name == family:
            return {
                tuple(sorted(s.labels.items())): s.value
                for s in fam.samples
                if s.name == family + "_total"
            }
    raise AssertionError(f"{family} is not in the scrape")


def test_every_mux_drop_counter_is_a_precreated_reason() -> None:
    from_mux = [
        name.removeprefix("dropped_") for name in mux.COUNTER_NAMES if name.startswith("dropped_")
    ]
    assert list(metrics.TUNNEL_DROP_REASONS) == from_mux


def test_worker_values_reads_the_mux_counters_leniently() -> None:
    values = metrics.worker_values(
        {"mux": {"rx_packets": 7, "tx_packets": "9", "dropped_not_owner": 2, "dropped_": 5}},
        calls=0,
    )
    assert values.tunnel_packets == {"in": 7, "out": 9}
    assert values.tunnel_drops == {"not_owner": 2}
    for junk in ({}, {"mux": None}, {"mux": "x"}, {"mux": {"dropped_closed": "junk"}}):
        v = metrics.worker_values(junk, calls=0)
        assert v.tunnel_packets == {"in": 0, "out": 0}
        assert all(n == 0 for n in v.tunnel_drops.values())


def test_drops_are_summed_over_workers_without_per_session_labels() -> None:
    pool = PoolStats(
        [
            WorkerSnapshot(1, 0, 4, stats={"mux": {"dropped_unknown_sender": 2, "rx_packets": 1}}),
            WorkerSnapshot(2, 0, 4, stats={"mux": {"dropped_unknown_sender": 3, "dropped_new": 1}}),
        ],
        draining=False,
    )
    text = metrics.render(pool, {}).decode()
    drops = samples(text, "splitrelay_transceiver_tunnel_drops")
    assert drops[(("reason", "unknown_sender"),)] == 5
    assert drops[(("reason", "new"),)] == 1  # a reason the mux adds later still shows
    assert set(drops) == {(("reason", r),) for r in (*metrics.TUNNEL_DROP_REASONS, "new")}
    packets = samples(text, "splitrelay_transceiver_tunnel_packets")
    assert packets == {(("direction", "in"),): 1, (("direction", "out"),): 0}


def test_jitter_buffer_families_sum_the_workers_playout_counters() -> None:
    from transceiver.jitterbuffer import DELAY_BUCKETS
    from transceiver.playout import PlayoutCounters

    first, second = PlayoutCounters(), PlayoutCounters()
    for wait in (0.001, 0.004, 0.004, 0.035):
        first.observe(wait)
    second.observe(0.7)
    second.decode_errors = 2
    snap_a, snap_b = first.snapshot(), second.snapshot()
    snap_a.update(concealed=3, fec=4, late=1, dropped=2, duplicate=1, skipped=10)
    snap_b.update(concealed=1, overflow=6, streams=2, target_seconds_mean=0.025)
    pool = PoolStats(
        [
            WorkerSnapshot(1, 0, 4, stats={"playout": snap_a}),
            WorkerSnapshot(2, 0, 4, stats={"playout": snap_b}),
            WorkerSnapshot(3, 0, 4, stats={"playout": "junk"}),  # lenient, as for the mux
        ],
        draining=False,
    )
    text = metrics.render(pool, {}).decode()
    by_name = {f.name: f for f in text_string_to_metric_families(text)}
    delay = by_name["splitrelay_transceiver_jitter_buffer_delay_seconds"]
    buckets = {s.labels["le"]: s.value for s in delay.samples if s.name.endswith("_bucket")}
    assert buckets[repr(DELAY_BUCKETS[0])] == 1  # 1 ms
    assert buckets["0.005"] == 3
    assert buckets["0.04"] == 4
    assert buckets["1.0"] == 5 and buckets["+Inf"] == 5
    total = next(s.value for s in delay.samples if s.name.endswith("_sum"))
    assert total == pytest.approx(0.744)
    target = by_name["splitrelay_transceiver_jitter_buffer_target_seconds"]
    assert target.samples[0].value == pytest.approx(0.025)
    assert samples(text, "splitrelay_transceiver_audio_concealed_frames") == {(): 4}
    assert samples(text, "splitrelay_transceiver_audio_fec_frames") == {(): 4}
    assert samples(text, "splitrelay_transceiver_audio_late_frames") == {(): 1}
    assert samples(text, "splitrelay_transceiver_audio_skipped_frames") == {(): 10}
    assert samples(text, "splitrelay_transceiver_audio_dropped_frames") == {
        (("reason", "shrink"),): 2,
        (("reason", "duplicate"),): 1,
        (("reason", "overflow"),): 6,
        (("reason", "undecodable"),): 2,
    }


def test_datagrams_the_tunnel_socket_drops_show_in_metrics() -> None:
    """A stranger's datagram, and two bad headers from the relay, each under its reason."""

    async def body() -> None:
        relay = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        relay.bind(("127.0.0.1", 0))
        stranger.bind(("127.0.0.1", 0))
        worker = Worker(
            WorkerConfig(0x7E1, "127.0.0.1", 0, [relay.getsockname()], PUBLIC, max_calls=2)
        )
        await worker.start()
        client = TestClient(TestServer(make_app(InProcessPool([worker]), bearer_token="t")))
        await client.start_server()
        try:
            tunnel = worker.tunnel_address
            assert tunnel is not None and worker.mux is not None
            header = wire.TunnelHeader(ip_address("198.51.100.10"), 5000, 3478).pack()
            # A valid header from a sender that is not the relay; then two bad headers from it.
            stranger.sendto(header + b"\x00\x01 any payload", tunnel)
            relay.sendto(b"short", tunnel)  # from the relay: shorter than a header
            relay.sendto(b"\xde\xad" + header[2:] + b"payload", tunnel)  # wrong magic
            counters = worker.mux.counters
            sent = (
                "dropped_unknown_sender",
                "dropped_tunnel_truncated",
                "dropped_tunnel_bad_header",
            )
            for _ in range(200):
                if all(counters[name] for name in sent):
                    break
                await asyncio.sleep(0.01)

            resp = await client.get("/metrics")
            assert resp.status == 200
            text = await resp.text()
        finally:
            await client.close()
            await worker.stop(0)
            relay.close()
            stranger.close()
        drops = samples(text, "splitrelay_transceiver_tunnel_drops")
        expected = dict.fromkeys(metrics.TUNNEL_DROP_REASONS, 0.0)
        expected.update(unknown_sender=1.0, tunnel_truncated=1.0, tunnel_bad_header=1.0)
        assert {dict(k)["reason"]: v for k, v in drops.items()} == expected
        packets = samples(text, "splitrelay_transceiver_tunnel_packets")
        assert packets == {(("direction", "in"),): 0, (("direction", "out"),): 0}

    run(body)
