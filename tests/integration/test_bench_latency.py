"""`python -m transceiver.bench_latency` end to end, shrunk: one impaired profile, one call each.

It checks the machinery (the demo's stack with a stock and an adaptive
transceiver, the impairment applied to both callers and removed, the
figures of each variant, the teardown), not the numbers: those are for a
quiet machine and docs/performance.md. The pure parts (outage recovery, the
summary, the table) are checked in tests/unit/test_bench_latency.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ctl.netns import netns_exists
from transceiver import bench_latency


def test_one_profile_measures_both_variants_and_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "latency.json"
    proc = subprocess.run(
        [sys.executable, "-m", "transceiver.bench_latency", "--profile", "loss 2%",
         "--calls", "1", "--duration", "15", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not netns_exists(f"{bench_latency.PREFIX}-sw")
    result = json.loads(out.read_text())
    figures = result["results"]["loss 2%"]
    for variant in ("stock", "adaptive"):
        f = figures[variant]
        assert f["ok"] == 1, (variant, f["errors"])
        assert f["rtt_ms"]["count"] > 0 and f["markers_sent"] >= 50, variant
        assert f["tone_intact"] is not None
    # Only the adaptive path has buffer counters, on both ends, and they saw the loss.
    adaptive, stock = figures["adaptive"], figures["stock"]
    assert adaptive["client_buffer"]["frames"] > 500
    assert (adaptive["client_buffer"]["concealed_share"] or 0) > 0
    assert adaptive["worker_buffer"]["frames"] > 500
    assert adaptive["worker_buffer"]["concealed"] + adaptive["worker_buffer"]["fec"] > 0
    assert stock["client_buffer"]["frames"] == 0 and stock["worker_buffer"]["frames"] == 0
    assert "| loss 2% | adaptive |" in proc.stdout
