"""Signaling -> real Worker -> userspace relay -> voice client, across three namespaces.

Topology (private namespaces, documentation addresses, nothing else touched):

    srsig-c  client 198.51.100.10  --veth--  198.51.100.1  srsig-r  203.0.113.1  --veth--
                                             (relay public :3478, tunnel :3479, IP forwarding)
    srsig-t  transceiver 203.0.113.11: tunnel sockets :4001.., signaling :8080

The client reaches signaling over plain IP routed by the relay host, and media
only through the relay's public address, the only candidate in the answer.
Each component runs in a thread that lives in its namespace, with its own
asyncio loop, so every socket (aiortc's included) is created where it belongs.

The first tests use the signaling app over an InProcessPool of real Workers;
the last ones run `transceiver run` (the supervisor, worker processes) and
check the SIGTERM drain.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection

from ctl.maps import RelayAddresses
from ctl.netns import in_netns, popen_in
from ctl.store import MemoryState
from ctl.userspace import UserspaceRelay
from transceiver.client import CallOptions, place_call, place_calls, summarize
from transceiver.pool import InProcessPool
from transceiver.signaling import make_app
from transceiver.worker import Worker, WorkerConfig

T = TypeVar("T")

NS_CLIENT, NS_RELAY, NS_TX = "srsig-c", "srsig-r", "srsig-t"
CLIENT = "198.51.100.10"
PUBLIC = ("198.51.100.1", 3478)
TUNNEL = ("203.0.113.1", 3479)
TX = "203.0.113.11"
SIGNALING_PORT = 8080
TOKEN = "e2e-secret"
TIDS = (0xE001, 0xE002)  # in-process workers, tunnel ports 4001, 4002
RUN_TID, RUN_PORT = 0xE101, 4101  # `transceiver run` workers: ids/ports counted up from here
TRANSCEIVER = str(Path(sys.executable).with_name("transceiver"))


# --------------------------------------------------------------------- namespaces


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _teardown() -> None:
    for ns in (NS_CLIENT, NS_RELAY, NS_TX):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture(scope="module")
def namespaces() -> Iterator[None]:
    _teardown()  # leftovers of an interrupted run
    try:
        for ns in (NS_CLIENT, NS_RELAY, NS_TX):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", NS_CLIENT, "link", "add", "c0", "type", "veth", "peer", "pub0", "netns", NS_RELAY)
        _ip("-n", NS_TX, "link", "add", "t0", "type", "veth", "peer", "dc0", "netns", NS_RELAY)
        for ns, dev, addr in (
            (NS_CLIENT, "c0", f"{CLIENT}/24"),
            (NS_RELAY, "pub0", f"{PUBLIC[0]}/24"),
            (NS_RELAY, "dc0", f"{TUNNEL[0]}/24"),
            (NS_TX, "t0", f"{TX}/24"),
        ):
            _ip("-n", ns, "addr", "add", addr, "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
        _ip("-n", NS_CLIENT, "route", "add", "default", "via", PUBLIC[0])
        _ip("-n", NS_TX, "route", "add", "default", "via", TUNNEL[0])
        subprocess.run(
            ["ip", "netns", "exec", NS_RELAY, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
            check=True,
            capture_output=True,
        )
        yield
    finally:
        _teardown()


class NsLoop:
    """An asyncio loop running in a thread that lives inside one network namespace."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def main() -> None:
            with in_netns(ns):
                asyncio.set_event_loop(self.loop)
                self.loop.call_soon(started.set)
                self.loop.run_forever()
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())

        self.thread = threading.Thread(target=main, name=f"loop-{ns}", daemon=True)
        self.thread.start()
        assert started.wait(10), f"the loop in {ns} did not start"

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


# --------------------------------------------------------------------- components


@pytest.fixture(scope="module")
def relay(namespaces: None) -> Iterator[tuple[UserspaceRelay, MemoryState]]:
    state = MemoryState(1000)
    for i, tid in enumerate(TIDS):
        state.put_transceiver(tid, TX, 4001 + i)
    for i in range(2):
        state.put_transceiver(RUN_TID + i, TX, RUN_PORT + i)
    addresses = RelayAddresses(
        public_port=PUBLIC[1],
        tunnel_port=TUNNEL[1],
        public_v4=ipaddress.IPv4Address(PUBLIC[0]),
        tunnel_v4=ipaddress.IPv4Address(TUNNEL[0]),
    )
    ns = NsLoop(NS_RELAY)
    relay = UserspaceRelay(addresses, state)
    ns.run(relay.start())
    try:
        yield relay, state
    finally:
        ns.run(relay.close())
        ns.close()


class Transceiver:
    """Real Workers behind an InProcessPool behind the signaling app, in the tx namespace."""

    def __init__(self) -> None:
        self.ns = NsLoop(NS_TX)
        self.workers = [
            Worker(
                WorkerConfig(
                    transceiver_id=tid,
                    tunnel_host=TX,
                    tunnel_port=4001 + i,
                    relays=[TUNNEL],
                    public_candidates=[PUBLIC],
                    max_calls=4,
                )
            )
            for i, tid in enumerate(TIDS)
        ]
        self.pool = InProcessPool(self.workers)
        self.runner: web.AppRunner | None = None
        self.ns.run(self._start())

    async def _start(self) -> None:
        for worker in self.workers:
            await worker.start()
        self.runner = web.AppRunner(make_app(self.pool, bearer_token=TOKEN))
        await self.runner.setup()
        await web.TCPSite(self.runner, TX, SIGNALING_PORT).start()

    async def _stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()
        for worker in self.workers:
            await worker.stop(0)

    def loads(self) -> list[int]:
        async def read() -> list[int]:
            return [w.load for w in self.workers]

        return self.ns.run(read())

    def close(self) -> None:
        self.ns.run(self._stop())
        self.ns.close()


@pytest.fixture(scope="module")
def transceiver(relay: tuple[UserspaceRelay, MemoryState]) -> Iterator[Transceiver]:
    tx = Transceiver()
    try:
        yield tx
    finally:
        tx.close()


@pytest.fixture(scope="module")
def client(namespaces: None) -> Iterator[NsLoop]:
    ns = NsLoop(NS_CLIENT)
    try:
        yield ns
    finally:
        ns.close()


URL = f"http://{TX}:{SIGNALING_PORT}"


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


async def http(method: str, url: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.request(method, url, **kw) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


# --------------------------------------------------------------------- in-process pool


def test_answer_names_only_the_relay_and_delete_ends_the_call(
    transceiver: Transceiver, client: NsLoop
) -> None:
    async def offer_and_hang_up() -> tuple[int, dict[str, str], str, int, int]:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("audio", direction="sendrecv")
        pc.createDataChannel("oai-events")
        await pc.setLocalDescription(await pc.createOffer())
        status, headers, body = await http(
            "POST",
            f"{URL}/v1/calls",
            data=pc.localDescription.sdp.encode(),
            headers={"Content-Type": "application/sdp", "Authorization": f"Bearer {TOKEN}"},
        )
        await pc.close()
        location = urllib.parse.urljoin(URL + "/v1/calls", headers["Location"])
        auth = {"Authorization": f"Bearer {TOKEN}"}
        deleted, _, _ = await http("DELETE", location, headers=auth)
        again, _, _ = await http("DELETE", location, headers=auth)
        return status, headers, body.decode(), deleted, again

    status, headers, answer, deleted, again = client.run(offer_and_hang_up())
    assert status == 201
    assert headers["Content-Type"].startswith("application/sdp")
    assert headers["Location"].startswith("/v1/calls/0000e00")
    candidates = [ln.split()[4:6] for ln in answer.splitlines() if ln.startswith("a=candidate:")]
    assert candidates and all(c == [PUBLIC[0], str(PUBLIC[1])] for c in candidates)
    assert (deleted, again) == (204, 404)
    wait_until(lambda: transceiver.loads() == [0, 0], 5, "the call to be gone")


def test_calls_through_the_relay_measure_echo_and_events(
    transceiver: Transceiver, client: NsLoop, relay: tuple[UserspaceRelay, MemoryState]
) -> None:
    userspace, _ = relay
    before = dict(userspace.counters)
    options = CallOptions(url=URL, token=TOKEN, duration=3.0, timeout=15.0)
    results = client.run(place_calls(options, 3, stagger=0.05), timeout=90)
    summary = summarize(results)
    assert summary["failed"] == 0, summary["errors"]
    for r in results:
        assert r.setup_seconds is not None and 0 < r.setup_seconds < 5
        # About one marker per 0.25 s came back, each within a sane round trip.
        assert r.markers_sent >= 10 and r.markers_lost <= 1, (r.markers_sent, r.markers_lost)
        assert all(0.005 < rtt < 1.0 for rtt in r.audio_rtts), r.audio_rtts
        assert len(r.event_rtts) >= r.events_sent - 1 and r.event_rtts
        assert all(0 < rtt < 1.0 for rtt in r.event_rtts)
    # Everything went through the relay: it created one session per call, both ways.
    after = userspace.counters
    assert after["sessions_created"] - before.get("sessions_created", 0) == 3
    for direction in ("to_transceiver", "to_client"):
        key = f"fwd_{direction}_packets"
        assert after[key] - before.get(key, 0) > 3 * 100  # 3 s of 20 ms audio per call
    # Both workers got calls, and every call is gone once the clients hung up.
    assert {r.call_id.split("-")[0] for r in results if r.call_id} == {"0000e001", "0000e002"}
    wait_until(lambda: transceiver.loads() == [0, 0], 10, "the calls to be gone")


def test_realtime_multipart_call(transceiver: Transceiver, client: NsLoop) -> None:
    options = CallOptions(url=URL, token=TOKEN, duration=1.5, realtime=True)
    result = client.run(place_call(options), timeout=60)
    assert result.ok, result.error
    assert result.audio_rtts and result.event_rtts
    wait_until(lambda: transceiver.loads() == [0, 0], 10, "the call to be gone")


def test_refused_offers_leave_no_session(transceiver: Transceiver, client: NsLoop) -> None:
    async def post(body: bytes, token: str = TOKEN) -> tuple[int, bytes]:
        status, _, data = await http(
            "POST",
            f"{URL}/v1/calls",
            data=body,
            headers={"Content-Type": "application/sdp", "Authorization": f"Bearer {token}"},
        )
        return status, data

    async def offer() -> str:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("audio", direction="sendrecv")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    good = client.run(offer())
    # No codec the worker can use: passes the shape check, refused by the real worker.
    no_codec = "\r\n".join(
        ln.replace("opus/48000/2", "x-unknown/48000/2")
        for ln in good.split("\r\n")
        if not ln.startswith(("a=rtpmap:0 ", "a=rtpmap:8 ")) and "PCM" not in ln
    )
    status, body = client.run(post(no_codec.encode()))
    assert status == 400, body
    assert json.loads(body)["error"]["type"] == "bad_offer"
    assert client.run(post(b"v=0\r\n"))[0] == 400
    assert client.run(post(good.encode(), token="wrong"))[0] == 401
    assert transceiver.loads() == [0, 0]


def test_metrics_and_health_reflect_the_calls(transceiver: Transceiver, client: NsLoop) -> None:
    status, _, body = client.run(http("GET", f"{URL}/healthz"))
    assert status == 200
    assert json.loads(body) == {
        "status": "ok",
        "calls": 0,
        "capacity": 8,
        "workers": 2,
        "workers_alive": 2,
    }
    status, _, body = client.run(http("GET", f"{URL}/metrics"))
    text = body.decode()
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values['splitrelay_transceiver_calls_total{result="created"}'] >= 5
    assert values['splitrelay_transceiver_calls_total{result="bad_offer"}'] >= 2
    assert values["splitrelay_transceiver_setup_seconds_count"] >= 4
    assert values['splitrelay_transceiver_audio_frames_total{direction="in"}'] > 500
    assert values['splitrelay_transceiver_audio_frames_total{direction="out"}'] > 500
    assert values['splitrelay_transceiver_datachannel_messages_total{direction="in"}'] > 10
    assert values["splitrelay_transceiver_sessions"] == 0
    # Every media packet crossed the tunnel sockets; the drop reasons exist from the start.
    assert values['splitrelay_transceiver_tunnel_packets_total{direction="in"}'] > 500
    assert values['splitrelay_transceiver_tunnel_packets_total{direction="out"}'] > 500
    assert 'splitrelay_transceiver_tunnel_drops_total{reason="unknown_sender"}' in values
    assert not any("session" in k.partition("{")[2] for k in values), "no per-session labels"


# --------------------------------------------------------------------- transceiver run


class RunProcess:
    """`transceiver run` with two worker processes, in the transceiver namespace."""

    def __init__(self, drain_timeout: float, port: int = 8090) -> None:
        self.url = f"http://{TX}:{port}"
        argv = [
            TRANSCEIVER,
            "run",
            "--listen",
            f"{TX}:{port}",
            "--workers",
            "2",
            "--transceiver-id",
            f"{RUN_TID:x}",
            "--tunnel",
            TX,
            "--tunnel-port",
            str(RUN_PORT),
            "--relay",
            f"{TUNNEL[0]}:{TUNNEL[1]}",
            "--public",
            f"{PUBLIC[0]}:{PUBLIC[1]}",
            "--max-calls",
            "2",
            "--drain-timeout",
            str(drain_timeout),
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = popen_in(NS_TX, argv, stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=env)

    def wait_ready(self, client: NsLoop) -> None:
        async def healthy() -> bool:
            try:
                status, _, _ = await http("GET", f"{self.url}/healthz")
            except aiohttp.ClientError:
                return False
            return status == 200

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"transceiver run exited: {self.output()}")
            if client.run(healthy()):
                return
            time.sleep(0.1)
        pytest.fail("transceiver run did not become healthy")

    def output(self) -> str:
        _, err = self.proc.communicate(timeout=30)
        return err.decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def run_process(relay: tuple[UserspaceRelay, MemoryState]) -> Iterator[list[RunProcess]]:
    made: list[RunProcess] = []
    try:
        yield made
    finally:
        for p in made:
            p.stop()


def test_run_serves_calls_and_drains_on_sigterm(
    run_process: list[RunProcess], client: NsLoop
) -> None:
    run = RunProcess(drain_timeout=20)
    run_process.append(run)
    run.wait_ready(client)
    options = CallOptions(url=run.url, duration=4.0)
    long_call = client.submit(place_call(options))
    time.sleep(2.0)  # the call is connected and talking
    run.proc.send_signal(signal.SIGTERM)

    async def refused() -> tuple[int, dict[str, str], int]:
        await asyncio.sleep(0.3)
        health, _, _ = await http("GET", f"{run.url}/healthz")
        status, headers, _ = await http(
            "POST", f"{run.url}/v1/calls", data=b"v=0", headers={"Content-Type": "application/sdp"}
        )
        return status, headers, health

    status, headers, health = client.run(refused())
    assert (status, health) == (503, 503)
    assert int(headers["Retry-After"]) > 0
    result = long_call.result(60)
    assert result.ok, result.error  # the live call was allowed to finish
    assert result.audio_rtts
    assert run.proc.wait(30) == 0
    err = run.output()
    assert "Traceback" not in err
    assert "drained" in err


def test_drain_deadline_ends_long_calls(run_process: list[RunProcess], client: NsLoop) -> None:
    run = RunProcess(drain_timeout=1.0, port=8091)
    run_process.append(run)
    run.wait_ready(client)
    long_call = client.submit(place_call(CallOptions(url=run.url, duration=30.0)))
    time.sleep(2.0)
    started = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(30) == 0
    assert time.monotonic() - started < 10
    result = long_call.result(30)
    assert not result.ok and "dropped" in (result.error or "")
    assert result.audio_rtts  # it talked until the deadline


def test_run_with_a_busy_tunnel_port_fails_in_one_line(transceiver: Transceiver) -> None:
    """The in-process worker holds 4001 in the same namespace: startup must say so, once."""
    argv = [TRANSCEIVER, "run", "--listen", f"{TX}:8092", "--workers", "1"]
    argv += ["--transceiver-id", "e201", "--tunnel", TX, "--tunnel-port", "4001"]
    argv += ["--relay", f"{TUNNEL[0]}:{TUNNEL[1]}", "--public", f"{PUBLIC[0]}:{PUBLIC[1]}"]
    proc = popen_in(NS_TX, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    errors = [ln for ln in err.decode().splitlines() if "error" in ln.lower()]
    assert errors == [
        "transceiver: error: worker 0 (transceiver 0000e201, tunnel 203.0.113.11:4001): "
        "cannot bind the tunnel socket: Address already in use"
    ], err.decode()
    assert "Traceback" not in err.decode()
