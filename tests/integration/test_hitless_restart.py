"""Restarting the relay daemon loses no packet of an established session.

A steady UDP stream runs client -> relay -> transceiver and back while the
daemon is stopped (SIGTERM) and started again on the same pinned maps. The
XDP program stays attached while no daemon runs, and the new daemon swaps
its program in atomically, so every packet arrives, both ways.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

from ctl import wire
from ctl.testbed import Testbed

from .relay_process import PUBLIC_PORT, PUBLIC_V4, TID_TX1, TX1, RelayProcess, stun, udp

RATE = 200  # packets per second
COUNT = 1000  # 5 s of stream: the restart takes about a second and a half


def test_restart_loses_nothing(testbed: Testbed) -> None:
    pin_dir = Path(tempfile.mkdtemp(prefix="splitrelay-restart-", dir="/sys/fs/bpf"))
    pin_dir.rmdir()
    relay = RelayProcess(testbed, "native", pin_dir)
    client = udp(testbed, "c1", ("198.51.100.11", 0), timeout=3.0)
    tx = udp(testbed, "tx1", TX1, timeout=3.0)
    try:
        relay.start()
        request = stun(TID_TX1)
        client.sendto(request, (PUBLIC_V4, PUBLIC_PORT))
        data, _ = tx.recvfrom(4096)
        header, _ = wire.decap(data)

        received_at_tx: set[int] = set()
        received_at_client: set[int] = set()

        def transceiver() -> None:
            while len(received_at_tx) < COUNT:
                try:
                    data, src = tx.recvfrom(4096)
                except TimeoutError:
                    return
                seq = int.from_bytes(wire.decap(data)[1][2:6], "big")
                received_at_tx.add(seq)
                tx.sendto(wire.encap(header, b"\x80\x00" + seq.to_bytes(4, "big")), src[:2])

        def client_rx() -> None:
            while len(received_at_client) < COUNT:
                try:
                    data, _ = client.recvfrom(4096)
                except TimeoutError:
                    return
                received_at_client.add(int.from_bytes(data[2:6], "big"))

        threads = [threading.Thread(target=transceiver), threading.Thread(target=client_rx)]
        for t in threads:
            t.start()
        restarted = threading.Event()

        def restart() -> None:
            time.sleep(1.0)
            assert relay.stop() == 0, relay.log()
            relay.start()
            restarted.set()

        restarter = threading.Thread(target=restart)
        restarter.start()
        start = time.monotonic()
        for seq in range(COUNT):
            client.sendto(
                b"\x80\x00" + seq.to_bytes(4, "big") + b"v" * 80, (PUBLIC_V4, PUBLIC_PORT)
            )
            time.sleep(max(0.0, start + (seq + 1) / RATE - time.monotonic()))
        restarter.join()
        for t in threads:
            t.join()
        assert restarted.is_set(), "the daemon did not come back"
        lost_to_tx = COUNT - len(received_at_tx)
        lost_to_client = COUNT - len(received_at_client)
        assert (lost_to_tx, lost_to_client) == (0, 0)
    finally:
        client.close()
        tx.close()
        relay.cleanup()
