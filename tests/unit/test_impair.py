"""The impairment models, spec and CLI surface of `relayctl testbed impair`, without root.

The models are checked on seeded synthetic packet streams. Every statistical
tolerance is stated next to its assertion as a multiple of the standard error for
that sample size (3 to 4 sigma); with fixed seeds the outcomes are deterministic,
so the tolerances say what the model guarantees, not how lucky a run was.
"""

from __future__ import annotations

import json
import math
import statistics
from typing import Any

import pytest
from click.testing import CliRunner, Result

from ctl import cli, impairctl
from ctl import cliutil as cu
from ctl.impair import (
    DEFAULT_REORDER_GAP_MS,
    DirectionModel,
    ImpairError,
    ImpairSpec,
    late_arrivals,
    loss_runs,
    parse_count,
    parse_duration_ms,
    parse_percent,
    simulate,
)

MS = 1_000_000  # ns


def stream(n: int, spacing_ms: float, start_ns: int = 0) -> list[int]:
    """Arrival times of n packets, evenly spaced (a voice stream is 20 ms)."""
    return [start_ns + round(i * spacing_ms * MS) for i in range(n)]


def lost_flags(spec: ImpairSpec, n: int, direction: str = "up") -> list[bool]:
    return [v.drop is not None for v in simulate(spec, direction, stream(n, 20))]


# ----------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "fraction"),
    [("2", 0.02), ("2%", 0.02), (" 0.5 % ", 0.005), ("100", 1.0), ("0", 0.0), (".5%", 0.005)],
)
def test_parse_percent(text: str, fraction: float) -> None:
    assert parse_percent(text) == pytest.approx(fraction)


@pytest.mark.parametrize("text", ["", "x", "-1", "101", "2%%", "1e3", "5 percent"])
def test_parse_percent_rejects(text: str) -> None:
    with pytest.raises(ImpairError, match="--loss"):
        parse_percent(text, "--loss")


@pytest.mark.parametrize(
    ("text", "unit", "ms"),
    [
        ("20", "ms", 20.0),
        ("20ms", "ms", 20.0),
        ("0.3s", "ms", 300.0),
        ("500us", "ms", 0.5),
        (" 1.5 s ", "ms", 1500.0),
        ("2", "s", 2000.0),
        ("250ms", "s", 250.0),
    ],
)
def test_parse_duration(text: str, unit: str, ms: float) -> None:
    assert parse_duration_ms(text, default_unit=unit) == pytest.approx(ms)


@pytest.mark.parametrize("text", ["", "ms", "-5", "20 min", "1h", "2ms3"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ImpairError, match="--delay: bad duration"):
        parse_duration_ms(text, "--delay")


def test_parse_count() -> None:
    assert parse_count("4") == 4.0
    assert parse_count("2.5 pkts") == 2.5
    with pytest.raises(ImpairError, match="packet count"):
        parse_count("four")


# ----------------------------------------------------------------- spec


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"direction": "sideways"}, "direction must be"),
        ({"loss": 1.5}, "--loss"),
        ({"loss": float("nan")}, "--loss"),
        ({"delay_ms": -1.0}, "--delay"),
        ({"delay_ms": 10_001.0}, "--delay"),
        ({"jitter_ms": float("inf")}, "--jitter"),
        ({"burst_loss": 0.1}, "needs --burst-length"),
        ({"burst_loss": 0.1, "burst_length": 0.5}, "needs --burst-length"),
        ({"burst_length": 3.0}, "--burst-length needs --burst-loss"),
        ({"burst_loss": 0.6, "burst_length": 1.0}, "at most 50% loss"),
        ({"burst_loss": 1.0, "burst_length": 5.0}, "impossible"),
        ({"outage_in_s": 2.0}, "--outage-in needs --outage"),
        ({"reorder_gap_ms": 10.0}, "--reorder-gap needs --reorder"),
        ({"reorder": 0.1, "reorder_gap_ms": 0.0}, "more than 0"),
        ({"seed": -1}, "--seed"),
        ({"seed": 1.5}, "--seed"),
        ({"limit": 0}, "--limit"),
    ],
)
def test_spec_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ImpairError, match=message.replace("%", "%")):
        ImpairSpec(**kwargs)


def test_spec_round_trips_and_rejects_unknown_fields() -> None:
    spec = ImpairSpec(direction="up", loss=0.1, delay_ms=20, jitter_ms=5, seed=9)
    assert ImpairSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ImpairError, match="unknown impairment fields: lost"):
        ImpairSpec.from_dict({**spec.to_dict(), "lost": 1})
    assert spec.directions == ("up",)
    assert ImpairSpec().directions == ("up", "down")


def test_spec_summary() -> None:
    spec = ImpairSpec(
        loss=0.02,
        burst_loss=0.1,
        burst_length=4,
        delay_ms=20,
        jitter_ms=10,
        reorder=0.05,
        outage_ms=500,
        outage_in_s=2,
    )
    assert spec.summary() == (
        "both: loss 2%, burst loss 10% (mean burst 4 pkts), delay 20ms + jitter 0-10ms, "
        "reorder 5% (+30ms), outage 500ms in 2s"
    )
    assert ImpairSpec(direction="down").summary() == "down: pass-through (no impairment)"


def test_gilbert_parameters_follow_from_loss_rate_and_burst_length() -> None:
    p, r = ImpairSpec(burst_loss=0.1, burst_length=4).gilbert()
    assert r == pytest.approx(0.25)  # mean burst = 1 / r
    assert p == pytest.approx(0.25 * 0.1 / 0.9)
    assert p / (p + r) == pytest.approx(0.1)  # stationary loss rate


# ----------------------------------------------------------------- models


def test_random_loss_rate_and_independence() -> None:
    n, rate = 20_000, 0.1
    lost = lost_flags(ImpairSpec(loss=rate, seed=1), n)
    sigma = math.sqrt(rate * (1 - rate) / n)  # 0.21 %
    assert abs(sum(lost) / n - rate) < 3 * sigma
    # Independent losses: runs are geometric with mean 1 / (1 - rate) = 1.11.
    runs = loss_runs(lost)
    assert statistics.mean(runs) == pytest.approx(1 / (1 - rate), abs=0.05)


def test_burst_loss_rate_and_mean_burst_length() -> None:
    n, rate, length = 50_000, 0.1, 4.0
    spec = ImpairSpec(burst_loss=rate, burst_length=length, seed=2)
    verdicts = simulate(spec, "up", stream(n, 20))
    lost = [v.drop is not None for v in verdicts]
    assert {v.drop for v in verdicts} == {None, "burst"}
    p, r = spec.gilbert()
    rho = 1 - p - r  # lag-1 correlation of the chain: losses cluster
    sigma_rate = math.sqrt(rate * (1 - rate) / n * (1 + rho) / (1 - rho))  # 0.33 %
    assert abs(sum(lost) / n - rate) < 3 * sigma_rate
    runs = loss_runs(lost)
    sigma_len = math.sqrt(1 - r) / r / math.sqrt(len(runs))  # geometric: ~0.1 for ~1250
    assert abs(statistics.mean(runs) - length) < 3 * sigma_len
    # Geometric burst lengths: a share r of the bursts is a single packet.
    singles = sum(1 for x in runs if x == 1) / len(runs)
    assert abs(singles - r) < 4 * math.sqrt(r * (1 - r) / len(runs))


def test_burst_loss_is_burstier_than_random_loss_at_the_same_rate() -> None:
    bursty = loss_runs(lost_flags(ImpairSpec(burst_loss=0.1, burst_length=4, seed=3), 20_000))
    random_ = loss_runs(lost_flags(ImpairSpec(loss=0.1, seed=3), 20_000))
    assert statistics.mean(bursty) > 3 * statistics.mean(random_)


def test_fixed_delay_is_exact_and_keeps_order() -> None:
    arrivals = stream(1000, 20)
    verdicts = simulate(ImpairSpec(delay_ms=20), "down", arrivals)
    assert [v.due_ns - t for v, t in zip(verdicts, arrivals, strict=True)] == [20 * MS] * 1000


def test_jitter_is_uniform_extra_delay_when_packets_are_spaced_wider() -> None:
    n, delay, jitter = 20_000, 20.0, 10.0
    arrivals = stream(n, 20)  # spacing 20 ms > jitter: the FIFO clamp never acts
    verdicts = simulate(ImpairSpec(delay_ms=delay, jitter_ms=jitter, seed=4), "up", arrivals)
    extra = [(v.due_ns - t) / MS - delay for v, t in zip(verdicts, arrivals, strict=True)]
    assert min(extra) >= 0 and max(extra) <= jitter
    sigma_mean = jitter / math.sqrt(12 * n)  # uniform: sd J/sqrt(12)
    assert abs(statistics.mean(extra) - jitter / 2) < 4 * sigma_mean
    q = statistics.quantiles(extra, n=20)  # 5 % steps
    for k, value in enumerate(q, start=1):
        # a uniform's quantile k/20 is J*k/20; the order statistic's sd is < 0.04 ms here
        assert value == pytest.approx(jitter * k / 20, abs=0.15)


def test_jitter_never_reorders_even_when_wider_than_the_spacing() -> None:
    arrivals = stream(5000, 2)  # 2 ms apart, jitter 30 ms: a real queue keeps order
    verdicts = simulate(ImpairSpec(delay_ms=5, jitter_ms=30, seed=5), "up", arrivals)
    dues = [v.due_ns for v in verdicts]
    assert dues == sorted(dues)
    assert late_arrivals(sorted(range(len(dues)), key=lambda i: (dues[i], i))) == 0
    # ... which makes it a queue: delays are no longer the plain uniform draw.
    delays = [(d - t) / MS for d, t in zip(dues, arrivals, strict=True)]
    assert min(delays) >= 5 and statistics.mean(delays) > 5 + 15


def test_reordering_holds_the_asked_share_back_behind_its_successor() -> None:
    n, rate = 10_000, 0.1
    arrivals = stream(n, 20)  # voice rate; the default 30 ms gap passes one successor
    verdicts = simulate(ImpairSpec(reorder=rate, seed=6), "up", arrivals)
    held = [v.reordered for v in verdicts]
    sigma = math.sqrt(rate * (1 - rate) / n)  # 0.3 %
    assert abs(sum(held) / n - rate) < 3 * sigma
    order = sorted(range(n), key=lambda i: (verdicts[i].due_ns, i))
    # A held packet lands after its successor unless that one is held too.
    expected_late = sum(1 for i in range(n - 1) if held[i] and not held[i + 1])
    assert late_arrivals(order) == expected_late
    position = {seq: k for k, seq in enumerate(order)}
    for i in range(n - 1):
        if held[i] and not held[i + 1]:  # displaced by exactly one position
            assert position[i] == position[i + 1] + 1
    gaps = {(v.due_ns - t) // MS for v, t in zip(verdicts, arrivals, strict=True) if v.reordered}
    assert gaps == {DEFAULT_REORDER_GAP_MS}


def test_reordered_packets_do_not_hold_back_their_successors() -> None:
    arrivals = stream(2000, 5)
    verdicts = simulate(ImpairSpec(delay_ms=10, reorder=0.2, seed=7), "up", arrivals)
    for v, t in zip(verdicts, arrivals, strict=True):
        assert v.due_ns - t == (40 if v.reordered else 10) * MS


def test_outage_drops_exactly_its_window_once_armed() -> None:
    spec = ImpairSpec(outage_ms=500, outage_in_s=1, seed=8)
    arrivals = stream(600, 5)  # 3 s
    dropped = [
        t for t, v in zip(arrivals, simulate(spec, "up", arrivals, 0), strict=True) if v.drop
    ]
    assert dropped == [t for t in arrivals if 1000 * MS <= t < 1500 * MS]
    assert len(dropped) == 100
    assert not any(v.drop for v in simulate(spec, "up", arrivals))  # never armed: no outage
    model = DirectionModel(spec, "down")
    assert model.arm(7 * MS) == (1007 * MS, 1507 * MS)


def test_outage_does_not_shift_the_other_models_draws() -> None:
    arrivals = stream(3000, 5)
    plain = simulate(ImpairSpec(loss=0.2, seed=9), "up", arrivals, 0)
    with_outage = simulate(ImpairSpec(loss=0.2, outage_ms=1000, seed=9), "up", arrivals, 0)
    for t, a, b in zip(arrivals, plain, with_outage, strict=True):
        if t >= 1000 * MS:
            assert a == b  # packet n's fate depends on the seed and n only


def test_seed_makes_runs_reproducible_and_directions_independent() -> None:
    spec = ImpairSpec(loss=0.3, jitter_ms=5, seed=10)
    arrivals = stream(500, 20)
    assert simulate(spec, "up", arrivals) == simulate(spec, "up", arrivals)
    assert simulate(spec, "up", arrivals) != simulate(spec, "down", arrivals)
    other = ImpairSpec(loss=0.3, jitter_ms=5, seed=11)
    assert simulate(spec, "up", arrivals) != simulate(other, "up", arrivals)


def test_helpers() -> None:
    assert loss_runs([True, True, False, True, False, False, True]) == [2, 1, 1]
    assert loss_runs([]) == []
    assert late_arrivals([0, 2, 1, 3, 5, 4, 6]) == 2
    assert late_arrivals([3, 0, 1, 2]) == 3


# ----------------------------------------------------------------- tc rendering


def test_filter_lines_divert_relay_traffic_per_direction_family_and_protocol() -> None:
    lines = impairctl.filter_lines("c1", "imp-c1-0", 0, ("up", "down"), ["198.51.100.1", "::1"])
    assert lines[0] == (
        "filter add dev c1 ingress protocol ip pref 4901 u32 match ip dst 198.51.100.1/32 "
        "match ip protocol 17 0xff action mirred egress redirect dev imp-c1-0"
    )
    assert lines[-1] == (
        "filter add dev c1 egress protocol ipv6 pref 4904 u32 match ip6 src ::1/128 "
        "match ip6 protocol 6 0xff action mirred egress redirect dev imp-c1-0"
    )
    assert len(lines) == 2 * 2 * 2  # directions x addresses x (udp, tcp)
    only_up = impairctl.filter_lines("c1", "t", 1, ("up",), ["198.51.100.1"])
    assert all(" ingress " in ln and " pref 4911 " in ln for ln in only_up)


def test_slots_never_share_a_priority() -> None:
    prefs = [
        impairctl.pref(s, d, f) for s in (0, 1) for d in ("up", "down") for f in ("ip", "ipv6")
    ]
    assert len(set(prefs)) == 8
    assert impairctl.delete_lines("c2", 1)[0] == "filter del dev c2 ingress pref 4911"
    assert len(impairctl.tap_name("c100", 1)) <= 15  # IFNAMSIZ - 1


# ----------------------------------------------------------------- CLI surface


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # click 8.1 mixes stderr into stdout by default
    except TypeError:  # click >= 8.2 always keeps them apart
        return CliRunner()


def impair(*args: str) -> Result:
    return _runner().invoke(cli.relayctl, ["testbed", "impair", "--prefix", "srunit", *args])


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--loss", "12x"], "Invalid value for '--loss': bad percentage '12x'"),
        (["--loss", "150"], "is not between 0 and 100%"),
        (["--delay", "20min"], "Invalid value for '--delay': bad duration '20min'"),
        (["--delay", "20000"], "--delay: 20000.0 is not between 0 and 10000 ms"),
        (["--jitter", "-1"], "bad duration '-1'"),
        (["--burst-loss", "10"], "--burst-loss needs --burst-length"),
        (["--burst-length", "3"], "--burst-length needs --burst-loss"),
        (["--burst-loss", "60", "--burst-length", "1"], "at most 50% loss"),
        (["--outage-in", "2"], "--outage-in needs --outage"),
        (["--reorder-gap", "30"], "--reorder-gap needs --reorder"),
        (["--direction", "sideways", "--loss", "1"], "Invalid value for '--direction'"),
        (["--seed", "-1", "--loss", "1"], "Invalid value for '--seed'"),
        ([], "nothing to apply"),
        (["--seed", "3"], "nothing to apply"),
        (["--clear", "--show"], "--clear and --show do not mix"),
        (["--clear", "--loss", "1"], "--clear takes no --loss"),
        (["--show", "--direction", "up"], "--show takes no --direction"),
    ],
)
def test_cli_errors_are_one_line(args: list[str], fragment: str) -> None:
    res = impair(*args)
    assert res.exit_code == 2, res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("relayctl: error: ")
    assert fragment in lines[0]
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_impair_help_lists_every_option() -> None:
    res = _runner().invoke(cli.relayctl, ["testbed", "impair", "--help"])
    assert res.exit_code == 0
    for opt in (
        "--direction",
        "--loss",
        "--burst-loss",
        "--burst-length",
        "--delay",
        "--jitter",
        "--reorder",
        "--reorder-gap",
        "--outage",
        "--outage-in",
        "--seed",
        "--limit",
        "--clear",
        "--show",
        "--json",
    ):
        assert opt in res.stdout


# ----------------------------------------------------------------- rendering


def _record(**over: Any) -> dict[str, Any]:
    counters = {
        "seen": 2000,
        "forwarded": 1800,
        "dropped": {"outage": 0, "burst": 0, "loss": 200, "queue_full": 0},
        "dropped_total": 200,
        "reordered": 0,
        "held": 1,
    }
    rec = {
        "client": "c1",
        "summary": "both: loss 10%",
        "spec": ImpairSpec(loss=0.1, seed=7).to_dict(),
        "daemon": {"pid": 42, "alive": True, "state": "active", "sched": "SCHED_FIFO 10"},
        "outage": None,
        "counters": {"up": counters, "down": counters},
        "lateness": {"buckets_us": [], "counts": [10, 5, 0, 0, 0, 1, 0, 0], "max_us": 1500.0},
        "problems": [],
    }
    return rec | over


def test_render_impairment() -> None:
    lines = cu.render_impairment(_record())
    assert lines[0] == (
        "impairment c1: both: loss 10% (seed 7, daemon pid 42 active, SCHED_FIFO 10)"
    )
    assert lines[1] == (
        "  up    seen 2000  forwarded 1800  dropped 200 (loss 200)  reordered 0  held 1"
    )
    assert lines[3] == "  sent within 1ms of due: 15/16, latest 1.50ms"
    dead = cu.render_impairment(
        _record(daemon={"pid": 42, "alive": False, "sched": None}, problems=["gone"])
    )
    assert "NOT RUNNING" in dead[0] and dead[-1] == "  problem: gone"


def test_render_cleared_and_empty_show() -> None:
    text = cu.render_cleared({"c1": _record(), "c2": None})
    assert text.splitlines()[0] == "c1: cleared"
    assert text.splitlines()[-1] == "c2: nothing to clear"
    assert cu.render_impairments("sr", {}) == "testbed sr: no impairment applied"
