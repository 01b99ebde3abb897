"""`relayctl run` options: each has help and an environment variable named after it.

In-process through click's CliRunner, with only the serving part (`_serve`)
stubbed: everything between the command line (or the environment) and the
DaemonConfig the daemon would run with is the real code.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from ctl import cli, daemon
from ctl.daemon import DaemonConfig
from ctl.xdp import AttachMode


@dataclass
class Served:
    """What `relayctl run` got as far as: its logging level and the configs it would serve."""

    log_levels: list[str] = field(default_factory=list)
    configs: list[DaemonConfig] = field(default_factory=list)


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    """Capture the config `relayctl run` would serve instead of serving it."""
    seen = Served()

    async def fake_serve(config: DaemonConfig) -> None:
        seen.configs.append(config)

    def fake_logging(**kw: Any) -> None:  # keep the test process's own logging as it is
        seen.log_levels.append(kw["level"])

    monkeypatch.setattr(daemon, "_serve", fake_serve)
    monkeypatch.setattr(logging, "basicConfig", fake_logging)
    yield seen


def _invoke(args: list[str], env: dict[str, str] | None = None) -> Result:
    try:
        runner = CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    except TypeError:  # click >= 8.2 keeps stderr apart anyway
        runner = CliRunner()
    # Only the variables given: none of the caller's SPLITRELAY_* may leak in.
    clean = {k: None for k in os.environ if k.startswith("SPLITRELAY_")}
    return runner.invoke(cli.relayctl, args, env={**clean, **(env or {})})  # type: ignore[dict-item]


def _options() -> list[click.Option]:
    return [p for p in daemon.run_command.params if isinstance(p, click.Option)]


def test_every_option_has_help_and_its_own_environment_variable() -> None:
    for opt in _options():
        long = next(o for o in opt.opts if o.startswith("--"))
        assert opt.help, f"{long} has no help"
        assert opt.envvar == "SPLITRELAY_RUN_" + long[2:].upper().replace("-", "_"), long
        assert opt.show_envvar, long


def test_help_shows_every_option_and_variable() -> None:
    res = _invoke(["run", "--help"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())  # help text wraps anywhere
    for opt in _options():
        assert next(o for o in opt.opts if o.startswith("--")) in text
        assert str(opt.envvar) in text
    assert "SPLITRELAY_RUN_INTERFACE" in text and "SPLITRELAY_RUN_METRICS" in text


def test_settings_from_the_environment(served: Served, tmp_path: Path) -> None:
    env = {
        "SPLITRELAY_PIN_DIR": str(tmp_path / "pins"),
        "SPLITRELAY_RUN_INTERFACE": "pub0 dc0",
        "SPLITRELAY_RUN_PUBLIC": "198.51.100.1 2001:db8:c::1",
        "SPLITRELAY_RUN_PUBLIC_PORT": "4478",
        "SPLITRELAY_RUN_TUNNEL": "203.0.113.1",
        "SPLITRELAY_RUN_TUNNEL_PORT": "4479",
        "SPLITRELAY_RUN_TRANSCEIVER": "11=203.0.113.11:4001 a012=[2001:db8:1::12]:4002",
        "SPLITRELAY_RUN_MODE": "generic",
        "SPLITRELAY_RUN_MAX_SESSIONS": "1000",
        "SPLITRELAY_RUN_MAX_TRANSCEIVERS": "16",
        "SPLITRELAY_RUN_IDLE_TIMEOUT": "7.5",
        "SPLITRELAY_RUN_METRICS": "127.0.0.1:19478",
        "SPLITRELAY_RUN_REDIS_URL": "redis://203.0.113.20:6379/0",
        "SPLITRELAY_RUN_REDIS_PREFIX": "sr-test:",
        "SPLITRELAY_RUN_RELAY_ID": "relay-a",
        "SPLITRELAY_RUN_DETACH_ON_EXIT": "1",
        "SPLITRELAY_RUN_LOG_LEVEL": "warning",
    }
    res = _invoke(["run"], env)
    assert res.exit_code == 0, res.stderr
    assert served.log_levels == ["WARNING"]
    [config] = served.configs
    assert config.pin_dir == tmp_path / "pins"
    assert config.interfaces == ["pub0", "dc0"]
    assert [str(a) for a in config.public] == ["198.51.100.1", "2001:db8:c::1"]
    assert config.public_port == 4478
    assert [str(a) for a in config.tunnel] == ["203.0.113.1"]
    assert config.tunnel_port == 4479
    assert config.transceivers == [
        (0x11, ipaddress.ip_address("203.0.113.11"), 4001),
        (0xA012, ipaddress.ip_address("2001:db8:1::12"), 4002),
    ]
    assert config.mode is AttachMode.GENERIC
    assert (config.sizes.sessions, config.sizes.transceivers) == (1000, 16)
    assert config.idle_timeout == 7.5
    assert (config.metrics_host, config.metrics_port) == ("127.0.0.1", 19478)
    assert config.redis_url == "redis://203.0.113.20:6379/0"
    assert config.redis_prefix == "sr-test:"
    assert config.relay_id == "relay-a"
    assert config.detach_on_exit is True


def test_no_xdp_from_the_environment_and_flags_win(served: Served) -> None:
    env = {"SPLITRELAY_RUN_NO_XDP": "1", "SPLITRELAY_RUN_PUBLIC_PORT": "4478"}
    res = _invoke(["run", "--public", "198.51.100.1", "--public-port", "5478"], env)
    assert res.exit_code == 0, res.stderr
    [config] = served.configs
    assert config.mode is None  # --no-xdp
    assert config.public_port == 5478  # the command line beats the environment


def test_defaults_without_environment(served: Served) -> None:
    assert _invoke(["run"]).exit_code == 0
    [config] = served.configs
    assert served.log_levels == ["INFO"]
    assert config.mode is AttachMode.AUTO
    assert (config.public_port, config.tunnel_port) == (3478, 3479)
    assert (config.metrics_host, config.metrics_port) == ("0.0.0.0", 9478)
    assert config.detach_on_exit is False and config.interfaces == []


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"SPLITRELAY_RUN_PUBLIC": "198.51.100.300"}, "'198.51.100.300' is not an IP address"),
        ({"SPLITRELAY_RUN_PUBLIC_PORT": "0"}, "'--public-port': 0 is not in the range"),
        ({"SPLITRELAY_RUN_TRANSCEIVER": "11@1.2.3.4"}, "expected ID=ADDR:PORT"),
        ({"SPLITRELAY_RUN_METRICS": "9478"}, "expected HOST:PORT"),
    ],
)
def test_bad_values_from_the_environment_are_one_line(
    served: Served, env: dict[str, str], fragment: str
) -> None:
    res = _invoke(["run"], env)
    assert res.exit_code == 2
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("relayctl: error: "), res.stderr
    assert fragment in lines[0]
    assert served.configs == []
