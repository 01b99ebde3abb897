"""Worker pools: what the signaling API calls, and the in-process implementation.

The HTTP layer (transceiver/signaling.py) never touches a Worker: it talks to
a `WorkerPool`, so the same API serves one in-process worker (tests, embedding)
or N worker processes (transceiver/supervisor.py's ProcessPool). The pool
picks the worker for a new call and encodes that worker in the call id, so a
later DELETE goes to the worker that owns the call without any shared table.

Call ids are `<8 hex digits of the transceiver id>-<the worker's own id>`: the
same id the routing token in the server ufrag carries, so an operator can tell
from a call id which process (and which relay map entry) serves it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from transceiver.worker import Worker

CALL_ID_RE = re.compile(r"([0-9a-f]{8})-([A-Za-z0-9_.~-]{1,128})")


class PoolError(Exception):
    """A call could not be created; the signaling layer maps each kind to a status."""


class BadOffer(PoolError):
    """The SDP offer is not one we can answer (HTTP 400)."""


class Unavailable(PoolError):
    """No worker can take the call now (HTTP 503 + Retry-After).

    `reason` is "capacity" (try again soon) or "draining" (this instance is going away).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class WorkerSnapshot:
    """One worker's state at a moment: what /healthz and /metrics are built from.

    `stats` is the worker's own Worker.stats() dict, passed through untouched so
    the metrics module is the only place that knows its keys.
    """

    tid: int
    calls: int
    capacity: int
    alive: bool = True
    draining: bool = False
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class PoolStats:
    """The whole pool: sums for /healthz, per-worker snapshots for /metrics."""

    workers: list[WorkerSnapshot]
    draining: bool

    @property
    def calls(self) -> int:
        return sum(w.calls for w in self.workers)

    @property
    def capacity(self) -> int:
        return sum(w.capacity for w in self.workers if w.alive)


class WorkerPool(Protocol):
    """What the signaling API needs from the workers behind it."""

    @property
    def draining(self) -> bool:
        """True once the pool takes no new calls (existing ones continue)."""
        ...

    def at_capacity(self) -> bool:
        """True when no worker can take a call right now (cheap: no I/O)."""
        ...

    async def create_call(self, offer_sdp: str) -> tuple[str, str]:
        """Answer an offer: (call id, SDP answer). Raises BadOffer or Unavailable."""
        ...

    async def end_call(self, call_id: str) -> bool:
        """Hang up; False when no worker knows the call."""
        ...

    async def stats(self) -> PoolStats:
        """Current state of every worker."""
        ...


def make_call_id(tid: int, worker_call_id: str) -> str:
    """The public call id: which worker (by transceiver id) plus the worker's own id."""
    call_id = f"{tid:08x}-{worker_call_id}"
    if not CALL_ID_RE.fullmatch(call_id):
        raise ValueError(f"worker call id {worker_call_id!r} is not URL-safe")
    return call_id


def split_call_id(call_id: str) -> tuple[int, str] | None:
    """(transceiver id, worker's id) of a public call id, or None if it is not one of ours."""
    match = CALL_ID_RE.fullmatch(call_id)
    if match is None:
        return None
    return int(match.group(1), 16), match.group(2)


def pick_least_loaded(loads: Sequence[tuple[int, int]], start: int = 0) -> int | None:
    """Index of the entry with the lowest load/capacity ratio that still has room.

    `loads` is (active calls, capacity) per worker. Ties go to the first entry at or
    after `start` (the caller rotates it), so a burst of calls on an idle pool is
    spread over all workers instead of piling onto worker 0 before its load shows.
    """
    best: int | None = None
    best_key: tuple[float, int] | None = None
    n = len(loads)
    for step in range(n):
        i = (start + step) % n
        calls, capacity = loads[i]
        if capacity <= 0 or calls >= capacity:
            continue
        key = (calls / capacity, calls)
        if best_key is None or key < best_key:
            best, best_key = i, key
    return best


class InProcessPool:
    """Workers in this process (tests, embedding, a single-process deployment).

    `pending` counts calls being set up, so concurrent offers see each other's
    load before the workers do and are spread instead of all landing on one.
    """

    def __init__(self, workers: Sequence[Worker]) -> None:
        if not workers:
            raise ValueError("a pool needs at least one worker")
        self.workers = list(workers)
        self._by_tid = {self._tid(w): w for w in self.workers}
        if len(self._by_tid) != len(self.workers):
            raise ValueError("workers must have distinct transceiver ids")
        self._pending = [0] * len(self.workers)
        self._next = 0
        self._draining = False

    @staticmethod
    def _tid(worker: Worker) -> int:
        return int(worker.config.transceiver_id)

    @staticmethod
    def _capacity(worker: Worker) -> int:
        return int(worker.config.max_calls)

    @property
    def draining(self) -> bool:
        return self._draining

    def start_draining(self) -> None:
        """Refuse new calls from now on; existing calls are untouched."""
        self._draining = True

    def _loads(self) -> list[tuple[int, int]]:
        return [
            (w.load + p, self._capacity(w))
            for w, p in zip(self.workers, self._pending, strict=True)
        ]

    def at_capacity(self) -> bool:
        return pick_least_loaded(self._loads()) is None

    async def create_call(self, offer_sdp: str) -> tuple[str, str]:
        from transceiver import worker as worker_mod

        if self._draining:
            raise Unavailable("draining", "this transceiver is draining")
        index = pick_least_loaded(self._loads(), self._next)
        if index is None:
            raise Unavailable("capacity", "every worker is at capacity")
        self._next = (index + 1) % len(self.workers)
        worker = self.workers[index]
        self._pending[index] += 1
        try:
            call_id, answer = await worker.create_call(offer_sdp)
        except worker_mod.BadOffer as exc:
            raise BadOffer(str(exc) or "the offer was rejected") from exc
        except worker_mod.Draining as exc:
            raise Unavailable("draining", str(exc) or "the worker is draining") from exc
        except worker_mod.AtCapacity as exc:
            raise Unavailable("capacity", str(exc) or "the worker is at capacity") from exc
        except Exception as exc:
            # The worker logged it; the client gets a 500 without internals.
            raise PoolError("call setup failed in the worker") from exc
        finally:
            self._pending[index] -= 1
        return make_call_id(self._tid(worker), call_id), answer

    async def end_call(self, call_id: str) -> bool:
        parts = split_call_id(call_id)
        if parts is None:
            return False
        worker = self._by_tid.get(parts[0])
        if worker is None:
            return False
        return bool(await worker.end_call(parts[1]))

    async def stats(self) -> PoolStats:
        snapshots = [
            WorkerSnapshot(
                tid=self._tid(w),
                calls=w.load,
                capacity=self._capacity(w),
                draining=self._draining,
                stats=dict(w.stats()),
            )
            for w in self.workers
        ]
        return PoolStats(snapshots, self._draining)

    async def drain(self, timeout: float) -> None:
        """Stop taking calls, then stop every worker, giving calls `timeout` seconds to end."""
        self.start_draining()
        await asyncio.gather(*(w.stop(timeout) for w in self.workers))
