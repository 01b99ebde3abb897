"""Fixtures shared by every suite: the relay program, compiled once per session."""

from __future__ import annotations

import os
import stat
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


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def checkout_reachable_by_others() -> Iterator[None]:
    """Let an unprivileged process run this checkout's venv, for the tests that drop root.

    Those tests run `relayctl` (or a unit's command line) as nobody, which
    needs to traverse every directory above the checkout. A checkout in a
    private directory (`mktemp -d` is 0700) would make them fail on where the
    repository lies, not on what they test. Directories that lack the
    search bit for others get it (search only, not read) for the session, and
    their mode is restored afterwards.
    """
    changed: list[tuple[Path, int]] = []
    for directory in (REPO, *REPO.parents):
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            os.chmod(directory, stat.S_IMODE(mode) | stat.S_IXOTH)
            changed.append((directory, stat.S_IMODE(mode)))
    try:
        yield
    finally:
        for directory, mode in reversed(changed):
            os.chmod(directory, mode)
