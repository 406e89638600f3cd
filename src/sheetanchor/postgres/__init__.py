"""PostgreSQL: a loop-aware, fork-safe ``Database`` that never leaks a connection.

Public names: :class:`Database`, :class:`PoolSettings`, :class:`DatabaseStats`,
:class:`LeakReport`, :class:`PoolBudget` (pool sizes within ``max_connections``) and the
``DEFAULT_*`` settings.
"""

from __future__ import annotations

from sheetanchor.postgres._budget import PoolBudget
from sheetanchor.postgres._database import Database
from sheetanchor.postgres._leaks import LeakReport, StackFrame
from sheetanchor.postgres._settings import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT,
    DEFAULT_LEAK_THRESHOLD,
    DEFAULT_STATEMENT_TIMEOUT,
    PoolSettings,
)
from sheetanchor.postgres._stats import DatabaseStats

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT",
    "DEFAULT_LEAK_THRESHOLD",
    "DEFAULT_STATEMENT_TIMEOUT",
    "Database",
    "DatabaseStats",
    "LeakReport",
    "PoolBudget",
    "PoolSettings",
    "StackFrame",
]
