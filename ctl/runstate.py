"""What a running relay daemon tells the rest of the world about itself.

The daemon writes a small JSON file when it starts and whenever its data
plane changes (attached, fell back to userspace); `relayctl status` reads it
next to the pinned maps. A file whose pid is gone describes a stopped daemon.
"""

from __future__ import annotations

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


def save(state: RunState) -> Path:
    """Write atomically, so a reader never sees half a file."""
    path = state_path(state.pin_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
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


def remove(pin_dir: Path | str) -> None:
    """Forget the state (clean shutdown)."""
    state_path(pin_dir).unlink(missing_ok=True)
