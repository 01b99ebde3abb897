"""`python -m transceiver.bench` end to end, shrunk: one small step per variant, a few setups.

It checks the machinery (namespace, relay, pinned workers of each variant,
the client process, the measurements, the teardown), not the numbers: those
are for a quiet machine and docs/performance.md.
"""

from __future__ import annotations

import json
import subprocess
import sys

from ctl.netns import netns_exists
from transceiver import bench

PREFIX = "srcall-test"


def test_a_small_run_measures_every_variant_and_cleans_up() -> None:
    config = bench.BenchConfig(
        steps=[2],
        duration=3.0,
        warmup=1.0,
        setup_rounds=2,
        retries=0,
        prefix=PREFIX,
    )
    result = bench.run(config)
    assert not netns_exists(PREFIX)
    assert set(result["setup"]) == {
        f"{v}/{m}" for v in bench.DEFAULT_VARIANTS for m in ("relay", "direct")
    }
    for times in result["setup"].values():
        assert times["count"] == 2 and not times["errors"]
        assert 0 < times["p50"] < 5
    steps = {s["variant"]: s for s in result["steps"]}
    assert set(steps) == set(bench.DEFAULT_VARIANTS)
    for variant, step in steps.items():
        assert step["connected"] == 2, (variant, step["errors"])
        assert step["rtt_seconds"]["count"] > 0, variant
        assert step["markers_heard"] > 0 and step["frames_received"] > 0, variant
        assert 0 < step["cpu"]["worker"] < 1.05, variant
        assert step["worker"]["loop_lag_seconds"]["count"] > 0
    assert set(result["summary"]) == set(bench.DEFAULT_VARIANTS)
    text = bench.render(result)
    assert "sustained echo calls" in text and "after/direct" in text


def test_the_cli_reports_errors_in_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "transceiver.bench", "--variants", "nope", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("bench: error: variants must be among")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not proc.stdout.strip() or json.loads(proc.stdout) is None
