"""The benchmark's pure helpers: frames (scapy as the independent oracle), parsing, reports.

No root, no namespaces, no timing: what a run measures is checked by the run
itself (ctl/bench.py check_sample); here we check the arithmetic and the
formats it relies on.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import click
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from ctl import bench, wire
from ctl.testbed import Testbed

SPEC = bench.FrameSpec(
    src_mac="02:00:c6:33:64:0b",
    dst_mac="02:00:c6:33:64:01",
    src_ip="198.51.100.11",
    dst_ip="198.51.100.1",
    src_port=40000,
    dst_port=3478,
    payload_size=160,
)


def _scapy_frame(spec: bench.FrameSpec) -> bytes:
    """The same frame as scapy renders it, checksums computed by scapy."""
    pkt = (
        Ether(src=spec.src_mac, dst=spec.dst_mac)
        / IP(src=spec.src_ip, dst=spec.dst_ip, id=0, flags="DF", ttl=64)
        / UDP(sport=spec.src_port, dport=spec.dst_port)
        / Raw(bench.voice_payload(spec.payload_size))
    )
    return bytes(pkt)


# --------------------------------------------------------------------------- frames


def test_frame_matches_scapy_byte_for_byte() -> None:
    assert bench.build_frame(SPEC) == _scapy_frame(SPEC)


@given(
    size=st.integers(bench.MIN_PAYLOAD, bench.MAX_PAYLOAD),
    sport=st.integers(1, 65535),
    dport=st.integers(1, 65535),
)
def test_frame_matches_scapy_for_any_size_and_ports(size: int, sport: int, dport: int) -> None:
    spec = dataclasses.replace(SPEC, payload_size=size, src_port=sport, dst_port=dport)
    assert bench.build_frame(spec) == _scapy_frame(spec)


def test_frame_checksums_verify_in_scapy() -> None:
    frame = bench.build_frame(SPEC)
    parsed = Ether(frame)
    ip_sum, udp_sum = parsed[IP].chksum, parsed[UDP].chksum
    del parsed[IP].chksum
    del parsed[UDP].chksum
    rebuilt = Ether(bytes(parsed))
    assert (rebuilt[IP].chksum, rebuilt[UDP].chksum) == (ip_sum, udp_sum)
    assert udp_sum != 0  # the relay's incremental update needs a real checksum


def test_frame_layout() -> None:
    frame = bench.build_frame(SPEC)
    parsed = Ether(frame)
    assert len(frame) == 14 + 20 + 8 + 160
    assert parsed[IP].flags == "DF" and parsed[IP].ttl == 64
    payload = bytes(parsed[UDP].payload)
    assert payload[0] == 0x80  # RTP version 2: not STUN (0..3), not DTLS (20..63)
    assert not wire.is_stun(payload)


@pytest.mark.parametrize("size", [bench.MIN_PAYLOAD - 1, bench.MAX_PAYLOAD + 1, 0])
def test_payload_size_bounds(size: int) -> None:
    with pytest.raises(ValueError):
        bench.voice_payload(size)


def test_max_payload_fits_mtu_after_encapsulation() -> None:
    assert 20 + 8 + wire.TUNNEL_HEADER_LEN + bench.MAX_PAYLOAD == 1500


def test_inet_checksum_rfc1071_example() -> None:
    data = bytes.fromhex("0001f203f4f5f6f7")  # RFC 1071 section 3 sum: 0xddf2
    assert bench.inet_checksum(data) == ~0xDDF2 & 0xFFFF


def test_inet_checksum_of_data_with_its_checksum_is_zero() -> None:
    data = bytes(range(1, 40))  # odd length: padded
    csum = bench.inet_checksum(data + b"\0")
    assert bench.inet_checksum(data + b"\0" + csum.to_bytes(2, "big")) == 0


def test_trafgen_packet_round_trips() -> None:
    frame = bench.build_frame(SPEC)
    text = bench.trafgen_packet(frame)
    assert text.startswith("{ ") and text.endswith(" }\n")
    values = [int(v, 16) for v in text.strip()[1:-1].split(",")]
    assert bytes(values) == frame


def test_mac_list() -> None:
    assert bench.mac_list("02:00:cb:00:71:0b") == "0x02,0x00,0xcb,0x00,0x71,0x0b"
    with pytest.raises(ValueError):
        bench.mac_list("02:00:cb")


# --------------------------------------------------------------------------- topology


def test_topology_from_the_testbed_plan() -> None:
    topo = bench.Topology.from_describe(Testbed(bench.PREFIX, 1, 1, 1).describe())
    assert (topo.relay_ns, topo.switch_ns) == ("srbench-relay1", "srbench-sw")
    assert (topo.pub_if, topo.dc_if) == ("pub0", "dc0")
    assert (topo.gen_port, topo.sink_port) == ("relay1-pub", "relay1-dc")
    assert (topo.client_ip, topo.public_ip) == ("198.51.100.11", "198.51.100.1")
    assert (topo.tunnel_ip, topo.transceiver_ip) == ("203.0.113.1", "203.0.113.11")
    spec = topo.frame_spec(160)
    assert (spec.src_mac, spec.dst_mac) == (topo.client_mac, topo.public_mac)
    assert (spec.dst_ip, spec.dst_port) == ("198.51.100.1", bench.PUBLIC_PORT)


# --------------------------------------------------------------------------- generator


def test_trafgen_is_bounded_in_count_and_time() -> None:
    argv = bench.trafgen_argv("relay1-pub", Path("/tmp/x.cfg"), 123, 8.0)
    assert argv[:6] == ["timeout", "-s", "INT", "-k", "2", "8.0"]
    assert argv[argv.index("--num") + 1] == "123"
    assert argv[argv.index("--cpus") + 1] == "1"
    assert argv[argv.index("--ring-size") + 1] == bench.TRAFGEN_RING
    assert "--no-sock-mem" in argv  # never touch system-wide socket memory


def test_packet_bound_exceeds_any_rate_for_the_whole_run() -> None:
    assert bench.packet_bound(8.0, max_pps=1_000_000) == 8_000_000
    assert bench.packet_bound(0.5, max_pps=3) == 2


def test_parse_trafgen_sent() -> None:
    out = "Running! Hang up with ^C!\n\n\r     6574080 packets outgoing\n\r  1327964160 bytes\n"
    assert bench.parse_trafgen_sent(out) == 6574080
    assert bench.parse_trafgen_sent("Flushing TX_RING failed") is None


def test_parse_net_dev() -> None:
    text = (
        "Inter-|   Receive                                                |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets"
        " errs drop fifo colls carrier compressed\n"
        "    lo:       0       0    0    0    0     0          0         0        0       0"
        "    0    0    0     0       0          0\n"
        "relay1-pub:  1368      10    0    0    0     0          0         0 1235927726"
        " 6574088    0    7    0     0       0          0\n"
    )
    assert bench.parse_net_dev(text, "relay1-pub") == (6574088, 7)
    with pytest.raises(bench.BenchError):
        bench.parse_net_dev(text, "relay1-dc")


def test_parse_proc_stat() -> None:
    text = (
        "cpu  82672 0 16977 429838 935 0 6818 32 0 0\n"
        "cpu0 31667 1 8973 221480 75 0 6534 10 5 0\n"
        "cpu1 51004 0 8004 208358 860 0 283 22 0 0\n"
    )
    cpu0 = bench.parse_proc_stat(text, 0)
    assert cpu0 == bench.CpuTimes(
        total=31667 + 1 + 8973 + 221480 + 75 + 6534 + 10, idle=221555, softirq=6534
    )
    with pytest.raises(bench.BenchError):
        bench.parse_proc_stat(text, 2)


def test_parse_stat_ticks_handles_spaces_in_the_name() -> None:
    stat = "4242 (trafgen worker) R 1 2 3 4 5 6 7 8 9 10 150 25 0 0 20 0 1 0 99 0 0"
    assert bench.parse_stat_ticks(stat) == 175


def test_process_tree_and_ticks_of_this_process() -> None:
    assert bench.process_tree(os.getpid())[0] == os.getpid()
    assert bench.process_ticks(os.getpid()) >= 0
    assert bench.process_ticks(2**22 + 12345) == 0  # beyond pid_max: gone


# --------------------------------------------------------------------------- windows


def _snap(
    t: float,
    sink: int,
    offered: int,
    fwd: int | None,
    softirq: int = 0,
    idle: int = 0,
    total: int = 0,
    diverted: dict[str, int] | None = None,
    frame: int = 202,
) -> bench.Snapshot:
    counts = None if fwd is None else bench.PathCounts(fwd, diverted or {})
    return bench.Snapshot(
        t,
        sink,
        sink * frame,
        offered,
        counts,
        bench.CpuTimes(total=total, idle=idle, softirq=softirq),
    )


def test_sample_rates_over_the_window() -> None:
    a = _snap(10.0, 1_000, 1_000, 1_000, softirq=100, total=1_000)
    b = _snap(12.0, 2_001_000, 2_001_000, 2_000_900, softirq=160, total=1_100)
    s = bench.sample_from(a, b, alive=True)
    assert s.delivered_pps == pytest.approx(1_000_000)
    assert s.offered_pps == pytest.approx(1_000_000)
    assert s.forwarded_pps == pytest.approx(999_950)
    assert s.sink_frame_bytes == pytest.approx(202)
    assert s.softirq_share == pytest.approx(0.6)
    assert s.softirq_ns_per_packet == pytest.approx(600)
    assert s.diverted == {}
    assert bench.check_sample(s, 202) == []


def test_generator_cpu_share() -> None:
    a = dataclasses.replace(_snap(0.0, 0, 0, 0, total=1_000), generator_ticks=50)
    b = dataclasses.replace(_snap(1.0, 10, 10, 10, total=1_100), generator_ticks=130)
    assert bench.sample_from(a, b, alive=True).generator_cpu_share == pytest.approx(0.8)


def test_sample_without_path_counters() -> None:
    s = bench.sample_from(_snap(0, 0, 0, None), _snap(1, 10, 10, None), alive=True)
    assert s.forwarded_pps is None and s.diverted is None
    assert s.softirq_share is None  # no CPU ticks elapsed


def test_zero_length_window_is_an_error() -> None:
    with pytest.raises(bench.BenchError):
        bench.sample_from(_snap(1, 0, 0, 0), _snap(1, 5, 5, 5), alive=True)


def _sample(**kw: object) -> bench.Sample:
    base = dict(
        delivered_pps=1e6,
        offered_pps=1e6,
        forwarded_pps=1e6,
        diverted={},
        sink_frame_bytes=226.0,
        window_s=5.0,
        generator_alive=True,
        softirq_share=0.6,
        idle_share=0.0,
    )
    return bench.Sample(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        ({"delivered_pps": 0.0, "forwarded_pps": 0.0}, "nothing delivered"),
        ({"generator_alive": False}, "generator stopped"),
        ({"forwarded_pps": 1.1e6}, "path forwarded"),
        ({"diverted": {"pass_unknown_client": 3}}, "pass_unknown_client=3"),
        ({"sink_frame_bytes": 202.0}, "expected 226"),
        ({"idle_share": 0.3}, "idle"),
    ],
)
def test_check_sample_names_the_problem(change: dict[str, object], expect: str) -> None:
    problems = bench.check_sample(_sample(**change), 226)
    assert len(problems) == 1 and expect in problems[0]


def test_check_sample_tolerates_frames_in_flight() -> None:
    assert bench.check_sample(_sample(forwarded_pps=1e6 + 5e3), 226) == []


# --------------------------------------------------------------------------- reports


def _results() -> list[bench.PathResult]:
    out = []
    for name, mode, pps, share in [
        ("ceiling", "native", [1.2e6, 1.25e6, 1.1e6], 0.6),
        ("relay-native", "native", [1.0e6, 0.9e6, 1.05e6], 0.65),
    ]:
        r = bench.PathResult(name, mode, 202)
        r.samples = [_sample(delivered_pps=p, offered_pps=p, softirq_share=share) for p in pps]
        out.append(r)
    return out


def test_medians_and_ratios() -> None:
    ceiling, relay = _results()
    assert ceiling.delivered == 1.2e6 and relay.delivered == 1.0e6
    assert bench.ratios([ceiling, relay]) == {"relay-native/ceiling": pytest.approx(1 / 1.2)}
    assert bench.extra_ns(relay, ceiling) == pytest.approx(1e3 - 1e3 / 1.2)
    rx = bench.rx_ratios([ceiling, relay])["relay-native/ceiling"]
    assert rx == pytest.approx((0.6 * 1e9 / 1.2e6) / (0.65 * 1e9 / 1.0e6))


def test_no_ceiling_no_ratios() -> None:
    _, relay = _results()
    assert bench.ratios([relay]) == {} and bench.rx_ratios([relay]) == {}
    assert "relay-native" in bench.format_table([relay])


def test_table() -> None:
    ceiling, relay = _results()
    relay.problems = ["run 2: nothing delivered"]
    table = bench.format_table([ceiling, relay])
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["path", "mode", "delivered"]
    assert "1,200,000" in lines[1] and "100.0 %" in lines[1] and lines[1].endswith("ok")
    assert "83.3 %" in lines[2] and "+167" in lines[2] and lines[2].endswith("FAILED")
    assert lines[3] == "problems:" and "nothing delivered" in lines[4]
    assert all(len(line) <= 100 for line in lines)


def test_contention_note() -> None:
    ceiling, relay = _results()
    assert bench.contention_note([ceiling, relay]) is None
    relay.samples[1] = _sample(generator_cpu_share=0.62)
    note = bench.contention_note([ceiling, relay])
    assert note is not None and "relay-native run 2 (62%)" in note


def test_report_json() -> None:
    ceiling, relay = _results()
    report = bench.report_json([ceiling, relay], {"kernel": "x", "cpu_count": 2})
    json.dumps(report)  # serialisable as is
    assert [p["name"] for p in report["paths"]] == ["ceiling", "relay-native"]
    assert report["ratios"] == {"relay-native/ceiling": 0.8333}
    assert set(report["ratios_rx_cpu"]) == {"relay-native/ceiling"}
    relay_json = report["paths"][1]
    assert relay_json["delivered_pps"] == 1_000_000
    assert (relay_json["delivered_pps_min"], relay_json["delivered_pps_max"]) == (
        900_000,
        1_050_000,
    )
    assert relay_json["ratio_to_ceiling"] == 0.8333 and relay_json["ok"] is True
    assert len(relay_json["samples"]) == 3
    assert relay_json["samples"][0]["softirq_ns_per_packet"] == pytest.approx(650)
    assert report["kernel"] == "x" and report["cpu_count"] == 2


# --------------------------------------------------------------------------- paths and options


def test_paths_are_uniquely_named_and_labelled() -> None:
    names = [p.name for p in bench.PATHS]
    assert len(names) == len(set(names)) and bench.CEILING in names
    assert {p.mode for p in bench.PATHS} <= {"native", "generic", "userspace"}
    relay = [p for p in bench.PATHS if p.name.startswith("relay-")]
    assert relay and all(p.overhead == wire.TUNNEL_HEADER_LEN for p in relay)


def test_select_paths_keeps_list_order_and_rejects_unknown() -> None:
    chosen = bench.select_paths(["relay-generic", "ceiling"])
    assert [p.name for p in chosen] == ["ceiling", "relay-generic"]
    with pytest.raises(bench.BenchError, match="relay-dpdk"):
        bench.select_paths(["relay-dpdk"])


def test_parse_args_defaults() -> None:
    opts = bench.parse_args([])
    assert opts.paths == tuple(p.name for p in bench.PATHS)
    assert (opts.size, opts.json, opts.output) == (160, False, bench.RESULTS_FILE)
    assert opts.duration > 0 and opts.repeat >= 1


def test_parse_args_options() -> None:
    opts = bench.parse_args(
        [
            "--duration",
            "2",
            "--size",
            "64",
            "--repeat",
            "3",
            "--json",
            "--paths",
            "ceiling, relay-native",
        ]
    )
    assert (opts.duration, opts.size, opts.repeat, opts.json) == (2.0, 64, 3, True)
    assert opts.paths == ("ceiling", "relay-native")


@pytest.mark.parametrize(
    "argv", [["--size", "11"], ["--size", "1449"], ["--repeat", "0"], ["--duration", "0"]]
)
def test_parse_args_rejects(argv: list[str]) -> None:
    with pytest.raises(click.UsageError):
        bench.parse_args(argv)
