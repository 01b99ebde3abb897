"""Single-machine testbed: clients, relays, transceivers and Redis in network namespaces.

`relayctl testbed up|down|status`, the integration and end-to-end tests, the demo and
the benchmarks all run on this topology, so its names and addresses are a contract
(they are the documentation ranges fixed by the brief):

    <p>-c<i>      eth0  198.51.100.(10+i)/24  2001:db8:c::(10+i)/64   via relay1
    <p>-relay<k>  pub0  198.51.100.k/24       2001:db8:c::k/64        (public, port 3478)
                  dc0   203.0.113.k/24        2001:db8:1::k/64        (tunnel side)
    <p>-tx<j>     eth0  203.0.113.(10+j)/24   2001:db8:1::(10+j)/64   via relay1
    <p>-redis     eth0  203.0.113.20/24       2001:db8:1::20/64       via relay1
    <p>-sw        bridges `lan` (client side) and `dc` (inside); one port per host link,
                  named after the host (`c1`, `tx1`, `redis`, `relay1-pub`, `relay1-dc`)

Every host link is a veth pair created directly between `<p>-sw` and the host's
namespace, so nothing ever appears in the root namespace and no name can collide
with the machine's own interfaces; the prefix keeps two testbeds (a user's "sr"
and a test suite's, e.g. "srtb") apart.

Why the less obvious settings:

* Transmit checksum offload is OFF on every veth end. A veth never computes
  checksums: with offload on, locally sent UDP leaves as CHECKSUM_PARTIAL with only
  the pseudo-header sum in the UDP checksum field. An XDP program that rewrites
  such a packet (the relay's encap/decap) would then fix up a checksum that is not
  the real one and the receiver drops the result. With offload off the stack
  writes the full checksum before the packet reaches XDP.
* Native XDP on veth: a frame redirected (or XDP_TX'ed) into a veth is delivered
  only if the *receiving* peer has an XDP program of its own. The relay's
  interfaces face switch ports, so those ports get a minimal `XDP_PASS` program
  (`Testbed.attach_peer_xdp_pass`).
* IPv6 duplicate address detection is disabled (per namespace and with `nodad` on
  each address) so addresses are usable at once, without sleeping; `up()` still
  verifies none is left "tentative".
* Reverse-path filtering is off: new namespaces inherit the host's IPv4 settings,
  and a strict host value would make forwarding and spoofed-source tests depend on
  the machine.
* The bridges have STP and multicast snooping off: ports forward as soon as they
  are up, and IPv6 neighbour discovery never depends on an MLD querier.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, NetlinkError
from pyroute2 import netns as pr_netns

from ctl.netns import (
    NetnsError,
    create_netns,
    in_netns,
    list_netns,
    netns_exists,
    popen_in,
    remove_netns,
)

STATE_DIR = Path("/run/splitrelay")
RELAY_PORT = 3478
METRICS_PORT = 9478
SIGNALING_PORT = 8080
REDIS_PORT = 6379

LAN4, LAN6 = "198.51.100.", "2001:db8:c::"
DC4, DC6 = "203.0.113.", "2001:db8:1::"
PREFIXLEN4, PREFIXLEN6 = 24, 64
REDIS_HOST_ID = 20

XDP_FLAGS_DRV_MODE = 1 << 2
IFF_UP = 0x1
IFA_F_NODAD = 0x02
IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40
SIOCETHTOOL = 0x8946
ETHTOOL_GTXCSUM = 0x16
ETHTOOL_STXCSUM = 0x17

MAX_CLIENTS = 100
MAX_TRANSCEIVERS = 9  # tx10 would take .20, which is Redis
_PREFIX_RE = re.compile(r"[a-z][a-z0-9]{0,11}")
_XDP_PASS_SRC = "int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }"


class TestbedError(RuntimeError):
    """The testbed could not be built, inspected or torn down; the message says why."""

    __test__ = False  # not a pytest test class, despite the name


@dataclass(frozen=True)
class Link:
    """One veth pair: `ifname` in the host namespace, `port` on `bridge` in `<p>-sw`."""

    ifname: str
    port: str
    bridge: str
    ipv4: str
    ipv6: str
    xdp_peer: bool = False

    @property
    def mac(self) -> str:
        """Fixed MAC of the host end: 02:00 + the IPv4 address bytes.

        Fixed rather than random so that a repaired (recreated) veth keeps its MAC
        and the neighbours' ARP/ND caches stay right, and so captures are readable.
        """
        return "02:00:" + ":".join(f"{int(b):02x}" for b in self.ipv4.split("."))

    @property
    def port_mac(self) -> str:
        """Fixed MAC of the switch end: 02:01 + the host end's IPv4 address bytes."""
        return "02:01:" + self.mac[6:]

    def describe(self) -> dict[str, Any]:
        """The JSON form used in `Testbed.describe()`."""
        return {
            "ipv4": f"{self.ipv4}/{PREFIXLEN4}",
            "ipv6": f"{self.ipv6}/{PREFIXLEN6}",
            "mac": self.mac,
            "bridge": self.bridge,
            "switch_port": self.port,
        }


@dataclass(frozen=True)
class Host:
    """A host namespace, its links, default gateways and whether it routes."""

    name: str
    role: str
    netns: str
    links: tuple[Link, ...]
    gateway4: str | None = None
    gateway6: str | None = None
    forwarding: bool = False


# --------------------------------------------------------------------------- helpers


def require_root() -> None:
    """Fail loudly (never skip) when not root: namespaces, veths and XDP need it."""
    if os.geteuid() != 0:
        raise TestbedError(
            "the namespace testbed needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN); run it with sudo"
        )


def _sysctl_path(key: str) -> Path:
    return Path("/proc/sys") / key.replace(".", "/")


def _ensure_sysctls(ns: str, wanted: dict[str, str], rec: _Reconciler) -> None:
    """Set sysctls of namespace `ns`, writing only those that differ.

    /proc/sys/net resolves against the calling thread's namespace, so entering the
    namespace with setns is enough; no process per value.
    """
    with in_netns(ns):
        for key, value in wanted.items():
            path = _sysctl_path(key)
            try:
                current = path.read_text().strip()
            except FileNotFoundError:
                raise TestbedError(f"{ns}: sysctl {key} does not exist") from None
            if current != value and rec.need(f"{ns}: sysctl {key}={value}"):
                path.write_text(value)


def _tx_csum(ifname: str, enable: bool | None = None) -> bool:
    """Read (enable=None) or set transmit checksum offload of `ifname`.

    The ETHTOOL_[GS]TXCSUM ioctl is what `ethtool -K <dev> tx on|off` does: setting
    it clears every tx-checksum feature (and TSO, which depends on them). It acts
    in the calling thread's namespace, so callers wrap it in `in_netns`.
    """
    cmd = ETHTOOL_GTXCSUM if enable is None else ETHTOOL_STXCSUM
    buf = array.array("I", [cmd, int(bool(enable))])
    ifreq = struct.pack("16sP", ifname.encode(), buf.buffer_info()[0]).ljust(40, b"\0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)
        except OSError as exc:
            raise TestbedError(f"ethtool ioctl on {ifname}: {exc}") from exc
    return bool(buf[1]) if enable is None else bool(enable)


def _exists_here(ifname: str) -> bool:
    """True if `ifname` exists in the calling thread's namespace."""
    try:
        socket.if_nametoindex(ifname)
    except OSError:
        return False
    return True


def _link(ipr: IPRoute, ifname: str) -> Any | None:
    """The link message named `ifname`, or None."""
    idx = ipr.link_lookup(ifname=ifname)
    return ipr.link("get", index=idx[0])[0] if idx else None


def _xdp_drv_attached(link: Any) -> bool:
    """True when a native (driver mode) XDP program is attached to `link`."""
    xdp = link.get("IFLA_XDP")
    return bool(xdp and xdp.get("IFLA_XDP_DRV_PROG_ID"))


def _proc_starttime(pid: int) -> int | None:
    """Start time of `pid` in clock ticks, to tell a process from a reused PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3 of the man page); starttime is field 22.
    return None if fields[0] in ("Z", "X") else int(fields[19])


# Popen objects of processes this process spawned: reaped through them so that
# their returncode stays right for callers that hold them.
_spawned: dict[int, subprocess.Popen[bytes]] = {}


def _reap(pid: int) -> None:
    """Collect `pid` if it is our child, so it does not linger as a zombie."""
    proc = _spawned.get(pid)
    if proc is not None:
        if proc.poll() is not None:
            del _spawned[pid]
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _signal(pid: int, sig: int) -> None:
    """Signal a process and its process group (spawned processes lead their own)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _stop_pids(pids: dict[int, int | None], grace: float = 3.0) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL what is left (bounded).

    `pids` maps PID -> recorded start time (None: do not check), so a PID reused by
    an unrelated process since we recorded it is left alone.
    """
    live = {p for p, st in pids.items() if (cur := _proc_starttime(p)) and (st in (None, cur))}
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        for pid in live:
            _signal(pid, sig)
        deadline = time.monotonic() + wait
        while live and time.monotonic() < deadline:
            for pid in list(live):
                _reap(pid)
                if _proc_starttime(pid) is None:
                    live.discard(pid)
            if live:
                time.sleep(0.02)
        if not live:
            return
    raise TestbedError(f"processes did not exit after SIGKILL: {sorted(live)}")


class _Reconciler:
    """Collects what differs from the plan; `fix` says whether to repair it now.

    One code path serves both `up()` (fix) and `status()` (only report), so the
    two can never disagree about what a complete testbed is.
    """

    def __init__(self, fix: bool) -> None:
        self.fix = fix
        self.changes: list[str] = []

    def need(self, what: str) -> bool:
        """Record `what`; True when the caller should fix it."""
        self.changes.append(what)
        return self.fix


_xdp_lock = threading.Lock()
_xdp_pass: Any = None  # (BPF, function), compiled once per process


def _xdp_pass_fn() -> Any:
    """Compile the XDP_PASS program once; the BPF object stays alive with the module."""
    global _xdp_pass
    with _xdp_lock:
        if _xdp_pass is None:
            from bcc import BPF  # imported lazily: only up() needs clang

            bpf = BPF(text=_XDP_PASS_SRC.encode())
            _xdp_pass = (bpf, bpf.load_func(b"xdp_pass", BPF.XDP))
        return _xdp_pass[1]


# --------------------------------------------------------------------------- testbed


class Testbed:
    """The namespace testbed for one prefix: plan, build, inspect, tear down.

    The plan (names and addresses) is a pure function of the constructor
    arguments; `describe()` returns it without touching the system, `up()` makes
    the system match it, `status()` compares without changing anything.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self, prefix: str = "sr", clients: int = 1, relays: int = 1, transceivers: int = 2
    ) -> None:
        if not _PREFIX_RE.fullmatch(prefix):
            raise TestbedError(f"bad prefix {prefix!r}: 1-12 chars, [a-z][a-z0-9]*")
        if not 1 <= clients <= MAX_CLIENTS:
            raise TestbedError(f"clients must be 1..{MAX_CLIENTS}, not {clients}")
        if relays not in (1, 2):
            raise TestbedError(f"relays must be 1 or 2, not {relays}")
        if not 1 <= transceivers <= MAX_TRANSCEIVERS:
            raise TestbedError(f"transceivers must be 1..{MAX_TRANSCEIVERS}, not {transceivers}")
        self.prefix = prefix
        self.clients = clients
        self.relays = relays
        self.transceivers = transceivers
        self.switch_ns = f"{prefix}-sw"
        self.hosts: dict[str, Host] = {h.name: h for h in self._plan()}
        self.state_file = STATE_DIR / f"testbed-{prefix}.json"
        self.log_dir = STATE_DIR / f"testbed-{prefix}-logs"
        # `testbed impair` (ctl/impairctl.py) keeps its records and daemons' state here.
        self.impair_dir = STATE_DIR / f"testbed-{prefix}-impair"
        self.changes: list[str] = []

    @classmethod
    def from_state(cls, prefix: str = "sr") -> Testbed:
        """The testbed as last built for `prefix` (its sizes come from the state file).

        `relayctl testbed status|down` use this so they act on what `up` made, not
        on default sizes.
        """
        state = cls(prefix)._load_state()
        cfg = state.get("config", {}) if state else {}
        return cls(prefix, **{k: int(v) for k, v in cfg.items()})

    # ------------------------------------------------------------------ plan

    def _plan(self) -> list[Host]:
        """Every host namespace with its links and routes, in creation order."""
        p = self.prefix
        gw4, gw6 = f"{LAN4}1", f"{LAN6}1"
        in4, in6 = f"{DC4}1", f"{DC6}1"
        hosts = [
            Host(
                f"relay{k}",
                "relay",
                f"{p}-relay{k}",
                (
                    Link("pub0", f"relay{k}-pub", "lan", f"{LAN4}{k}", f"{LAN6}{k}", True),
                    Link("dc0", f"relay{k}-dc", "dc", f"{DC4}{k}", f"{DC6}{k}", True),
                ),
                forwarding=True,
            )
            for k in range(1, self.relays + 1)
        ]
        for i in range(1, self.clients + 1):
            link = Link("eth0", f"c{i}", "lan", f"{LAN4}{10 + i}", f"{LAN6}{10 + i}")
            hosts.append(Host(f"c{i}", "client", f"{p}-c{i}", (link,), gw4, gw6))
        for j in range(1, self.transceivers + 1):
            link = Link("eth0", f"tx{j}", "dc", f"{DC4}{10 + j}", f"{DC6}{10 + j}")
            hosts.append(Host(f"tx{j}", "transceiver", f"{p}-tx{j}", (link,), in4, in6))
        rid = REDIS_HOST_ID
        link = Link("eth0", "redis", "dc", f"{DC4}{rid}", f"{DC6}{rid}")
        hosts.append(Host("redis", "redis", f"{p}-redis", (link,), in4, in6))
        return hosts

    @property
    def namespaces(self) -> list[str]:
        """All namespaces of the plan, the switch first."""
        return [self.switch_ns, *(h.netns for h in self.hosts.values())]

    def netns(self, host: str) -> str:
        """Namespace of a host given by short name (`tx1`) or full name (`sr-tx1`)."""
        if host in self.hosts:
            return self.hosts[host].netns
        if host == self.switch_ns or any(h.netns == host for h in self.hosts.values()):
            return host
        raise TestbedError(f"no host {host!r} in testbed {self.prefix!r}")

    def describe(self) -> dict[str, Any]:
        """JSON-able description: namespaces, interfaces, addresses and service URLs.

        It depends only on the plan, so it is identical before and after `up()`.
        """
        hosts: dict[str, Any] = {}
        for h in self.hosts.values():
            entry: dict[str, Any] = {
                "role": h.role,
                "netns": h.netns,
                "interfaces": {ln.ifname: ln.describe() for ln in h.links},
            }
            if h.gateway4:
                entry |= {"gateway4": h.gateway4, "gateway6": h.gateway6}
            if h.role == "relay":
                pub, dc = h.links
                entry["public"] = {"interface": pub.ifname, "ipv4": pub.ipv4, "ipv6": pub.ipv6}
                entry["tunnel"] = {"interface": dc.ifname, "ipv4": dc.ipv4, "ipv6": dc.ipv6}
                entry["relay_addr"] = [f"{pub.ipv4}:{RELAY_PORT}", f"[{pub.ipv6}]:{RELAY_PORT}"]
                entry["metrics_url"] = f"http://{pub.ipv4}:{METRICS_PORT}/metrics"
            else:
                entry |= {"ipv4": h.links[0].ipv4, "ipv6": h.links[0].ipv6}
            if h.role == "transceiver":
                entry["signaling_url"] = f"http://{h.links[0].ipv4}:{SIGNALING_PORT}"
                entry["signaling_url6"] = f"http://[{h.links[0].ipv6}]:{SIGNALING_PORT}"
            if h.role == "redis":
                entry["url"] = f"redis://{h.links[0].ipv4}:{REDIS_PORT}/0"
            hosts[h.name] = entry
        by_role = {
            role: [n for n, h in self.hosts.items() if h.role == role]
            for role in ("client", "relay", "transceiver")
        }
        return {
            "prefix": self.prefix,
            "config": self._config(),
            "state_file": str(self.state_file),
            "namespaces": self.namespaces,
            "switch": {"netns": self.switch_ns, "bridges": self._bridge_ports()},
            "hosts": hosts,
            "clients": by_role["client"],
            "relays": by_role["relay"],
            "transceivers": by_role["transceiver"],
            "signaling_urls": [hosts[n]["signaling_url"] for n in by_role["transceiver"]],
            "relay_metrics_url": hosts["relay1"]["metrics_url"],
            "redis_url": hosts["redis"]["url"],
        }

    def _config(self) -> dict[str, int]:
        return {"clients": self.clients, "relays": self.relays, "transceivers": self.transceivers}

    def _bridge_ports(self) -> dict[str, list[str]]:
        ports: dict[str, list[str]] = {"lan": [], "dc": []}
        for h in self.hosts.values():
            for ln in h.links:
                ports[ln.bridge].append(ln.port)
        return ports

    # ------------------------------------------------------------------ up / status

    def up(self) -> dict[str, Any]:
        """Build (or repair) the testbed and return `describe()`.

        Idempotent: every step checks before acting, so on a complete testbed it
        changes nothing (`self.changes` is then empty) and a half-built one is
        completed in place; a veth whose pair is broken is recreated.
        """
        require_root()
        with self._locked():
            state = self._load_state() or self._new_state()
            state["config"] = self._config()
            # Recorded before building, so a crash half-way still lets down() clean up.
            state["namespaces"] = sorted(set(state.get("namespaces", [])) | set(self.namespaces))
            self._save_state(state)
            rec = _Reconciler(fix=True)
            try:
                self._reconcile(rec)
                self._wait_addresses_ready()
            except (NetnsError, NetlinkError) as exc:
                raise TestbedError(f"testbed {self.prefix!r}: {exc}") from exc
            self.changes = rec.changes
        return self.describe()

    def status(self) -> dict[str, Any]:
        """What exists now compared with the plan; changes nothing.

        `state` is "up" (complete), "partial" or "down"; `problems` lists what
        `up()` would fix; `processes` lists the recorded background processes.
        """
        require_root()
        exists = {ns: netns_exists(ns) for ns in self.namespaces}
        rec = _Reconciler(fix=False)
        try:
            self._reconcile(rec)
        except (NetnsError, NetlinkError, OSError) as exc:
            rec.changes.append(f"cannot inspect: {exc}")
        state = self._load_state() or {}
        procs = [
            {**p, "alive": _proc_starttime(p["pid"]) == p.get("starttime")}
            for p in state.get("processes", [])
        ]
        label = "up" if not rec.changes else ("partial" if any(exists.values()) else "down")
        return {
            "prefix": self.prefix,
            "state": label,
            "up": label == "up",
            "namespaces": exists,
            "problems": rec.changes,
            "processes": procs,
            "state_file": str(self.state_file) if self.state_file.exists() else None,
            "impairments": self._impairments(),
        }

    def _impairments(self) -> dict[str, Any]:
        """Active `testbed impair` records with their daemons' counters (none: {})."""
        if not self.impair_dir.is_dir():
            return {}
        from ctl import impairctl  # lazily: only a testbed with impairments needs it

        return impairctl.status(self)

    def _reconcile(self, rec: _Reconciler) -> None:
        """Bring every namespace, bridge, veth, address, route and XDP pass in line."""
        for ns in self.namespaces:
            if not netns_exists(ns) and rec.need(f"create netns {ns}"):
                create_netns(ns)
        if not netns_exists(self.switch_ns):
            return  # status() on a missing testbed: nothing more to inspect
        _ensure_sysctls(self.switch_ns, self._sysctls(None), rec)
        with IPRoute(netns=self.switch_ns, flags=0) as sw:
            self._ensure_up(sw, "lo", self.switch_ns, rec)
            for bridge in ("lan", "dc"):
                self._ensure_bridge(sw, bridge, rec)
            for host in self.hosts.values():
                if netns_exists(host.netns):
                    self._reconcile_host(sw, host, rec)
        self._ensure_tx_csum_off(self.switch_ns, [ln.port for ln in self._links()], rec)
        self._attach_peer_xdp_pass(rec)

    def _reconcile_host(self, sw: IPRoute, host: Host, rec: _Reconciler) -> None:
        """Sysctls, links, addresses and routes of one host namespace."""
        _ensure_sysctls(host.netns, self._sysctls(host), rec)
        with IPRoute(netns=host.netns, flags=0) as ipr:
            self._ensure_up(ipr, "lo", host.netns, rec)
            for ln in host.links:
                if not self._ensure_veth(sw, ipr, host, ln, rec):
                    continue  # status(): missing pair, nothing below can be inspected
                self._ensure_master(sw, ln, rec)
                self._ensure_up(sw, ln.port, self.switch_ns, rec)
                self._ensure_up(ipr, ln.ifname, host.netns, rec)
                self._ensure_addresses(ipr, host, ln, rec)
            self._ensure_routes(ipr, host, rec)
        present = [ln.ifname for ln in host.links]
        self._ensure_tx_csum_off(host.netns, present, rec)

    def _links(self) -> list[Link]:
        return [ln for h in self.hosts.values() for ln in h.links]

    def _sysctls(self, host: Host | None) -> dict[str, str]:
        """Per-namespace sysctls; `host` None means the switch namespace."""
        if host is None:
            # The switch only bridges: no IPv6 on its ports means no RS/DAD/MLD noise.
            return {
                "net.ipv6.conf.all.disable_ipv6": "1",
                "net.ipv6.conf.default.disable_ipv6": "1",
            }
        wanted = {
            "net.ipv6.conf.all.accept_dad": "0",
            "net.ipv6.conf.default.accept_dad": "0",
            "net.ipv4.conf.all.rp_filter": "0",
            "net.ipv4.conf.default.rp_filter": "0",
        }
        if host.forwarding:
            wanted |= {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"}
        return wanted

    def _ensure_bridge(self, sw: IPRoute, name: str, rec: _Reconciler) -> None:
        if _link(sw, name) is None and rec.need(f"{self.switch_ns}: create bridge {name}"):
            sw.link("add", ifname=name, kind="bridge", br_stp_state=0, br_mcast_snooping=0)
        self._ensure_up(sw, name, self.switch_ns, rec)

    def _ensure_up(self, ipr: IPRoute, ifname: str, ns: str, rec: _Reconciler) -> None:
        link = _link(ipr, ifname)
        if link is None:
            rec.need(f"{ns}: {ifname} missing")
        elif not link["flags"] & IFF_UP and rec.need(f"{ns}: set {ifname} up"):
            ipr.link("set", index=link["index"], state="up")

    def _ensure_veth(
        self, sw: IPRoute, ipr: IPRoute, host: Host, ln: Link, rec: _Reconciler
    ) -> bool:
        """Make sure `ln` exists as one veth pair; recreate it if either end is wrong.

        The pair is created from the switch side with the peer placed straight into
        the host namespace, so neither end ever exists in the root namespace.
        Returns False when the pair is (still) missing, i.e. only in status().
        """
        port, end = _link(sw, ln.port), _link(ipr, ln.ifname)
        paired = (
            port is not None
            and end is not None
            and port.get("IFLA_LINK") == end["index"]
            and end.get("IFLA_LINK") == port["index"]
        )
        if paired:
            return True
        if not rec.need(f"create veth {self.switch_ns}:{ln.port} <-> {host.netns}:{ln.ifname}"):
            return False
        for ipr_, link in ((sw, port), (ipr, end)):
            if link is not None:
                with contextlib.suppress(Exception):  # gone already with its peer
                    ipr_.link("del", index=link["index"])
        peer = {"ifname": ln.ifname, "net_ns_fd": host.netns, "address": ln.mac}
        sw.link("add", ifname=ln.port, kind="veth", address=ln.port_mac, peer=peer)
        return True

    def _ensure_master(self, sw: IPRoute, ln: Link, rec: _Reconciler) -> None:
        port, bridge = _link(sw, ln.port), _link(sw, ln.bridge)
        if port is None or bridge is None:
            return
        if port.get("IFLA_MASTER") != bridge["index"] and rec.need(
            f"{self.switch_ns}: attach {ln.port} to {ln.bridge}"
        ):
            sw.link("set", index=port["index"], master=bridge["index"])

    def _ensure_addresses(self, ipr: IPRoute, host: Host, ln: Link, rec: _Reconciler) -> None:
        idx = ipr.link_lookup(ifname=ln.ifname)[0]
        have = {(a.get("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=idx)}
        for addr, plen in ((ln.ipv4, PREFIXLEN4), (ln.ipv6, PREFIXLEN6)):
            if (addr, plen) not in have and rec.need(f"{host.netns}: add {addr}/{plen}"):
                flags = IFA_F_NODAD if ":" in addr else 0
                ipr.addr("add", index=idx, address=addr, prefixlen=plen, flags=flags)

    def _ensure_routes(self, ipr: IPRoute, host: Host, rec: _Reconciler) -> None:
        for fam, dst, gw in (
            (socket.AF_INET, "0.0.0.0/0", host.gateway4),
            (socket.AF_INET6, "::/0", host.gateway6),
        ):
            if gw is None:
                continue
            gws = {r.get("RTA_GATEWAY") for r in ipr.get_default_routes(family=fam)}
            if gws != {gw} and rec.need(f"{host.netns}: default route via {gw}"):
                ipr.route("replace", dst=dst, gateway=gw, family=fam)

    def _ensure_tx_csum_off(self, ns: str, ifnames: Sequence[str], rec: _Reconciler) -> None:
        with in_netns(ns):
            for ifname in ifnames:
                if not _exists_here(ifname):
                    continue  # reported as missing by the link checks
                if _tx_csum(ifname) and rec.need(f"{ns}: tx checksum offload off on {ifname}"):
                    _tx_csum(ifname, False)

    def attach_peer_xdp_pass(self) -> list[str]:
        """Attach XDP_PASS (native mode) to the switch ports facing the relays.

        Native XDP redirect or XDP_TX into a veth only delivers when the receiving
        peer has an XDP program, and the relay's XDP transmits out of pub0/dc0 whose
        peers are these ports. The program is compiled once per process with bcc;
        attachment is per port and skipped where one is already attached, so this
        is idempotent. `down()` removes them with the namespace. Returns the ports
        it attached to.
        """
        require_root()
        return self._attach_peer_xdp_pass(_Reconciler(fix=True))

    def _attach_peer_xdp_pass(self, rec: _Reconciler) -> list[str]:
        attached: list[str] = []
        if not netns_exists(self.switch_ns):
            return attached
        with IPRoute(netns=self.switch_ns, flags=0) as sw:
            todo = [
                ln.port
                for ln in self._links()
                if ln.xdp_peer and (link := _link(sw, ln.port)) is not None
                if not _xdp_drv_attached(link)
            ]
        todo = [p for p in todo if rec.need(f"{self.switch_ns}: attach xdp_pass to {p}")]
        if not todo:
            return attached
        from bcc import BPF

        fn = _xdp_pass_fn()
        with in_netns(self.switch_ns):
            for port in todo:
                try:
                    BPF.attach_xdp(port.encode(), fn, XDP_FLAGS_DRV_MODE)
                except Exception as exc:
                    raise TestbedError(f"cannot attach xdp_pass to {port}: {exc}") from exc
                attached.append(port)
        return attached

    def _wait_addresses_ready(self, timeout: float = 3.0) -> None:
        """Wait (bounded) until no address is tentative; fail on a DAD failure.

        With DAD disabled this normally passes on the first look.
        """
        deadline = time.monotonic() + timeout
        pending: list[str] = []
        for host in self.hosts.values():
            with IPRoute(netns=host.netns, flags=0) as ipr:
                while True:
                    pending = []
                    for a in ipr.get_addr():
                        flags = a.get("IFA_FLAGS") or a["flags"]
                        where = f"{host.netns}: {a.get('IFA_ADDRESS')}"
                        if flags & IFA_F_DADFAILED:
                            raise TestbedError(f"{where} failed duplicate address detection")
                        if flags & IFA_F_TENTATIVE:
                            pending.append(where)
                    if not pending or time.monotonic() >= deadline:
                        break
                    time.sleep(0.02)
            if pending:
                raise TestbedError(f"addresses still tentative after {timeout}s: {pending}")

    # ------------------------------------------------------------------ processes

    def spawn(
        self,
        host: str,
        argv: Sequence[str],
        *,
        name: str | None = None,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        log: str | Path | None = None,
        keep_mounts: bool = True,
    ) -> subprocess.Popen[bytes]:
        """Start `argv` in the background in `host`'s namespace and record it.

        By default only the network namespace changes (see `popen_in`): the relay
        pins its maps on the host's bpffs (/sys/fs/bpf), which `ip netns exec`
        would hide; pass keep_mounts=False for `ip netns exec` semantics (/sys
        showing the namespace's interfaces).
        Output goes to `log` (default: <state dir>/testbed-<p>-logs/<name>.log).
        The process leads its own session, so `down()` can stop it together with
        any children it started, and survives the caller (the CLI exits after
        `demo` steps start daemons).
        """
        require_root()
        ns = self.netns(host)
        if not argv:
            raise TestbedError("spawn: empty command")
        label = name or f"{host}-{Path(argv[0]).name}"
        log_path = Path(log) if log else self.log_dir / f"{label}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            proc = popen_in(
                ns,
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
                keep_mounts=keep_mounts,
            )
        _spawned[proc.pid] = proc
        record = {
            "name": label,
            "host": host,
            "netns": ns,
            "pid": proc.pid,
            "starttime": _proc_starttime(proc.pid),
            "argv": [str(a) for a in argv],
            "log": str(log_path),
        }
        with self._locked():
            state = self._load_state() or self._new_state()
            state.setdefault("processes", []).append(record)
            self._save_state(state)
        return proc

    def stop_processes(self, name: str) -> list[int]:
        """Stop the recorded processes called `name` and forget them; returns their PIDs.

        For helpers that come and go while the testbed stays up (an impairment
        daemon replaced or cleared); `down()` stops whatever is still recorded.
        """
        require_root()
        with self._locked():
            state = self._load_state()
            if state is None:
                return []
            procs = state.get("processes", [])
            mine = [p for p in procs if p.get("name") == name]
            if not mine:
                return []
            _stop_pids({int(p["pid"]): p.get("starttime") for p in mine})
            state["processes"] = [p for p in procs if p.get("name") != name]
            self._save_state(state)
        return [int(p["pid"]) for p in mine]

    # ------------------------------------------------------------------ down

    def down(self, keep_logs: bool = False) -> list[str]:
        """Remove everything: processes, namespaces (with their veths, bridges, XDP).

        Safe when nothing is up. Besides recorded processes it stops any process
        still inside one of our namespaces, because such a process would keep the
        namespace and its interfaces alive after the name is gone. Returns the
        namespaces it removed.
        """
        require_root()
        with self._locked():
            state = self._load_state() or {}
            names = set(state.get("namespaces", [])) | set(self.namespaces) | self._leftovers()
            recorded = {int(p["pid"]): p.get("starttime") for p in state.get("processes", [])}
            _stop_pids(recorded)
            strays = {
                pid: None
                for ns, pids in pr_netns.ns_pids().items()
                if ns in names
                for pid in pids
                if pid != os.getpid()
            }
            _stop_pids(strays)
            removed = [ns for ns in sorted(names) if remove_netns(ns)]
            self.state_file.unlink(missing_ok=True)
            (STATE_DIR / f"testbed-{self.prefix}.lock").unlink(missing_ok=True)
            if not keep_logs and self.log_dir.is_dir():
                for f in self.log_dir.iterdir():
                    f.unlink(missing_ok=True)
                self.log_dir.rmdir()
            if self.impair_dir.is_dir():  # its daemons are stopped; their filters went
                for f in self.impair_dir.iterdir():  # with the switch namespace
                    f.unlink(missing_ok=True)
                self.impair_dir.rmdir()
        return removed

    def _leftovers(self) -> set[str]:
        """Namespaces that look like ours (any size), e.g. from an up() with more clients."""
        pat = re.compile(rf"{re.escape(self.prefix)}-(sw|c\d+|relay\d+|tx\d+|redis)")
        return {ns for ns in list_netns(f"{self.prefix}-") if pat.fullmatch(ns)}

    # ------------------------------------------------------------------ state file

    def _new_state(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "config": self._config(), "namespaces": [], "processes": []}

    def _load_state(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise TestbedError(f"unreadable state file {self.state_file}: {exc}") from exc

    def _save_state(self, state: dict[str, Any]) -> None:
        """Write atomically (temp file + rename), so a crash never leaves half a file."""
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_file)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise up/down/spawn of this testbed across processes (flock per prefix).

        Testbeds with other prefixes never wait for each other.
        """
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        lock = STATE_DIR / f"testbed-{self.prefix}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
