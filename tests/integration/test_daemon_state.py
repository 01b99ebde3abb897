"""The daemon's state keeping, against the real relay program and its pinned maps.

- KernelState.touch must not undo an owner change the XDP program made while
  it ran: the change is made by the program itself (bpf_prog_test_run), in
  the window between touch's read and its write.
- The sweep of the userspace-only table is bounded by the sweep batch, like
  the kernel map's, and never walks the whole table.
- Lost session events are exported: the kernel's (ring buffer full) plus the
  ones the daemon could not pass on.
- The run state file is removed only by the daemon that wrote it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctl import runstate
from ctl.daemon import DaemonConfig, RelayDaemon
from ctl.layout import SessionEvent
from ctl.maps import SessionEntry, monotonic_ns
from ctl.store import KernelState, MemoryState
from tests.bpf.xdp_harness import (
    CLIENT_V4,
    PUBLIC_PORT,
    RELAY_V4,
    TID_T1,
    TID_T2,
    XdpHarness,
    binding_request,
    client_frame,
)

PORT = 50000


@pytest.fixture
def h(xdp: XdpHarness) -> XdpHarness:
    xdp.reset()
    return xdp


def test_touch_counts_a_userspace_packet(h: XdpHarness) -> None:
    state = KernelState(h.maps)
    state.put_session(CLIENT_V4, PORT, TID_T1, RELAY_V4, PUBLIC_PORT)
    assert state.touch(CLIENT_V4, PORT, True, 100)
    entry = state.get_session(CLIENT_V4, PORT)
    assert entry is not None
    assert (entry.tid, entry.packets_to_transceiver, entry.bytes_to_transceiver) == (TID_T1, 1, 100)


def test_touch_does_not_undo_a_reroute_the_kernel_made_meanwhile(
    h: XdpHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = KernelState(h.maps)
    state.put_session(CLIENT_V4, PORT, TID_T1, RELAY_V4, PUBLIC_PORT)
    real_lookup = h.maps.sessions.lookup
    calls = 0

    def lookup_then_reroute(key: bytes) -> bytes | None:
        """The first read of touch(); then the client's Binding Request for T2 hits XDP."""
        nonlocal calls
        calls += 1
        raw = real_lookup(key)
        if calls == 1:
            h.run_quiet(client_frame(binding_request(TID_T2), port=PORT))
        return raw

    monkeypatch.setattr(h.maps.sessions, "lookup", lookup_then_reroute)
    assert state.touch(CLIENT_V4, PORT, True, 100)  # the session exists: True
    monkeypatch.undo()
    entry = state.get_session(CLIENT_V4, PORT)
    assert entry is not None
    assert entry.tid == TID_T2, "touch() wrote the old owner back over the kernel's reroute"
    assert entry.packets_to_transceiver == 1  # the kernel's own count of its packet
    assert h.maps.counters_snapshot()["sessions_rerouted"] == 1


def _idle_table(n: int) -> MemoryState:
    table = MemoryState(n + 10)
    for port in range(1, n + 1):
        table.put_session("198.51.100.10", port, TID_T1, RELAY_V4, PUBLIC_PORT)
    return table


def test_memory_sweep_is_bounded_and_keeps_live_sessions() -> None:
    table = _idle_table(10_000)
    time.sleep(0.05)  # the coarse monotonic clock ticks every few ms
    cutoff = monotonic_ns()
    time.sleep(0.05)
    for port in (1, 5_000, 10_000):  # used again: they move to the live end
        assert table.touch("198.51.100.10", port, True, 10)
    assert table.expire_idle(cutoff, 4096) == 4096
    assert table.expire_idle(cutoff, 4096) == 4096
    assert table.expire_idle(cutoff, 4096) == 10_000 - 3 - 8192
    assert table.expire_idle(cutoff, 4096) == 0
    assert {e.client_port for e in table.iter_sessions()} == {1, 5_000, 10_000}


def test_daemon_sweep_of_the_userspace_table_never_walks_it_all() -> None:
    daemon = RelayDaemon(DaemonConfig(idle_timeout=0.01, sweep_batch=1000))
    table = _idle_table(5_000)
    daemon.state = table

    def no_full_scan() -> Iterator[SessionEntry]:
        raise AssertionError("the sweep walked the whole table")

    table.iter_sessions = no_full_scan  # type: ignore[method-assign]
    time.sleep(0.05)
    assert daemon.sweep() == 1000
    assert table.session_count() == 4_000
    assert daemon.counters["sessions_expired"] == 1000
    while daemon.sweep():
        pass
    assert table.session_count() == 0
    assert daemon.counters["sessions_expired"] == 5_000


def test_lost_events_are_the_kernels_plus_the_daemons(h: XdpHarness) -> None:
    daemon = RelayDaemon(DaemonConfig())
    daemon.maps = h.maps

    def broken_listener(_entry: SessionEntry, _kind: str) -> None:
        raise RuntimeError("Redis queue exploded")

    daemon.session_listeners.append(broken_listener)
    h.run_quiet(client_frame(binding_request(TID_T1), port=PORT))
    [event] = h.drain_events()
    assert isinstance(event, SessionEvent)
    daemon._on_kernel_event(event)  # must not raise: it runs inside bcc's callback
    assert daemon._daemon_counters()["events_lost"] == 1

    h.fill_event_ring()  # nobody consumes: the kernel counts what it could not queue
    kernel_lost = h.maps.counters_snapshot()["events_lost"]
    assert kernel_lost > 0
    assert daemon._daemon_counters()["events_lost"] == 1 + kernel_lost
    h.drain_events()


def test_run_state_is_removed_only_by_its_owner(tmp_path: Path) -> None:
    pin_dir = tmp_path / "splitrelay-owner-test"
    runstate.save(runstate.RunState(pid=os.getpid(), pin_dir=str(pin_dir)))
    try:
        assert runstate.remove(pin_dir, pid=os.getpid() + 1) is False
        assert runstate.load(pin_dir) is not None
        assert runstate.remove(pin_dir, pid=os.getpid()) is True
        assert runstate.load(pin_dir) is None
        assert runstate.remove(pin_dir, pid=os.getpid()) is False
    finally:
        runstate.remove(pin_dir)
