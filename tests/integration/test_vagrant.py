"""The Vagrant testbed (vagrant/), checked without booting a VM.

No VM boots in CI (no nested virtualisation, no box download), so each part is checked
where it can be:

* the Vagrantfile: `vagrant validate` for the common configuration and for each
  provider's block: libvirt through Debian's vagrant-libvirt plugin, VirtualBox through a
  stand-in VBoxManage that answers `--version`, the only thing validation asks of it (the
  test fails if Vagrant ever asks for more). Every vagrant command runs in a network
  namespace of its own that has nothing but loopback, so it cannot reach anything;
* plan.json is what `roles.py plan` makes of ctl/testbed.py today;
* provision.sh passes shellcheck;
* the units, each with the drop-in provision.sh would write, pass `systemd-analyze verify`;
* the command lines in those drop-ins run, as their units run them, in a namespace testbed
  of their own: Redis, the relay and both transceivers come up and answer from the
  client's namespace, the README's call goes through the relay, and each service stops
  cleanly on SIGTERM, the relay leaving its XDP program attached (its hitless restart).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ctl.netns import in_netns
from ctl.testbed import REDIS_PORT, Testbed
from ctl.xdp import info

ROOT = Path(__file__).resolve().parents[2]
VAGRANT_DIR = ROOT / "vagrant"
BOOTSTRAP = ROOT / "ctl" / "bootstrap.sh"
UNIT_DIR = VAGRANT_DIR / "units"
BIN_DIR = Path(sys.executable).parent  # the venv running the tests
ROLES = [sys.executable, str(VAGRANT_DIR / "roles.py")]
PATHS = ["--root", str(ROOT), "--bin-dir", str(BIN_DIR)]
PREFIX = "srvag"  # this module's namespaces, apart from a user's "sr" and other suites'
PLAN = json.loads((VAGRANT_DIR / "plan.json").read_text())
HOSTS = [m["host"] for m in PLAN["machines"]]
NOBODY = "65534"  # what a DynamicUser= service is, as far as file access goes
VBOXMANAGE_STUB = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/calls.log"
[ "$1" = --version ] && echo 7.0.20r163906
"""


def roles(*args: str) -> str:
    """Run vagrant/roles.py as provision.sh does; its output."""
    res = subprocess.run([*ROLES, *args], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"roles.py {' '.join(args)}: {res.stderr}"
    return res.stdout


# --------------------------------------------------------------------------- static


def test_plan_json_is_current() -> None:
    """The Vagrantfile reads plan.json; it must be what ctl/testbed.py says today."""
    assert json.loads(roles("plan")) == PLAN, (
        "vagrant/plan.json is stale: run `.venv/bin/python vagrant/roles.py plan "
        "> vagrant/plan.json`"
    )


def test_roles_cover_the_plan() -> None:
    """One VM per host of the default testbed, every role with its units."""
    tb = Testbed()
    assert sorted(HOSTS) == sorted(tb.hosts)
    for host in HOSTS:
        shown = json.loads(roles("show", host))
        assert shown["units"], host
        assert all(argv for argv in shown["units"].values()), host
        assert {ln["mac"] for ln in shown["links"]} == {ln.mac for ln in tb.hosts[host].links}
    relay = json.loads(roles("show", "relay"))
    assert relay["sysctls"]["net.ipv4.ip_forward"] == "1"
    assert relay["sysctls"]["net.ipv6.conf.all.forwarding"] == "1"
    assert {ln["ifname"] for ln in relay["links"]} == {"pub0", "dc0"}


def test_roles_unknown_host_is_one_line() -> None:
    res = subprocess.run([*ROLES, "links", "nope"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.startswith("roles.py: error: no host 'nope'")
    assert len(res.stderr.strip().splitlines()) == 1


def test_shellcheck() -> None:
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed (Debian package shellcheck)", pytrace=False)
    scripts = [*sorted(str(p) for p in VAGRANT_DIR.glob("*.sh")), str(BOOTSTRAP)]
    assert scripts
    res = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def _vagrant(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, cwd: Path = VAGRANT_DIR
) -> subprocess.CompletedProcess[str]:
    """`vagrant ARGS` in `cwd`, in a network namespace that has only loopback."""
    if shutil.which("vagrant") is None:
        pytest.fail("vagrant is not installed (Debian package vagrant)", pytrace=False)
    full_env = {
        **os.environ,
        "VAGRANT_HOME": str(tmp_path / "home"),
        "VAGRANT_DOTFILE_PATH": str(tmp_path / "dotfile"),
        "VAGRANT_CHECKPOINT_DISABLE": "1",
        "VAGRANT_NO_COLOR": "1",
        **(env or {}),
    }
    return subprocess.run(
        ["unshare", "--net", "vagrant", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def _validated(res: subprocess.CompletedProcess[str]) -> None:
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "Vagrantfile validated successfully" in out, out


def test_vagrant_validate_common(tmp_path: Path) -> None:
    """Everything but the provider blocks; needs no provider at all."""
    _validated(_vagrant(tmp_path, "validate", "--ignore-provider"))


def test_vagrant_validate_libvirt(tmp_path: Path) -> None:
    """The libvirt block, validated by the vagrant-libvirt plugin (Debian's package)."""
    res = _vagrant(tmp_path, "plugin", "list")
    if "vagrant-libvirt" not in res.stdout:
        pytest.fail(
            "the vagrant-libvirt plugin is missing (Debian package vagrant-libvirt)", pytrace=False
        )
    _validated(_vagrant(tmp_path, "validate", env={"VAGRANT_DEFAULT_PROVIDER": "libvirt"}))


def test_vagrant_validate_virtualbox(tmp_path: Path) -> None:
    """The VirtualBox block; the provider counts as usable once VBoxManage reports a version."""
    stub_dir = tmp_path / "vbox"
    stub_dir.mkdir()
    stub = stub_dir / "VBoxManage"
    stub.write_text(VBOXMANAGE_STUB)
    stub.chmod(0o755)
    env = {"VAGRANT_DEFAULT_PROVIDER": "virtualbox", "PATH": f"{stub_dir}:{os.environ['PATH']}"}
    _validated(_vagrant(tmp_path, "validate", env=env))
    calls = set((stub_dir / "calls.log").read_text().split("\n")) - {""}
    assert calls == {"--version"}, f"validation asked VBoxManage for more: {calls}"


def test_vagrant_validate_catches_errors(tmp_path: Path) -> None:
    """The check has teeth: a provider setting that does not exist fails validation."""
    bad = tmp_path / "bad"
    shutil.copytree(VAGRANT_DIR, bad, ignore=shutil.ignore_patterns(".vagrant"))
    vagrantfile = bad / "Vagrantfile"
    text = vagrantfile.read_text()
    assert "libvirt.memory = memory" in text
    vagrantfile.write_text(text.replace("libvirt.memory = memory", "libvirt.memroy = memory"))
    res = _vagrant(tmp_path, "validate", env={"VAGRANT_DEFAULT_PROVIDER": "libvirt"}, cwd=bad)
    assert res.returncode != 0
    assert "memroy" in res.stdout + res.stderr


def _install_units(host: str, dest: Path) -> list[Path]:
    """The host's units and drop-ins laid out as provision.sh installs them."""
    paths = []
    for unit in roles("units", host).split():
        shutil.copy(UNIT_DIR / f"{unit}.service", dest / f"{unit}.service")
        (dest / f"{unit}.service.d").mkdir()
        (dest / f"{unit}.service.d" / "exec.conf").write_text(roles("dropin", host, unit, *PATHS))
        paths.append(dest / f"{unit}.service")
    return paths


@pytest.mark.parametrize("host", HOSTS)
def test_systemd_analyze_verify(host: str, tmp_path: Path) -> None:
    """Each unit with its drop-in: settings, dependencies, and that ExecStart exists."""
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is not installed (Debian package systemd)", pytrace=False)
    units = _install_units(host, tmp_path)
    res = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, units)],
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    ours = [ln for ln in (res.stdout + res.stderr).splitlines() if "splitrelay" in ln]
    assert res.returncode == 0 and not ours, res.stdout + res.stderr
    # The drop-in is what gives each unit its command: without it verify must refuse.
    (tmp_path / f"{units[-1].name}.d" / "exec.conf").unlink()
    res = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(units[-1])],
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0 and "no ExecStart" in res.stderr


# --------------------------------------------------------------------------- network part


def _ip(*args: str) -> str:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, f"ip {' '.join(args)}: {res.stderr}"
    return res.stdout


@pytest.fixture
def fake_vm(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """A namespace shaped like a freshly booted VM of `host`, and its peer namespace.

    Like a VM: a management NIC named eth0, then one NIC per testbed network with the
    MAC the Vagrantfile gives it and a name the provider chose (eth1, eth2), their
    other ends in a second namespace. Nothing is created in the root namespace.
    """
    host: str = request.param
    vm, peer = f"{PREFIX}n-vm", f"{PREFIX}n-peer"
    for ns in (vm, peer):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        _ip("netns", "add", ns)
    try:
        _ip("-n", vm, "link", "add", "eth0", "type", "veth", "peer", "name", "p0", "netns", peer)
        nics = next(m["nics"] for m in PLAN["machines"] if m["host"] == host)
        for i, nic in enumerate(nics, start=1):
            _ip("-n", vm, "link", "add", f"eth{i}", "address", nic["mac"], "type", "veth",
                "peer", "name", f"p{i}", "netns", peer)  # fmt: skip
        yield vm, host
    finally:
        for ns in (vm, peer):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.parametrize("fake_vm", HOSTS, indirect=True)
def test_provision_network(fake_vm: tuple[str, str]) -> None:
    """`provision.sh --network HOST` (what splitrelay-net.service runs at boot) in a fake VM.

    Twice, since it runs at every boot and on every `vagrant provision`: the second run
    must change nothing and fail on nothing.
    """
    vm, host = fake_vm
    env = {**os.environ, "SPLITRELAY_ROOT": str(ROOT), "SPLITRELAY_VENV": str(BIN_DIR.parent)}
    script = str(VAGRANT_DIR / "provision.sh")
    for _ in range(2):
        res = subprocess.run(
            ["ip", "netns", "exec", vm, script, "--network", host],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr
    shown = json.loads(roles("show", host))
    links = {ln["ifname"]: ln for ln in json.loads(_ip("-n", vm, "-j", "addr", "show"))}
    assert "eth0" in links, "the management NIC keeps its name"
    for want in shown["links"]:
        have = links[want["ifname"]]
        assert have["address"] == want["mac"]
        assert "UP" in have["flags"]
        addrs = {f"{a['local']}/{a['prefixlen']}" for a in have["addr_info"]}
        assert {want["ipv4"], want["ipv6"]} <= addrs
        assert not any(a.get("tentative") for a in have["addr_info"])
    routes = {
        (r["dst"], r.get("gateway"))
        for fam in ("-4", "-6")
        for r in json.loads(_ip("-n", vm, "-j", fam, "route", "show"))
    }
    for route in shown["routes"]:
        assert (route["destination"], route["gateway"]) in routes
    assert not any(dst == "default" for dst, _ in routes), "the default route is Vagrant's"
    for key, value in shown["sysctls"].items():
        path = "/proc/sys/" + key.replace(".", "/")
        res = subprocess.run(["ip", "netns", "exec", vm, "cat", path], capture_output=True)
        assert res.stdout.decode().strip() == value, key


# --------------------------------------------------------------------------- the units, run


@dataclass
class UnitCommand:
    """What systemd would run for one unit: its pre-commands, command, user, stop timeout."""

    host: str
    unit: str
    pre: list[list[str]]
    argv: list[str]
    user: str | None  # None: root
    group: str | None
    stop_timeout: float


def _service_settings(unit: str) -> dict[str, list[str]]:
    """The [Service] settings of a base unit (enough of the syntax for our own files)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in (UNIT_DIR / f"{unit}.service").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def unit_command(host: str, unit: str) -> UnitCommand:
    """The unit's command as its drop-in says, checked against `roles.py argv`."""
    dropin = roles("dropin", host, unit, *PATHS)
    lines = [ln for ln in dropin.splitlines() if ln.startswith("ExecStart=")]
    assert len(lines) == 1, dropin
    argv = shlex.split(lines[0].removeprefix("ExecStart="))
    assert argv == json.loads(roles("argv", host, unit, *PATHS))
    settings = _service_settings(unit)
    assert "ExecStart" not in settings, "the command line belongs in the drop-in"
    dynamic = settings.get("DynamicUser", ["no"])[-1] == "yes"
    user = NOBODY if dynamic else settings.get("User", [None])[-1]
    group = NOBODY if dynamic else settings.get("Group", [user])[-1]
    return UnitCommand(
        host,
        unit,
        [shlex.split(v) for v in settings.get("ExecStartPre", [])],
        argv,
        user,
        group,
        float(settings.get("TimeoutStopSec", ["90"])[-1]),
    )


def start_unit(tb: Testbed, cmd: UnitCommand, cwd: Path) -> subprocess.Popen[bytes]:
    """Run the unit's pre-commands and command in the host's namespace, as its user.

    Each runs in a mount namespace of its own with a fresh bpffs on /sys/fs/bpf and a
    fresh /run/splitrelay, so the relay pins its maps and writes its state at the very
    paths of the VM without touching a relay this machine may run. The returned process
    is the command itself (every wrapper execs), so signals reach it as systemd's would.
    """
    setup = [
        "mount -t bpf bpf /sys/fs/bpf",
        "mkdir -p /run/splitrelay",
        "mount -t tmpfs tmpfs /run/splitrelay",
        *(shlex.join(p) for p in cmd.pre),
        'exec "$@"',
    ]
    as_user = []
    if cmd.user is not None:
        as_user = ["setpriv", f"--reuid={cmd.user}", f"--regid={cmd.group}", "--clear-groups"]
    argv = [
        "unshare", "--mount", "--propagation", "private", "--",
        "/bin/sh", "-ec", "; ".join(setup), cmd.unit, *as_user, *cmd.argv,
    ]  # fmt: skip
    return tb.spawn(cmd.host, argv, name=f"{cmd.host}-{cmd.unit}", cwd=cwd)


def _log(tb: Testbed, cmd: UnitCommand) -> str:
    path = tb.log_dir / f"{cmd.host}-{cmd.unit}.log"
    return path.read_text()[-4000:] if path.exists() else "(no log)"


def _wait(
    tb: Testbed,
    cmd: UnitCommand,
    proc: subprocess.Popen[bytes],
    what: str,
    ready: Any,
    timeout: float = 60.0,
) -> Any:
    """Poll `ready()` until it returns something truthy; fail with the unit's log."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{cmd.unit} on {cmd.host} exited with {proc.returncode}:\n{_log(tb, cmd)}")
        try:
            result = ready()
            if result:
                return result
        except (OSError, ValueError, urllib.error.URLError) as exc:
            last = exc
        time.sleep(0.2)
    pytest.fail(
        f"{cmd.unit} on {cmd.host}: {what} not within {timeout} s ({last}):\n{_log(tb, cmd)}"
    )


def http_get(tb: Testbed, host: str, url: str) -> tuple[int, bytes]:
    """GET `url` from `host`'s namespace."""
    with in_netns(tb.netns(host)):
        try:
            with urllib.request.urlopen(url, timeout=3) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()


def redis_command(tb: Testbed, host: str, addr: str, port: int, *args: str) -> bytes:
    """One Redis command over RESP from `host`'s namespace; the raw reply."""
    payload = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
    with in_netns(tb.netns(host)):
        sock = socket.create_connection((addr, port), timeout=2)
    with sock:
        sock.sendall(payload.encode())
        return sock.recv(65536)


def metrics(body: bytes) -> dict[str, float]:
    """Sums of each sample name over its labels."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


@dataclass
class Running:
    """The Vagrant testbed's services, running in namespaces."""

    tb: Testbed
    desc: dict[str, Any]
    procs: dict[str, tuple[UnitCommand, subprocess.Popen[bytes]]]  # host -> its service


@pytest.fixture(scope="module")
def running(checkout_reachable_by_others: None) -> Iterator[Running]:
    """A testbed of the Vagrant plan's size with every VM's services started from its units."""
    if os.geteuid() != 0:
        pytest.fail("needs root (namespaces, XDP): run `sudo make test`", pytrace=False)
    roles_of = [m["role"] for m in PLAN["machines"]]
    tb = Testbed(
        PREFIX,
        clients=roles_of.count("client"),
        relays=roles_of.count("relay"),
        transceivers=roles_of.count("transceiver"),
    )
    tb.down()  # leftovers of an interrupted run
    desc = tb.up()
    cwd = Path(tempfile.mkdtemp(prefix="splitrelay-vagrant-"))
    cwd.chmod(0o755)  # services that drop root still reach their working directory
    state = Running(tb, desc, {})
    try:
        for host in HOSTS:  # plan.json lists them in boot order: Redis first
            for unit in roles("units", host).split():
                if unit == "splitrelay-net":
                    continue  # the namespaces are that unit's job here
                cmd = unit_command(host, unit)
                state.procs[host] = (cmd, start_unit(tb, cmd, cwd))
                _wait_ready(state, host, unit)
        yield state
    finally:
        tb.down()
        shutil.rmtree(cwd, ignore_errors=True)


def _wait_ready(state: Running, host: str, unit: str) -> None:
    """What provision.sh waits for (`roles.py checks`), from the namespaces' side."""
    tb, desc = state.tb, state.desc
    cmd, proc = state.procs[host]
    if unit == "splitrelay-redis":
        redis = desc["hosts"]["redis"]
        ping = ("relay1", redis["ipv4"], REDIS_PORT, "PING")
        _wait(
            tb,
            cmd,
            proc,
            "PONG from the relay's namespace",
            lambda: redis_command(tb, *ping) == b"+PONG\r\n",
        )
    elif unit == "splitrelay-relay":
        runstate = Path(f"/proc/{proc.pid}/root/run/splitrelay/splitrelay.json")
        _wait(
            tb,
            cmd,
            proc,
            "its run state",
            lambda: json.loads(runstate.read_text())["pid"] == proc.pid,
            timeout=90,
        )
        _wait(
            tb,
            cmd,
            proc,
            "metrics from the client's namespace",
            lambda: http_get(tb, "c1", desc["relay_metrics_url"])[0] == 200,
        )
    elif unit == "splitrelay-transceiver":
        url = desc["hosts"][host]["signaling_url"] + "/healthz"
        _wait(
            tb,
            cmd,
            proc,
            "/healthz from the client's namespace",
            lambda: http_get(tb, "c1", url)[0] == 200,
        )


def test_relay_runs_as_its_unit_says(running: Running) -> None:
    _, proc = running.procs["relay1"]
    state = json.loads(Path(f"/proc/{proc.pid}/root/run/splitrelay/splitrelay.json").read_text())
    assert state["xdp"], f"XDP not in use: {state['fallback_reason']}"
    assert set(state["interfaces"]) == {"pub0", "dc0"}
    assert state["redis"] == running.desc["redis_url"]
    status, body = http_get(running.tb, "c1", running.desc["relay_metrics_url"])
    assert status == 200
    assert metrics(body)["splitrelay_relay_xdp_attached"] == 2


def test_transceivers_answer_and_register(running: Running) -> None:
    tb, desc = running.tb, running.desc
    for host in desc["transceivers"]:
        status, body = http_get(tb, "c1", desc["hosts"][host]["signaling_url"] + "/healthz")
        assert status == 200, body
        assert json.loads(body)["status"] == "ok"
    redis = desc["hosts"]["redis"]

    def registered() -> bool:
        """At least one worker of each transceiver host (a multi-bulk reply: *COUNT)."""
        reply = redis_command(
            tb, "relay1", redis["ipv4"], REDIS_PORT, "SCARD", "splitrelay:transceivers"
        )
        return int(reply[1:].split(b"\r\n")[0]) >= len(desc["transceivers"])

    cmd, proc = running.procs[desc["transceivers"][0]]
    _wait(tb, cmd, proc, "registration of every transceiver in Redis", registered, timeout=20)


def test_call_through_the_relay(running: Running) -> None:
    """The README's call, from the client's namespace, through the relay."""
    tb, desc = running.tb, running.desc
    url = desc["hosts"]["tx1"]["signaling_url"] + "/v1/calls"
    argv = [str(BIN_DIR / "transceiver"), "call", url, "--calls", "2", "--duration", "5", "--json"]
    with in_netns(tb.netns("c1")):
        res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    summary = json.loads(res.stdout)
    assert summary["ok"] == 2, summary["errors"]
    status, body = http_get(tb, "c1", desc["relay_metrics_url"])
    assert status == 200
    relay = metrics(body)
    assert relay["splitrelay_relay_sessions_created_total"] >= 2
    assert relay["splitrelay_relay_packets_total"] > 0
    status, body = http_get(tb, "c1", desc["hosts"]["tx1"]["signaling_url"] + "/metrics")
    assert status == 200
    assert metrics(body)["splitrelay_transceiver_calls_connected_total"] >= 2


def test_services_stop_on_sigterm(running: Running) -> None:
    """systemd's stop (KillSignal=SIGTERM) ends each cleanly within its TimeoutStopSec.

    Reverse boot order. The relay leaves XDP attached, which is what makes a restart of
    splitrelay-relay.service hitless.
    """
    for cmd, proc in reversed(running.procs.values()):
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(cmd.stop_timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{cmd.unit} on {cmd.host} ignored SIGTERM for {cmd.stop_timeout} s")
        assert code == 0, f"{cmd.unit} on {cmd.host} exited {code}:\n{_log(running.tb, cmd)}"
    with in_netns(running.tb.netns("relay1")):
        assert info("pub0").mode is not None
        assert info("dc0").mode is not None
