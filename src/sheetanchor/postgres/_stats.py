"""Statistics of a :class:`~sheetanchor.postgres.Database`, as a NamedTuple and as metrics.

``db.stats()`` returns :class:`DatabaseStats`; the same figures are exported as Prometheus
metrics ``sheetanchor_pg_*`` on :data:`sheetanchor.observe.REGISTRY` by one collector. The only
label is the database's ``name`` (low cardinality by construction: one per ``Database`` object).

* **Gauges** (engines, pool connections, waiters...) are read from every live ``Database`` when
  scraped (no bookkeeping on the query path), and summed per name.
* **Counters** (engines disposed, leaks, commit failures...) come from a :class:`Tally` per
  name that each ``Database`` adds its events to as they happen. A tally lives as long as the
  process, so a counter never goes down when a ``Database`` is garbage-collected (a
  Prometheus counter that decreases reads as a reset and corrupts ``rate()``).
* A scrape only reads: it never sweeps the leak watch, reaps the engines of closed loops or
  disposes anything. It runs in the exporter's thread, where disposal has no business
  (``db.stats()``, called by the application, still does both).
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

__all__ = ["COUNTER_FIELDS", "DatabaseStats", "Tally", "register_source", "tally_for"]


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
        engines_idle_loops: of ``engines_alive``, those whose event loop is open but not
            running now. A loop reused between jobs (a Celery worker's) counts while idle; one
            that only grows means event loops dropped without ``close()``, each keeping its
            engine and pooled connections (see ``Database``).
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
    engines_idle_loops: int = 0


class _Source(Protocol):
    name: str

    def _gauges(self) -> dict[str, int]: ...


_sources: weakref.WeakSet[Any] = weakref.WeakSet()
_lock = threading.Lock()

_GAUGES = (
    ("engines_alive", "engines", "Engines open now (one per event loop using the database)."),
    (
        "engines_idle_loops",
        "engines_idle_loops",
        "Engines whose event loop is open but not running (loops dropped without close() stay).",
    ),
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


COUNTER_FIELDS = tuple(field for field, _what, _doc in _COUNTERS)


class Tally:
    """The counters of every ``Database`` of one name in this process; they only go up.

    Get one with :func:`tally_for`. Events are added as they happen (under a lock: they are
    rare, never on the query path), and the tally outlives the ``Database`` objects.
    """

    __slots__ = ("_counts", "_lock", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._counts = dict.fromkeys(COUNTER_FIELDS, 0)
        self._lock = threading.Lock()

    def add(self, field: str, n: int = 1) -> None:
        """Count ``n`` more ``field`` events (a name of :data:`COUNTER_FIELDS`)."""
        with self._lock:
            self._counts[field] += n

    def counts(self) -> dict[str, int]:
        """A copy of the counts."""
        with self._lock:
            return dict(self._counts)


_tallies: dict[str, Tally] = {}


def tally_for(name: str) -> Tally:
    """The process-wide :class:`Tally` of the databases named ``name`` (made on first use)."""
    with _lock:
        tally = _tallies.get(name)
        if tally is None:
            tally = _tallies[name] = Tally(name)
        return tally


class _DatabaseCollector(Collector):
    def collect(self) -> Iterator[Any]:
        # Read-only: gauges from the live databases, counters from the tallies. Nothing here
        # sweeps, reaps or disposes (see the module docstring).
        with _lock:
            sources = list(_sources)
            tallies = list(_tallies.values())
        # Two Database objects may share a name: sum them, one sample per label value.
        # Every name ever used keeps its series: gauges read 0 once its databases are gone.
        gauges: dict[str, dict[str, float]] = {
            tally.name: dict.fromkeys((f for f, _w, _d in _GAUGES), 0.0) for tally in tallies
        }
        for src in sources:
            row = gauges.setdefault(src.name, {})
            for field, value in src._gauges().items():
                row[field] = row.get(field, 0.0) + float(value)
        counters = {tally.name: tally.counts() for tally in tallies}
        for field, what, doc in _GAUGES:
            gauge = GaugeMetricFamily(metric_name("pg", what), doc, labels=["database"])
            for name, row in sorted(gauges.items()):
                gauge.add_metric([name], row[field])
            yield gauge
        for field, what, doc in _COUNTERS:
            counter = CounterMetricFamily(metric_name("pg", what), doc, labels=["database"])
            for name, counts in sorted(counters.items()):
                counter.add_metric([name], float(counts[field]))
            yield counter

    def describe(self) -> Iterator[Any]:
        # Describing without collecting keeps registration free of side effects.
        for _field, what, doc in _GAUGES:
            yield GaugeMetricFamily(metric_name("pg", what), doc, labels=["database"])
        for _field, what, doc in _COUNTERS:
            yield CounterMetricFamily(metric_name("pg", what), doc, labels=["database"])


REGISTRY.register(_DatabaseCollector())


def _after_fork_in_child() -> None:
    # A scrape thread of the parent may have held the locks at fork time. The counts stay:
    # what the parent counted before the fork is part of this process's history too.
    global _lock
    _lock = threading.Lock()
    for tally in _tallies.values():
        tally._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def register_source(source: _Source) -> None:
    """Export ``source._gauges()`` as metrics for as long as ``source`` is alive."""
    with _lock:
        _sources.add(source)
