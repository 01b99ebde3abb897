"""transceiver/bench_latency.py's pure parts: outage recovery, a variant's summary, the table."""

from __future__ import annotations

import pytest

from transceiver import bench_latency


def test_outage_recovery_is_the_first_run_of_clean_round_trips() -> None:
    before = [[t, 25.0] for t in range(10)]
    after = [[10.5, 80.0], [10.75, 60.0], [11.0, 27.0], [11.25, 26.0], [11.5, 29.0], [11.75, 25.0]]
    # Clean is 25 ms; within 5 ms from 11.0 on, for RECOVERED_RUN (4) markers.
    assert bench_latency.outage_recovery(before + after, 10.0, 10.3) == pytest.approx(0.7)
    assert bench_latency.outage_recovery(before + after[:4], 10.0, 10.3) is None
    assert bench_latency.outage_recovery(after, 10.0, 10.3) is None  # no clean value


def test_summary_and_table_from_call_output() -> None:
    call = {
        "calls": 1,
        "ok": 1,
        "errors": [],
        "per_call": [{"audio_rtts": [0.02, 0.03, 0.04], "markers_sent": 4, "markers_lost": 1}],
        "jitter_buffer": {
            "played": 90,
            "fec": 4,
            "concealed": 6,
            "late": 1,
            "dropped": 0,
            "delay_seconds_mean": 0.005,
        },
        "tone_intact": 0.97,
    }
    f = bench_latency.summarize_calls(call)
    assert f["rtt_ms"] == {"count": 3, "p50": 30.0, "p95": 40.0, "p99": 40.0}
    assert f["markers_lost_share"] == 0.25
    assert f["client_buffer"]["concealed_share"] == 0.06
    assert f["client_buffer"]["fec_share"] == 0.04
    f["worker_buffer"] = {"mean_delay_ms": 4.0, "frames": 100, "concealed": 0, "fec": 0}
    result = {"results": {"clean": {"stock": f, "adaptive": f}}, "breakdown": None}
    table = bench_latency.render(result)
    assert "| clean | stock | 30.0 | 40.0 | 40.0 | 25.0 % | 6.0 % | 4.0 % | 97.0 % | 4.0 ms |" in (
        table
    )
