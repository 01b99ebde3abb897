"""Compile and load the XDP relay program with bcc, with its maps pinned.

The maps live under a pin directory (default /sys/fs/bpf/splitrelay) so that
the data plane keeps its state when the controller stops, `bpftool map dump
pinned ...` works, and the CLI can read them without compiling anything.
bcc creates a pinned map when its path is missing and reuses it when it
exists, so loading again adopts the sessions already there.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctl import layout, xdp

DEFAULT_PIN_DIR = Path("/sys/fs/bpf/splitrelay")
BPF_SOURCE = layout.BPF_DIR / "relay.c"
CEILING_SOURCE = layout.BPF_DIR / "ceiling.c"
PROGRAM_NAME = "xdp_relay"
MAP_NAMES = ("config", "transceivers", "sessions", "counters")


class LoadError(RuntimeError):
    """The program could not be compiled, verified or pinned."""


@dataclass(frozen=True)
class MapSizes:
    """Bounds on the kernel maps: memory never grows past them (sessions are LRU)."""

    sessions: int = 65536
    transceivers: int = 1024
    event_pages: int = 64  # ring buffer size in pages (power of two)

    def __post_init__(self) -> None:
        if self.sessions < 1 or self.transceivers < 1:
            raise ValueError("map sizes must be positive")
        if self.event_pages < 1 or self.event_pages & (self.event_pages - 1):
            raise ValueError("event_pages must be a power of two")


def _import_bcc() -> Any:
    """bcc's BPF class, or LoadError: without bcc the relay runs on its userspace path.

    Imported here rather than at module level because the CLI's map commands
    do not need bcc. A missing or broken bcc (no python3-bpfcc, a version that
    does not match libbcc) is a reason to fall back, like any other load
    failure, not a crash.
    """
    try:
        from bcc import BPF
    except (ImportError, OSError) as exc:  # OSError: bcc found, libbcc.so not
        raise LoadError(
            f"bcc is not importable ({exc}); install python3-bpfcc (see the README)"
        ) from exc
    return BPF


def _bpffs_ready(pin_dir: Path) -> None:
    root = pin_dir.parent
    if not os.path.ismount(root) and not os.path.ismount("/sys/fs/bpf"):
        raise LoadError(f"bpffs is not mounted at {root} (mount -t bpf bpf /sys/fs/bpf)")
    pin_dir.mkdir(parents=True, exist_ok=True)


class RelayProgram:
    """The compiled relay program, its pinned maps and its event ring buffer."""

    def __init__(self, pin_dir: Path = DEFAULT_PIN_DIR, sizes: MapSizes | None = None) -> None:
        self.pin_dir = Path(pin_dir)
        self.sizes = sizes or MapSizes()
        self._bpf: Any = None
        self._fn: Any = None

    def load(self) -> RelayProgram:
        """Compile with bcc and load; maps are created or adopted at pin_dir."""
        BPF = _import_bcc()
        _bpffs_ready(self.pin_dir)
        cflags = [
            f"-I{layout.BPF_DIR}",
            f'-DPIN_DIR="{self.pin_dir}"',
            f"-DMAX_SESSIONS={self.sizes.sessions}",
            f"-DMAX_TRANSCEIVERS={self.sizes.transceivers}",
            f"-DEVENT_PAGES={self.sizes.event_pages}",
            "-Wno-unused-function",
        ]
        try:
            self._bpf = BPF(src_file=str(BPF_SOURCE).encode(), cflags=cflags)
            self._fn = self._bpf.load_func(PROGRAM_NAME.encode(), BPF.XDP)
        except Exception as exc:  # bcc raises bare Exception
            raise LoadError(f"cannot load {BPF_SOURCE.name}: {exc}") from exc
        return self

    @property
    def bpf(self) -> Any:
        """The bcc BPF object (tables by name)."""
        if self._bpf is None:
            raise LoadError("program not loaded")
        return self._bpf

    @property
    def prog_fd(self) -> int:
        """File descriptor of the loaded XDP program."""
        if self._fn is None:
            raise LoadError("program not loaded")
        return int(self._fn.fd)

    def pin_program(self) -> Path:
        """Pin the program itself next to its maps (replacing an older pin)."""
        from bcc.libbcc import lib

        path = self.pin_dir / PROGRAM_NAME
        path.unlink(missing_ok=True)
        if lib.bpf_obj_pin(self.prog_fd, str(path).encode()) < 0:
            raise LoadError(f"cannot pin program at {path}: {os.strerror(ctypes.get_errno())}")
        return path

    def attach(self, ifname: str, mode: xdp.AttachMode = xdp.AttachMode.AUTO) -> xdp.AttachMode:
        """Attach to an interface; returns the mode actually used."""
        return xdp.attach(ifname, self.prog_fd, mode)

    def open_events(self, callback: Callable[[layout.SessionEvent], None]) -> None:
        """Deliver each session event the kernel reports to callback (on poll_events)."""

        def _raw(_ctx: Any, data: Any, size: int) -> int:
            callback(layout.SessionEvent.from_buffer_copy(ctypes.string_at(data, size)))
            return 0

        self.bpf[b"events"].open_ring_buffer(_raw)

    def poll_events(self, timeout_ms: int = 0) -> None:
        """Run pending event callbacks, waiting up to timeout_ms."""
        self.bpf.ring_buffer_poll(timeout_ms)

    def close(self) -> None:
        """Release the program and map fds (pinned objects stay)."""
        if self._bpf is not None:
            self._bpf.cleanup()
        self._bpf = None
        self._fn = None


def remove_pins(pin_dir: Path = DEFAULT_PIN_DIR) -> None:
    """Unpin the program and maps (a fresh state on the next load)."""
    pin_dir = Path(pin_dir)
    if not pin_dir.is_dir():
        return
    for entry in pin_dir.iterdir():
        entry.unlink()
    pin_dir.rmdir()
