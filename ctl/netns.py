"""Small helpers for named network namespaces (the ones `ip netns` manages).

Two ways to act inside a namespace, for two different needs:

* `in_netns(name)` moves only the *calling thread* into the namespace and back.
  Sockets (and netlink sockets, and child processes forked by that thread)
  created inside keep that namespace for their whole life, so one test process
  can own a client socket in one namespace and a server socket in another.
* `run_in` / `popen_in` run a program there through `ip netns exec`, which also
  remounts /sys for that namespace, as tools like `ethtool` or `sysctl` expect
  (`popen_in(..., keep_mounts=True)` enters only the network namespace, for
  programs that need the caller's mounts, such as bpffs pins).

Namespaces are created and removed with `pyroute2.netns`, which bind-mounts them
under /run/netns exactly as iproute2 does, so `ip netns list` sees ours and we see
theirs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pyroute2 import netns as _pr_netns

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
DEFAULT_TIMEOUT = 10.0

_libc_lock = threading.Lock()
_libc: ctypes.CDLL | None = None


class NetnsError(RuntimeError):
    """A namespace operation failed; the message says which and why."""


def netns_path(name: str) -> Path:
    """Return the bind-mount path of a named namespace, rejecting path tricks."""
    if not name or "/" in name or name in (".", ".."):
        raise NetnsError(f"invalid network namespace name {name!r}")
    return NETNS_DIR / name


def netns_exists(name: str) -> bool:
    """True if /run/netns/NAME is a live namespace mount (not a stale empty file).

    A crashed `ip netns add` can leave the file without the nsfs mount; such a
    file is not a namespace and entering it would fail, so it does not count.
    """
    path = netns_path(name)
    try:
        return path.exists() and os.path.ismount(path)
    except OSError:
        return False


def list_netns(prefix: str = "") -> list[str]:
    """Names of the named namespaces, optionally only those starting with `prefix`."""
    return sorted(n for n in _pr_netns.listnetns(str(NETNS_DIR)) if n.startswith(prefix))


def create_netns(name: str) -> bool:
    """Create a named namespace; return False if it already existed.

    A stale non-mounted file of that name is removed first, because pyroute2 (like
    iproute2) refuses to create over an existing path.
    """
    path = netns_path(name)
    if netns_exists(name):
        return False
    if path.exists():
        path.unlink()
    try:
        _pr_netns.create(name)
    except OSError as exc:
        raise NetnsError(f"cannot create network namespace {name!r}: {exc}") from exc
    if not netns_exists(name):
        raise NetnsError(f"network namespace {name!r} was not created")
    return True


def remove_netns(name: str) -> bool:
    """Unmount and delete a named namespace; return False if there was none.

    The kernel destroys the namespace (and the veths in it) once the last
    process inside it is gone; callers that started processes there stop them
    first.
    """
    path = netns_path(name)
    if not path.exists():
        return False
    try:
        _pr_netns.remove(name)
    except OSError as exc:
        raise NetnsError(f"cannot remove network namespace {name!r}: {exc}") from exc
    return True


def _setns(fd: int) -> None:
    """setns(2) for the calling thread (os.setns only exists from Python 3.12)."""
    setns = getattr(os, "setns", None)
    if setns is not None:
        setns(fd, CLONE_NEWNET)
        return
    global _libc
    with _libc_lock:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the body with the calling thread inside namespace `name`.

    Only this thread moves (setns on a thread affects that thread alone), so
    other threads, including an asyncio loop running elsewhere, are unaffected.
    The original namespace is saved from /proc/thread-self (not /proc/self, which
    is the main thread's) and restored even if the body raises. Sockets created
    inside keep the namespace after the block ends.
    """
    path = netns_path(name)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsError(f"network namespace {name!r} does not exist ({path})") from None
    try:
        saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        os.close(target)
        raise
    try:
        try:
            _setns(target)
        except OSError as exc:
            hint = " (are you root?)" if exc.errno == errno.EPERM else ""
            raise NetnsError(f"cannot enter network namespace {name!r}: {exc}{hint}") from exc
        try:
            yield
        finally:
            # Failing to return would leave this thread in the wrong namespace
            # for everything it does next; that must never pass silently.
            _setns(saved)
    finally:
        os.close(saved)
        os.close(target)


def _ns_argv(ns: str, argv: Sequence[str]) -> list[str]:
    """The `ip netns exec` command line, after checking the namespace is there."""
    if not argv:
        raise NetnsError("empty command")
    if not netns_exists(ns):
        raise NetnsError(f"network namespace {ns!r} does not exist")
    return ["ip", "netns", "exec", ns, *map(str, argv)]


def run_in(
    ns: str,
    argv: Sequence[str],
    check: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    **kw: Any,
) -> subprocess.CompletedProcess[str]:
    """Run `argv` in namespace `ns` and wait (bounded by `timeout` seconds).

    Output is captured as text unless the caller passes its own stdout/stderr.
    With check=True a non-zero exit raises NetnsError carrying the command and
    its stderr, which is what a user needs to see; a timeout always raises.
    """
    cmd = _ns_argv(ns, argv)
    if "stdout" not in kw and "stderr" not in kw:
        kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    try:
        proc = subprocess.run(cmd, timeout=timeout, check=False, **kw)
    except FileNotFoundError as exc:
        raise NetnsError(f"cannot run {cmd[0]!r}: is iproute2 installed? ({exc})") from exc
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(f"in netns {ns}: {' '.join(cmd[4:])} timed out after {timeout}s") from exc
    if check and proc.returncode != 0:
        err = (proc.stderr or "").strip() if isinstance(proc.stderr, str) else ""
        raise NetnsError(
            f"in netns {ns}: {' '.join(cmd[4:])} exited {proc.returncode}"
            + (f": {err}" if err else "")
        )
    return proc


def popen_in(
    ns: str, argv: Sequence[str], *, keep_mounts: bool = False, **kw: Any
) -> subprocess.Popen[Any]:
    """Start `argv` in namespace `ns` without waiting; keyword args go to Popen.

    keep_mounts=False runs `ip netns exec`, which also gives the program a private
    mount namespace with /sys remounted for `ns` (so /sys/class/net lists the
    namespace's interfaces). That remount hides the bpffs on /sys/fs/bpf, so a
    program that pins BPF maps there (the relay) must use keep_mounts=True: only
    the network namespace changes (the child is forked from a thread inside `ns`,
    like `nsenter --net`), and it shares the caller's mounts, pins included.
    Either way the returned PID is the program's own (no wrapper process), so
    signals reach it directly.
    """
    if not keep_mounts:
        cmd = _ns_argv(ns, argv)
    elif not argv:
        raise NetnsError("empty command")
    else:
        cmd = [str(a) for a in argv]
    try:
        if not keep_mounts:
            return subprocess.Popen(cmd, **kw)
        with in_netns(ns):
            return subprocess.Popen(cmd, **kw)
    except FileNotFoundError as exc:
        raise NetnsError(f"cannot run {cmd[0]!r}: {exc}") from exc
