"""Shared fixtures for the integration suites: root is required, never skipped.

These suites build real network namespaces, veths and XDP programs. Without root
they cannot test anything, and a skip would let `make test` look green on a
machine where nothing ran, so they fail with one clear line instead.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from ctl.testbed import Testbed

from .relay_process import TX1, TX2, udp

# Distinct from a user's "sr" testbed, and from other suites' prefixes, so a test
# run never touches (or tears down) somebody else's namespaces.
TESTBED_PREFIX = "srtb"


@pytest.fixture(autouse=True)
def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail(
            "integration tests need root (network namespaces, veth, XDP): run `sudo make test`",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def testbed() -> Iterator[Testbed]:
    """A two-client, two-relay testbed, built once per module and always torn down."""
    if os.geteuid() != 0:
        pytest.fail("the testbed fixture needs root: run `sudo make test`", pytrace=False)
    yield from build_testbed(TESTBED_PREFIX, clients=2, relays=2, transceivers=2)


def build_testbed(prefix: str, **hosts: int) -> Iterator[Testbed]:
    """Build a testbed (after removing leftovers of an interrupted run), yield it, remove it."""
    tb = Testbed(prefix, **hosts)
    tb.down()
    tb.up()
    try:
        yield tb
    finally:
        tb.down()


# Sockets on the testbed's hosts, for the suites that play client and transceiver by
# hand; `testbed` is whichever testbed the requesting module uses.
@pytest.fixture
def client(testbed: Testbed) -> Iterator[socket.socket]:
    """The client c1's UDP socket (an ephemeral port on 198.51.100.11)."""
    sock = udp(testbed, "c1", ("198.51.100.11", 0))
    yield sock
    sock.close()


@pytest.fixture
def tx1(testbed: Testbed) -> Iterator[socket.socket]:
    """The tunnel socket transceiver tx1 answers on."""
    sock = udp(testbed, "tx1", TX1)
    yield sock
    sock.close()


@pytest.fixture
def tx2(testbed: Testbed) -> Iterator[socket.socket]:
    """The tunnel socket transceiver tx2 answers on."""
    sock = udp(testbed, "tx2", TX2)
    yield sock
    sock.close()
