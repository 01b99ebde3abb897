"""The pieces of `python -m transceiver.bench` that decide its numbers.

The benchmark itself runs in tests/integration/test_transceiver_bench.py;
here: the pass/fail rule of a step, the pre-encoded marker loop the clients
send, the clients' faster marker detector (it must find exactly what
transceiver/markers.py finds), and the options.
"""

from __future__ import annotations

import random
from array import array
from typing import Any

import pytest
from click.testing import CliRunner

from transceiver import bench
from transceiver.bench_client import FastDetector, MarkerLoop
from transceiver.markers import BURST_AMPLITUDE, MarkerDetector, MarkerSource


def _result(**over: Any) -> dict[str, Any]:
    result: dict[str, Any] = {
        "calls": 10,
        "connected": 10,
        "min_call_heard_ratio": 1.0,
        "rtt_seconds": {"count": 100, "p50": 0.115, "p95": 0.120, "max": 0.13},
        "rtt_first_third_p50": 0.115,
        "rtt_last_third_p50": 0.116,
    }
    result.update(over)
    return result


def test_a_step_passes_only_when_every_criterion_holds() -> None:
    config = bench.BenchConfig()
    assert bench.judge(_result(), config) == (True, [])
    cases = {
        "did not connect": _result(connected=9),
        "heard only": _result(min_call_heard_ratio=0.5),
        "rtt p95 150 ms": _result(rtt_seconds={"count": 1, "p50": 0.1, "p95": 0.15, "max": 0.2}),
        "rtt p95 none": _result(rtt_seconds={"count": 0, "p50": None, "p95": None, "max": None}),
        "backlog grows": _result(rtt_first_third_p50=0.115, rtt_last_third_p50=0.140),
    }
    for phrase, result in cases.items():
        ok, reasons = bench.judge(result, config)
        assert not ok and any(phrase in r for r in reasons), (phrase, reasons)


def test_summary_takes_the_largest_passing_step() -> None:
    steps = [
        {"variant": "after", "calls": 10, "ok": True, "cpu": {"worker": 0.3},
         "rtt_seconds": {"p95": 0.12}},
        {"variant": "after", "calls": 20, "ok": True, "cpu": {"worker": 0.6},
         "rtt_seconds": {"p95": 0.12}},
        {"variant": "after", "calls": 30, "ok": False, "cpu": {"worker": 0.99},
         "rtt_seconds": {"p95": 0.4}},
        {"variant": "before", "calls": 10, "ok": False, "cpu": {"worker": 0.5},
         "rtt_seconds": {"p95": 0.3}},
    ]  # fmt: skip
    summary = bench.summarize(steps, ["before", "after"])
    assert summary["after"]["sustained_calls"] == 20
    assert summary["after"]["worker_cpu_per_call"] == pytest.approx(0.03)
    assert summary["before"] == {
        "sustained_calls": 0,
        "worker_cpu": None,
        "worker_cpu_per_call": None,
        "rtt_p95_seconds": None,
    }


def test_config_is_validated() -> None:
    for bad in (
        {"steps": []},
        {"steps": [0]},
        {"variants": ["nope"]},
        {"duration": 0},
        {"retries": 9},
    ):
        with pytest.raises(bench.BenchError):
            bench.BenchConfig(**bad).validate()
    bench.BenchConfig().validate()
    assert bench.DEFAULT_VARIANTS == ("before", "stock-aiortc", "release", "after")
    assert set(bench.DEFAULT_VARIANTS) < set(bench.VARIANTS)


def test_the_marker_loop_is_one_seamless_cycle() -> None:
    loop = MarkerLoop.build()
    assert len(loop.packets) == 100 and loop.markers_per_cycle == 8
    seqs = [seq for frame in loop.markers for seq, _ in frame]
    assert seqs == list(range(8))  # each pitch once per cycle, in order
    for frame in loop.markers:
        for _, offset in frame:
            assert 0 <= offset < 960
    assert all(20 < len(p) < 1500 for p in loop.packets)


def test_fast_detector_finds_exactly_what_the_reference_detector_finds() -> None:
    source = MarkerSource()
    rnd = random.Random(7)
    reference, fast = MarkerDetector(), FastDetector()
    found_ref, found_fast = [], []
    for k in range(300):
        samples, _ = source.read(960)
        if k % 37 == 5:  # a lost frame now and then: silence in its place
            samples = array("h", bytes(1920))
        noisy = array("h", (max(-32768, min(32767, s + rnd.randint(-200, 200))) for s in samples))
        found_ref += reference.feed(noisy)
        found_fast += fast.feed(noisy)
    assert found_fast == found_ref
    assert len(found_ref) >= 20
    assert fast.threshold < BURST_AMPLITUDE


def test_cli_help_and_bad_options() -> None:
    runner = CliRunner()
    result = runner.invoke(bench.main, ["--help"])
    assert result.exit_code == 0 and "--json" in result.output and "after" in result.output
    result = runner.invoke(bench.main, ["--steps", "5,x"])
    assert result.exit_code == 2 and "--steps" in result.output
