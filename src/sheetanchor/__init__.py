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
    JournalError,
    JournalFull,
    NotReady,
    OperationTimeout,
    OutcomeUnknown,
    PoisonRecord,
    PoolTimeout,
    RecordError,
    ResourceClosed,
    SheetAnchorError,
    TransientError,
    VersionConflict,
    WrongEventLoop,
)
from sheetanchor.ingest import (
    DeadLetterStore,
    Stream,
    StreamStats,
    WriteBuffer,
    WriteBufferStats,
)
from sheetanchor.observe import configure_logging, timed
from sheetanchor.postgres import Database, DatabaseStats, LeakReport, PoolBudget, PoolSettings
from sheetanchor.redis import LuaScript, RedisClient, RedisStats
from sheetanchor.retry import DEFAULT_POLICY, STARTUP_POLICY, RetryPolicy, is_transient
from sheetanchor.runtime import wait_for_postgres, wait_for_redis, wait_for_services
from sheetanchor.state import (
    CachedStore,
    CacheSettings,
    CircuitBreaker,
    DriftReport,
    Links,
    Reconciler,
    StoreStats,
    uuid7,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_POLICY",
    "STARTUP_POLICY",
    "BudgetExceeded",
    "BufferFull",
    "CacheSettings",
    "CachedStore",
    "CircuitBreaker",
    "CommitFailed",
    "ConfigError",
    "ConnectionLost",
    "Database",
    "DatabaseStats",
    "DeadLetterFull",
    "DeadLetterStore",
    "DriftReport",
    "EmbeddedServerError",
    "JournalError",
    "JournalFull",
    "LeakReport",
    "Links",
    "LuaScript",
    "NotReady",
    "OperationTimeout",
    "OutcomeUnknown",
    "PoisonRecord",
    "PoolBudget",
    "PoolSettings",
    "PoolTimeout",
    "Reconciler",
    "RecordError",
    "RedisClient",
    "RedisStats",
    "ResourceClosed",
    "RetryPolicy",
    "SheetAnchorError",
    "StoreStats",
    "Stream",
    "StreamStats",
    "TransientError",
    "VersionConflict",
    "WriteBuffer",
    "WriteBufferStats",
    "WrongEventLoop",
    "__version__",
    "configure_logging",
    "is_transient",
    "timed",
    "uuid7",
    "wait_for_postgres",
    "wait_for_redis",
    "wait_for_services",
]
