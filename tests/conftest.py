"""Fixtures shared by every suite: the relay program, compiled once per session."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def require_root() -> None:
    """BPF and namespaces need root: fail with instructions, never skip."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root for BPF and network namespaces (sudo make test)")
    if not os.path.ismount("/sys/fs/bpf"):
        pytest.fail("bpffs is not mounted at /sys/fs/bpf (mount -t bpf bpf /sys/fs/bpf)")


@pytest.fixture(scope="session")
def xdp() -> Iterator[object]:
    """The relay program loaded once, with a private namespace for its FIB lookups."""
    require_root()
    from tests.bpf import xdp_harness

    xdp_harness.setup_netns()
    pin_dir = Path(tempfile.mkdtemp(prefix="splitrelay-xdp-", dir="/sys/fs/bpf"))
    harness = xdp_harness.XdpHarness(pin_dir)
    try:
        yield harness
    finally:
        harness.close()
        xdp_harness.teardown_netns()
