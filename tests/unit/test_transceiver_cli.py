"""`transceiver` CLI surface: help, option validation, and one-line call errors.

Everything here runs without root and touches only loopback: bad options must
fail before anything starts, and `call` failures (refused, 401, 503, timeout,
unusable answer) must each be one stderr line with a non-zero exit.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator

import pytest
from aiohttp import web
from click.testing import CliRunner, Result

from tests.unit.test_signaling import FakePool
from transceiver.cli import ERROR_PREFIX, transceiver
from transceiver.signaling import make_app

GOOD_RUN = [
    "run",
    "--transceiver-id",
    "a001",
    "--tunnel",
    "127.0.0.3",
    "--relay",
    "127.0.0.2:3479",
    "--public",
    "127.0.0.2:3478",
]


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    runner = CliRunner(mix_stderr=False)
    return runner.invoke(transceiver, list(args), env=env, catch_exceptions=False)


def assert_one_line_error(res: Result, code: int, *fragments: str) -> None:
    assert res.exit_code == code, (res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(ERROR_PREFIX), res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --------------------------------------------------------------------- help


def test_help() -> None:
    res = invoke("--help")
    assert res.exit_code == 0
    assert "run" in res.stdout and "call" in res.stdout


def test_run_help_lists_options_and_environment() -> None:
    res = invoke("run", "--help")
    assert res.exit_code == 0
    for option in (
        "--listen",
        "--workers",
        "--transceiver-id",
        "--tunnel",
        "--tunnel-port",
        "--relay",
        "--public",
        "--max-calls",
        "--backend",
        "--ws-url",
        "--token",
        "--drain-timeout",
        "SPLITRELAY_TRANSCEIVER_ID",
        "SPLITRELAY_TRANSCEIVER_LISTEN",
        "0.0.0.0:8080",
    ):
        assert option in res.stdout, option


def test_call_help() -> None:
    res = invoke("call", "--help")
    assert res.exit_code == 0
    for option in ("--token", "--calls", "--duration", "--json", "--timeout", "--realtime"):
        assert option in res.stdout


# --------------------------------------------------------------------- bad options


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["run"], "--transceiver-id"),
        (GOOD_RUN[:3], "--tunnel"),
        (GOOD_RUN[:5], "--relay"),
        (GOOD_RUN[:7], "--public"),
        ([*GOOD_RUN, "--listen", "8080"], "HOST:PORT"),
        ([*GOOD_RUN, "--listen", "::1:8080"], "brackets"),
        ([*GOOD_RUN, "--listen", "127.0.0.1:70000"], "0..65535"),
        ([*GOOD_RUN, "--workers", "0"], "--workers"),
        ([*GOOD_RUN, "--max-calls", "0"], "--max-calls"),
        ([*GOOD_RUN, "--drain-timeout", "-1"], "--drain-timeout"),
        ([*GOOD_RUN, "--backend", "nope"], "--backend"),
        ([*GOOD_RUN, "--backend", "ws"], "--ws-url"),
        ([*GOOD_RUN, "--ws-url", "ws://127.0.0.1:9000"], "--backend ws"),
        ([*GOOD_RUN, "--backend", "ws", "--ws-url", "http://127.0.0.1:9000"], "ws://"),
        ([*GOOD_RUN, "--tunnel-port", "65535", "--workers", "2"], "65535"),
        ([*GOOD_RUN, "--public", "127.0.0.4:3478"], "one address per IP family"),
        (["run", *GOOD_RUN[1:2], "0", *GOOD_RUN[3:]], "reserved"),
        (["run", *GOOD_RUN[1:2], "xyz", *GOOD_RUN[3:]], "hex"),
        (["run", *GOOD_RUN[1:2], "ffffffff", *GOOD_RUN[3:], "--workers", "2"], "overflows"),
        (["run", *GOOD_RUN[1:4], "nope", *GOOD_RUN[5:]], "not an IP address"),
        (["run", *GOOD_RUN[1:6], "127.0.0.2", *GOOD_RUN[7:]], "--relay"),
        (["run", *GOOD_RUN[1:8], "127.0.0.2:0"], "--public"),
        (["call"], "URL"),
        (["call", "ftp://127.0.0.1/"], "http://"),
        (["call", "127.0.0.1:8080"], "http://"),
        (["call", "http://127.0.0.1:8080", "--calls", "0"], "--calls"),
        (["call", "http://127.0.0.1:8080", "--duration", "0"], "--duration"),
        ([*GOOD_RUN, "--opus-complexity", "11"], "--opus-complexity"),
        ([*GOOD_RUN, "--opus-bitrate", "1000"], "--opus-bitrate"),
        ([*GOOD_RUN, "--jitter-min-ms", "80", "--jitter-max-ms", "40"], "above --jitter-max-ms"),
        (["call", "http://127.0.0.1:8080", "--jitter-max-ms", "9000"], "--jitter-max-ms"),
        (["nope"], "No such command"),
    ],
)
def test_bad_options_are_one_line_usage_errors(args: list[str], fragment: str) -> None:
    assert_one_line_error(invoke(*args), 2, fragment)


def test_options_come_from_the_environment() -> None:
    env = {
        "SPLITRELAY_TRANSCEIVER_ID": "not-hex",
        "SPLITRELAY_TRANSCEIVER_TUNNEL": "127.0.0.3",
        "SPLITRELAY_TRANSCEIVER_RELAY": "127.0.0.2:3479",
        "SPLITRELAY_TRANSCEIVER_PUBLIC": "127.0.0.2:3478",
    }
    assert_one_line_error(invoke("run", env=env), 2, "--transceiver-id", "not-hex")


# --------------------------------------------------------------------- call errors


@pytest.fixture
def server() -> Iterator[tuple[str, FakePool]]:
    """The signaling app over a FakePool, on loopback, in a thread of its own."""
    pool = FakePool()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, object] = {}

    async def start() -> None:
        runner = web.AppRunner(make_app(pool, bearer_token="secret"))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        holder["runner"] = runner
        holder["port"] = runner.addresses[0][1]
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()))
    thread.start()
    assert ready.wait(10)
    try:
        yield f"http://127.0.0.1:{holder['port']}", pool
    finally:
        runner = holder["runner"]
        assert isinstance(runner, web.AppRunner)
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_call_connection_refused() -> None:
    res = invoke("call", f"http://127.0.0.1:{_free_port()}/v1/calls", "--timeout", "5")
    assert_one_line_error(res, 1, "cannot reach", "Connection refused")
    assert res.stdout == ""


def test_call_unauthorized(server: tuple[str, FakePool]) -> None:
    url, pool = server
    res = invoke("call", url, "--token", "wrong")
    assert_one_line_error(res, 1, "HTTP 401", "unauthorized")
    res = invoke("call", url)
    assert_one_line_error(res, 1, "HTTP 401", "missing bearer token")
    assert pool.offers == []


def test_call_at_capacity_names_retry_after(server: tuple[str, FakePool]) -> None:
    url, pool = server
    pool.full = True
    res = invoke("call", url, "--token", "secret")
    assert_one_line_error(res, 1, "HTTP 503", "at_capacity", "retry after 2 s")


def test_many_calls_failing_are_summarized_in_one_line(server: tuple[str, FakePool]) -> None:
    url, pool = server
    pool.draining = True
    res = invoke("call", url, "--token", "secret", "--calls", "3", "--json")
    assert_one_line_error(res, 1, "3 of 3 calls failed", "HTTP 503", "draining")
    assert '"failed": 3' in res.stdout  # --json still prints the summary


def test_call_unusable_answer(server: tuple[str, FakePool]) -> None:
    url, pool = server
    res = invoke("call", url, "--token", "secret", "--timeout", "5")
    assert res.exit_code == 1
    assert len(res.stderr.splitlines()) == 1
    assert res.stderr.startswith(ERROR_PREFIX)
    assert "Traceback" not in res.stderr
    assert len(pool.offers) == 1 and pool.offers[0].startswith("v=0")
    assert pool.ended == ["0000a001-c4ll"]  # the client still hangs up


def test_call_timeout() -> None:
    """A server that accepts the connection but never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        res = invoke("call", f"http://127.0.0.1:{port}", "--timeout", "0.5")
    assert_one_line_error(res, 1, "timed out")
