"""`relayctl transceivers --redis-url ...` edits the shared registry."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_server import RedisServer

RELAYCTL = str(Path(sys.executable).with_name("relayctl"))


@pytest.fixture
def server() -> Iterator[RedisServer]:
    s = RedisServer().start()
    yield s
    s.close()


def relayctl(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [RELAYCTL, "transceivers", "--redis-url", url, *args],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_add_drain_list_remove(server: RedisServer) -> None:
    res = relayctl(server.url, "add", "a1", "203.0.113.11:4001")
    assert res.returncode == 0, res.stderr
    assert relayctl(server.url, "drain", "a1").returncode == 0
    listed = json.loads(relayctl(server.url, "ls", "--json").stdout)
    assert [(t["id"], t["address"], t["state"]) for t in listed] == [
        ("000000a1", "203.0.113.11:4001", "draining")
    ]
    assert relayctl(server.url, "rm", "a1").returncode == 0
    assert json.loads(relayctl(server.url, "ls", "--json").stdout) == []


def test_unknown_transceiver_and_redis_down_are_one_line_errors(server: RedisServer) -> None:
    res = relayctl(server.url, "drain", "a9")
    assert res.returncode != 0 and res.stderr.count("\n") == 1 and "no transceiver" in res.stderr
    url = server.url
    server.stop()
    res = relayctl(url, "add", "a1", "203.0.113.11:4001")
    assert res.returncode != 0
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("relayctl: error: Redis")
