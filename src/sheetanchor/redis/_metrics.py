"""Prometheus metrics of the Redis clients (on ``sheetanchor.observe.REGISTRY``).

Counters are plain prometheus counters; gauges (clients alive, connections in use / idle)
are read from the live clients at scrape time by one collector, so nothing has to be kept
in sync by hand.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from sheetanchor.observe import REGISTRY, metric_name

__all__ = [
    "CLOSE_ERRORS",
    "CREATED",
    "DISPOSED",
    "OUTCOME_UNKNOWN",
    "RETRIES",
    "SCRIPT_RELOADS",
    "install_collector",
]

CREATED = Counter(
    metric_name("redis", "clients_created", "total"),
    "Per-loop Redis clients created.",
    ["client"],
    registry=REGISTRY,
)
DISPOSED = Counter(
    metric_name("redis", "clients_disposed", "total"),
    "Per-loop Redis clients disposed of "
    "(reason: closed, loop_end, loop_closed_by_hand, loop_closed).",
    ["client", "reason"],
    registry=REGISTRY,
)
CLOSE_ERRORS = Counter(
    metric_name("redis", "close_errors", "total"),
    "Errors raised while closing a Redis connection pool.",
    ["client"],
    registry=REGISTRY,
)
RETRIES = Counter(
    metric_name("redis", "retries", "total"),
    "Commands sent again after a transient error (reason: not_sent = the error came before "
    "the command was written; idempotent = possibly sent, but safe to repeat).",
    ["client", "reason"],
    registry=REGISTRY,
)
OUTCOME_UNKNOWN = Counter(
    metric_name("redis", "outcome_unknown", "total"),
    "Non-idempotent commands whose reply was lost: not retried, raised as CommandOutcomeUnknown.",
    ["client"],
    registry=REGISTRY,
)
SCRIPT_RELOADS = Counter(
    metric_name("redis", "script_reloads", "total"),
    "EVALSHA answered NOSCRIPT and the script was sent again.",
    ["script"],
    registry=REGISTRY,
)


class _ClientCollector(Collector):
    def __init__(self, live: Callable[[], Iterable[Any]]) -> None:
        self._live = live

    def collect(self) -> Iterator[GaugeMetricFamily]:
        alive: dict[str, int] = defaultdict(int)
        in_use: dict[str, int] = defaultdict(int)
        idle: dict[str, int] = defaultdict(int)
        for rc in self._live():
            name, stats = rc._snapshot()
            alive[name] += stats.clients_alive
            in_use[name] += stats.connections_in_use
            idle[name] += stats.connections_idle
        clients = GaugeMetricFamily(
            metric_name("redis", "clients"), "Per-loop Redis clients alive.", labels=["client"]
        )
        conns = GaugeMetricFamily(
            metric_name("redis", "connections"),
            "Pooled Redis connections by state (in_use, idle).",
            labels=["client", "state"],
        )
        for name in alive:
            clients.add_metric([name], alive[name])
            conns.add_metric([name, "in_use"], in_use[name])
            conns.add_metric([name, "idle"], idle[name])
        yield clients
        yield conns

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(metric_name("redis", "clients"), "", labels=["client"])
        yield GaugeMetricFamily(metric_name("redis", "connections"), "", labels=["client", "state"])


_installed: list[_ClientCollector] = []


def install_collector(live: Callable[[], Iterable[Any]]) -> None:
    """Register the gauge collector once (idempotent)."""
    if _installed:
        return
    collector = _ClientCollector(live)
    REGISTRY.register(collector)
    _installed.append(collector)
