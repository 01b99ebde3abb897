"""The signaling HTTP API against a fake pool: every endpoint, every error shape.

The fake stands for the workers (they are tested end to end elsewhere); what
is tested here is the HTTP contract above them: status codes, headers, JSON
errors, CORS, limits, and that a refused request never reaches a worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from transceiver.pool import BadOffer, PoolStats, Unavailable, WorkerSnapshot
from transceiver.signaling import MAX_SDP_LINE, MAX_SDP_LINES, check_offer, make_app

OFFER = "\r\n".join(
    [
        "v=0",
        "o=- 4611731400430051336 2 IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0 1",
        "a=msid-semantic: WMS",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111",
        "c=IN IP4 0.0.0.0",
        "a=rtcp:9 IN IP4 0.0.0.0",
        "a=ice-ufrag:abcd",
        "a=ice-pwd:0123456789abcdefghijklmn",
        "a=fingerprint:sha-256 " + ":".join(["AB"] * 32),
        "a=setup:actpass",
        "a=mid:0",
        "a=sendrecv",
        "a=rtpmap:111 opus/48000/2",
        "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
        "c=IN IP4 0.0.0.0",
        "a=mid:1",
        "a=sctp-port:5000",
        "",
    ]
)
ANSWER = (
    "v=0\r\no=- 1 1 IN IP4 203.0.113.1\r\ns=-\r\nt=0 0\r\nm=audio 3478 UDP/TLS/RTP/SAVPF 111\r\n"
)
CALL_ID = "0000a001-c4ll"
SDP = {"Content-Type": "application/sdp"}


class FakePool:
    """Records what reaches it; its state (full, draining, failing) is set per test."""

    def __init__(self) -> None:
        self.offers: list[str] = []
        self.ended: list[str] = []
        self.calls = {CALL_ID}
        self.draining = False
        self.full = False
        self.fail: Exception | None = None

    def at_capacity(self) -> bool:
        return self.full

    async def create_call(self, offer_sdp: str) -> tuple[str, str]:
        self.offers.append(offer_sdp)
        if self.fail is not None:
            raise self.fail
        return CALL_ID, ANSWER

    async def end_call(self, call_id: str) -> bool:
        self.ended.append(call_id)
        if call_id in self.calls:
            self.calls.discard(call_id)
            return True
        return False

    async def stats(self) -> PoolStats:
        worker = WorkerSnapshot(
            tid=0xA001,
            calls=3,
            capacity=10,
            stats={  # the shape of Worker.stats()
                "sessions": 3,
                "setup_seconds": {
                    "buckets": [[0.05, 1], [0.1, 1], [0.25, 2], [30.0, 2]],
                    "count": 2,
                    "sum": 0.24,
                },
                "audio_frames_total": {"in": 100, "out": 99},
                "datachannel_messages_total": {"in": 4, "out": 5},
                "backend_errors_total": 1,
                "calls_connected_total": 2,
                "calls_ended_total": 1,
                "calls_failed_total": 0,
            },
        )
        return PoolStats([worker], self.draining)


Check = Callable[[TestClient[web.Request, web.Application], FakePool], Awaitable[None]]


def run(check: Check, **app_kwargs: Any) -> FakePool:
    """Serve a fresh app over a fresh FakePool on loopback and run `check` against it."""
    pool = FakePool()
    app_kwargs.setdefault("bearer_token", None)

    async def main() -> None:
        app = make_app(pool, **app_kwargs)
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            await check(client, pool)

    asyncio.run(main())
    return pool


async def error_of(resp: aiohttp.ClientResponse, status: int, type_: str) -> dict[str, Any]:
    """Assert the JSON error shape and return the error object."""
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) == {"error"}
    assert body["error"]["type"] == type_
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


# --------------------------------------------------------------------- success paths


def test_post_calls_returns_answer_and_location() -> None:
    async def check(client: TestClient, pool: FakePool) -> None:
        resp = await client.post("/v1/calls", data=OFFER, headers=SDP)
        assert resp.status == 201
        assert resp.content_type == "application/sdp"
        assert resp.headers["Location"] == f"/v1/calls/{CALL_ID}"
        assert await resp.text() == ANSWER
        assert pool.offers == [OFFER]

    run(check)


def test_content_type_parameters_are_accepted() -> None:
    async def check(client: TestClient, pool: FakePool) -> None:
        resp = await client.post(
            "/v1/calls", data=OFFER, headers={"Content-Type": "application/sdp; charset=utf-8"}
        )
        assert resp.status == 201

    run(check)


def test_realtime_accepts_plain_sdp() -> None:
    async def check(client: TestClient, pool: FakePool) -> None:
        resp = await client.post("/v1/realtime/calls", data=OFFER, headers=SDP)
        assert resp.status == 201
        assert resp.headers["Location"] == f"/v1/calls/{CALL_ID}"
        assert await resp.text() == ANSWER

    run(check)


def test_realtime_accepts_multipart_with_sdp_and_session_parts() -> None:
    async def check(client: TestClient, pool: FakePool) -> None:
        form = aiohttp.FormData(default_to_multipart=True)
        form.add_field("sdp", OFFER)
        form.add_field("session", '{"type": "realtime", "model": "x"}')
        resp = await client.post("/v1/realtime/calls", data=form)
        assert resp.status == 201, await resp.text()
        assert resp.content_type == "application/sdp"
        assert await resp.text() == ANSWER
        assert pool.offers == [OFFER]

    run(check)


def test_realtime_accepts_sdp_part_sent_as_a_file() -> None:
    async def check(client: TestClient, pool: FakePool) -> None:
        form = aiohttp.FormData(default_to_multipart=True)
        form.add_field("sdp", OFFER.encode(), filename="offer.sdp", content_type="application/sdp")
        resp = await client.post("/v1/realtime/calls", data=form)
        assert resp.status == 201
        assert pool.offers == [OFFER]

    run(check)


def test_delete_call() -> None:
    async def check(client: TestClient, pool: FakePool) -> None:
        resp = await client.delete(f"/v1/calls/{CALL_ID}")
        assert resp.status == 204
        assert await resp.read() == b""
        resp = await client.delete(f"/v1/realtime/calls/{CALL_ID}")
        await error_of(resp, 404, "not_found")
        assert pool.ended == [CALL_ID, CALL_ID]

    run(check)


def test_healthz_ok_and_draining() -> None:
    async def check(client: TestClient, pool: FakePool) -> None:
        resp = await client.get("/healthz")
        assert resp.status == 200
        assert await resp.json() == {
            "status": "ok",
            "calls": 3,
            "capacity": 10,
            "workers": 1,
            "workers_alive": 1,
        }
        pool.draining = True
        resp = await client.get("/healthz")
        assert resp.status == 503
        assert (await resp.json())["status"] == "draining"

    run(check)


def test_metrics_exposition() -> None:
    async def check(client: TestClient, pool: FakePool) -> None:
        await client.post("/v1/calls", data=OFFER, headers=SDP)
        await client.post("/v1/calls", data="nope", headers=SDP)
        resp = await client.get("/metrics")
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await resp.text()
        for line in (
            "splitrelay_transceiver_sessions 3.0",
            "splitrelay_transceiver_capacity 10.0",
            'splitrelay_transceiver_setup_seconds_bucket{le="0.05"} 1.0',
            'splitrelay_transceiver_setup_seconds_bucket{le="+Inf"} 2.0',
            "splitrelay_transceiver_setup_seconds_count 2.0",
            'splitrelay_transceiver_audio_frames_total{direction="in"} 100.0',
            'splitrelay_transceiver_audio_frames_total{direction="out"} 99.0',
            'splitrelay_transceiver_datachannel_messages_total{direction="in"} 4.0',
            'splitrelay_transceiver_datachannel_messages_total{direction="out"} 5.0',
            "splitrelay_transceiver_backend_errors_total 1.0",
            "splitrelay_transceiver_calls_connected_total 2.0",
            'splitrelay_transceiver_calls_ended_total{result="ended"} 1.0',
            "splitrelay_transceiver_setup_seconds_sum 0.24",
            'splitrelay_transceiver_calls_total{result="created"} 1.0',
            'splitrelay_transceiver_calls_total{result="bad_offer"} 1.0',
            'splitrelay_transceiver_calls_total{result="at_capacity"} 0.0',
            'splitrelay_transceiver_worker_up{transceiver_id="0000a001"} 1.0',
        ):
            assert line in text.splitlines(), line

    run(check)


# --------------------------------------------------------------------- 400


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "empty"),
        (b"   \r\n", "empty"),
        (b"hello world", "v=0"),
        (b'{"sdp": "v=0"}', "v=0"),
        (OFFER.replace("m=audio", "m=video").encode(), "no audio"),
        (OFFER.replace("a=ice-ufrag:abcd\r\n", "").encode(), "ICE credentials"),
        (OFFER.replace("a=ice-pwd:", "a=x-pwd:").encode(), "ICE credentials"),
        (OFFER.replace("a=fingerprint:", "a=x-fingerprint:").encode(), "fingerprint"),
        (OFFER.replace("s=-", "s=\x00evil").encode(), "line 3"),
        (OFFER.replace("s=-", "garbage").encode(), "line 3"),
        (OFFER.replace("s=-", "s=" + "x" * MAX_SDP_LINE).encode(), "longer than"),
        (OFFER.replace("a=ice-ufrag:abcd", "a=ice-ufrag:" + "u" * 300).encode(), "1..256"),
        (OFFER.encode() + b"a=x\r\n" * MAX_SDP_LINES, "lines"),
        (OFFER.encode() + b"m=audio 9 RTP/AVP 0\r\n" * 40, "media sections"),
        (OFFER.encode().replace(b"s=-", b"s=\xff\xfe"), "UTF-8"),
    ],
)
def test_bad_offers_are_refused_before_any_worker(body: bytes, fragment: str) -> None:
    async def check(client: TestClient, pool: FakePool) -> None:
        for path in ("/v1/calls", "/v1/realtime/calls"):
            resp = await client.post(path, data=body, headers=SDP)
            error = await error_of(resp, 400, "bad_offer")
            assert fragment in error["message"]
        assert pool.offers == []

    run(check, max_body=256 * 1024)


def test_offer_the_worker_rejects_is_400() -> None:
    async def check(client: TestClient, pool: FakePool) -> None:
        pool.fail = BadOffer("no common audio codec")
        resp = await client.post("/v1/calls", data=OFFER, headers=SDP)
        error = await error_of(resp, 400, "bad_offer")
        assert error["message"] == "no common audio codec"

    run(check)


@pytest.mark.parametrize(
    "form_parts",
    [
        [("session", "{}")],
        [("other", OFFER)],
    ],
)
def test_multipart_without_sdp_part_is_400(form_parts: list[tuple[str, str]]) -> None:
    async def check(client: TestClient, pool: FakePool) -> None:
        form = aiohttp.FormData(default_to_multipart=True)
        for name, value in form_parts:
            form.add_field(name, value)
        resp = await client.post("/v1/realtime/calls", data=form)
        error = await error_of(resp, 400, "bad_offer")
        assert "sdp" in error["message"]
        assert pool.offers == []

    run(check)


def test_malformed_multipart_is_400() -> None:
    async def check(client: TestClient, pool: FakePool) -> None:
        for headers, body in (
            ({"Content-Type": "multipart/form-data"}, b"--x\r\n\r\nv=0\r\n--x--\r\n"),
            ({"Content-Type": "multipart/form-data; boundary=x"}, b"garbage without boundary"),
            (
                {"Content-Type": "multipart/form-data; boundary=x"},
                b'--x\r\nContent-Disposition: form-data; name="sdp"\r\n\r\nv=0 truncated',
            ),
        ):
            resp = await client.post("/v1/realtime/calls", data=body, headers=headers)
            await error_of(resp, 400, "bad_offer")
        assert pool.offers == []

    run(check)


def test_multipart_sdp_part_is_checked_like_a_plain_offer() -> None:
    async def check(client: TestClient, pool: FakePool) -> None:
        form = aiohttp.FormData(default_to_multipart=True)
        form.add_field("sdp", "m=video 9 RTP/AVP 0")
        resp = await client.post("/v1/realtime/calls", data=form)
        await error_of(resp, 400, "bad_offer")
        assert pool.offers == []

    run(check)


def test_check_offer_accepts_a_browser_offer() -> None:
    check_offer(OFFER)
    check_offer(OFFER.replace("\r\n", "\n"))


# --------------------------------------------------------------------- 401


def test_bearer_token_required_when_configured() -> None:
    async def check(client: TestClient, pool: FakePool) -> None:
        resp = await client.post("/v1/calls", data=OFFER, headers=SDP)
        await error_of(resp, 401, "unauthorized")
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        for auth in ("Bearer wrong", "Basic c2VjcmV0", "Bearer", "secret", "Bearer s3cret"):
            resp = await client.post(
                "/v1/calls", data=OFFER, headers={**SDP, "Authorization": auth}
            )
            await error_of(resp, 401, "unauthorized")
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        resp = await client.delete(f"/v1/calls/{CALL_ID}")
        await error_of(resp, 401, "unauthorized")
        assert pool.offers == [] and pool.ended == []

        good = {**SDP, "Authorization": "Bearer secret"}
        resp = await client.post("/v1/calls", data=OFFER, headers=good)
        assert resp.status == 201
        resp = await client.post("/v1/realtime/calls", data=OFFER, headers=good)
        assert resp.status == 201
        resp = await client.delete(
            f"/v1/calls/{CALL_ID}", headers={"Authorization": "bearer secret"}
        )
        assert resp.status == 204

        # Health and metrics stay open for load balancers and Prometheus.
        assert (await client.get("/healthz")).status == 200
        assert (await client.get("/metrics")).status == 200

    run(check, bearer_token="secret")


def test_auth_is_checked_before_the_body() -> None:
    async def check(client: TestClient, pool: FakePool) -> None:
        resp = await client.post("/v1/calls", data=b"x" * 100_000, headers=SDP)
        await error_of(resp, 401, "unauthorized")

    run(check, bearer_token="secret")


# --------------------------------------------------------------------- 413


def test_declared_oversize_body_is_413() -> None:
    async def check(client: TestClient, pool: FakePool) -> None:
        big = OFFER + "a=x-pad:" + "p" * 2000 + "\r\n"
        for path in ("/v1/calls", "/v1/realtime/calls"):
            resp = await client.post(path, data=big, headers=SDP)
            error = await error_of(resp, 413, "payload_too_large")
            assert "1024" in error["message"]
        assert pool.offers == []

    run(check, max_body=1024)


def test_chunked_oversize_body_is_413() -> None:
    async def check(client: TestClient, pool: FakePool) -> None:
        async def chunks() -> AsyncIterator[bytes]:
            yield OFFER.encode()
            for _ in range(64):
                yield b"a=x-pad:" + b"p" * 1000 + b"\r\n"

        resp = await client.post("/v1/calls", data=chunks(), headers=SDP)
        await error_of(resp, 413, "payload_too_large")
        assert pool.offers == []

    run(check, max_body=4096)


def test_oversize_multipart_is_413() -> None:
    async def check(client: TestClient, pool: FakePool) -> None:
        form = aiohttp.FormData(default_to_multipart=True)
        form.add_field("sdp", OFFER)
        form.add_field("session", "x" * 8000)
        resp = await client.post("/v1/realtime/calls", data=form)
        await error_of(resp, 413, "payload_too_large")
        assert pool.offers == []

    run(check, max_body=4096)


# --------------------------------------------------------------------- 415


def test_wrong_content_type_is_415() -> None:
    async def check(client: TestClient, pool: FakePool) -> None:
        for path, headers in (
            ("/v1/calls", {"Content-Type": "text/plain"}),
            ("/v1/calls", {"Content-Type": "application/json"}),
            ("/v1/calls", {"Content-Type": "multipart/form-data; boundary=x"}),
            ("/v1/realtime/calls", {"Content-Type": "application/x-www-form-urlencoded"}),
            ("/v1/realtime/calls", {"Content-Type": "text/plain"}),
        ):
            resp = await client.post(path, data=OFFER.encode(), headers=headers)
            await error_of(resp, 415, "unsupported_media_type")
        resp = await client.post("/v1/calls", data=OFFER.encode())  # octet-stream default
        await error_of(resp, 415, "unsupported_media_type")
        assert pool.offers == []

    run(check)


# --------------------------------------------------------------------- 404, 405, 500


def test_unknown_paths_and_calls_are_json_404() -> None:
    async def check(client: TestClient, pool: FakePool) -> None:
        await error_of(await client.get("/"), 404, "not_found")
        await error_of(await client.get("/v1/nope"), 404, "not_found")
        await error_of(await client.delete("/v1/calls/0000a001-unknown"), 404, "not_found")
        await error_of(await client.delete("/v1/calls/bad%20id"), 404, "not_found")
        await error_of(await client.delete("/v1/calls/" + "x" * 300), 404, "not_found")

    run(check)


def test_wrong_method_is_json_405_with_allow() -> None:
    async def check(client: TestClient, pool: FakePool) -> None:
        resp = await client.get("/v1/calls")
        await error_of(resp, 405, "method_not_allowed")
        assert "POST" in resp.headers["Allow"]
        # WHIP: a server without trickle ICE answers PATCH with 405.
        resp = await client.patch(f"/v1/calls/{CALL_ID}", data=b"a=candidate")
        await error_of(resp, 405, "method_not_allowed")
        assert "DELETE" in resp.headers["Allow"]
        await error_of(await client.post("/healthz"), 405, "method_not_allowed")
        await error_of(await client.delete("/metrics"), 405, "method_not_allowed")

    run(check)


def test_unexpected_pool_failure_is_json_500_without_details() -> None:
    async def check(client: TestClient, pool: FakePool) -> None:
        pool.fail = RuntimeError("secret internal detail")
        resp = await client.post("/v1/calls", data=OFFER, headers=SDP)
        error = await error_of(resp, 500, "internal_error")
        assert "secret" not in error["message"]
        resp = await client.get("/metrics")
        assert 'splitrelay_transceiver_calls_total{result="internal_error"} 1.0' in (
            await resp.text()
        )

    run(check)


# --------------------------------------------------------------------- 503


def test_draining_is_503_with_retry_after() -> None:
    async def check(client: TestClient, pool: FakePool) -> None:
        pool.draining = True
        for path in ("/v1/calls", "/v1/realtime/calls"):
            resp = await client.post(path, data=OFFER, headers=SDP)
            await error_of(resp, 503, "draining")
            assert resp.headers["Retry-After"] == "7"
        assert pool.offers == []
        # Existing calls can still be ended while draining.
        assert (await client.delete(f"/v1/calls/{CALL_ID}")).status == 204

    run(check, retry_after_draining=7)


def test_at_capacity_is_503_with_retry_after() -> None:
    async def check(client: TestClient, pool: FakePool) -> None:
        pool.full = True
        resp = await client.post("/v1/calls", data=OFFER, headers=SDP)
        await error_of(resp, 503, "at_capacity")
        assert resp.headers["Retry-After"] == "2"
        assert pool.offers == []

        # The pool may also discover it is full while the call is being set up.
        pool.full = False
        pool.fail = Unavailable("capacity", "worker full")
        resp = await client.post("/v1/calls", data=OFFER, headers=SDP)
        await error_of(resp, 503, "at_capacity")
        assert resp.headers["Retry-After"] == "2"

    run(check)


# --------------------------------------------------------------------- CORS


def test_cors_preflight_for_any_origin() -> None:
    async def check(client: TestClient, pool: FakePool) -> None:
        resp = await client.options(
            "/v1/calls",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert resp.status == 204
        h = resp.headers
        assert h["Access-Control-Allow-Origin"] == "*"
        assert "POST" in h["Access-Control-Allow-Methods"]
        allowed = {x.strip().lower() for x in h["Access-Control-Allow-Headers"].split(",")}
        assert {"authorization", "content-type"} <= allowed
        assert "Location" in h["Access-Control-Expose-Headers"]
        resp = await client.options(
            f"/v1/calls/{CALL_ID}",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "DELETE"},
        )
        assert resp.status == 204
        assert "DELETE" in resp.headers["Access-Control-Allow-Methods"]
        assert pool.offers == [] and pool.ended == []

    run(check, bearer_token="secret")  # preflights never need the token


def test_cors_headers_on_answers_and_errors() -> None:
    async def check(client: TestClient, pool: FakePool) -> None:
        origin = {"Origin": "https://app.example"}
        resp = await client.post("/v1/calls", data=OFFER, headers={**SDP, **origin})
        assert resp.status == 201
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        assert "Location" in resp.headers["Access-Control-Expose-Headers"]
        resp = await client.post("/v1/calls", data="bad", headers={**SDP, **origin})
        await error_of(resp, 400, "bad_offer")
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        resp = await client.get("/nope", headers=origin)
        await error_of(resp, 404, "not_found")
        assert resp.headers["Access-Control-Allow-Origin"] == "*"

    run(check)


def test_cors_with_an_origin_list() -> None:
    async def check(client: TestClient, pool: FakePool) -> None:
        preflight = {"Access-Control-Request-Method": "POST"}
        resp = await client.options(
            "/v1/calls", headers={**preflight, "Origin": "https://good.example"}
        )
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == "https://good.example"
        assert "Origin" in resp.headers.getall("Vary")
        resp = await client.options(
            "/v1/calls", headers={**preflight, "Origin": "https://evil.example"}
        )
        await error_of(resp, 403, "origin_not_allowed")
        assert "Access-Control-Allow-Origin" not in resp.headers
        resp = await client.post(
            "/v1/calls", data=OFFER, headers={**SDP, "Origin": "https://evil.example"}
        )
        assert "Access-Control-Allow-Origin" not in resp.headers

    run(check, cors_origins=["https://good.example"])


def test_plain_options_lists_methods() -> None:
    async def check(client: TestClient, pool: FakePool) -> None:
        resp = await client.options("/v1/realtime/calls")
        assert resp.status == 204
        assert set(resp.headers["Allow"].split(", ")) == {"OPTIONS", "POST"}
        await error_of(await client.options("/v1/unknown"), 404, "not_found")

    run(check)
