"""Prometheus metrics of the cached stores; the label ``table`` names the store, never a key."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from sheetanchor.observe import REGISTRY, metric_name

__all__ = [
    "BACKFILLS",
    "BACKFILLS_INFLIGHT",
    "BREAKER_OPEN",
    "CACHE",
    "DRIFT",
    "FENCE_REFUSED",
    "FLIGHTS",
    "LEASE",
    "PENDING",
    "PG_READS",
    "REDIS_ERRORS",
]

CACHE = Counter(
    metric_name("state", "cache_lookups", "total"),
    "Cache lookups by result: hit, miss, absent (cached absence), corrupt, skipped (breaker).",
    ["table", "result"],
    registry=REGISTRY,
)
PG_READS = Counter(
    metric_name("state", "pg_reads", "total"),
    "Reads of the source of truth made by the store (point or batch queries).",
    ["table"],
    registry=REGISTRY,
)
FENCE_REFUSED = Counter(
    metric_name("state", "fence_refused", "total"),
    "Cache sets refused because Redis already held a newer entry (or the read was too old).",
    ["table"],
    registry=REGISTRY,
)
LEASE = Counter(
    metric_name("state", "lease_events", "total"),
    "Load leases by outcome: acquired, waited (another holder filled), timeout (read PG).",
    ["table", "outcome"],
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
BACKFILLS = Counter(
    metric_name("state", "backfills", "total"),
    "Backfills of a miss by how they ran: background, inline (max_backfills pending, or 0), "
    "failed (an error other than Redis being down; logged, the lease released), dropped "
    "(the Redis client closed first, or cut short twice: the lease expires on its own).",
    ["table", "mode"],
    registry=REGISTRY,
)
BACKFILLS_INFLIGHT = Gauge(
    metric_name("state", "backfills_inflight"),
    "Backfills being written to Redis in the background now.",
    ["table"],
    registry=REGISTRY,
)
