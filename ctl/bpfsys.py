"""A small typed ctypes layer over libbpf.so.1: pinned maps and BPF_PROG_TEST_RUN.

Why this exists: bcc compiles C at load time (seconds, and it needs kernel headers),
which is right for the controller that loads the XDP program but wrong for an
operator's `relayctl` that only wants to read or edit a pinned map, and for tests
that push packets through an already loaded program. libbpf's low-level API
(`bpf_obj_get`, `bpf_map_*_elem`, `bpf_prog_test_run_opts`, ...) does exactly those
syscalls, so we call it directly and compile nothing.

ABI notes (checked against libbpf 1.1 `bpf.h` and the kernel UAPI `linux/bpf.h`):

* libbpf >= 1.0 returns ``-errno`` from every call here (and sets errno too), so a
  negative return value is the error code itself.
* Option structs start with ``size_t sz`` so libbpf can tell which fields the
  caller knows; it rejects unknown trailing bytes unless they are zero.
* ``struct bpf_map_info`` may be shorter than the running kernel's: the kernel
  fills only the ``info_len`` bytes we give it.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = [
    "BPF_ANY",
    "BPF_EXIST",
    "BPF_F_LOCK",
    "BPF_F_NO_PREALLOC",
    "BPF_MAP_TYPE_ARRAY",
    "BPF_MAP_TYPE_DEVMAP",
    "BPF_MAP_TYPE_DEVMAP_HASH",
    "BPF_MAP_TYPE_HASH",
    "BPF_MAP_TYPE_LPM_TRIE",
    "BPF_MAP_TYPE_LRU_HASH",
    "BPF_MAP_TYPE_LRU_PERCPU_HASH",
    "BPF_MAP_TYPE_PERCPU_ARRAY",
    "BPF_MAP_TYPE_PERCPU_HASH",
    "BPF_MAP_TYPE_PERF_EVENT_ARRAY",
    "BPF_MAP_TYPE_PROG_ARRAY",
    "BPF_MAP_TYPE_RINGBUF",
    "BPF_NOEXIST",
    "PERCPU_MAP_TYPES",
    "XDP_ABORTED",
    "XDP_DROP",
    "XDP_MD_SIZE",
    "XDP_PACKET_HEADROOM",
    "XDP_PASS",
    "XDP_REDIRECT",
    "XDP_TX",
    "BpfError",
    "MapType",
    "PinnedMap",
    "TestRunResult",
    "XdpAction",
    "create_map",
    "parse_cpu_list",
    "pin",
    "possible_cpus",
    "prog_test_run",
    "xdp_action_name",
    "xdp_md",
]

LIBBPF_SONAME = "libbpf.so.1"
"""Library loaded by default; ``SPLITRELAY_LIBBPF`` overrides it (a path or soname)."""

POSSIBLE_CPUS_FILE = Path("/sys/devices/system/cpu/possible")

XDP_PACKET_HEADROOM = 256
"""Headroom the kernel reserves in front of an XDP frame (``bpf_xdp_adjust_head``)."""

TEST_RUN_OUT_SLACK = 4096
"""Extra output room for test runs: covers the full XDP headroom (prepending with
``bpf_xdp_adjust_head``) plus tail growth with ``bpf_xdp_adjust_tail``, which the
kernel limits to the rest of one page."""

BPF_OBJ_NAME_LEN = 16


# --------------------------------------------------------------------------- errors


class BpfError(OSError):
    """A failed BPF operation: carries the errno and names the operation and object.

    It is an ``OSError`` so callers can test ``e.errno`` (``ENOENT`` for a missing
    pin, ``EPERM`` without privileges, ...) like any other system error.
    """

    def __init__(self, err: int, operation: str, target: str = "", hint: str = "") -> None:
        where = f" on {target}" if target else ""
        message = f"{operation}{where} failed: {os.strerror(err)}"
        if hint:
            message = f"{message} ({hint})"
        super().__init__(err, message)
        self.operation = operation
        self.target = target
        self.hint = hint

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple[type[BpfError], tuple[int, str, str, str]]:
        # Rebuild from our own arguments (OSError's default would pass (errno, message)).
        return (type(self), (int(self.errno or 0), self.operation, self.target, self.hint))


def _check(ret: int, operation: str, target: str = "", hint: str = "") -> int:
    """Pass through a non-negative libbpf result, or raise its ``-errno`` as BpfError."""
    if ret >= 0:
        return ret
    raise BpfError(-ret, operation, target, hint)


# --------------------------------------------------------------------------- constants


class MapType(IntEnum):
    """``enum bpf_map_type`` from the kernel UAPI (values are ABI, never renumbered)."""

    UNSPEC = 0
    HASH = 1
    ARRAY = 2
    PROG_ARRAY = 3
    PERF_EVENT_ARRAY = 4
    PERCPU_HASH = 5
    PERCPU_ARRAY = 6
    STACK_TRACE = 7
    CGROUP_ARRAY = 8
    LRU_HASH = 9
    LRU_PERCPU_HASH = 10
    LPM_TRIE = 11
    ARRAY_OF_MAPS = 12
    HASH_OF_MAPS = 13
    DEVMAP = 14
    SOCKMAP = 15
    CPUMAP = 16
    XSKMAP = 17
    SOCKHASH = 18
    CGROUP_STORAGE = 19
    REUSEPORT_SOCKARRAY = 20
    PERCPU_CGROUP_STORAGE = 21
    QUEUE = 22
    STACK = 23
    SK_STORAGE = 24
    DEVMAP_HASH = 25
    STRUCT_OPS = 26
    RINGBUF = 27
    INODE_STORAGE = 28
    TASK_STORAGE = 29
    BLOOM_FILTER = 30
    USER_RINGBUF = 31
    CGRP_STORAGE = 32
    ARENA = 33


BPF_MAP_TYPE_HASH = MapType.HASH
BPF_MAP_TYPE_ARRAY = MapType.ARRAY
BPF_MAP_TYPE_PROG_ARRAY = MapType.PROG_ARRAY
BPF_MAP_TYPE_PERF_EVENT_ARRAY = MapType.PERF_EVENT_ARRAY
BPF_MAP_TYPE_PERCPU_HASH = MapType.PERCPU_HASH
BPF_MAP_TYPE_PERCPU_ARRAY = MapType.PERCPU_ARRAY
BPF_MAP_TYPE_LRU_HASH = MapType.LRU_HASH
BPF_MAP_TYPE_LRU_PERCPU_HASH = MapType.LRU_PERCPU_HASH
BPF_MAP_TYPE_LPM_TRIE = MapType.LPM_TRIE
BPF_MAP_TYPE_DEVMAP = MapType.DEVMAP
BPF_MAP_TYPE_DEVMAP_HASH = MapType.DEVMAP_HASH
BPF_MAP_TYPE_RINGBUF = MapType.RINGBUF

PERCPU_MAP_TYPES = frozenset(
    {
        MapType.PERCPU_HASH,
        MapType.PERCPU_ARRAY,
        MapType.LRU_PERCPU_HASH,
        MapType.PERCPU_CGROUP_STORAGE,
    }
)
"""Map types whose userspace value is one slot per possible CPU."""

_ARRAY_MAP_TYPES = frozenset({MapType.ARRAY, MapType.PERCPU_ARRAY})
"""Map types whose entries always exist (delete is EINVAL; "clearing" means zeroing)."""

# Flags for bpf_map_update_elem.
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
BPF_F_LOCK = 4

# map_flags for create_map.
BPF_F_NO_PREALLOC = 1


class XdpAction(IntEnum):
    """``enum xdp_action``: what an XDP program asks the kernel to do with a frame."""

    XDP_ABORTED = 0
    XDP_DROP = 1
    XDP_PASS = 2
    XDP_TX = 3
    XDP_REDIRECT = 4


XDP_ABORTED = XdpAction.XDP_ABORTED
XDP_DROP = XdpAction.XDP_DROP
XDP_PASS = XdpAction.XDP_PASS
XDP_TX = XdpAction.XDP_TX
XDP_REDIRECT = XdpAction.XDP_REDIRECT


def xdp_action_name(code: int) -> str:
    """Name of an XDP verdict for logs and test failures, e.g. ``3 -> "XDP_TX"``."""
    try:
        return XdpAction(code).name
    except ValueError:
        return f"XDP_UNKNOWN({code})"


# --------------------------------------------------------------------------- C structs

_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64


class _BpfMapInfo(ctypes.Structure):
    """Kernel UAPI ``struct bpf_map_info`` (prefix up to ``map_extra``, 88 bytes)."""

    _fields_ = (
        ("type", _u32),
        ("id", _u32),
        ("key_size", _u32),
        ("value_size", _u32),
        ("max_entries", _u32),
        ("map_flags", _u32),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", _u32),
        ("btf_vmlinux_value_type_id", _u32),
        ("netns_dev", _u64),
        ("netns_ino", _u64),
        ("btf_id", _u32),
        ("btf_key_type_id", _u32),
        ("btf_value_type_id", _u32),
        ("_pad", _u32),
        ("map_extra", _u64),
    )


class _BpfMapCreateOpts(ctypes.Structure):
    """libbpf 1.1 ``struct bpf_map_create_opts`` (48 bytes)."""

    _fields_ = (
        ("sz", ctypes.c_size_t),
        ("btf_fd", _u32),
        ("btf_key_type_id", _u32),
        ("btf_value_type_id", _u32),
        ("btf_vmlinux_value_type_id", _u32),
        ("inner_map_fd", _u32),
        ("map_flags", _u32),
        ("map_extra", _u64),
        ("numa_node", _u32),
        ("map_ifindex", _u32),
    )


class _BpfTestRunOpts(ctypes.Structure):
    """libbpf 1.1 ``struct bpf_test_run_opts`` (80 bytes; the last field is batch_size)."""

    _fields_ = (
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", _u32),
        ("data_size_out", _u32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", _u32),
        ("ctx_size_out", _u32),
        ("retval", _u32),
        ("repeat", ctypes.c_int),
        ("duration", _u32),
        ("flags", _u32),
        ("cpu", _u32),
        ("batch_size", _u32),
    )


class _XdpMd(ctypes.Structure):
    """Kernel UAPI ``struct xdp_md``, the XDP program's context (24 bytes)."""

    _fields_ = (
        ("data", _u32),
        ("data_end", _u32),
        ("data_meta", _u32),
        ("ingress_ifindex", _u32),
        ("rx_queue_index", _u32),
        ("egress_ifindex", _u32),
    )


XDP_MD_SIZE = ctypes.sizeof(_XdpMd)

# A wrong layout would corrupt memory silently, so fail at import instead.
assert ctypes.sizeof(_BpfMapInfo) == 88
assert ctypes.sizeof(_BpfMapCreateOpts) == 48
assert ctypes.sizeof(_BpfTestRunOpts) == 80
assert XDP_MD_SIZE == 24


# --------------------------------------------------------------------------- libbpf


class _Libbpf:
    """The libbpf functions we use, with C prototypes declared once and typed wrappers.

    Every method returns libbpf's raw int (a value >= 0, or ``-errno``); callers
    turn errors into BpfError with context only they know (which path, which map).
    """

    def __init__(self, lib: ctypes.CDLL) -> None:
        c_int, c_void_p, c_char_p = ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p
        self._obj_get = self._proto(lib.bpf_obj_get, c_char_p)
        self._obj_pin = self._proto(lib.bpf_obj_pin, c_int, c_char_p)
        self._lookup = self._proto(lib.bpf_map_lookup_elem, c_int, c_void_p, c_void_p)
        self._update = self._proto(lib.bpf_map_update_elem, c_int, c_void_p, c_void_p, _u64)
        self._delete = self._proto(lib.bpf_map_delete_elem, c_int, c_void_p)
        self._next_key = self._proto(lib.bpf_map_get_next_key, c_int, c_void_p, c_void_p)
        self._info = self._proto(lib.bpf_obj_get_info_by_fd, c_int, c_void_p, ctypes.POINTER(_u32))
        self._create = self._proto(
            lib.bpf_map_create,
            c_int,
            c_char_p,
            _u32,
            _u32,
            _u32,
            ctypes.POINTER(_BpfMapCreateOpts),
        )
        self._test_run = self._proto(
            lib.bpf_prog_test_run_opts, c_int, ctypes.POINTER(_BpfTestRunOpts)
        )

    @staticmethod
    def _proto(fn: ctypes._CFuncPtr, *argtypes: type) -> ctypes._CFuncPtr:
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
        return fn

    def obj_get(self, path: bytes) -> int:
        return int(self._obj_get(path))

    def obj_pin(self, fd: int, path: bytes) -> int:
        return int(self._obj_pin(fd, path))

    def map_lookup_elem(
        self, fd: int, key: bytes | None, value: ctypes.Array[ctypes.c_char]
    ) -> int:
        return int(self._lookup(fd, key, value))

    def map_update_elem(self, fd: int, key: bytes, value: bytes, flags: int) -> int:
        return int(self._update(fd, key, value, flags))

    def map_delete_elem(self, fd: int, key: bytes) -> int:
        return int(self._delete(fd, key))

    def map_get_next_key(
        self, fd: int, key: bytes | None, next_key: ctypes.Array[ctypes.c_char]
    ) -> int:
        return int(self._next_key(fd, key, next_key))

    def obj_get_info_by_fd(self, fd: int, info: ctypes.Structure) -> int:
        size = _u32(ctypes.sizeof(info))
        return int(self._info(fd, ctypes.byref(info), ctypes.byref(size)))

    def map_create(
        self,
        map_type: int,
        name: bytes | None,
        key_size: int,
        value_size: int,
        max_entries: int,
        opts: _BpfMapCreateOpts,
    ) -> int:
        return int(self._create(map_type, name, key_size, value_size, max_entries, opts))

    def prog_test_run_opts(self, prog_fd: int, opts: _BpfTestRunOpts) -> int:
        return int(self._test_run(prog_fd, ctypes.byref(opts)))


@functools.cache
def _libbpf() -> _Libbpf:
    """Load libbpf once, on first use, so importing this module never needs it."""
    name = os.environ.get("SPLITRELAY_LIBBPF", LIBBPF_SONAME)
    try:
        return _Libbpf(ctypes.CDLL(name, use_errno=True))
    except OSError as exc:
        raise BpfError(
            errno.ENOENT, "load libbpf", name, "install libbpf1 or set SPLITRELAY_LIBBPF"
        ) from exc


# --------------------------------------------------------------------------- CPUs


def parse_cpu_list(text: str) -> int:
    """Count the CPUs in a kernel cpu list such as ``"0-3,5,7-8"`` (-> 7)."""
    count = 0
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        count += (int(last) if last else int(first)) - int(first) + 1
    if count <= 0:
        raise ValueError(f"empty CPU list: {text!r}")
    return count


@functools.cache
def possible_cpus() -> int:
    """Number of possible CPUs: the number of slots in a per-CPU map value.

    The kernel sizes per-CPU values by *possible* CPUs (including offline and
    hot-pluggable ones), not online ones, so os.cpu_count() would be wrong.
    """
    return parse_cpu_list(POSSIBLE_CPUS_FILE.read_text())


def _round_up8(n: int) -> int:
    return (n + 7) & ~7


# --------------------------------------------------------------------------- maps


def create_map(
    map_type: int,
    key_size: int,
    value_size: int,
    max_entries: int,
    name: str = "",
    *,
    flags: int = 0,
) -> int:
    """Create a map and return its fd (caller owns it); used by tests and tools.

    ``flags`` are the kernel's map_flags, e.g. BPF_F_NO_PREALLOC, which LPM tries
    require. ``name`` is at most 15 characters of ``[A-Za-z0-9_.]``.
    """
    opts = _BpfMapCreateOpts(sz=ctypes.sizeof(_BpfMapCreateOpts), map_flags=flags)
    ret = _libbpf().map_create(
        map_type, name.encode() or None, key_size, value_size, max_entries, opts
    )
    target = f"map {name!r} ({_type_name(map_type)}, key {key_size} B, value {value_size} B)"
    return _check(ret, "bpf_map_create", target)


def pin(fd: int, path: str | Path) -> None:
    """Pin a BPF object (map, program, link) at ``path`` on a bpffs mount.

    Pinning keeps the object alive after its last fd closes and lets other
    processes (relayctl, a restarted controller) reopen it by path.
    """
    _check(_libbpf().obj_pin(fd, os.fsencode(path)), "bpf_obj_pin", str(path))


def _type_name(map_type: int) -> str:
    try:
        return MapType(map_type).name
    except ValueError:
        return f"type {map_type}"


def _fd_kind(fd: int) -> str | None:
    """Kernel object kind behind ``fd`` ("bpf-map", "bpf-prog", ...), None if unknown."""
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    return link.removeprefix("anon_inode:") if link.startswith("anon_inode:") else link


class PinnedMap:
    """An open BPF map (usually reopened from a bpffs pin) with bytes-level access.

    Keys and values are raw bytes in the map's native layout; higher layers
    (ctl/layout.py) pack and unpack them. Lengths are checked here because the
    kernel copies exactly key_size/value_size bytes from our buffers: a short
    buffer would make it read past the end of a Python object.
    """

    def __init__(self, fd: int, info: _BpfMapInfo, path: str | None = None) -> None:
        """Use PinnedMap.open() or PinnedMap.from_fd(); they read ``info`` for you."""
        self._fd = fd
        self._path = path
        self._map_type = int(info.type)
        self._map_id = int(info.id)
        self._key_size = int(info.key_size)
        self._value_size = int(info.value_size)
        self._max_entries = int(info.max_entries)
        self._map_flags = int(info.map_flags)
        self._name = bytes(info.name).split(b"\0", 1)[0].decode(errors="replace")

    # -- construction

    @classmethod
    def open(cls, path: str | Path) -> Self:
        """Open the map pinned at ``path`` (bpf_obj_get) and read its geometry."""
        spath = os.fspath(path)
        fd = _check(_libbpf().obj_get(os.fsencode(spath)), "bpf_obj_get", spath)
        try:
            return cls._from_owned_fd(fd, spath)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def from_fd(cls, fd: int) -> Self:
        """Wrap a map fd the caller hands over; close() will close it."""
        return cls._from_owned_fd(fd, None)

    @classmethod
    def _from_owned_fd(cls, fd: int, path: str | None) -> Self:
        target = path or f"fd {fd}"
        kind = _fd_kind(fd)
        if kind is not None and kind != "bpf-map":
            raise BpfError(errno.EINVAL, "open map", target, f"it is a {kind}, not a bpf-map")
        info = _BpfMapInfo()
        _check(_libbpf().obj_get_info_by_fd(fd, info), "bpf_obj_get_info_by_fd", target)
        return cls(fd, info, path)

    # -- lifetime

    def close(self) -> None:
        """Close the fd (idempotent). A pinned map lives on; only our handle goes."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"PinnedMap(name={self._name!r}, type={_type_name(self._map_type)}, "
            f"key_size={self._key_size}, value_size={self._value_size}, "
            f"max_entries={self._max_entries}, path={self._path!r}, fd={self._fd})"
        )

    # -- properties

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise ValueError(f"{self._label()} is closed")
        return self._fd

    @property
    def path(self) -> str | None:
        return self._path

    @property
    def name(self) -> str:
        return self._name

    @property
    def map_type(self) -> int:
        """Raw ``bpf_map_type`` value (compare with MapType; unknown types stay ints)."""
        return self._map_type

    @property
    def type_name(self) -> str:
        return _type_name(self._map_type)

    @property
    def map_id(self) -> int:
        """Kernel-wide map id: equal ids mean the same map (e.g. via two pins)."""
        return self._map_id

    @property
    def key_size(self) -> int:
        return self._key_size

    @property
    def value_size(self) -> int:
        """Size of one value as the BPF program sees it (one CPU's slot for per-CPU maps)."""
        return self._value_size

    @property
    def max_entries(self) -> int:
        return self._max_entries

    @property
    def map_flags(self) -> int:
        return self._map_flags

    @property
    def is_percpu(self) -> bool:
        return self._map_type in PERCPU_MAP_TYPES

    @property
    def value_buffer_size(self) -> int:
        """Bytes userspace reads/writes per value: possible_cpus * round_up(value_size, 8)
        for per-CPU maps, value_size otherwise."""
        if self.is_percpu:
            return possible_cpus() * _round_up8(self._value_size)
        return self._value_size

    # -- element access

    def lookup(self, key: bytes) -> bytes | None:
        """Value for ``key``, or None if absent; per-CPU maps return the raw buffer."""
        self._check_key(key)
        buf = ctypes.create_string_buffer(self.value_buffer_size)
        ret = _libbpf().map_lookup_elem(self.fd, key, buf)
        if ret == -errno.ENOENT:
            return None
        self._raise_if(ret, "bpf_map_lookup_elem")
        return buf.raw

    def lookup_percpu(self, key: bytes) -> list[bytes] | None:
        """Per-CPU values for ``key`` (index = CPU number, padding stripped), None if absent."""
        self._require_percpu("lookup_percpu")
        raw = self.lookup(key)
        if raw is None:
            return None
        stride = _round_up8(self._value_size)
        return [raw[i : i + self._value_size] for i in range(0, len(raw), stride)]

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        """Insert or replace (BPF_ANY), insert only (BPF_NOEXIST -> EEXIST if present)
        or replace only (BPF_EXIST -> ENOENT if absent)."""
        self._check_key(key)
        if len(value) != self.value_buffer_size:
            extra = " (per-CPU map: use update_percpu)" if self.is_percpu else ""
            raise ValueError(
                f"{self._label()}: value is {len(value)} bytes, "
                f"expected {self.value_buffer_size}{extra}"
            )
        ret = _libbpf().map_update_elem(self.fd, key, value, flags)
        self._raise_if(ret, "bpf_map_update_elem")

    def update_percpu(self, key: bytes, values: Sequence[bytes], flags: int = BPF_ANY) -> None:
        """Set one value per possible CPU (``len(values) == possible_cpus()``)."""
        self._require_percpu("update_percpu")
        ncpu = possible_cpus()
        if len(values) != ncpu:
            raise ValueError(f"{self._label()}: got {len(values)} values for {ncpu} CPUs")
        stride = _round_up8(self._value_size)
        for v in values:
            if len(v) != self._value_size:
                raise ValueError(
                    f"{self._label()}: per-CPU value is {len(v)} bytes, expected {self._value_size}"
                )
        self.update(key, b"".join(v.ljust(stride, b"\0") for v in values), flags)

    def delete(self, key: bytes) -> bool:
        """Delete ``key``; True if it was there, False if it was already gone."""
        self._check_key(key)
        ret = _libbpf().map_delete_elem(self.fd, key)
        if ret == -errno.ENOENT:
            return False
        self._raise_if(ret, "bpf_map_delete_elem")
        return True

    # -- iteration

    def keys(self) -> Iterator[bytes]:
        """Every key, each once, walking bpf_map_get_next_key.

        Entries may vanish while we walk (the XDP program, LRU eviction, or the
        caller deleting the key just yielded). The kernel then restarts from the
        first key, so we skip keys already yielded, and give up with EAGAIN only if
        the map churns so fast that the walk cannot finish in a bounded number of
        steps. Keys inserted during the walk may or may not be seen.
        """
        seen: set[bytes] = set()
        budget = 8 * max(self._max_entries, 1) + 1024
        buf = ctypes.create_string_buffer(self._key_size)
        current: bytes | None = None
        while True:
            ret = _libbpf().map_get_next_key(self.fd, current, buf)
            if ret == -errno.ENOENT:
                return
            self._raise_if(ret, "bpf_map_get_next_key")
            current = buf.raw
            if current not in seen:
                seen.add(current)
                yield current
            budget -= 1
            if budget < 0:
                raise BpfError(
                    errno.EAGAIN, "iterate", self._label(), "entries changed too fast to walk"
                )

    def __iter__(self) -> Iterator[bytes]:
        return self.keys()

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) pairs; entries deleted between the walk and the lookup are skipped."""
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:
                yield key, value

    def clear(self) -> int:
        """Remove every entry and return how many were removed.

        Array maps cannot delete entries (the kernel returns EINVAL), so their
        values are reset to zeros instead, which is what "empty" means for them.
        """
        keys = list(self.keys())
        if self._map_type in _ARRAY_MAP_TYPES:
            zero = bytes(self.value_buffer_size)
            for key in keys:
                self.update(key, zero)
            return len(keys)
        return sum(self.delete(key) for key in keys)

    # -- helpers

    def _label(self) -> str:
        where = self._path or f"fd {self._fd}"
        return f"map {self._name!r} ({where})"

    def _check_key(self, key: bytes) -> None:
        if len(key) != self._key_size:
            raise ValueError(f"{self._label()}: key is {len(key)} bytes, expected {self._key_size}")

    def _require_percpu(self, operation: str) -> None:
        if not self.is_percpu:
            raise TypeError(f"{operation} on {self._label()}: {self.type_name} is not per-CPU")

    def _raise_if(self, ret: int, operation: str) -> None:
        _check(ret, operation, self._label())


# --------------------------------------------------------------------------- test runs


@dataclass(frozen=True)
class TestRunResult:
    """Outcome of one BPF_PROG_TEST_RUN: the program's return value (the XDP verdict),
    the packet as the program left it, and the mean run time per repetition."""

    __test__ = False  # not a pytest test class, despite the name

    retval: int
    data: bytes
    duration_ns: int


def xdp_md(ingress_ifindex: int = 0, rx_queue_index: int = 0, data_len: int = 0) -> bytes:
    """A ``struct xdp_md`` to pass as ``ctx`` to prog_test_run for an XDP program.

    It lets a test pretend the frame arrived on interface ``ingress_ifindex``
    (queue ``rx_queue_index``); without a ctx the kernel uses loopback, queue 0.
    Pass ``data_len=len(data)``: older kernels reject anything else, and newer ones
    read a smaller data_end as the size of the linear part (the program then sees
    only that many bytes, 0 for the default). The kernel also wants no metadata
    (data = data_meta = 0), egress_ifindex 0, an interface that exists in the
    caller's network namespace and a queue index below its queue count.
    """
    md = _XdpMd(
        data=0,
        data_end=data_len,
        data_meta=0,
        ingress_ifindex=ingress_ifindex,
        rx_queue_index=rx_queue_index,
        egress_ifindex=0,
    )
    return bytes(md)


def prog_test_run(
    prog_fd: int,
    data: bytes,
    *,
    ctx: bytes | None = None,
    repeat: int = 1,
    data_out_size: int | None = None,
) -> TestRunResult:
    """Run a loaded program on ``data`` in the kernel (BPF_PROG_TEST_RUN) and return
    its verdict and output packet, without attaching it to any interface.

    ``data_out_size`` bounds the output packet; the default leaves room for the
    program to prepend the full XDP headroom and grow the tail. ``repeat`` runs the
    program that many times (map side effects repeat too); duration is the mean.
    XDP needs at least a 14-byte (Ethernet header) frame or the kernel says EINVAL.
    """
    out_size = len(data) + TEST_RUN_OUT_SLACK if data_out_size is None else data_out_size
    data_in = ctypes.create_string_buffer(data, len(data)) if data else None
    data_out = ctypes.create_string_buffer(out_size) if out_size else None
    ctx_in = ctypes.create_string_buffer(ctx, len(ctx)) if ctx else None
    opts = _BpfTestRunOpts(
        sz=ctypes.sizeof(_BpfTestRunOpts),
        data_in=_address(data_in),
        data_size_in=len(data),
        data_out=_address(data_out),
        data_size_out=out_size,
        ctx_in=_address(ctx_in),
        ctx_size_in=len(ctx) if ctx else 0,
        repeat=repeat,
    )
    ret = _libbpf().prog_test_run_opts(prog_fd, opts)
    _check(ret, "bpf_prog_test_run_opts", f"prog fd {prog_fd}", _test_run_hint(-ret, data, ctx))
    out = data_out.raw[: opts.data_size_out] if data_out else b""
    return TestRunResult(retval=int(opts.retval), data=out, duration_ns=int(opts.duration))


def _address(buf: ctypes.Array[ctypes.c_char] | None) -> int | None:
    return ctypes.addressof(buf) if buf is not None else None


def _test_run_hint(err: int, data: bytes, ctx: bytes | None) -> str:
    """Explain the usual causes of a test-run failure, which the kernel reports tersely."""
    if err == errno.ENOSPC:
        return "output packet larger than data_out_size; pass a bigger data_out_size"
    if err == errno.EINVAL:
        hint = "XDP needs len(data) >= 14"
        if ctx is not None:
            hint += f"; an xdp_md ctx needs data_end = len(data) = {len(data)}, egress_ifindex 0"
        return hint
    if err == errno.ENODEV and ctx is not None:
        return "ctx ingress_ifindex names no interface in this network namespace"
    return ""
