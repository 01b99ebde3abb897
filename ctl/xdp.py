"""Attaching XDP programs to interfaces, detaching them, and asking what is attached.

Native (driver) mode is the fast one; generic (skb) mode works on any device
but runs after the kernel allocated an skb. `auto` tries native first. The
kernel replaces an attached program atomically, which is what makes a
controller restart hitless: the new program takes over between two packets.
"""

from __future__ import annotations

import asyncio
import ctypes
import enum
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

T = TypeVar("T")

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2


class XdpError(RuntimeError):
    """Attaching or detaching failed; the message is one line for operators."""


class AttachMode(enum.StrEnum):
    """How to attach: native (driver), generic (skb), or native else generic."""

    NATIVE = "native"
    GENERIC = "generic"
    AUTO = "auto"


_MODE_FLAGS = {AttachMode.NATIVE: XDP_FLAGS_DRV_MODE, AttachMode.GENERIC: XDP_FLAGS_SKB_MODE}
# IFLA_XDP_ATTACHED values, as numbers or as pyroute2 decodes them
_ATTACHED_MODES: dict[int | str, str] = {
    1: AttachMode.NATIVE,
    2: AttachMode.GENERIC,
    3: "offload",
    4: "multi",
    "xdp": AttachMode.NATIVE,
    "xdpdrv": AttachMode.NATIVE,
    "xdpgeneric": AttachMode.GENERIC,
    "xdpoffload": "offload",
    "xdpmulti": "multi",
}


@dataclass(frozen=True)
class XdpInfo:
    """What the kernel reports for one interface."""

    ifname: str
    ifindex: int
    mode: str | None  # "native", "generic", ... or None when nothing is attached
    prog_id: int


def ifindex(ifname: str) -> int:
    """The interface index in the calling thread's network namespace."""
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        raise XdpError(f"interface {ifname!r} does not exist") from None


def _outside_event_loop(fn: Callable[[], T]) -> T:
    """Run fn in a helper thread when this thread runs an asyncio loop.

    pyroute2's synchronous IPRoute drives an event loop of its own, which
    cannot run inside another one. The helper thread is created from this
    thread, so it is in the same network namespace.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def _get_link(ifname: str) -> Any:
    with IPRoute() as ipr:
        try:
            return ipr.link("get", ifname=ifname)[0]
        except NetlinkError as exc:
            raise XdpError(f"interface {ifname!r} does not exist") from exc


def info(ifname: str) -> XdpInfo:
    """The XDP attachment of an interface."""
    link = _outside_event_loop(lambda: _get_link(ifname))
    xdp = link.get("IFLA_XDP")
    attached = xdp.get("IFLA_XDP_ATTACHED") if xdp is not None else None
    prog_id = (xdp.get("IFLA_XDP_PROG_ID") if xdp is not None else None) or 0
    mode = _ATTACHED_MODES.get(attached) if attached else None
    return XdpInfo(ifname, int(link["index"]), str(mode) if mode else None, int(prog_id))


def _libbcc() -> ctypes.CDLL:
    from bcc.libbcc import lib  # imported late: only attach needs bcc

    return lib


def _set(ifname: str, prog_fd: int, flags: int) -> None:
    ret = _libbcc().bpf_attach_xdp(ifname.encode(), prog_fd, flags)
    if ret < 0:
        raise XdpError(f"cannot attach XDP to {ifname}: {os.strerror(ctypes.get_errno())}")


def attach(ifname: str, prog_fd: int, mode: AttachMode = AttachMode.AUTO) -> AttachMode:
    """Attach prog_fd to ifname (replacing any program there); return the mode used."""
    ifindex(ifname)  # a clear error for a missing interface
    if mode is AttachMode.AUTO:
        current = info(ifname).mode
        order = [AttachMode.NATIVE, AttachMode.GENERIC]
        if current == AttachMode.GENERIC:
            order.reverse()  # replace in place rather than stacking a second mode
        for candidate in order:
            try:
                _set(ifname, prog_fd, _MODE_FLAGS[candidate])
                return candidate
            except XdpError:
                continue
        raise XdpError(f"cannot attach XDP to {ifname} in native or generic mode")
    _set(ifname, prog_fd, _MODE_FLAGS[mode])
    return mode


def detach(ifname: str) -> bool:
    """Remove whatever XDP program is attached to ifname; True if one was.

    Netlink (pyroute2), like info(), not libbcc: a daemon that cannot import
    bcc must still be able to take a stale program off its interfaces.
    """
    current = info(ifname)
    if current.mode is None:
        return False
    flags = _MODE_FLAGS[AttachMode(current.mode)] if current.mode in _MODE_FLAGS else 0

    def request() -> None:
        with IPRoute() as ipr:
            ipr.link(
                "set",
                index=current.ifindex,
                xdp={"attrs": [("IFLA_XDP_FD", -1), ("IFLA_XDP_FLAGS", flags)]},
            )

    try:
        _outside_event_loop(request)
    except NetlinkError as exc:
        raise XdpError(f"cannot detach XDP from {ifname}: {os.strerror(exc.code)}") from exc
    return True
