"""Shared fixtures for the integration suites: root is required, never skipped.

These suites build real network namespaces, veths and XDP programs. Without root
they cannot test anything, and a skip would let `make test` look green on a
machine where nothing ran, so they fail with one clear line instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from ctl.testbed import Testbed

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
    tb = Testbed(TESTBED_PREFIX, clients=2, relays=2, transceivers=2)
    tb.down()  # leftovers of an interrupted earlier run
    tb.up()
    try:
        yield tb
    finally:
        tb.down()
