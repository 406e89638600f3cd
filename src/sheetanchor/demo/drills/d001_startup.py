"""Drill 001: the service starts before PostgreSQL is reachable.

The incident: a scheduler container ran ``create_tables`` the moment it started, before the
database accepted connections, crashed, and was restarted every 30 seconds. Here a fault
proxy refuses connections for the first seconds; the naive start-up creates its tables at
once and crashes; the sheetanchor start-up waits with bounded backoff, then creates them.
"""

from __future__ import annotations

import asyncio
import time

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from sheetanchor.config import parse_url, to_asyncpg_dsn, to_sqlalchemy_url
from sheetanchor.demo._drill import DemoContext, DrillResult
from sheetanchor.runtime import Attempt, wait_for_postgres

__all__ = ["DRILL", "StartupDrill"]

_metadata = sa.MetaData()
sa.Table(
    "jobs",
    _metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("name", sa.Text, nullable=False, unique=True),
)


async def _create_tables(url: str) -> None:
    """What the incident's scheduler did at start: connect and run DDL, no waiting."""
    engine = create_async_engine(to_sqlalchemy_url(url), poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_metadata.create_all)
    finally:
        await engine.dispose()


async def _table_exists(url: str) -> bool:
    import asyncpg

    conn = await asyncpg.connect(to_asyncpg_dsn(url))
    try:
        return bool(await conn.fetchval("SELECT to_regclass('public.jobs') IS NOT NULL"))
    finally:
        await conn.close()


class StartupDrill:
    """Drill 001 (see module docstring). ``outage`` is how long the database is unreachable."""

    id = "001"
    title = "start-up before the database is reachable"

    def __init__(self, *, outage: float = 2.0) -> None:
        self.outage = outage

    async def run(self, ctx: DemoContext) -> DrillResult:
        from sheetanchor.testing import FaultProxy

        url = await ctx.fresh_database("d001")
        parsed = parse_url(url)
        with FaultProxy(parsed.host or "127.0.0.1", parsed.port or 5432) as proxy:
            proxied = proxy.url(url)

            # Naive half: the database is not reachable yet; create tables at once.
            proxy.refuse()
            try:
                await _create_tables(proxied)
            except (OSError, sa.exc.SQLAlchemyError) as exc:
                naive, naive_failed = f"crashed at start: {type(exc).__name__}", True
            else:
                naive, naive_failed = "started (database was already up?)", False

            # sheetanchor half: same outage, restarted from the beginning.
            proxy.refuse()

            async def database_comes_up() -> None:
                await asyncio.sleep(self.outage)
                await asyncio.to_thread(proxy.pass_through)

            attempts: list[Attempt] = []
            started = time.monotonic()
            # The outage ends in a task of its own; its failure fails the drill (TaskGroup).
            async with asyncio.TaskGroup() as group:
                group.create_task(database_comes_up())
                await wait_for_postgres(proxied, timeout=30.0, on_attempt=attempts.append)
            await _create_tables(proxied)
            ready = time.monotonic() - started
        ok = await _table_exists(url)
        ours = (
            f"waited {len(attempts)} attempts, then created the schema"
            if ok
            else "schema missing after start-up"
        )
        return DrillResult(
            drill=self.id,
            title=self.title,
            naive=naive,
            naive_failed=naive_failed,
            ours=ours,
            ours_ok=ok and len(attempts) > 0,
            seconds=ready,
            details={"outage_seconds": self.outage, "failed_attempts": len(attempts)},
        )


DRILL = StartupDrill()
