"""The namespace testbed builds the documented topology, routes through the relay,
is idempotent, repairs itself and leaves nothing behind (real namespaces, as root)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from ctl.netns import NetnsError, in_netns, list_netns, netns_exists, run_in
from ctl.testbed import Testbed, TestbedError

pytestmark = pytest.mark.root

IFA_F_TENTATIVE = 0x40


def ping(tb: Testbed, host: str, addr: str) -> subprocess.CompletedProcess[str]:
    """One bounded echo request from `host` (`ping -c 1 -W 1`)."""
    if shutil.which("ping") is None:
        pytest.fail("`ping` is not installed (Debian package iputils-ping)", pytrace=False)
    return run_in(tb.netns(host), ["ping", "-n", "-c", "1", "-W", "1", addr], check=False)


def addresses(ns: str) -> dict[str, list[tuple[str, int, int]]]:
    """ifname -> [(address, prefixlen, flags)] in namespace `ns`."""
    with IPRoute(netns=ns, flags=0) as ipr:
        names = {link["index"]: link.get("IFLA_IFNAME") for link in ipr.get_links()}
        out: dict[str, list[tuple[str, int, int]]] = {}
        for a in ipr.get_addr():
            flags = a.get("IFA_FLAGS") or a["flags"]
            out.setdefault(names[a["index"]], []).append(
                (a.get("IFA_ADDRESS"), a["prefixlen"], flags)
            )
        return out


def link_indexes(tb: Testbed) -> dict[tuple[str, str], int]:
    """(netns, ifname) -> ifindex for every link of the testbed."""
    out = {}
    for ns in tb.namespaces:
        with IPRoute(netns=ns, flags=0) as ipr:
            for link in ipr.get_links():
                out[(ns, link.get("IFLA_IFNAME"))] = link["index"]
    return out


def root_link_names() -> set[str]:
    with IPRoute() as ipr:
        return {link.get("IFLA_IFNAME") for link in ipr.get_links()}


def our_link_names(tb: Testbed) -> set[str]:
    """Switch-port names of the testbed: none of them may ever appear in the root netns."""
    return {ln.port for h in tb.hosts.values() for ln in h.links}


# --------------------------------------------------------------------------- topology


def test_every_namespace_exists(testbed: Testbed) -> None:
    desc = testbed.describe()
    assert desc["namespaces"][0] == "srtb-sw"
    for ns in desc["namespaces"]:
        assert netns_exists(ns), ns
    assert set(desc["namespaces"]) == {
        "srtb-sw",
        "srtb-relay1",
        "srtb-relay2",
        "srtb-c1",
        "srtb-c2",
        "srtb-tx1",
        "srtb-tx2",
        "srtb-redis",
    }


@pytest.mark.parametrize(
    ("host", "ifname", "v4", "v6"),
    [
        ("c1", "eth0", "198.51.100.11", "2001:db8:c::11"),
        ("c2", "eth0", "198.51.100.12", "2001:db8:c::12"),
        ("relay1", "pub0", "198.51.100.1", "2001:db8:c::1"),
        ("relay1", "dc0", "203.0.113.1", "2001:db8:1::1"),
        ("relay2", "pub0", "198.51.100.2", "2001:db8:c::2"),
        ("relay2", "dc0", "203.0.113.2", "2001:db8:1::2"),
        ("tx1", "eth0", "203.0.113.11", "2001:db8:1::11"),
        ("tx2", "eth0", "203.0.113.12", "2001:db8:1::12"),
        ("redis", "eth0", "203.0.113.20", "2001:db8:1::20"),
    ],
)
def test_addresses_present_and_usable(
    testbed: Testbed, host: str, ifname: str, v4: str, v6: str
) -> None:
    addrs = addresses(testbed.netns(host))
    have = {(a, plen) for a, plen, _ in addrs[ifname]}
    mac = testbed.describe()["hosts"][host]["interfaces"][ifname]["mac"]
    assert mac == "02:00:" + ":".join(f"{int(b):02x}" for b in v4.split("."))
    with IPRoute(netns=testbed.netns(host), flags=0) as ipr:
        assert ipr.get_links(ifname=ifname)[0].get("IFLA_ADDRESS") == mac
    assert (v4, 24) in have
    assert (v6, 64) in have
    tentative = [a for a, _, flags in addrs[ifname] if flags & IFA_F_TENTATIVE]
    assert tentative == [], f"{host}: tentative addresses {tentative}"
    assert ("127.0.0.1", 8) in {(a, p) for a, p, _ in addrs["lo"]}


def test_nothing_in_root_namespace(testbed: Testbed) -> None:
    assert not our_link_names(testbed) & root_link_names()


def test_tx_checksum_offload_off_on_every_veth_end(testbed: Testbed) -> None:
    if shutil.which("ethtool") is None:
        pytest.fail("`ethtool` is not installed", pytrace=False)
    ends = [(h.netns, ln.ifname) for h in testbed.hosts.values() for ln in h.links]
    ends += [(testbed.switch_ns, port) for port in sorted(our_link_names(testbed))]
    for ns, dev in ends:
        out = run_in(ns, ["ethtool", "-k", dev]).stdout
        assert "tx-checksumming: off" in out, f"{ns}:{dev}\n{out}"


def test_xdp_pass_on_switch_ports_facing_relays(testbed: Testbed) -> None:
    with IPRoute(netns=testbed.switch_ns, flags=0) as ipr:
        for link in ipr.get_links():
            name = link.get("IFLA_IFNAME")
            xdp = link.get("IFLA_XDP")
            drv = bool(xdp and xdp.get("IFLA_XDP_DRV_PROG_ID"))
            assert drv == name.startswith("relay"), f"{name}: xdp {xdp}"


# --------------------------------------------------------------------------- traffic


@pytest.mark.parametrize("addr", ["198.51.100.1", "2001:db8:c::1"])
def test_client_pings_relay_public(testbed: Testbed, addr: str) -> None:
    res = ping(testbed, "c1", addr)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("addr", ["203.0.113.11", "2001:db8:1::11", "203.0.113.20"])
def test_client_pings_inside_through_relay(testbed: Testbed, addr: str) -> None:
    res = ping(testbed, "c2", addr)
    assert res.returncode == 0, res.stdout + res.stderr
    # One router on the way (relay1) decrements the TTL / hop limit from 64.
    assert "ttl=63" in res.stdout, res.stdout


@pytest.mark.parametrize(
    ("family", "client_addr", "tx_addr"),
    [
        (socket.AF_INET, "198.51.100.11", "203.0.113.11"),
        (socket.AF_INET6, "2001:db8:c::11", "2001:db8:1::11"),
    ],
)
def test_udp_from_client_netns_reaches_transceiver_netns(
    testbed: Testbed, family: int, client_addr: str, tx_addr: str
) -> None:
    with in_netns(testbed.netns("tx1")):
        server = socket.socket(family, socket.SOCK_DGRAM)
    with in_netns(testbed.netns("c1")):
        client = socket.socket(family, socket.SOCK_DGRAM)
    with server, client:
        server.bind((tx_addr, 0))
        client.bind((client_addr, 0))
        server.settimeout(2)
        client.settimeout(2)
        client.sendto(b"hello tx1", (tx_addr, server.getsockname()[1]))
        data, src = server.recvfrom(2048)
        assert data == b"hello tx1"
        # Routed, not NATed: the transceiver sees the client's real address.
        assert src[:2] == client.getsockname()[:2]
        server.sendto(b"hello c1", src)
        assert client.recvfrom(2048)[0] == b"hello c1"


def test_in_netns_moves_only_this_thread_and_restores(testbed: Testbed) -> None:
    before = os.stat("/proc/thread-self/ns/net").st_ino
    with pytest.raises(NetnsError, match="does not exist"), in_netns("srtb-no-such-ns"):
        pass
    assert os.stat("/proc/thread-self/ns/net").st_ino == before
    with pytest.raises(RuntimeError, match="boom"), in_netns(testbed.netns("c1")):
        assert os.stat("/proc/thread-self/ns/net").st_ino != before
        raise RuntimeError("boom")
    assert os.stat("/proc/thread-self/ns/net").st_ino == before


def test_run_in_reports_failures_clearly(testbed: Testbed) -> None:
    with pytest.raises(NetnsError, match=r"in netns srtb-c1: false exited 1"):
        run_in(testbed.netns("c1"), ["false"])
    with pytest.raises(NetnsError, match="does not exist"):
        run_in("srtb-no-such-ns", ["true"])


# --------------------------------------------------------------------------- lifecycle


def test_describe_is_json_with_documented_addresses(testbed: Testbed) -> None:
    desc: dict[str, Any] = json.loads(json.dumps(testbed.describe()))
    hosts = desc["hosts"]
    assert hosts["relay1"]["public"] == {
        "interface": "pub0",
        "ipv4": "198.51.100.1",
        "ipv6": "2001:db8:c::1",
    }
    assert hosts["relay1"]["tunnel"] == {
        "interface": "dc0",
        "ipv4": "203.0.113.1",
        "ipv6": "2001:db8:1::1",
    }
    assert hosts["relay2"]["public"]["ipv4"] == "198.51.100.2"
    assert desc["relay_metrics_url"] == "http://198.51.100.1:9478/metrics"
    assert desc["signaling_urls"] == ["http://203.0.113.11:8080", "http://203.0.113.12:8080"]
    assert hosts["tx1"]["signaling_url6"] == "http://[2001:db8:1::11]:8080"
    assert (hosts["c1"]["ipv4"], hosts["c1"]["ipv6"]) == ("198.51.100.11", "2001:db8:c::11")
    assert (hosts["c1"]["gateway4"], hosts["c1"]["gateway6"]) == ("198.51.100.1", "2001:db8:c::1")
    assert hosts["tx2"]["gateway4"] == "203.0.113.1"
    assert desc["redis_url"] == "redis://203.0.113.20:6379/0"
    assert desc["clients"] == ["c1", "c2"]
    assert desc["relays"] == ["relay1", "relay2"]
    assert desc["transceivers"] == ["tx1", "tx2"]
    assert all(len(p) <= 15 for ports in desc["switch"]["bridges"].values() for p in ports)


def test_up_twice_is_idempotent(testbed: Testbed) -> None:
    before_desc, before_links = testbed.describe(), link_indexes(testbed)
    assert testbed.up() == before_desc
    assert testbed.changes == []
    assert link_indexes(testbed) == before_links  # nothing was recreated


def test_status_reports_up(testbed: Testbed) -> None:
    status = testbed.status()
    assert status["state"] == "up", status["problems"]
    assert status["up"] is True
    assert all(status["namespaces"].values())
    assert json.dumps(status)


def test_half_built_testbed_is_repaired(testbed: Testbed) -> None:
    run_in(testbed.netns("tx1"), ["ip", "link", "del", "eth0"])
    run_in(testbed.netns("c1"), ["ip", "addr", "del", "2001:db8:c::11/64", "dev", "eth0"])
    run_in(testbed.switch_ns, ["ip", "link", "set", "relay1-pub", "xdp", "off"])
    status = testbed.status()
    assert status["state"] == "partial"
    assert any("tx1" in p for p in status["problems"])
    testbed.up()
    assert testbed.changes, "up() should have repaired something"
    assert testbed.status()["state"] == "up"
    assert ping(testbed, "c1", "2001:db8:1::11").returncode == 0
    assert ping(testbed, "c1", "203.0.113.11").returncode == 0


def test_from_state_reads_the_built_sizes(testbed: Testbed) -> None:
    again = Testbed.from_state(testbed.prefix)
    assert (again.clients, again.relays, again.transceivers) == (2, 2, 2)


@pytest.mark.parametrize("keep_mounts", [True, False])
def test_spawn_runs_in_the_host_namespace(testbed: Testbed, keep_mounts: bool) -> None:
    script = "readlink /proc/self/ns/net; stat -f -c %T /sys/fs/bpf 2>/dev/null || echo none"
    proc = testbed.spawn(
        "relay1", ["sh", "-c", script], name=f"probe-{keep_mounts}", keep_mounts=keep_mounts
    )
    assert proc.wait(timeout=5) == 0
    record = testbed.status()["processes"][-1]
    netns_line, fs_type = Path(record["log"]).read_text().split()
    inode = os.stat(f"/run/netns/{testbed.netns('relay1')}").st_ino
    assert netns_line == f"net:[{inode}]"
    host_fs = "bpf_fs" if os.path.ismount("/sys/fs/bpf") else None
    if keep_mounts and host_fs:
        assert fs_type == host_fs  # the relay can pin maps where bpftool finds them
    if not keep_mounts:
        assert fs_type != "bpf_fs"  # `ip netns exec` remounts /sys


def test_down_removes_everything_and_stops_processes() -> None:
    tb = Testbed("srtd")
    tb.up()
    proc = tb.spawn("tx1", ["sleep", "60"], name="sleeper")
    assert [p["alive"] for p in tb.status()["processes"]] == [True]
    assert tb.state_file.exists()
    removed = tb.down()
    assert set(removed) == set(tb.namespaces)
    assert proc.wait(timeout=5) is not None
    assert list_netns("srtd-") == []
    assert not tb.state_file.exists()
    assert not tb.log_dir.exists()
    assert not our_link_names(tb) & root_link_names()
    assert tb.status()["state"] == "down"
    assert tb.down() == []  # fine when nothing is up


def test_not_root_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(TestbedError, match="needs root"):
        Testbed("srtx").up()


@pytest.mark.parametrize(
    "kwargs",
    [{"prefix": "Bad-Prefix"}, {"clients": 0}, {"relays": 3}, {"transceivers": 10}],
)
def test_bad_arguments_are_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(TestbedError):
        Testbed(**kwargs)
