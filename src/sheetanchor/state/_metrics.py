"""Prometheus metrics of the cached stores; the label ``table`` names the store, never a key.

The counters of the read paths (lookups, database reads, leases, backfills) are plain ints
in each store (``StoreCore._counts``, which :meth:`CachedStore.stats` reads too), folded into
Prometheus at scrape time by one collector: a read then pays a dict increment instead of a
prometheus child's lock and method calls (two or three of them per read). A store that is
garbage-collected keeps its counts in the totals of its table: the counters never go down.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections import deque
from collections.abc import Iterator

from prometheus_client import Counter, Gauge
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from sheetanchor.observe import REGISTRY, metric_name

__all__ = [
    "BACKFILLS_INFLIGHT",
    "BREAKER_OPEN",
    "COUNTS",
    "COUNT_KEYS",
    "DRIFT",
    "FENCE_REFUSED",
    "FLIGHTS",
    "PENDING",
    "REDIS_ERRORS",
    "StoreCounters",
]

FENCE_REFUSED = Counter(
    metric_name("state", "fence_refused", "total"),
    "Cache sets refused because Redis already held a newer entry (or the read was too old).",
    ["table"],
    registry=REGISTRY,
)
REDIS_ERRORS = Counter(
    metric_name("state", "redis_errors", "total"),
    "Redis calls of the store that failed (connection, timeout), routed to the breaker.",
    ["table"],
    registry=REGISTRY,
)
BREAKER_OPEN = Gauge(
    metric_name("state", "breaker_open"),
    "1 while the store's Redis circuit breaker is open (reads served by PostgreSQL).",
    ["table"],
    registry=REGISTRY,
)
PENDING = Gauge(
    metric_name("state", "pending_invalidations"),
    "Keys written while Redis was unreachable, waiting to be invalidated.",
    ["table"],
    registry=REGISTRY,
)
FLIGHTS = Gauge(
    metric_name("state", "singleflight_inflight"),
    "Loads in flight in the store's single-flight table.",
    ["table"],
    registry=REGISTRY,
)
DRIFT = Counter(
    metric_name("state", "drift", "total"),
    "Drift found by the reconciler: missing, stale, ahead, orphan; repaired; filled (cached).",
    ["table", "kind"],
    registry=REGISTRY,
)
BACKFILLS_INFLIGHT = Gauge(
    metric_name("state", "backfills_inflight"),
    "Backfills being written to Redis in the background now.",
    ["table"],
    registry=REGISTRY,
)


# The counted families: (name, help, second label or None, ((count key, label value), ...)).
# "refused" is counted by the store for stats() only: FENCE_REFUSED is a plain counter,
# incremented where Redis refuses a set.
_FAMILIES: tuple[tuple[str, str, str | None, tuple[tuple[str, str], ...]], ...] = (
    (
        metric_name("state", "cache_lookups", "total"),
        "Cache lookups by result: hit, miss, absent (cached absence), corrupt, skipped (breaker).",
        "result",
        tuple((r, r) for r in ("hit", "miss", "absent", "corrupt", "skipped")),
    ),
    (
        metric_name("state", "pg_reads", "total"),
        "Reads of the source of truth made by the store (point or batch queries).",
        None,
        (("pg", ""),),
    ),
    (
        metric_name("state", "lease_events", "total"),
        "Load leases by outcome: acquired, waited (another holder filled), timeout (read PG).",
        "outcome",
        tuple((o, o) for o in ("acquired", "waited", "timeout")),
    ),
    (
        metric_name("state", "backfills", "total"),
        "Backfills of a miss by how they ran: background, inline (max_backfills pending, or "
        "0), failed (an error other than Redis being down; logged, the lease released), "
        "dropped (the Redis client closed first, or cut short twice: the lease expires on its "
        "own).",
        "mode",
        tuple((f"backfill_{m}", m) for m in ("background", "inline", "failed", "dropped")),
    ),
)
COUNT_KEYS: tuple[str, ...] = (
    *(key for _name, _help, _label, keys in _FAMILIES for key, _value in keys),
    "refused",
)
"""The keys of a store's counts (every one starts at 0)."""


class StoreCounters(Collector):
    """The counts of every store of this process, by table, read at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[int, tuple[str, dict[str, int]]] = {}
        self._retired: dict[str, dict[str, int]] = {}
        # Tokens of stores gone: a finalizer may run inside any allocation (the collector's
        # own included), so it only appends here; the next register or scrape folds them.
        self._dead: deque[int] = deque()
        self._tokens = itertools.count()

    def register(self, owner: object, table: str) -> dict[str, int]:
        """New counts for ``owner`` (all 0), reported under ``table`` from now on, and
        after ``owner`` is gone too."""
        counts = dict.fromkeys(COUNT_KEYS, 0)
        token = next(self._tokens)
        with self._lock:
            self._fold_dead()
            self._live[token] = (table, counts)
        weakref.finalize(owner, self._dead.append, token)
        return counts

    def totals(self) -> dict[str, dict[str, int]]:
        """``{table: {count key: total}}`` over the live and the retired stores."""
        with self._lock:
            self._fold_dead()
            out = {table: dict(c) for table, c in self._retired.items()}
            live = list(self._live.values())
        for table, counts in live:
            into = out.setdefault(table, dict.fromkeys(COUNT_KEYS, 0))
            for key, n in list(counts.items()):
                into[key] += n
        return out

    def _fold_dead(self) -> None:
        # Under the lock: a store gone keeps its counts in its table's totals.
        while self._dead:
            entry = self._live.pop(self._dead.popleft(), None)
            if entry is None:
                continue
            table, counts = entry
            into = self._retired.setdefault(table, dict.fromkeys(COUNT_KEYS, 0))
            for key, n in counts.items():
                into[key] += n

    def collect(self) -> Iterator[CounterMetricFamily]:
        """The counted families, one sample per table (and label value)."""
        totals = self.totals()
        for name, doc, label, keys in _FAMILIES:
            family = CounterMetricFamily(
                name, doc, labels=["table"] if label is None else ["table", label]
            )
            for table, counts in totals.items():
                for key, value in keys:
                    family.add_metric([table] if label is None else [table, value], counts[key])
            yield family

    def describe(self) -> Iterator[CounterMetricFamily]:
        """The families' names (for the registry's duplicate check)."""
        for name, doc, label, _keys in _FAMILIES:
            yield CounterMetricFamily(
                name, doc, labels=["table"] if label is None else ["table", label]
            )


COUNTS = StoreCounters()
"""The stores' counts; registered on ``REGISTRY``."""
REGISTRY.register(COUNTS)
