"""State: a Redis read-through over PostgreSQL that is never staler than the database."""

from __future__ import annotations

from sheetanchor.state._breaker import CircuitBreaker
from sheetanchor.state._ids import uuid7
from sheetanchor.state._links import Links
from sheetanchor.state._reconcile import DriftReport, Reconciler
from sheetanchor.state._settings import (
    DEFAULT_CACHE_SETTINGS,
    CacheSettings,
    StoreClock,
    StoreHooks,
)
from sheetanchor.state._store import CachedStore, PgExecutor, StoreStats

__all__ = [
    "DEFAULT_CACHE_SETTINGS",
    "CacheSettings",
    "CachedStore",
    "CircuitBreaker",
    "DriftReport",
    "Links",
    "PgExecutor",
    "Reconciler",
    "StoreClock",
    "StoreHooks",
    "StoreStats",
    "uuid7",
]
