"""sheetanchor: a fault-tolerant async data layer over PostgreSQL and Redis.

The public API is what ``__all__`` lists (the README's API table names each one); everything
else is private and may change. Submodules hold the rest of each part: ``sheetanchor.postgres``,
``sheetanchor.redis``, ``sheetanchor.state``, ``sheetanchor.ingest``, ``sheetanchor.runtime``,
``sheetanchor.observe``, ``sheetanchor.retry``, ``sheetanchor.embedded``, ``sheetanchor.testing``.
"""

from __future__ import annotations

from sheetanchor.errors import (
    BudgetExceeded,
    BufferFull,
    CommitFailed,
    ConfigError,
    ConnectionLost,
    DeadLetterFull,
    EmbeddedServerError,
    NotReady,
    PoisonRecord,
    PoolTimeout,
    RecordError,
    ResourceClosed,
    SheetAnchorError,
    TransientError,
    VersionConflict,
    WrongEventLoop,
)
from sheetanchor.observe import configure_logging, timed
from sheetanchor.postgres import Database, DatabaseStats, LeakReport, PoolBudget, PoolSettings
from sheetanchor.retry import DEFAULT_POLICY, STARTUP_POLICY, RetryPolicy, is_transient
from sheetanchor.runtime import wait_for_postgres, wait_for_redis, wait_for_services

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_POLICY",
    "STARTUP_POLICY",
    "BudgetExceeded",
    "BufferFull",
    "CommitFailed",
    "ConfigError",
    "ConnectionLost",
    "Database",
    "DatabaseStats",
    "DeadLetterFull",
    "EmbeddedServerError",
    "LeakReport",
    "NotReady",
    "PoisonRecord",
    "PoolBudget",
    "PoolSettings",
    "PoolTimeout",
    "RecordError",
    "ResourceClosed",
    "RetryPolicy",
    "SheetAnchorError",
    "TransientError",
    "VersionConflict",
    "WrongEventLoop",
    "__version__",
    "configure_logging",
    "is_transient",
    "timed",
    "wait_for_postgres",
    "wait_for_redis",
    "wait_for_services",
]
