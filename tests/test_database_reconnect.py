"""Incident 001/003: connections the server dropped are replaced, not handed out.

``pg_terminate_backend`` on every pooled connection: the naive engine (no pre-ping) fails on
the next query; ``db.session()`` and ``db.fetchval`` succeed without pinging on every checkout.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
import sqlalchemy.exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from sheetanchor.config import to_asyncpg_dsn, to_sqlalchemy_url
from sheetanchor.postgres import Database, PoolSettings


async def _terminate(pg_url: str, app_name: str) -> int:
    """Terminate every backend with ``app_name`` and wait until they are gone."""
    admin = await asyncpg.connect(to_asyncpg_dsn(pg_url))
    try:
        killed: int = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = $1",
            app_name,
        )
        async with asyncio.timeout(10):
            while await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app_name
            ):
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)  # let this loop read the EOFs
        return killed
    finally:
        await admin.close()


async def _warm_engine(engine: AsyncEngine, n: int) -> None:
    async def hold() -> None:
        async with AsyncSession(engine) as s:
            await s.execute(text("SELECT pg_sleep(0.05)"))

    await asyncio.gather(*(hold() for _ in range(n)))


async def test_naive_engine_fails_after_backends_are_terminated(pg_url: str) -> None:
    engine = create_async_engine(
        to_sqlalchemy_url(pg_url),
        pool_size=3,
        connect_args={"server_settings": {"application_name": "naive-terminate"}},
    )
    await _warm_engine(engine, 3)
    assert await _terminate(pg_url, "naive-terminate") == 3
    with pytest.raises(sqlalchemy.exc.DBAPIError):
        async with AsyncSession(engine) as s:
            await s.execute(text("SELECT 1"))
    await engine.dispose()


async def test_database_survives_terminated_backends(pg_url: str) -> None:
    db = Database(pg_url, pool=PoolSettings(size=3, max_overflow=0), role="terminate")
    app_name = f"sheetanchor:terminate:{__import__('os').getpid()}"
    await _warm_engine(db.engine(), 3)
    assert db.stats().pool_size == 3
    assert await _terminate(pg_url, app_name) == 3
    async with db.session() as s:
        assert (await s.execute(text("SELECT 1"))).scalar() == 1
    assert await db.fetchval("SELECT 2") == 2
    async with db.connection() as conn:
        assert await conn.fetchval("SELECT 3") == 3
    assert db.stats().checked_out == 0
    await db.close()


async def test_idle_connections_are_pinged(pg_url: str) -> None:
    # pre_ping_idle=0: every checkout pings; a dead connection is replaced before use even
    # when the loop has not seen its EOF yet.
    db = Database(pg_url, pool=PoolSettings(size=1, max_overflow=0, pre_ping_idle=0.0))
    first = await db.fetchval("SELECT pg_backend_pid()")
    admin = await asyncpg.connect(to_asyncpg_dsn(pg_url))
    try:
        await admin.execute("SELECT pg_terminate_backend($1)", first)
    finally:
        await admin.close()
    second = await db.fetchval("SELECT pg_backend_pid()")
    assert second != first
    await db.close()
