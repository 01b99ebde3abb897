"""A transceiver worker: one tunnel socket, one transceiver id, many calls.

This is the API the signaling layer (through transceiver/pool.py) calls:
``create_call`` (offer -> call id + answer), ``end_call``, ``load``,
``stats()``, ``start()`` and ``stop()``. Each worker process has its own
transceiver id, so the routing token in its ufrags names exactly this process
and its tunnel port, and the relays deliver its clients to its one socket.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Any

from ctl import wire
from transceiver import backends, playout
from transceiver.jitterbuffer import JitterConfig
from transceiver.mux import Address, TunnelMux, check_versions, relay_candidates
from transceiver.opus import VoiceSettings
from transceiver.session import (
    DEFAULT_SETUP_TIMEOUT,
    BadOffer,
    CallSession,
    SessionCounters,
)

__all__ = ["AtCapacity", "BackendUnavailable", "BadOffer", "Draining", "Worker", "WorkerConfig"]

log = logging.getLogger("splitrelay.transceiver.worker")

#: Upper bounds (seconds) of the setup-time histogram buckets, cumulative like Prometheus'.
SETUP_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RECENT_SETUPS = 256


class AtCapacity(RuntimeError):
    """The worker takes no more calls now (HTTP 503 + Retry-After)."""


class Draining(AtCapacity):
    """The worker is stopping and takes no new calls."""


class BackendUnavailable(AtCapacity):
    """The call's backend could not start (its service is down or full): retry later, 503."""


@dataclass
class WorkerConfig:
    """Everything a worker needs; validated on creation so a bad config fails at startup.

    ``relays``: the relay tunnel endpoints (source ip, port) whose packets are
    accepted. ``public_candidates``: the relay's public address(es) to
    advertise, at most one per address family (the tunnel header cannot say
    which of two same-family addresses a client used). ``backend_options`` are
    passed to the backend factory as keyword arguments.

    ``direct``: no relay; clients reach the tunnel socket itself, which must
    then be the (only) public candidate (TunnelMux's direct mode, for
    benchmarks and development: it measures the worker without the relay hop).

    ``jitter`` configures every call's receive buffer (floor, ceiling, ...;
    transceiver/jitterbuffer.py), ``voice`` its Opus encoder
    (transceiver/opus.py's VoiceSettings).
    """

    transceiver_id: int
    tunnel_host: str
    tunnel_port: int
    relays: list[tuple[str, int]]
    public_candidates: list[tuple[str, int]]
    max_calls: int
    backend: str = "echo"
    backend_options: dict[str, Any] = field(default_factory=dict)
    setup_timeout: float = DEFAULT_SETUP_TIMEOUT
    direct: bool = False
    jitter: JitterConfig = field(default_factory=JitterConfig)
    voice: VoiceSettings = field(default_factory=VoiceSettings)

    def __post_init__(self) -> None:
        wire.make_server_ufrag(self.transceiver_id)  # raises for an id the token cannot carry
        ip_address(self.tunnel_host)
        if not 0 <= self.tunnel_port <= 0xFFFF:
            raise ValueError(f"tunnel port {self.tunnel_port} is not a UDP port")
        if self.direct and self.relays:
            raise ValueError("a direct worker takes no relay tunnel address")
        if not self.relays and not self.direct:
            raise ValueError("no relay tunnel address: the worker would accept nothing")
        for host, port in self.relays:
            ip_address(host)
            if not 0 < int(port) <= 0xFFFF:
                raise ValueError(f"relay port {port} is not in 1..65535")
        relay_candidates(self.public_candidates)  # one per family, valid addresses and ports
        if self.max_calls < 1:
            raise ValueError(f"max_calls must be at least 1, got {self.max_calls}")
        if self.backend not in backends.backend_names():
            raise ValueError(
                f"unknown backend {self.backend!r}; known: {', '.join(backends.backend_names())}"
            )
        if self.setup_timeout <= 0:
            raise ValueError("setup_timeout must be positive")


class _SetupTimes:
    """Offer-to-connected durations: cumulative buckets for Prometheus plus the recent values."""

    def __init__(self) -> None:
        self.counts = [0] * len(SETUP_BUCKETS)
        self.count = 0
        self.sum = 0.0
        self.recent: deque[float] = deque(maxlen=RECENT_SETUPS)

    def observe(self, seconds: float) -> None:
        index = bisect.bisect_left(SETUP_BUCKETS, seconds)
        if index < len(self.counts):
            self.counts[index] += 1
        self.count += 1
        self.sum += seconds
        self.recent.append(seconds)

    def snapshot(self) -> dict[str, Any]:
        cumulative, total = [], 0
        for bound, n in zip(SETUP_BUCKETS, self.counts, strict=True):
            total += n
            cumulative.append([bound, total])
        return {
            "buckets": cumulative,
            "count": self.count,
            "sum": self.sum,
            "recent": list(self.recent),
        }


class Worker:
    """Calls on one tunnel socket. Create with a WorkerConfig, then ``await start()``."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self._mux: TunnelMux | None = None
        self._sessions: dict[str, CallSession] = {}
        self._counters = SessionCounters()
        self._playout = playout.PlayoutCounters()
        self._setup = _SetupTimes()
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._totals = dict.fromkeys(
            (
                "calls_created",
                "calls_connected",
                "calls_failed",
                "calls_ended",
                "rejected_bad_offer",
                "rejected_capacity",
                "rejected_draining",
                "rejected_backend",
                "setup_errors",
                "setup_aborted",
            ),
            0,
        )

    # -- lifecycle

    async def start(self) -> None:
        """Check the aioice/aiortc pins and bind the tunnel socket (in this thread's netns)."""
        if self._mux is not None:
            raise RuntimeError("the worker is already started")
        check_versions()
        mux = TunnelMux(self.config.relays, direct=self.config.direct)
        await mux.start(self.config.tunnel_host, self.config.tunnel_port)
        self._mux = mux
        log.info(
            "transceiver %#x on tunnel %s:%d, relays %s, advertising %s",
            self.config.transceiver_id,
            *mux.local_address or ("?", 0),
            self.config.relays,
            self.config.public_candidates,
        )

    async def stop(self, drain_deadline: float) -> None:
        """Take no new calls, give live calls ``drain_deadline`` seconds to end, then end them.

        ``drain_deadline`` is a duration in seconds (0 ends every call at once).
        The tunnel socket is closed last.
        """
        self._draining = True
        if self._sessions and drain_deadline > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), drain_deadline)
        sessions = list(self._sessions.values())
        if sessions:
            await asyncio.gather(*(s.close("draining") for s in sessions))
        if self._mux is not None:
            mux, self._mux = self._mux, None
            mux.close()
            await mux.wait_closed()

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def load(self) -> int:
        """Calls this worker holds now, including those being set up."""
        return len(self._sessions)

    @property
    def tunnel_address(self) -> Address | None:
        """The bound tunnel (host, port) (useful with tunnel_port 0), None when stopped."""
        return None if self._mux is None else self._mux.local_address

    @property
    def mux(self) -> TunnelMux | None:
        return self._mux

    # -- calls

    async def create_call(self, offer_sdp: str) -> tuple[str, str]:
        """Answer an SDP offer: (call id, answer SDP).

        Raises BadOffer for an offer that cannot be answered (nothing is left
        behind), AtCapacity at max_calls, and two AtCapacity subclasses:
        Draining once stop() began, BackendUnavailable when the backend's
        start() raised BackendError. ConnectionError means the call was ended
        (end_call, stop) before its setup finished.
        """
        received = time.monotonic()
        mux = self._mux
        if self._draining or mux is None:
            self._totals["rejected_draining"] += 1
            raise Draining("the transceiver is draining" if mux else "the worker is not running")
        if len(self._sessions) >= self.config.max_calls:
            self._totals["rejected_capacity"] += 1
            raise AtCapacity(f"the worker is at capacity ({self.config.max_calls} calls)")
        call_id = secrets.token_urlsafe(12)
        ufrag = wire.make_server_ufrag(self.config.transceiver_id)
        while mux.has_ufrag(ufrag):  # 48 random bits: practically never
            ufrag = wire.make_server_ufrag(self.config.transceiver_id)
        backend = backends.create_backend(self.config.backend, **self.config.backend_options)
        session = CallSession(
            call_id,
            mux=mux,
            ufrag=ufrag,
            transceiver_id=self.config.transceiver_id,
            public_candidates=self.config.public_candidates,
            backend=backend,
            counters=self._counters,
            setup_timeout=self.config.setup_timeout,
            jitter=self.config.jitter,
            voice=self.config.voice,
            playout_counters=self._playout,
            offer_received=received,
            on_connected=self._session_connected,
            on_closed=self._session_closed,
        )
        self._sessions[call_id] = session
        self._idle.clear()
        try:
            answer = await session.start(offer_sdp)
        except BadOffer:
            self._totals["rejected_bad_offer"] += 1
            raise
        except backends.BackendError as exc:
            self._totals["rejected_backend"] += 1
            raise BackendUnavailable(str(exc) or "the backend could not start") from exc
        except ConnectionError:  # end_call() or stop() won the race with the setup
            self._totals["setup_aborted"] += 1
            raise
        except Exception:
            self._totals["setup_errors"] += 1
            log.exception("call setup failed")
            raise
        self._totals["calls_created"] += 1
        return call_id, answer

    async def end_call(self, call_id: str) -> bool:
        """Hang up a call; False if this worker has no such call."""
        session = self._sessions.get(call_id)
        if session is None:
            return False
        await session.close("ended")
        return True

    def _session_connected(self, session: CallSession) -> None:
        self._totals["calls_connected"] += 1
        if session.setup_seconds is not None:
            self._setup.observe(session.setup_seconds)

    def _session_closed(self, session: CallSession) -> None:
        if self._sessions.get(session.call_id) is session:
            del self._sessions[session.call_id]
        if session.close_reason != "setup_failed":
            key = "calls_ended" if session.state == "closed" else "calls_failed"
            self._totals[key] += 1
        if not self._sessions:
            self._idle.set()

    # -- observation

    def stats(self) -> dict[str, Any]:
        """A snapshot for metrics and health; plain JSON-able types (it may cross processes).

        ``setup_seconds`` is a cumulative histogram (upper bound, count) of
        offer-received to ICE+DTLS-connected, observed when each call connects;
        ``playout`` the received audio's jitter buffers summed over calls
        (transceiver/playout.py's PlayoutCounters.snapshot).
        """
        sessions = list(self._sessions.values())
        connected = sum(1 for s in sessions if s.state == "connected")
        c = self._counters
        mux = self._mux
        return {
            "transceiver_id": self.config.transceiver_id,
            "tunnel": None if mux is None else list(mux.local_address or ()),
            "backend": self.config.backend,
            "max_calls": self.config.max_calls,
            "draining": self._draining,
            "sessions": len(sessions),
            "sessions_connected": connected,
            "setup_seconds": self._setup.snapshot(),
            "audio_frames_total": {"in": c.audio_frames_in, "out": c.audio_frames_out},
            "datachannel_messages_total": {
                "in": c.datachannel_messages_in,
                "out": c.datachannel_messages_out,
            },
            "playback_frames_queued": sum(s.playback_queued for s in sessions),
            "events_dropped_total": c.events_dropped,
            "backend_errors_total": c.backend_errors,
            **{f"{k}_total": v for k, v in self._totals.items()},
            "mux": {} if mux is None else mux.stats(),
            "playout": self._playout.snapshot(),
        }
