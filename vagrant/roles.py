#!/usr/bin/env python3
"""Role configuration of the Vagrant testbed, generated from the netns testbed's plan.

The VMs play the hosts of `relayctl testbed` (ctl/testbed.py) with the same names,
addresses and MACs. This script is the only place that turns that plan into what a VM
needs, so the topology and the services' command lines are never written twice: the
Vagrantfile reads `plan.json` (written by `plan`, checked for staleness by the tests),
and vagrant/provision.sh asks for everything else when it provisions or boots a VM.

    roles.py plan                    machines and NICs for the Vagrantfile (plan.json)
    roles.py links HOST              "ifname mac ipv4/len ipv6/len", one line per NIC
    roles.py sysctls HOST            "key value", one line per sysctl
    roles.py routes HOST             "destination gateway", one line per route
    roles.py units HOST              the systemd units HOST runs, in start order
    roles.py argv HOST UNIT          a unit's command line, as a JSON list
    roles.py dropin HOST UNIT        the unit's drop-in: ExecStart= that command line
    roles.py checks HOST             "http URL" or "redis HOST PORT": how to see it is up
    roles.py show HOST               all of the above for HOST, as JSON

HOST is a host of the plan (relay1, c1, tx1, tx2, redis) or its VM name (relay, client).
`argv` and `dropin` take --root (the checkout, /opt/splitrelay in the VMs) and --bin-dir
(the venv's bin directory): the tests run the very same commands in network namespaces.

Where a VM must differ from a namespace, the difference is derived here, not configured:

* A VM's first NIC is Vagrant's management network and keeps the default route (package
  installs, `vagrant ssh`). The plan's default gateway becomes a route to each testbed
  subnet the host is not on, via that same gateway.
* A VM's testbed NICs are found by the plan's MACs (the Vagrantfile sets them) and named
  after the relay's interface on the same network (pub0 client side, dc0 inside), because
  `eth0` is the management NIC and the relay's command line names pub0 and dc0.
* The plan's XDP_PASS on the relay's switch ports is a veth quirk; a VM's NIC has no
  such peer, so nothing here asks for it.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The checkout next to this file, never another one an editable install points at.
sys.path.insert(0, str(ROOT))

from ctl.daemon import DaemonConfig  # noqa: E402
from ctl.testbed import (  # noqa: E402
    PREFIXLEN4,
    PREFIXLEN6,
    REDIS_PORT,
    Host,
    Testbed,
    TestbedError,
)

VM_ROOT = Path("/opt/splitrelay")  # where the Vagrantfile syncs the checkout
REDIS_SERVER = "/usr/bin/redis-server"  # Debian's redis-server package
TUNNEL_PORT = DaemonConfig().tunnel_port  # `relayctl run --tunnel-port` default
NETWORK_NAMES = {"lan": "splitrelay-lan", "dc": "splitrelay-dc"}
BOOT_ORDER = ("redis", "relay", "transceiver", "client")  # shared state first, callers last
UNITS = {
    "relay": ("splitrelay-net", "splitrelay-relay"),
    "transceiver": ("splitrelay-net", "splitrelay-transceiver"),
    "redis": ("splitrelay-net", "splitrelay-redis"),
    "client": ("splitrelay-net",),
}
TRANSCEIVER_ID_BASE = 0xA100  # tx1: a100 + worker index; tx2: a200 + ...
TRANSCEIVER_ID_STRIDE = 0x100  # room for 256 workers, `transceiver run --workers` maximum
_SYSTEMD_SAFE = re.compile(r"[A-Za-z0-9_@%+=:,./\[\]-]+")


class RoleError(RuntimeError):
    """A host or unit the plan does not have; the message is one line."""


def testbed() -> Testbed:
    """The plan the VMs play: the default testbed (one client, one relay, two transceivers).

    The prefix only names namespaces, which VMs do not have; the addresses, MACs and
    command lines do not depend on it.
    """
    return Testbed()


def vm_name(tb: Testbed, host: Host) -> str:
    """The VM's name: its role when it is the only host of that role, else the host name."""
    same_role = [h for h in tb.hosts.values() if h.role == host.role]
    return host.role if len(same_role) == 1 and host.role in ("relay", "client") else host.name


def find_host(tb: Testbed, name: str) -> Host:
    """A host by plan name (relay1) or VM name (relay)."""
    if name in tb.hosts:
        return tb.hosts[name]
    for host in tb.hosts.values():
        if vm_name(tb, host) == name:
            return host
    known = ", ".join(f"{h.name} ({vm_name(tb, h)})" for h in tb.hosts.values())
    raise RoleError(f"no host {name!r} in the testbed plan (have: {known})")


def _relay(tb: Testbed, index: int = 0) -> Host:
    relays = [h for h in tb.hosts.values() if h.role == "relay"]
    return relays[index]


def vm_ifname(tb: Testbed, bridge: str) -> str:
    """A VM's NIC on `bridge` is named like the relay's interface on it (pub0, dc0)."""
    for link in _relay(tb).links:
        if link.bridge == bridge:
            return link.ifname
    raise RoleError(f"the relay has no interface on network {bridge!r}")


def links(tb: Testbed, host: Host) -> list[dict[str, str]]:
    """The host's testbed NICs, as the VM names and addresses them."""
    return [
        {
            "network": ln.bridge,
            "ifname": vm_ifname(tb, ln.bridge),
            "mac": ln.mac,
            "ipv4": f"{ln.ipv4}/{PREFIXLEN4}",
            "ipv6": f"{ln.ipv6}/{PREFIXLEN6}",
        }
        for ln in host.links
    ]


def sysctls(tb: Testbed, host: Host) -> dict[str, str]:
    """Exactly the sysctls the namespace testbed sets for this host (forwarding on relays)."""
    return tb._sysctls(host)


def routes(tb: Testbed, host: Host) -> list[tuple[str, str]]:
    """(destination, gateway): every testbed subnet the host is not on, via its gateway."""
    subnets: dict[int, set[ipaddress.IPv4Network | ipaddress.IPv6Network]] = {4: set(), 6: set()}
    for other in tb.hosts.values():
        for ln in other.links:
            subnets[4].add(ipaddress.ip_network(f"{ln.ipv4}/{PREFIXLEN4}", strict=False))
            subnets[6].add(ipaddress.ip_network(f"{ln.ipv6}/{PREFIXLEN6}", strict=False))
    own = {
        ipaddress.ip_network(f"{addr}/{plen}", strict=False)
        for ln in host.links
        for addr, plen in ((ln.ipv4, PREFIXLEN4), (ln.ipv6, PREFIXLEN6))
    }
    out: list[tuple[str, str]] = []
    for version, gateway in ((4, host.gateway4), (6, host.gateway6)):
        if gateway is None:
            continue
        for net in sorted(subnets[version] - own, key=str):
            out.append((str(net), gateway))
    return out


def units(host: Host) -> tuple[str, ...]:
    """The systemd units a host runs, the network first."""
    return UNITS[host.role]


def _endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _hostport(url: str) -> str:
    """`http://a.b.c.d:port/path` -> `a.b.c.d:port`: listen where the plan's URL points."""
    return url.split("//", 1)[1].split("/", 1)[0]


def relay_argv(tb: Testbed, host: Host, bin_dir: Path) -> list[str]:
    """`relayctl run` for a relay host: XDP on both sides, Redis, metrics on the public side.

    Default pin dir, attach mode and ports; nothing that only a throwaway run wants
    (`relayctl demo` adds its own pin dir and --detach-on-exit, which would make a
    restart of the unit lose its pins or stop forwarding).
    """
    desc = tb.describe()
    me = desc["hosts"][host.name]
    pub, tun = me["public"], me["tunnel"]
    return [
        str(bin_dir / "relayctl"), "run",
        "-i", pub["interface"], "-i", tun["interface"],
        "--public", pub["ipv4"], "--public", pub["ipv6"],
        "--tunnel", tun["ipv4"], "--tunnel", tun["ipv6"],
        "--redis-url", desc["redis_url"],
        "--metrics", _hostport(me["metrics_url"]),
    ]  # fmt: skip


def transceiver_argv(tb: Testbed, host: Host, bin_dir: Path) -> list[str]:
    """`transceiver run` for a transceiver host: signaling on its plan URL, Redis registry.

    It accepts tunnel packets from every relay, advertises the public addresses of the
    relay it routes through (its gateway), and takes the id block of its position among
    the transceivers (tx1: a100, a101, ... one per worker), so ids never overlap.
    Workers: one per core, the product's default.
    """
    desc = tb.describe()
    me = desc["hosts"][host.name]
    relays = [desc["hosts"][h.name] for h in tb.hosts.values() if h.role == "relay"]
    via = next((r for r in relays if r["tunnel"]["ipv4"] == host.gateway4), relays[0])
    position = [h.name for h in tb.hosts.values() if h.role == "transceiver"].index(host.name)
    argv = [
        str(bin_dir / "transceiver"), "run",
        "--listen", _hostport(me["signaling_url"]),
        "--transceiver-id", f"{TRANSCEIVER_ID_BASE + position * TRANSCEIVER_ID_STRIDE:x}",
        "--tunnel", me["ipv4"],
    ]  # fmt: skip
    for relay in relays:  # the tunnel's family: the one of --tunnel
        argv += ["--relay", _endpoint(relay["tunnel"]["ipv4"], TUNNEL_PORT)]
    for public in via["relay_addr"]:
        argv += ["--public", public]
    return [*argv, "--redis-url", desc["redis_url"]]


def redis_argv(tb: Testbed, host: Host) -> list[str]:
    """Debian's redis-server on the inside addresses (and loopback, for redis-cli).

    No persistence: relays write their live sessions back when Redis returns empty,
    and transceivers re-register with their next heartbeat (docs/redis-schema.md).
    No password and protected mode off: it listens only on the inside network.
    """
    ln = host.links[0]
    return [
        REDIS_SERVER,
        "--bind", ln.ipv4, ln.ipv6, "127.0.0.1", "-::1",
        "--port", str(REDIS_PORT),
        "--protected-mode", "no",
        "--save", "",
        "--appendonly", "no",
        "--supervised", "systemd",
        "--daemonize", "no",
    ]  # fmt: skip


def argv(tb: Testbed, host: Host, unit: str, root: Path, bin_dir: Path) -> list[str]:
    """The command line of `unit` on `host`."""
    if unit not in units(host):
        raise RoleError(f"{host.name} ({host.role}) runs no {unit} (it runs {units(host)})")
    if unit == "splitrelay-net":
        # Through bash: the script need not keep its mode bits on the way into the VM.
        return ["/bin/bash", str(root / "vagrant" / "provision.sh"), "--network", host.name]
    if unit == "splitrelay-relay":
        return relay_argv(tb, host, bin_dir)
    if unit == "splitrelay-transceiver":
        return transceiver_argv(tb, host, bin_dir)
    return redis_argv(tb, host)


def systemd_quote(arg: str) -> str:
    """One argument as systemd's ExecStart= reads it back ($ and % are special there)."""
    text = arg.replace("%", "%%").replace("$", "$$")
    if _SYSTEMD_SAFE.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def dropin(tb: Testbed, host: Host, unit: str, root: Path, bin_dir: Path) -> str:
    """The drop-in that gives the unit its command line."""
    line = " ".join(systemd_quote(a) for a in argv(tb, host, unit, root, bin_dir))
    return (
        f"# Written by vagrant/provision.sh from `vagrant/roles.py dropin {host.name} {unit}`,\n"
        "# i.e. from the testbed plan in ctl/testbed.py. Do not edit: provision again.\n"
        "[Service]\n"
        f"ExecStart={line}\n"
    )


def checks(tb: Testbed, host: Host) -> list[str]:
    """How provisioning sees the host's services are up, one check per line."""
    desc = tb.describe()["hosts"][host.name]
    if host.role == "relay":
        return [f"http {desc['metrics_url']}"]
    if host.role == "transceiver":
        return [f"http {desc['signaling_url']}/healthz"]
    if host.role == "redis":
        return [f"redis {desc['ipv4']} {REDIS_PORT}"]
    return []


def plan(tb: Testbed) -> dict[str, Any]:
    """What the Vagrantfile needs: machines in boot order with their NICs' networks and MACs."""
    hosts = sorted(tb.hosts.values(), key=lambda h: BOOT_ORDER.index(h.role))
    return {
        "comment": "Generated by `vagrant/roles.py plan > vagrant/plan.json` from "
        "ctl/testbed.py; do not edit (tests/integration/test_vagrant.py checks it is current).",
        "networks": NETWORK_NAMES,
        "machines": [
            {"name": vm_name(tb, h), "host": h.name, "role": h.role, "nics": links(tb, h)}
            for h in hosts
        ],
    }


def show(tb: Testbed, host: Host, root: Path, bin_dir: Path) -> dict[str, Any]:
    """Everything about one host, for people and for debugging a VM."""
    return {
        "host": host.name,
        "vm": vm_name(tb, host),
        "role": host.role,
        "links": links(tb, host),
        "sysctls": sysctls(tb, host),
        "routes": [{"destination": d, "gateway": g} for d, g in routes(tb, host)],
        "units": {u: argv(tb, host, u, root, bin_dir) for u in units(host)},
        "checks": checks(tb, host),
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="roles.py", description="Vagrant testbed roles, from the netns testbed's plan."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plan", help="machines and NICs for the Vagrantfile (JSON)")
    for name in ("links", "sysctls", "routes", "units", "checks", "show"):
        sub.add_parser(name, help=f"{name} of HOST").add_argument("host")
    for name in ("argv", "dropin"):
        cmd = sub.add_parser(name, help=f"{name} of UNIT on HOST")
        cmd.add_argument("host")
        cmd.add_argument("unit")
    for cmd in sub.choices.values():
        cmd.add_argument("--root", type=Path, default=VM_ROOT, help="the checkout")
        cmd.add_argument("--bin-dir", type=Path, default=None, help="the venv's bin directory")
    return parser


def main(args: Sequence[str] | None = None) -> int:
    """Print what was asked for; errors are one line on stderr and exit status 2."""
    opts = _parser().parse_args(args)
    root: Path = opts.root
    bin_dir: Path = opts.bin_dir or root / ".venv" / "bin"
    try:
        tb = testbed()
        if opts.command == "plan":
            print(json.dumps(plan(tb), indent=2))
            return 0
        host = find_host(tb, opts.host)
        if opts.command == "links":
            for ln in links(tb, host):
                print(ln["ifname"], ln["mac"], ln["ipv4"], ln["ipv6"])
        elif opts.command == "sysctls":
            for key, value in sysctls(tb, host).items():
                print(key, value)
        elif opts.command == "routes":
            for dst, gateway in routes(tb, host):
                print(dst, gateway)
        elif opts.command in ("units", "checks"):
            for line in units(host) if opts.command == "units" else checks(tb, host):
                print(line)
        elif opts.command == "argv":
            print(json.dumps(argv(tb, host, opts.unit, root, bin_dir)))
        elif opts.command == "dropin":
            print(dropin(tb, host, opts.unit, root, bin_dir), end="")
        else:
            print(json.dumps(show(tb, host, root, bin_dir), indent=2))
    except (RoleError, TestbedError) as exc:
        print(f"roles.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
