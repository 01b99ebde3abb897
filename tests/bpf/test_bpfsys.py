"""ctl.bpfsys against the real kernel: pinned maps, per-CPU values, XDP test runs.

Maps are created with create_map (no compiler involved), pinned in a scratch bpffs
directory and reopened by path, the way relayctl reaches the controller's maps.
The XDP programs are compiled once per module with bcc, and only their fds are
handed to bpfsys, the way the test harness drives bpf/relay.c.
"""

from __future__ import annotations

import errno
import os
import pickle
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ctl.bpfsys import (
    BPF_EXIST,
    BPF_NOEXIST,
    XDP_DROP,
    XDP_PACKET_HEADROOM,
    XDP_PASS,
    XDP_TX,
    BpfError,
    MapType,
    PinnedMap,
    create_map,
    parse_cpu_list,
    pin,
    possible_cpus,
    prog_test_run,
    xdp_action_name,
    xdp_md,
)

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("bpf_privileges")]

U32 = struct.Struct("=I")  # map keys/values use the host's byte order
U64 = struct.Struct("=Q")

PREPEND_TAG = bytes(range(0xA0, 0xA8))
LOOPBACK_IFINDEX = 1

XDP_SOURCE = r"""
#include <uapi/linux/bpf.h>

BPF_TABLE_PINNED("hash", u32, u64, hits, 16, "@HITS_PIN@");

/* Swap destination and source MAC, bounce the frame back out. */
int xdp_mac_swap(struct xdp_md *ctx) {
    unsigned char *data = (void *)(long)ctx->data;
    unsigned char *data_end = (void *)(long)ctx->data_end;
    if (data + 14 > data_end)
        return XDP_DROP;
    #pragma unroll
    for (int i = 0; i < 6; i++) {
        unsigned char t = data[i];
        data[i] = data[i + 6];
        data[i + 6] = t;
    }
    return XDP_TX;
}

/* Grow the frame by 8 bytes at the front and fill them with 0xa0..0xa7. */
int xdp_prepend8(struct xdp_md *ctx) {
    if (bpf_xdp_adjust_head(ctx, -8))
        return XDP_ABORTED;
    unsigned char *data = (void *)(long)ctx->data;
    unsigned char *data_end = (void *)(long)ctx->data_end;
    if (data + 8 > data_end)
        return XDP_ABORTED;
    #pragma unroll
    for (int i = 0; i < 8; i++)
        data[i] = 0xa0 + i;
    return XDP_PASS;
}

/* Verdict from the context: pass what arrived on loopback, drop the rest. */
int xdp_by_ifindex(struct xdp_md *ctx) {
    return ctx->ingress_ifindex == 1 ? XDP_PASS : XDP_DROP;
}

/* Count frames per length in the pinned map. */
int xdp_count(struct xdp_md *ctx) {
    u32 len = ctx->data_end - ctx->data;
    hits.increment(len);
    return XDP_PASS;
}
"""


@dataclass(frozen=True)
class XdpProgs:
    """Program fds of the compiled XDP_SOURCE and where its map is pinned."""

    mac_swap: int
    prepend8: int
    by_ifindex: int
    count: int
    hits_pin: Path


@pytest.fixture(scope="module")
def xdp(bpffs_module_dir: Path) -> Iterator[XdpProgs]:
    """Compile and load the test programs once (bcc takes about half a second)."""
    from bcc import BPF  # imported here: only this fixture needs the compiler

    hits_pin = bpffs_module_dir / "hits"
    bpf = BPF(text=XDP_SOURCE.replace("@HITS_PIN@", str(hits_pin)).encode())
    try:
        yield XdpProgs(
            mac_swap=bpf.load_func(b"xdp_mac_swap", BPF.XDP).fd,
            prepend8=bpf.load_func(b"xdp_prepend8", BPF.XDP).fd,
            by_ifindex=bpf.load_func(b"xdp_by_ifindex", BPF.XDP).fd,
            count=bpf.load_func(b"xdp_count", BPF.XDP).fd,
            hits_pin=hits_pin,
        )
    finally:
        bpf.cleanup()


@pytest.fixture
def veth_ifindex(bpf_privileges: None) -> Iterator[int]:
    """ifindex of a throwaway veth, an interface that is certainly not loopback."""
    from pyroute2 import IPRoute

    name = f"srbt{os.getpid() % 100000}"
    with IPRoute() as ipr:
        ipr.link("add", ifname=name, kind="veth", peer={"ifname": f"{name}p"})
        index = int(ipr.link_lookup(ifname=name)[0])
        try:
            yield index
        finally:
            ipr.link("del", index=index)


def pinned_map(
    directory: Path, map_type: MapType, key_size: int, value_size: int, max_entries: int
) -> PinnedMap:
    """Create a map, pin it, drop the creating fd, and reopen it by path."""
    name = f"t_{map_type.name.lower()}"[:15]
    fd = create_map(map_type, key_size, value_size, max_entries, name)
    try:
        pin(fd, directory / name)
    finally:
        os.close(fd)
    return PinnedMap.open(directory / name)


def ethernet_frame(length: int = 60) -> bytes:
    """A frame with recognisable MACs (dst 02:..:01, src 02:..:02) and a counting payload."""
    dst = bytes.fromhex("020000000001")
    src = bytes.fromhex("020000000002")
    header = dst + src + b"\x08\x00"
    return header + bytes(i & 0xFF for i in range(length - len(header)))


# --------------------------------------------------------------------------- maps


def test_open_missing_pin_raises_enoent(bpffs_dir: Path) -> None:
    missing = bpffs_dir / "no_such_map"
    with pytest.raises(BpfError) as info:
        PinnedMap.open(missing)
    assert info.value.errno == errno.ENOENT
    assert isinstance(info.value, OSError)
    assert "bpf_obj_get" in str(info.value)
    assert str(missing) in str(info.value)
    copy = pickle.loads(pickle.dumps(info.value))
    assert (copy.errno, str(copy)) == (errno.ENOENT, str(info.value))


def test_reopened_map_reports_its_geometry(bpffs_dir: Path) -> None:
    with pinned_map(bpffs_dir, MapType.HASH, 4, 8, 64) as m:
        assert m.map_type == MapType.HASH
        assert m.type_name == "HASH"
        assert (m.key_size, m.value_size, m.max_entries) == (4, 8, 64)
        assert m.name == "t_hash"
        assert m.path == str(bpffs_dir / "t_hash")
        assert not m.is_percpu
        assert m.value_buffer_size == 8
        with PinnedMap.open(bpffs_dir / "t_hash") as again:
            assert again.map_id == m.map_id
    assert m.closed


def test_hash_map_crud(bpffs_dir: Path) -> None:
    with pinned_map(bpffs_dir, MapType.HASH, 4, 8, 64) as m:
        key = U32.pack(7)
        assert m.lookup(key) is None

        m.update(key, U64.pack(1))
        assert m.lookup(key) == U64.pack(1)
        m.update(key, U64.pack(2), BPF_EXIST)
        assert m.lookup(key) == U64.pack(2)

        with pytest.raises(BpfError) as exists:
            m.update(key, U64.pack(3), BPF_NOEXIST)
        assert exists.value.errno == errno.EEXIST
        assert "t_hash" in str(exists.value)
        with pytest.raises(BpfError) as absent:
            m.update(U32.pack(8), U64.pack(3), BPF_EXIST)
        assert absent.value.errno == errno.ENOENT

        assert m.delete(key) is True
        assert m.delete(key) is False
        assert m.lookup(key) is None


def test_writes_are_visible_through_another_handle(bpffs_dir: Path) -> None:
    with (
        pinned_map(bpffs_dir, MapType.HASH, 4, 8, 8) as writer,
        PinnedMap.open(bpffs_dir / "t_hash") as reader,
    ):
        writer.update(U32.pack(1), U64.pack(42))
        assert reader.lookup(U32.pack(1)) == U64.pack(42)


def test_wrong_sizes_are_rejected_before_the_kernel(bpffs_dir: Path) -> None:
    with pinned_map(bpffs_dir, MapType.HASH, 4, 8, 8) as m:
        with pytest.raises(ValueError, match="key is 2 bytes, expected 4"):
            m.lookup(b"\0\0")
        with pytest.raises(ValueError, match="value is 4 bytes, expected 8"):
            m.update(U32.pack(1), U32.pack(1))
        with pytest.raises(TypeError, match="not per-CPU"):
            m.lookup_percpu(U32.pack(1))


def test_full_map_raises_e2big(bpffs_dir: Path) -> None:
    with pinned_map(bpffs_dir, MapType.HASH, 4, 8, 2) as m:
        m.update(U32.pack(1), U64.pack(1))
        m.update(U32.pack(2), U64.pack(2))
        with pytest.raises(BpfError) as full:
            m.update(U32.pack(3), U64.pack(3))
        assert full.value.errno == errno.E2BIG


def test_keys_items_and_clear(bpffs_dir: Path) -> None:
    with pinned_map(bpffs_dir, MapType.HASH, 4, 8, 64) as m:
        expected = {U32.pack(i): U64.pack(i * 10) for i in range(20)}
        for key, value in expected.items():
            m.update(key, value)

        keys = list(m.keys())
        assert sorted(keys) == sorted(expected)
        assert dict(m.items()) == expected
        assert set(m) == set(expected)

        assert m.clear() == 20
        assert list(m.keys()) == []
        assert m.clear() == 0


def test_keys_survive_deleting_while_walking(bpffs_dir: Path) -> None:
    """Deleting the key just yielded makes the kernel restart the walk; every key
    must still come out exactly once."""
    with pinned_map(bpffs_dir, MapType.HASH, 4, 8, 64) as m:
        for i in range(30):
            m.update(U32.pack(i), U64.pack(i))
        walked = []
        walk = m.keys()
        for key in walk:
            walked.append(key)
            assert m.delete(key)
        assert sorted(walked) == sorted(U32.pack(i) for i in range(30))
        assert list(m.keys()) == []


def test_percpu_array_values(bpffs_dir: Path) -> None:
    ncpu = possible_cpus()
    # value_size 4 exercises the kernel's padding of each CPU slot to 8 bytes.
    with pinned_map(bpffs_dir, MapType.PERCPU_ARRAY, 4, 4, 4) as m:
        assert m.is_percpu
        assert m.value_buffer_size == ncpu * 8
        key = U32.pack(2)

        assert m.lookup(key) == bytes(ncpu * 8)
        assert m.lookup_percpu(key) == [bytes(4)] * ncpu

        values = [U32.pack(100 + cpu) for cpu in range(ncpu)]
        m.update_percpu(key, values)
        assert m.lookup_percpu(key) == values
        raw = m.lookup(key)
        assert raw == b"".join(v + bytes(4) for v in values)

        with pytest.raises(ValueError, match="use update_percpu"):
            m.update(key, U32.pack(1))
        with pytest.raises(ValueError, match="values for"):
            m.update_percpu(key, [*values, U32.pack(0)])

        assert sorted(m.keys()) == [U32.pack(i) for i in range(4)]
        assert m.clear() == 4  # arrays cannot delete: clearing zeroes every slot
        assert m.lookup_percpu(key) == [bytes(4)] * ncpu
        assert m.lookup(U32.pack(4)) is None  # out of range reads as absent


def test_percpu_hash_missing_key(bpffs_dir: Path) -> None:
    with pinned_map(bpffs_dir, MapType.PERCPU_HASH, 4, 8, 8) as m:
        assert m.lookup_percpu(U32.pack(1)) is None
        m.update_percpu(U32.pack(1), [U64.pack(cpu) for cpu in range(possible_cpus())])
        assert m.lookup_percpu(U32.pack(1)) == [U64.pack(c) for c in range(possible_cpus())]


def test_pin_over_existing_pin_raises_eexist(bpffs_dir: Path) -> None:
    fd = create_map(MapType.ARRAY, 4, 4, 1, "t_dup")
    try:
        pin(fd, bpffs_dir / "dup")
        with pytest.raises(BpfError) as info:
            pin(fd, bpffs_dir / "dup")
        assert info.value.errno == errno.EEXIST
        assert "bpf_obj_pin" in str(info.value)
    finally:
        os.close(fd)


def test_create_map_error_names_the_map() -> None:
    with pytest.raises(BpfError) as info:
        create_map(MapType.HASH, 0, 8, 8, "t_bad")
    assert info.value.errno == errno.EINVAL
    assert "t_bad" in str(info.value)


def test_opening_a_program_pin_is_refused(bpffs_dir: Path, xdp: XdpProgs) -> None:
    pin(xdp.mac_swap, bpffs_dir / "prog")
    with pytest.raises(BpfError, match="bpf-prog") as info:
        PinnedMap.open(bpffs_dir / "prog")
    assert info.value.errno == errno.EINVAL


def test_parse_cpu_list() -> None:
    assert parse_cpu_list("0\n") == 1
    assert parse_cpu_list("0-3\n") == 4
    assert parse_cpu_list("0-3,5,7-8") == 7
    assert possible_cpus() >= (os.cpu_count() or 1)


# --------------------------------------------------------------------------- XDP test runs


def test_mac_swap_returns_tx_and_swapped_frame(xdp: XdpProgs) -> None:
    frame = ethernet_frame(60)
    result = prog_test_run(xdp.mac_swap, frame)
    assert xdp_action_name(result.retval) == "XDP_TX"
    assert result.retval == XDP_TX
    assert result.data == frame[6:12] + frame[0:6] + frame[12:]
    assert result.duration_ns >= 0


def test_minimum_frame_is_ethernet_header(xdp: XdpProgs) -> None:
    """The kernel refuses test frames shorter than an Ethernet header, so the
    program's short-frame branch is unreachable from a test run: 14 is the floor."""
    assert prog_test_run(xdp.mac_swap, ethernet_frame(14)).retval == XDP_TX
    with pytest.raises(BpfError) as info:
        prog_test_run(xdp.mac_swap, ethernet_frame(14)[:13])
    assert info.value.errno == errno.EINVAL
    assert ">= 14" in str(info.value)


def test_adjust_head_prepends_bytes(xdp: XdpProgs) -> None:
    frame = ethernet_frame(60)
    result = prog_test_run(xdp.prepend8, frame)
    assert result.retval == XDP_PASS
    assert result.data == PREPEND_TAG + frame


def test_output_buffer_too_small_raises_enospc(xdp: XdpProgs) -> None:
    frame = ethernet_frame(60)
    with pytest.raises(BpfError) as info:
        prog_test_run(xdp.prepend8, frame, data_out_size=len(frame))
    assert info.value.errno == errno.ENOSPC
    ok = prog_test_run(xdp.prepend8, frame, data_out_size=len(frame) + XDP_PACKET_HEADROOM)
    assert len(ok.data) == len(frame) + 8


def test_ctx_sets_ingress_interface(xdp: XdpProgs, veth_ifindex: int) -> None:
    frame = ethernet_frame(60)
    assert prog_test_run(xdp.by_ifindex, frame).retval == XDP_PASS  # default: loopback
    on_lo = xdp_md(ingress_ifindex=LOOPBACK_IFINDEX, data_len=len(frame))
    assert prog_test_run(xdp.by_ifindex, frame, ctx=on_lo).retval == XDP_PASS
    on_veth = xdp_md(ingress_ifindex=veth_ifindex, data_len=len(frame))
    assert prog_test_run(xdp.by_ifindex, frame, ctx=on_veth).retval == XDP_DROP


def test_ctx_errors_are_explained(xdp: XdpProgs) -> None:
    frame = ethernet_frame(60)
    with pytest.raises(BpfError) as no_dev:
        prog_test_run(xdp.by_ifindex, frame, ctx=xdp_md(0x7FFF_FFF0, data_len=len(frame)))
    assert no_dev.value.errno == errno.ENODEV
    assert "ingress_ifindex" in str(no_dev.value)

    with pytest.raises(BpfError) as bad_len:
        prog_test_run(xdp.by_ifindex, frame, ctx=xdp_md(LOOPBACK_IFINDEX, data_len=len(frame) + 1))
    assert bad_len.value.errno == errno.EINVAL
    assert f"data_end = len(data) = {len(frame)}" in str(bad_len.value)


def test_program_updates_bcc_pinned_map(xdp: XdpProgs) -> None:
    frame = ethernet_frame(60)
    result = prog_test_run(xdp.count, frame, repeat=3)
    assert result.retval == XDP_PASS
    assert result.data == frame

    with PinnedMap.open(xdp.hits_pin) as hits:
        assert hits.map_type == MapType.HASH
        assert (hits.key_size, hits.value_size, hits.max_entries) == (4, 8, 16)
        assert hits.name == "hits"
        assert dict(hits.items()) == {U32.pack(60): U64.pack(3)}
