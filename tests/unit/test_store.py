"""MemoryState: the session/transceiver table a relay without BPF relies on.

It must behave like the kernel maps it stands in for: one key per client
(IPv4 and IPv4-mapped IPv6 are the same client), a hard bound with LRU
eviction so a flood of new clients cannot grow memory, and per-session
counters the CLI and the idle sweep read.
"""

from __future__ import annotations

import sys
import threading
import time
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from ctl.layout import Origin, TransceiverState
from ctl.maps import TransceiverEntry
from ctl.store import MemoryState, RelayState, StateError

C4, C6, R4, R6 = "198.51.100.10", "2001:db8:c::10", "198.51.100.1", "2001:db8:c::1"


def test_is_a_relay_state() -> None:
    assert isinstance(MemoryState(4), RelayState)


def test_put_get_session_v4_and_v6() -> None:
    st = MemoryState(16)
    e4 = st.put_session(C4, 50000, 7, R4, 3478, Origin.USERSPACE)
    e6 = st.put_session(ip_address(C6), 50001, 8, ip_address(R6), 3478, Origin.XDP)
    assert e4.client_addr == IPv4Address(C4) and e4.tid == 7 and e4.relay_port == 3478
    assert e4.origin is Origin.USERSPACE and e4.created_ns == e4.last_seen_ns > 0
    assert e4.packets_to_transceiver == e4.bytes_to_client == 0
    assert st.get_session(C4, 50000) == e4
    assert st.get_session(C6, 50001) == e6
    assert st.get_session(C6, 50001).relay_addr == IPv6Address(R6)  # type: ignore[union-attr]
    assert st.get_session(C4, 50001) is None
    assert st.session_count() == 2


def test_ipv4_mapped_is_the_same_client() -> None:
    st = MemoryState(4)
    st.put_session(f"::ffff:{C4}", 5000, 1, f"::ffff:{R4}", 3478)
    entry = st.get_session(IPv4Address(C4), 5000)
    assert entry is not None
    assert entry.client_addr == IPv4Address(C4) and entry.relay_addr == IPv4Address(R4)
    assert st.touch(IPv6Address(f"::ffff:{C4}"), 5000, True, 10)
    assert st.remove_session(C4, 5000)


def test_touch_counts_each_direction_and_refreshes_last_seen() -> None:
    st = MemoryState(4)
    first = st.put_session(C4, 5000, 1, R4, 3478)
    assert st.touch(C4, 5000, True, 100)
    assert st.touch(C4, 5000, True, 20)
    assert st.touch(C4, 5000, False, 7)
    e = st.get_session(C4, 5000)
    assert e is not None
    assert (e.packets_to_transceiver, e.bytes_to_transceiver) == (2, 120)
    assert (e.packets_to_client, e.bytes_to_client) == (1, 7)
    assert e.last_seen_ns >= first.last_seen_ns and e.created_ns == first.created_ns
    assert not st.touch(C4, 5001, True, 1)  # no session: nothing is created
    assert st.get_session(C4, 5001) is None


def test_put_replaces_a_session_and_resets_it() -> None:
    st = MemoryState(4)
    st.put_session(C4, 5000, 1, R4, 3478)
    st.touch(C4, 5000, True, 100)
    e = st.put_session(C4, 5000, 2, R4, 3478, Origin.USERSPACE)
    assert st.session_count() == 1
    got = st.get_session(C4, 5000)
    assert got == e and got.tid == 2 and got.packets_to_transceiver == 0  # type: ignore[union-attr]


def test_lru_bound_evicts_least_recently_used() -> None:
    st = MemoryState(3)
    for port in (1, 2, 3):
        st.put_session(C4, port, 1, R4, 3478)
    st.touch(C4, 1, True, 1)  # 1 is now the most recent; 2 is the oldest
    st.put_session(C4, 4, 1, R4, 3478)
    assert st.session_count() == 3
    assert st.get_session(C4, 2) is None
    assert {e.client_port for e in st.iter_sessions()} == {1, 3, 4}
    st.put_session(C4, 3, 5, R4, 3478)  # replacing refreshes too: 1 is now the oldest
    st.put_session(C4, 5, 1, R4, 3478)
    assert [e.client_port for e in st.iter_sessions()] == [4, 3, 5]


def test_lru_bound_holds_under_a_flood() -> None:
    st = MemoryState(100)
    for port in range(10_000):
        st.put_session(C4, port, 1, R4, 3478)
    assert st.session_count() == 100
    assert {e.client_port for e in st.iter_sessions()} == set(range(9_900, 10_000))


def test_remove_and_iterate_snapshot() -> None:
    st = MemoryState(8)
    for port in range(4):
        st.put_session(C4, port, 1, R4, 3478)
    it = st.iter_sessions()
    for port in range(4):  # removing while iterating is safe: iteration is a snapshot
        assert st.remove_session(C4, port)
    assert len(list(it)) == 4
    assert not st.remove_session(C4, 0)
    assert st.session_count() == 0


def test_transceivers() -> None:
    st = MemoryState(4, max_transceivers=2)
    st.put_transceiver(2, "203.0.113.12", 4002)
    st.put_transceiver(1, "2001:db8:1::11", 4001, TransceiverState.DRAINING)
    assert st.get_transceiver(1) == TransceiverEntry(
        1, IPv6Address("2001:db8:1::11"), 4001, TransceiverState.DRAINING
    )
    assert [t.tid for t in st.list_transceivers()] == [1, 2]
    st.put_transceiver(1, "203.0.113.11", 4001)  # replacing never counts against the bound
    assert st.get_transceiver(1).state is TransceiverState.ACTIVE  # type: ignore[union-attr]
    with pytest.raises(StateError, match="full"):
        st.put_transceiver(3, "203.0.113.13", 4003)
    assert st.remove_transceiver(2)
    assert not st.remove_transceiver(2)
    assert st.get_transceiver(2) is None
    st.put_transceiver(3, "203.0.113.13", 4003)


@pytest.mark.parametrize("tid", [0, -1, 1 << 32])
def test_rejects_bad_transceiver_ids(tid: int) -> None:
    st = MemoryState(4)
    with pytest.raises(StateError):
        st.put_transceiver(tid, "203.0.113.11", 4001)
    with pytest.raises(StateError):
        st.put_session(C4, 5000, tid, R4, 3478)


def test_rejects_bad_sizes_and_ports() -> None:
    with pytest.raises(ValueError):
        MemoryState(0)
    st = MemoryState(4)
    with pytest.raises(StateError):
        st.put_session(C4, 70000, 1, R4, 3478)
    with pytest.raises(StateError):
        st.put_transceiver(1, "203.0.113.11", -1)


def test_safe_to_read_from_another_thread() -> None:
    """The metrics thread counts and lists sessions while the relay mutates them."""
    st = MemoryState(64)
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                list(st.iter_sessions())
                st.session_count()
                time.sleep(0.0001)  # a scrape loop, not a GIL hog
        except BaseException as exc:  # pragma: no cover - the failure being tested for
            errors.append(exc)

    thread = threading.Thread(target=reader)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so a missing lock shows
    thread.start()
    try:
        for i in range(5_000):
            st.put_session(C4, i % 200, 1, R4, 3478)
            st.touch(C4, (i * 7) % 200, True, 1)
            st.remove_session(C4, (i * 13) % 200)
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert not errors
