"""Statistics of a :class:`~sheetanchor.postgres.Database`, as a NamedTuple and as metrics.

``db.stats()`` returns :class:`DatabaseStats`; the same figures are exported as Prometheus
metrics ``sheetanchor_pg_*`` on :data:`sheetanchor.observe.REGISTRY` by one collector that reads
every live ``Database`` when scraped (no bookkeeping on the query path). The only label is the
database's ``name`` (low cardinality by construction: one per ``Database`` object).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterator
from typing import Any, NamedTuple, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sheetanchor.observe import REGISTRY, metric_name

__all__ = ["DatabaseStats", "register_source"]


class DatabaseStats(NamedTuple):
    """A snapshot of one ``Database`` in this process, summed over its engines (one per loop).

    Attributes:
        name: the database's name (its metrics label).
        engines_alive: engines open now (one per running event loop that used the database).
        engines_disposed: engines disposed so far (their loop closed or died, or ``close()``).
        pool_size: connections open now, idle and checked out.
        idle: connections waiting in the pools.
        checked_out: connections in use now.
        overflow: checked-out connections beyond ``PoolSettings.size``.
        waiting: tasks waiting for a free connection (best effort).
        capacity: most connections this process may open (``size + max_overflow`` per engine).
        leaks: checkouts reported as leaked (held past the threshold, or never returned).
        leaks_unreturned: of those, the ones garbage-collected without being returned.
        commit_failures: commits that failed and were raised as ``CommitFailed``.
        cleanup_failures: rollbacks or closes of a session or transaction that failed (logged
            at WARNING; after a successful COMMIT the data is saved and the block succeeds).
        dispose_failures: engines whose disposal failed while their loop shut down (logged at
            WARNING; the loop is closed anyway).
    """

    name: str
    engines_alive: int
    engines_disposed: int
    pool_size: int
    idle: int
    checked_out: int
    overflow: int
    waiting: int
    capacity: int
    leaks: int
    leaks_unreturned: int
    commit_failures: int
    cleanup_failures: int = 0
    dispose_failures: int = 0


class _Source(Protocol):
    def stats(self) -> DatabaseStats: ...


_sources: weakref.WeakSet[Any] = weakref.WeakSet()
_lock = threading.Lock()

_GAUGES = (
    ("engines_alive", "engines", "Engines open now (one per event loop using the database)."),
    ("pool_size", "pool_connections", "Connections open now, idle and in use."),
    ("idle", "pool_idle_connections", "Connections idle in the pools."),
    ("checked_out", "pool_checked_out_connections", "Connections checked out now."),
    ("overflow", "pool_overflow_connections", "Checked-out connections beyond the pool size."),
    ("waiting", "pool_waiting_tasks", "Tasks waiting for a free connection."),
    ("capacity", "pool_capacity_connections", "Most connections this process may open."),
)
_COUNTERS = (
    ("engines_disposed", "engines_disposed", "Engines disposed (loop closed or died, or close())."),
    ("leaks", "leaks", "Connections reported as leaked (held too long or never returned)."),
    (
        "leaks_unreturned",
        "leaks_unreturned",
        "Connections garbage-collected without being returned.",
    ),
    ("commit_failures", "commit_failures", "Commits that failed and were raised as CommitFailed."),
    (
        "cleanup_failures",
        "cleanup_failures",
        "Rollbacks or closes of a session or transaction that failed (connection invalidated).",
    ),
    (
        "dispose_failures",
        "dispose_failures",
        "Engine disposals that failed while their event loop shut down.",
    ),
)


class _DatabaseCollector(Collector):
    def collect(self) -> Iterator[Any]:
        with _lock:
            snapshots = [src.stats() for src in list(_sources)]
        # Two Database objects may share a name: sum them, one sample per label value.
        totals: dict[str, dict[str, float]] = {}
        for snap in snapshots:
            row = totals.setdefault(snap.name, {})
            for field, value in snap._asdict().items():
                if field != "name":
                    row[field] = row.get(field, 0.0) + float(value)
        for field, what, doc in _GAUGES:
            gauge = GaugeMetricFamily(metric_name("pg", what), doc, labels=["database"])
            for name, row in sorted(totals.items()):
                gauge.add_metric([name], row[field])
            yield gauge
        for field, what, doc in _COUNTERS:
            counter = CounterMetricFamily(metric_name("pg", what), doc, labels=["database"])
            for name, row in sorted(totals.items()):
                counter.add_metric([name], row[field])
            yield counter

    def describe(self) -> Iterator[Any]:
        # Describing without collecting keeps registration free of side effects.
        for _field, what, doc in _GAUGES:
            yield GaugeMetricFamily(metric_name("pg", what), doc, labels=["database"])
        for _field, what, doc in _COUNTERS:
            yield CounterMetricFamily(metric_name("pg", what), doc, labels=["database"])


REGISTRY.register(_DatabaseCollector())


def _after_fork_in_child() -> None:
    # A scrape thread of the parent may have held the lock at fork time.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def register_source(source: _Source) -> None:
    """Export ``source.stats()`` as metrics for as long as ``source`` is alive."""
    with _lock:
        _sources.add(source)
