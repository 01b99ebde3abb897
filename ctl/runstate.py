"""What a running relay daemon tells the rest of the world about itself.

The daemon writes a small JSON file when it starts and refreshes it every
second (attachments, why it fell back to userspace, and the userspace path's
counters, which live only in the daemon's memory); `relayctl status` and
`relayctl stats` read it next to the pinned maps. A file whose pid is gone
describes a stopped daemon.

One file per pin dir, owned by the daemon whose pid it names: a daemon
refuses to start while the file names another live process, and removes the
file on exit only if it is still its own.
"""

from __future__ import annotations

import errno
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

RUN_DIR = Path("/run/splitrelay")


@dataclass
class RunState:
    """The daemon's own account of what it runs."""

    pid: int
    pin_dir: str
    started: float = field(default_factory=time.time)
    xdp: bool = False  # is the XDP program attached and in use?
    interfaces: dict[str, str] = field(default_factory=dict)  # ifname -> "native"/"generic"
    fallback_reason: str | None = None  # why XDP is not in use, one line
    metrics: str | None = None  # "addr:port" of the Prometheus endpoint
    public: list[str] = field(default_factory=list)  # "addr:port" the clients reach
    tunnel: list[str] = field(default_factory=list)  # "addr:port" transceivers answer to
    redis: str | None = None  # the Redis URL without password
    # The userspace path's counters (names as in ctl/userspace.py) and when they were
    # taken (Unix time): `relayctl stats` shows them next to the kernel's.
    userspace_counters: dict[str, int] = field(default_factory=dict)
    counters_updated: float | None = None

    @property
    def alive(self) -> bool:
        """True while the recorded process still exists."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def state_path(pin_dir: Path | str) -> Path:
    """Where the daemon using pin_dir records its state (one file per pin dir)."""
    return RUN_DIR / f"{Path(pin_dir).name}.json"


def ensure_writable() -> None:
    """Raise OSError unless this process can write run state (the daemon checks first).

    Checked before the daemon changes anything, so that a daemon without the
    permission fails at once with a clear reason instead of after loading.
    """
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    if not os.access(RUN_DIR, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(RUN_DIR))


def save(state: RunState) -> Path:
    """Write atomically, so a reader never sees half a file."""
    path = state_path(state.pin_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{state.pid}.tmp")  # per writer: two never share a temp file
    tmp.write_text(json.dumps(asdict(state), indent=2, sort_keys=True))
    tmp.replace(path)
    return path


def load(pin_dir: Path | str) -> RunState | None:
    """The recorded state, or None if no daemon ever recorded one."""
    path = state_path(pin_dir)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    known = set(RunState.__dataclass_fields__)
    return RunState(**{k: v for k, v in data.items() if k in known})


def remove(pin_dir: Path | str, pid: int | None = None) -> bool:
    """Forget the state; with `pid`, only if that process recorded it.

    A daemon passes its own pid, so a daemon that failed to start (or a
    second one on the same pin dir) can never delete the live one's record.
    Returns whether a file was removed.
    """
    if pid is not None:
        current = load(pin_dir)
        if current is None or current.pid != pid:
            return False
    try:
        state_path(pin_dir).unlink()
    except FileNotFoundError:
        return False
    return True
