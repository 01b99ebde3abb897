"""`python -m ctl.bench_redis` runs end to end and accounts for every session.

A benchmark's figures are not asserted (no timing in the suite), but what makes
them mean something is: every session loaded, every kernel-created session in
Redis, no event lost, no write dropped, and nothing left behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ctl.bench_redis import NETNS
from ctl.netns import netns_exists

SESSIONS = 5000  # more than two chunks, so the drain between chunks is exercised


def test_a_small_run_accounts_for_every_session() -> None:
    before = sorted(Path("/sys/fs/bpf").glob("splitrelay-bench-redis-*"))
    res = subprocess.run(
        [sys.executable, "-m", "ctl.bench_redis", "--sessions", str(SESSIONS), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout)
    assert result["recovery"]["sessions"] == SESSIONS
    write = result["write_through"]
    assert write["sessions"] == SESSIONS
    assert write["events_lost"] == 0
    assert write["writes_dropped"] == 0
    assert write["seconds_to_redis"] >= write["kernel_creation_seconds"] > 0
    assert not netns_exists(NETNS)
    assert sorted(Path("/sys/fs/bpf").glob("splitrelay-bench-redis-*")) == before
