"""The transceiver's signaling HTTP API (aiohttp): WHIP-style call setup, health, metrics.

Endpoints (docs/transceiver.md has the full contract):

    POST   /v1/calls                 application/sdp offer -> 201, SDP answer, Location
    POST   /v1/realtime/calls        the same, or multipart/form-data with an `sdp` part
    DELETE /v1/calls/{id}            -> 204 (also /v1/realtime/calls/{id})
    GET    /healthz                  JSON status, 503 while draining
    GET    /metrics                  Prometheus text

Every error is JSON `{"error": {"type": ..., "message": ...}}`, including the
404/405 aiohttp's router raises, so a browser client needs one error path.
Every input check happens here, before any worker sees the offer: a hostile
body is refused by its headers (size, type) without being read, and a bad SDP
is refused without allocating a session, so no bad request can leak one.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from aiohttp import BodyPartReader, web
from aiohttp.web_exceptions import HTTPException

from transceiver import metrics
from transceiver.pool import BadOffer, PoolError, Unavailable, WorkerPool

log = logging.getLogger("splitrelay.transceiver.signaling")

DEFAULT_MAX_BODY = 64 * 1024
SDP_TYPE = "application/sdp"
MULTIPART_TYPE = "multipart/form-data"

# SDP limits. A browser offer for one audio track and a data channel is 2-6 KiB
# and under 150 lines; these bounds are far above that and far below anything
# that would make the SDP parser behind us slow.
MAX_SDP_LINES = 2000
MAX_SDP_LINE = 4096
MAX_MEDIA_SECTIONS = 32
MAX_ICE_FIELD = 256
_SDP_LINE_RE = re.compile(r"[a-z]=[^\x00-\x08\x0a-\x1f\x7f]*")

CALL_ID_PATTERN = r"[A-Za-z0-9_.~-]{1,200}"
ALLOWED_HEADERS = "Authorization, Content-Type"
EXPOSED_HEADERS = "Location, Retry-After, WWW-Authenticate"
PREFLIGHT_MAX_AGE = "600"

POOL_KEY = web.AppKey("pool", object)
CONFIG_KEY = web.AppKey("signaling_config", object)


@dataclass
class SignalingConfig:
    """Options of one signaling app, kept on the app for the handlers."""

    bearer_token: bytes | None
    max_body: int
    cors_origins: frozenset[str] | None  # None: any origin ("*")
    retry_after_capacity: int
    retry_after_draining: int
    calls: Counter[str] = field(default_factory=Counter)  # creation outcomes, by result


class ApiError(Exception):
    """An error response: status, JSON `type` and message, optional extra headers."""

    def __init__(
        self, status: int, type_: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.headers = headers or {}


def error_response(
    status: int, type_: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """The one error shape of this API."""
    body = json.dumps({"error": {"type": type_, "message": message}})
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)


# --------------------------------------------------------------------- SDP checks


def check_offer(sdp: str) -> None:
    """Refuse what is not a plausible WebRTC audio offer, with a reason a developer can act on.

    This is a shape check, not a parser: the worker's SDP parser still decides,
    but it only ever sees bounded, line-structured, printable text with an audio
    section and the ICE and DTLS attributes a WebRTC offer must carry.
    """
    if not sdp.strip():
        raise BadOffer("the offer is empty")
    lines = sdp.splitlines()
    if len(lines) > MAX_SDP_LINES:
        raise BadOffer(f"the offer has more than {MAX_SDP_LINES} lines")
    if lines[0].strip() != "v=0":
        raise BadOffer("not an SDP offer: the first line must be v=0")
    media = audio = 0
    ufrag = pwd = fingerprint = False
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        if len(line) > MAX_SDP_LINE:
            raise BadOffer(f"SDP line {number} is longer than {MAX_SDP_LINE} characters")
        if not _SDP_LINE_RE.fullmatch(line):
            raise BadOffer(f"SDP line {number} is not a `x=value` line of printable text")
        if line.startswith("m="):
            media += 1
            if media > MAX_MEDIA_SECTIONS:
                raise BadOffer(f"the offer has more than {MAX_MEDIA_SECTIONS} media sections")
            if line.startswith("m=audio "):
                audio += 1
        elif line.startswith(("a=ice-ufrag:", "a=ice-pwd:")):
            value = line.partition(":")[2].strip()
            if not 1 <= len(value) <= MAX_ICE_FIELD:
                raise BadOffer(f"SDP line {number}: ICE credentials must be 1..256 characters")
            ufrag = ufrag or line.startswith("a=ice-ufrag:")
            pwd = pwd or line.startswith("a=ice-pwd:")
        elif line.startswith("a=fingerprint:"):
            fingerprint = True
    if not audio:
        raise BadOffer("the offer has no audio section (m=audio)")
    if not (ufrag and pwd):
        raise BadOffer("the offer has no ICE credentials (a=ice-ufrag / a=ice-pwd)")
    if not fingerprint:
        raise BadOffer("the offer has no DTLS fingerprint (a=fingerprint)")


def decode_offer(body: bytes | bytearray | str) -> str:
    """SDP text from a request body: UTF-8 (RFC 8866), checked."""
    if isinstance(body, str):
        text = body
    else:
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            raise BadOffer("the offer is not UTF-8 text") from None
    check_offer(text)
    return text


# --------------------------------------------------------------------- middlewares


def _allowed_origin(config: SignalingConfig, origin: str | None) -> str | None:
    """The Access-Control-Allow-Origin value for a request, or None for no CORS headers."""
    if origin is None:
        return None
    if config.cors_origins is None:
        return "*"
    return origin if origin in config.cors_origins else None


def _resource_methods(request: web.Request) -> list[str]:
    """Methods the matched path allows (from the router), for Allow and preflights."""
    route = request.match_info.route
    resource = route.resource
    if resource is None:
        return []
    methods = {r.method for r in resource}
    return sorted(methods)


@web.middleware
async def cors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """CORS for browsers on other origins (WHIP requires it): preflights and response headers.

    Preflights are answered here for every known path, without authentication:
    browsers never send credentials on a preflight.
    """
    config: SignalingConfig = request.app[CONFIG_KEY]  # type: ignore[assignment]
    origin = request.headers.get("Origin")
    allow = _allowed_origin(config, origin)
    if request.method == "OPTIONS" and request.match_info.http_exception is None:
        allowed = _resource_methods(request)
        methods = ", ".join(m for m in allowed if m != "HEAD")  # HEAD is implied by GET
        headers = {"Allow": ", ".join(allowed)}
        if origin is not None and "Access-Control-Request-Method" in request.headers:
            if allow is None:
                return error_response(
                    403, "origin_not_allowed", f"origin {origin} may not call this API"
                )
            headers.update(
                {
                    "Access-Control-Allow-Methods": methods,
                    "Access-Control-Allow-Headers": ALLOWED_HEADERS,
                    "Access-Control-Max-Age": PREFLIGHT_MAX_AGE,
                }
            )
        response: web.StreamResponse = web.Response(status=204, headers=headers)
    else:
        response = await handler(request)
    if allow is not None:
        response.headers["Access-Control-Allow-Origin"] = allow
        response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
        if allow != "*":
            response.headers.add("Vary", "Origin")
    return response


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Turn every failure into the JSON error shape; never leak a traceback to a client."""
    config: SignalingConfig = request.app[CONFIG_KEY]  # type: ignore[assignment]
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.type, exc.message, exc.headers)
    except HTTPException as exc:
        if exc.status < 400:
            raise
        type_, message = _http_error(exc, config)
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow",)}
        return error_response(exc.status, type_, message, headers)
    except Exception:
        log.exception("signaling request %s %s failed", request.method, request.path)
        return error_response(500, "internal_error", "internal error; see the transceiver log")


def _http_error(exc: HTTPException, config: SignalingConfig) -> tuple[str, str]:
    if exc.status == 404:
        return "not_found", "no such resource"
    if exc.status == 405:
        return "method_not_allowed", "method not allowed on this resource"
    if exc.status == 413:
        return "payload_too_large", f"the request body exceeds {config.max_body} bytes"
    return "bad_request", exc.reason or "bad request"


# --------------------------------------------------------------------- checks


def _check_auth(request: web.Request, config: SignalingConfig) -> None:
    """Bearer token (RFC 6750), compared in constant time, when one is configured."""
    if config.bearer_token is None:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401,
            "unauthorized",
            "missing bearer token (Authorization: Bearer ...)",
            {"WWW-Authenticate": 'Bearer realm="splitrelay"'},
        )
    presented = token.strip().encode("utf-8", "replace")
    if not hmac.compare_digest(presented, config.bearer_token):
        raise ApiError(
            401,
            "unauthorized",
            "invalid bearer token",
            {"WWW-Authenticate": 'Bearer realm="splitrelay", error="invalid_token"'},
        )


def _check_length(request: web.Request, config: SignalingConfig) -> None:
    """Refuse a declared oversize body before reading a byte of it.

    A chunked body has no length; aiohttp's client_max_size (set to max_body)
    stops reading it as soon as it passes the limit.
    """
    length = request.content_length
    if length is not None and length > config.max_body:
        raise ApiError(
            413, "payload_too_large", f"the request body exceeds {config.max_body} bytes"
        )


def _check_available(pool: WorkerPool, config: SignalingConfig) -> None:
    if pool.draining:
        raise _unavailable(Unavailable("draining", "this transceiver is draining"), config)
    if pool.at_capacity():
        raise _unavailable(Unavailable("capacity", "every worker is at capacity"), config)


def _unavailable(exc: Unavailable, config: SignalingConfig) -> ApiError:
    draining = exc.reason == "draining"
    retry = config.retry_after_draining if draining else config.retry_after_capacity
    return ApiError(
        503,
        "draining" if draining else "at_capacity",
        str(exc) + "; retry later or on another transceiver",
        {"Retry-After": str(retry)},
    )


async def _read_multipart_sdp(request: web.Request, config: SignalingConfig) -> str:
    """The `sdp` part of a multipart/form-data body (OpenAI Realtime style).

    Other parts (such as OpenAI's `session` JSON) are read within the same size
    budget and ignored: the session configuration belongs to the backend.
    """
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError, KeyError):
        raise BadOffer("malformed multipart/form-data body") from None
    sdp: bytes | None = None
    total = 0
    while True:
        try:
            part = await reader.next()
        except HTTPException:
            raise
        except Exception:
            raise BadOffer("malformed multipart/form-data body") from None
        if part is None:
            break
        if not isinstance(part, BodyPartReader):
            raise BadOffer("nested multipart bodies are not supported")
        data = bytearray()
        while chunk := await _read_chunk(part):
            total += len(chunk)
            if total > config.max_body:
                raise ApiError(
                    413, "payload_too_large", f"the request body exceeds {config.max_body} bytes"
                )
            data.extend(chunk)
        if part.name == "sdp" and sdp is None:
            sdp = bytes(data)
    if sdp is None:
        raise BadOffer("the multipart body has no `sdp` part")
    return decode_offer(sdp)


async def _read_chunk(part: BodyPartReader) -> bytes:
    try:
        return await part.read_chunk()
    except HTTPException:
        raise
    except Exception:
        raise BadOffer("malformed multipart/form-data body") from None


# --------------------------------------------------------------------- handlers


async def _create(request: web.Request, *, multipart: bool) -> web.Response:
    """Create a call, counting its outcome under calls_total{result}."""
    config: SignalingConfig = request.app[CONFIG_KEY]  # type: ignore[assignment]
    try:
        response = await _create_inner(request, config, multipart=multipart)
    except ApiError as exc:
        config.calls[exc.type] += 1
        raise
    except HTTPException as exc:
        config.calls[_http_error(exc, config)[0]] += 1
        raise
    except Exception:
        config.calls["internal_error"] += 1
        raise
    config.calls["created"] += 1
    return response


async def _create_inner(
    request: web.Request, config: SignalingConfig, *, multipart: bool
) -> web.Response:
    pool: WorkerPool = request.app[POOL_KEY]  # type: ignore[assignment]
    _check_auth(request, config)
    ctype = request.content_type
    accepted = (SDP_TYPE, MULTIPART_TYPE) if multipart else (SDP_TYPE,)
    if ctype not in accepted:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type must be {' or '.join(accepted)}, not {ctype or 'missing'}",
        )
    _check_length(request, config)
    _check_available(pool, config)
    try:
        if ctype == MULTIPART_TYPE:
            offer = await _read_multipart_sdp(request, config)
        else:
            offer = decode_offer(await request.read())
        call_id, answer = await pool.create_call(offer)
    except BadOffer as exc:
        raise ApiError(400, "bad_offer", str(exc)) from None
    except Unavailable as exc:
        raise _unavailable(exc, config) from None
    except PoolError as exc:
        raise ApiError(500, "worker_error", str(exc)) from None
    return web.Response(
        status=201,
        body=answer.encode("utf-8"),
        content_type=SDP_TYPE,
        headers={"Location": f"/v1/calls/{call_id}"},
    )


async def create_call(request: web.Request) -> web.Response:
    """POST /v1/calls: WHIP-compatible, application/sdp only."""
    return await _create(request, multipart=False)


async def create_realtime_call(request: web.Request) -> web.Response:
    """POST /v1/realtime/calls: application/sdp or OpenAI's multipart form."""
    return await _create(request, multipart=True)


async def delete_call(request: web.Request) -> web.Response:
    """DELETE /v1/calls/{id}: hang up (204), or 404 for a call nobody knows."""
    pool: WorkerPool = request.app[POOL_KEY]  # type: ignore[assignment]
    config: SignalingConfig = request.app[CONFIG_KEY]  # type: ignore[assignment]
    _check_auth(request, config)
    if not await pool.end_call(request.match_info["call_id"]):
        raise ApiError(404, "not_found", "no such call")
    return web.Response(status=204)


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: 200 while taking calls, 503 while draining (for readiness probes)."""
    pool: WorkerPool = request.app[POOL_KEY]  # type: ignore[assignment]
    stats = await pool.stats()
    body = {
        "status": "draining" if pool.draining else "ok",
        "calls": stats.calls,
        "capacity": stats.capacity,
        "workers": len(stats.workers),
        "workers_alive": sum(1 for w in stats.workers if w.alive),
    }
    return web.json_response(body, status=503 if pool.draining else 200)


async def metrics_handler(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text, built from the pool's stats at scrape time."""
    pool: WorkerPool = request.app[POOL_KEY]  # type: ignore[assignment]
    config: SignalingConfig = request.app[CONFIG_KEY]  # type: ignore[assignment]
    stats = await pool.stats()
    body = metrics.render(stats, dict(config.calls))
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})


# --------------------------------------------------------------------- factory


def make_app(
    pool: WorkerPool,
    *,
    bearer_token: str | None,
    max_body: int = DEFAULT_MAX_BODY,
    cors_origins: str | Iterable[str] = "*",
    retry_after_capacity: int = 2,
    retry_after_draining: int = 10,
) -> web.Application:
    """The signaling application over `pool`.

    `bearer_token` protects the call endpoints (POST, DELETE); /healthz and
    /metrics stay open for load balancers and Prometheus, and carry no secrets.
    `cors_origins` is "*" or the exact origins (scheme://host[:port]) allowed.
    """
    if max_body <= 0:
        raise ValueError("max_body must be positive")
    origins: frozenset[str] | None
    if isinstance(cors_origins, str):
        origins = None if cors_origins == "*" else frozenset({cors_origins})
    else:
        origins = frozenset(cors_origins)
    config = SignalingConfig(
        bearer_token=bearer_token.encode("utf-8") if bearer_token else None,
        max_body=max_body,
        cors_origins=origins,
        retry_after_capacity=retry_after_capacity,
        retry_after_draining=retry_after_draining,
    )
    app = web.Application(client_max_size=max_body, middlewares=[cors_middleware, error_middleware])
    app[POOL_KEY] = pool
    app[CONFIG_KEY] = config
    call = "{call_id:" + CALL_ID_PATTERN + "}"
    routes: list[tuple[str, dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]]] = [
        ("/v1/calls", {"POST": create_call}),
        (f"/v1/calls/{call}", {"DELETE": delete_call}),
        ("/v1/realtime/calls", {"POST": create_realtime_call}),
        (f"/v1/realtime/calls/{call}", {"DELETE": delete_call}),
        ("/healthz", {"GET": healthz}),
        ("/metrics", {"GET": metrics_handler}),
    ]
    for path, handlers in routes:
        resource = app.router.add_resource(path)
        for method, handler in handlers.items():
            resource.add_route(method, handler)
            if method == "GET":
                resource.add_route("HEAD", handler)
        resource.add_route("OPTIONS", _options_placeholder)
    return app


async def _options_placeholder(request: web.Request) -> web.Response:
    """Never reached: cors_middleware answers OPTIONS; registered so the router knows the path."""
    return web.Response(status=204)
