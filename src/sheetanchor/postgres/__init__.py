"""PostgreSQL: loop-aware Database, pool budgets, PgBouncer mode."""

from __future__ import annotations

from sheetanchor.postgres._budget import PoolBudget

__all__ = ["PoolBudget"]
