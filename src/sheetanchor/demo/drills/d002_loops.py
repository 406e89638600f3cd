"""Drill 002: a global engine used from a new event loop per task (Celery-style).

Naive: ``create_async_engine`` at import time, then one ``asyncio.run`` per task: the pooled
connections belong to the first loop, and the next loops fail with "Future attached to a
different loop" / "another operation is in progress".
sheetanchor: a module-level :class:`~sheetanchor.postgres.Database`: one engine per loop, each
disposed with its loop.
"""

from __future__ import annotations

import asyncio
import gc
import time
import warnings
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from sheetanchor.config import to_sqlalchemy_url
from sheetanchor.demo._drill import DemoContext, DrillResult
from sheetanchor.postgres import Database, PoolSettings

__all__ = ["DRILL", "LoopsDrill"]

RUNS = 5
_KINDS = ("attached to a different loop", "another operation is in progress")


def _naive(url: str) -> list[str]:
    naive = {"engine": create_async_engine(to_sqlalchemy_url(url), pool_size=2)}

    async def task() -> None:
        async with AsyncSession(naive["engine"]) as session:
            await session.execute(text("SELECT 1"))

    errors: list[str] = []
    with warnings.catch_warnings():
        # The naive engine's sockets outlive their loops; their ResourceWarnings are the
        # incident too, not noise we want in the demo output.
        warnings.simplefilter("ignore", ResourceWarning)
        for _ in range(RUNS):
            try:
                asyncio.run(task())
            except Exception as exc:  # noqa: BLE001 - counted and reported: that is the drill
                errors.append(f"{type(exc).__name__}: {exc}")
        naive["engine"].sync_engine.dispose(close=False)
        naive.clear()
        gc.collect()
    return errors


def _ours(url: str) -> tuple[list[str], dict[str, Any]]:
    db = Database(url, name="drill002", role="drill", pool=PoolSettings(size=2, max_overflow=0))

    async def task() -> None:
        async with db.session() as session:
            await session.execute(text("SELECT 1"))
        await db.fetchval("SELECT 1")

    errors: list[str] = []
    for _ in range(RUNS):
        try:
            asyncio.run(task())
        except Exception as exc:  # noqa: BLE001 - counted and reported: that is the drill
            errors.append(f"{type(exc).__name__}: {exc}")
    stats = db.stats()
    return errors, {
        "engines_alive": stats.engines_alive,
        "engines_disposed": stats.engines_disposed,
    }


class LoopsDrill:
    """Incident 002: "Future attached to a different loop"."""

    id = "002"
    title = "global engine used from a new event loop per task"

    async def run(self, ctx: DemoContext) -> DrillResult:
        """Run both halves, each in a worker thread (``asyncio.run`` needs a loop-free thread)."""
        url = await ctx.fresh_database("d002")
        naive_errors = await asyncio.to_thread(_naive, url)
        start = time.monotonic()
        our_errors, stats = await asyncio.to_thread(_ours, url)
        elapsed = time.monotonic() - start
        kinds = sorted({k for e in naive_errors for k in _KINDS if k in e})
        naive_failed = bool(naive_errors) and bool(kinds)
        ours_ok = not our_errors and stats["engines_alive"] == 0
        ours_ok = ours_ok and stats["engines_disposed"] == RUNS
        return DrillResult(
            drill=self.id,
            title=self.title,
            naive=f"{len(naive_errors)} of {RUNS} asyncio.run calls failed ({'; '.join(kinds)})",
            naive_failed=naive_failed,
            ours=(
                f"{len(our_errors)} of {RUNS} failed; {stats['engines_disposed']} engines, one "
                "per loop, each disposed with its loop"
            ),
            ours_ok=ours_ok,
            seconds=elapsed,
            details={
                "runs": RUNS,
                "naive_errors": [e[:200] for e in naive_errors],
                "our_errors": our_errors,
                **stats,
            },
        )


DRILL = LoopsDrill()
