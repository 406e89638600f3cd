"""sheetanchor: a fault-tolerant async data layer over PostgreSQL and Redis.

The public API is what ``__all__`` lists; everything else is private and may change.
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

__version__ = "0.1.0"

__all__ = [
    "BudgetExceeded",
    "BufferFull",
    "CommitFailed",
    "ConfigError",
    "ConnectionLost",
    "DeadLetterFull",
    "EmbeddedServerError",
    "NotReady",
    "PoisonRecord",
    "PoolTimeout",
    "RecordError",
    "ResourceClosed",
    "SheetAnchorError",
    "TransientError",
    "VersionConflict",
    "WrongEventLoop",
    "__version__",
]
