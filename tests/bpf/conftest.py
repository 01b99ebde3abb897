"""Shared fixtures for tests that use real BPF: privileges, bpffs, scratch pin dirs.

These tests exercise the kernel, not mocks, so a missing prerequisite is a
failure with instructions, never a silent skip that would hide an untested build.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

BPFFS = Path("/sys/fs/bpf")


def _bpffs_mounted(mountpoint: Path = BPFFS) -> bool:
    """True if a filesystem of type "bpf" is mounted exactly at ``mountpoint``."""
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        return any(
            fields[1] == str(mountpoint) and fields[2] == "bpf"
            for fields in (line.split() for line in mounts)
            if len(fields) >= 3
        )


@pytest.fixture(scope="session")
def bpf_privileges() -> None:
    """Fail early and clearly when these tests cannot possibly run here."""
    if os.geteuid() != 0:
        pytest.fail("BPF tests must run as root (try: sudo make test)", pytrace=False)
    if not _bpffs_mounted():
        pytest.fail(
            f"bpffs is not mounted at {BPFFS} (run: mount -t bpf bpf {BPFFS}, or ctl/bootstrap.sh)",
            pytrace=False,
        )


@contextmanager
def _scratch_bpffs_dir() -> Iterator[Path]:
    """A fresh directory on bpffs, removed with every pin in it afterwards.

    Unique names keep parallel or aborted runs from colliding on pins, and the
    cleanup matters: a pin keeps its map alive in the kernel until unlinked.
    """
    path = Path(tempfile.mkdtemp(prefix="splitrelay-test-", dir=BPFFS))
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture
def bpffs_dir(bpf_privileges: None) -> Iterator[Path]:
    """A scratch bpffs directory for one test."""
    with _scratch_bpffs_dir() as path:
        yield path


@pytest.fixture(scope="module")
def bpffs_module_dir(bpf_privileges: None) -> Iterator[Path]:
    """A scratch bpffs directory shared by a module, e.g. for pins a bcc program
    declares at compile time."""
    with _scratch_bpffs_dir() as path:
        yield path
