"""Prometheus metrics of the relay, read at scrape time from their sources.

Nothing is copied into prometheus_client counters ahead of time: each scrape
reads the per-CPU BPF counters and the userspace path's counters directly,
so the exported values are exactly what the maps hold. No per-session labels.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "splitrelay_relay"

# counter name suffix -> (metric, direction)
_FORWARD = {
    "fwd_to_transceiver_packets": ("packets", "to_transceiver"),
    "fwd_to_transceiver_bytes": ("bytes", "to_transceiver"),
    "fwd_to_client_packets": ("packets", "to_client"),
    "fwd_to_client_bytes": ("bytes", "to_client"),
}


@dataclass
class RelaySources:
    """Where each family's values come from (callables, read at every scrape)."""

    # None, or returning None: no kernel maps (XDP could not load), so no path="xdp" series.
    xdp_counters: Callable[[], dict[str, int] | None] | None = None
    userspace_counters: Callable[[], dict[str, int]] = dict
    session_count: Callable[[], int] = lambda: 0
    xdp_attachments: Callable[[], dict[str, str]] = dict  # ifname -> mode
    daemon_counters: Callable[[], dict[str, int]] = dict  # expired sessions, events lost, ...
    redis_up: Callable[[], bool | None] = lambda: None
    extra: list[Callable[[], Iterator[Metric]]] = field(default_factory=list)


class RelayCollector(Collector):
    """The relay's metric families (splitrelay_relay_*)."""

    def __init__(self, sources: RelaySources) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        packets = CounterMetricFamily(
            f"{PREFIX}_packets", "Packets relayed", labels=["path", "direction"]
        )
        octets = CounterMetricFamily(
            f"{PREFIX}_bytes", "Client-side UDP payload bytes relayed", labels=["path", "direction"]
        )
        drops = CounterMetricFamily(
            f"{PREFIX}_drops", "Packets dropped, by reason", labels=["path", "reason"]
        )
        passes = CounterMetricFamily(
            f"{PREFIX}_xdp_passes",
            "Packets the XDP program passed up to the kernel stack, by reason",
            labels=["reason"],
        )
        created = CounterMetricFamily(
            f"{PREFIX}_sessions_created", "Sessions created", labels=["path"]
        )
        rerouted = CounterMetricFamily(
            f"{PREFIX}_sessions_rerouted",
            "Known clients moved to another transceiver by a new STUN request",
            labels=["path"],
        )
        paths: list[tuple[str, dict[str, int]]] = []
        xdp = self.sources.xdp_counters() if self.sources.xdp_counters is not None else None
        if xdp is not None:
            paths.append(("xdp", xdp))
        paths.append(("userspace", self.sources.userspace_counters()))
        for path, values in paths:
            for name, (metric, direction) in _FORWARD.items():
                family = packets if metric == "packets" else octets
                family.add_metric([path, direction], values.get(name, 0))
            for name, value in sorted(values.items()):
                if name.startswith("drop_"):
                    drops.add_metric([path, name.removeprefix("drop_")], value)
                elif name.startswith("pass_") and path == "xdp":
                    passes.add_metric([name.removeprefix("pass_")], value)
            created.add_metric([path], values.get("sessions_created", 0))
            rerouted.add_metric([path], values.get("sessions_rerouted", 0))
        yield from (packets, octets, drops, passes, created, rerouted)

        sessions = GaugeMetricFamily(f"{PREFIX}_sessions", "Sessions the relay holds now")
        sessions.add_metric([], self.sources.session_count())
        yield sessions

        attached = GaugeMetricFamily(
            f"{PREFIX}_xdp_attached",
            "1 for each interface the XDP program is attached to, by mode",
            labels=["interface", "mode"],
        )
        for ifname, mode in sorted(self.sources.xdp_attachments().items()):
            attached.add_metric([ifname, mode], 1)
        yield attached

        for name, value in sorted(self.sources.daemon_counters().items()):
            yield CounterMetricFamily(f"{PREFIX}_{name}", _HELP.get(name, name), value=value)

        up = self.sources.redis_up()
        if up is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_redis_up", "1 while the relay reaches Redis", value=int(up)
            )
        for extra in self.sources.extra:
            yield from extra()


_HELP = {
    "sessions_expired": "Sessions removed after their idle timeout",
    "events_lost": "Session events lost: the kernel's ring buffer was full, or the "
    "controller could not pass an event on",
    "redis_errors": "Redis operations that failed",
}


def make_registry(sources: RelaySources) -> CollectorRegistry:
    """A registry holding only the relay's families (no process/platform noise)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RelayCollector(sources))
    return registry


class MetricsServer:
    """The /metrics HTTP endpoint in a background thread."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        from wsgiref.simple_server import WSGIRequestHandler, make_server

        class _Quiet(WSGIRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

        class _Server(WSGIServer):
            address_family = _family(host)
            daemon_threads = True

        self._server = make_server(
            host, port, make_wsgi_app(registry), server_class=_Server, handler_class=_Quiet
        )
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._started = False

    @property
    def address(self) -> tuple[str, int]:
        """The bound address (port resolved when 0 was asked for)."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Serve in the background (the socket is bound and listening since __init__)."""
        self._thread.start()
        self._started = True

    def stop(self) -> None:
        """Stop serving and close the socket; safe on a server that never started.

        shutdown() waits for serve_forever() to acknowledge, so it would hang
        on a server whose thread never ran (a daemon that failed to start).
        """
        if self._started:
            self._server.shutdown()
        self._server.server_close()


def _family(host: str) -> int:
    import socket

    return socket.AF_INET6 if ":" in host else socket.AF_INET
