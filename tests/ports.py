"""Free ports on loopback for servers the tests start (Redis, transceiver workers)."""

from __future__ import annotations

import random
import socket

import pytest


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_udp_ports(host: str, count: int) -> int:
    """A base port such that base .. base+count-1 are free UDP ports on `host`."""
    for _ in range(200):
        base = random.randrange(20000, 60000)
        sockets: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                s = socket.socket(_family(host), socket.SOCK_DGRAM)
                sockets.append(s)
                s.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    pytest.fail("no free UDP ports on loopback")
