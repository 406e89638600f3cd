"""Incident 001/003: connections the server dropped are replaced, not handed out.

``pg_terminate_backend`` on every pooled connection: the naive engine (no pre-ping) fails on
the next query; ``db.session()``, ``db.transaction()``, ``db.connection()`` and the one-shot
reads succeed without pinging on every checkout. The backends are terminated from a blocking
client, so this event loop does not run between the termination and the next query: it has
not read the server's goodbye yet (``is_closed()`` is still False), and only the checkout's
look at the socket can tell.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest
import sqlalchemy.exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from sheetanchor.config import to_sqlalchemy_url
from sheetanchor.postgres import Database, PoolSettings


def _terminate(pg_url: str, app_name: str) -> int:
    """Terminate every backend with ``app_name`` and wait until they are gone.

    Blocking on purpose: the calling loop does not run until this returns, and the next
    query follows at once (no sleep that would let the loop read the EOFs first).
    """
    with psycopg.connect(pg_url, autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = %s",
            (app_name,),
        ).fetchone()
        assert row is not None
        deadline = time.monotonic() + 10
        while True:
            left = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app_name,)
            ).fetchone()
            if left == (0,):
                break
            assert time.monotonic() < deadline, f"{app_name}: backends still there"
            time.sleep(0.01)
    killed: int = row[0]
    return killed


def _pids(pg_url: str, app_name: str) -> set[int]:
    with psycopg.connect(pg_url, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (app_name,)
        ).fetchall()
    return {pid for (pid,) in rows}


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
    assert _terminate(pg_url, "naive-terminate") == 3
    with pytest.raises(sqlalchemy.exc.DBAPIError):
        async with AsyncSession(engine) as s:
            await s.execute(text("SELECT 1"))
    await engine.dispose()


async def _via_session(db: Database) -> Any:
    async with db.session() as s:
        return (await s.execute(text("SELECT 1"))).scalar()


async def _via_transaction(db: Database) -> Any:
    async with db.transaction() as conn:
        return (await conn.execute(text("SELECT 1"))).scalar()


async def _via_connection(db: Database) -> Any:
    async with db.connection() as conn:
        return await conn.fetchval("SELECT 1")


async def _via_fetchval(db: Database) -> Any:
    return await db.fetchval("SELECT 1")


async def _via_fetchrow(db: Database) -> Any:
    row = await db.fetchrow("SELECT 1 AS one")
    return None if row is None else row["one"]


async def _via_fetch(db: Database) -> Any:
    return (await db.fetch("SELECT 1 AS one"))[0]["one"]


async def _via_execute(db: Database) -> Any:
    return 1 if await db.execute("SELECT 1") == "SELECT 1" else None


_PATHS: dict[str, Callable[[Database], Awaitable[Any]]] = {
    "session": _via_session,
    "transaction": _via_transaction,
    "connection": _via_connection,
    "fetchval": _via_fetchval,
    "fetchrow": _via_fetchrow,
    "fetch": _via_fetch,
    "execute": _via_execute,
}


@pytest.mark.parametrize("pre_ping_idle", [10.0, None], ids=["ping-idle-10s", "never-ping"])
@pytest.mark.parametrize("path", list(_PATHS))
async def test_database_survives_terminated_backends(
    pg_url: str, path: str, pre_ping_idle: float | None
) -> None:
    role = f"terminate-{path}"
    app_name = f"sheetanchor:{role}:{os.getpid()}"
    db = Database(
        pg_url, pool=PoolSettings(size=3, max_overflow=0, pre_ping_idle=pre_ping_idle), role=role
    )
    try:
        await _warm_engine(db.engine(), 3)
        assert db.stats().pool_size == 3
        before = _pids(pg_url, app_name)
        assert len(before) == 3
        assert _terminate(pg_url, app_name) == 3
        # At once: the loop has not run since the backends died.
        assert await _PATHS[path](db) == 1
        # Every other path works too, and the pool holds only new backends.
        for other in _PATHS.values():
            assert await other(db) == 1
        assert db.stats().checked_out == 0
        assert not (_pids(pg_url, app_name) & before)
    finally:
        await db.close()


@pytest.mark.parametrize("path", ["session", "connection", "fetchval"])
async def test_a_pool_class_of_the_application_gets_the_same_check(pg_url: str, path: str) -> None:
    # A pool class from engine_options does the checkout work through event listeners
    # (checkout_hook): the same look at the socket, the same outcome.
    role = f"terminate-plain-{path}"
    app_name = f"sheetanchor:{role}:{os.getpid()}"
    db = Database(
        pg_url,
        pool=PoolSettings(size=3, max_overflow=0),
        role=role,
        engine_options={"poolclass": AsyncAdaptedQueuePool},
    )
    try:
        await _warm_engine(db.engine(), 3)
        assert type(db.engine().sync_engine.pool) is AsyncAdaptedQueuePool
        assert _terminate(pg_url, app_name) == 3
        assert await _PATHS[path](db) == 1
        for other in _PATHS.values():
            assert await other(db) == 1
    finally:
        await db.close()


async def test_healthy_idle_connections_are_reused(pg_url: str) -> None:
    # The socket check does not mistake a healthy idle connection for a dead one: the same
    # backend serves every path in turn (no reconnect, no invalidation).
    db = Database(pg_url, pool=PoolSettings(size=1, max_overflow=0), role="reuse-idle")
    try:
        pid = await db.fetchval("SELECT pg_backend_pid()")
        for _ in range(3):
            for run in _PATHS.values():
                assert await run(db) == 1
        assert await db.fetchval("SELECT pg_backend_pid()") == pid
    finally:
        await db.close()


async def test_idle_connections_are_pinged(pg_url: str) -> None:
    # pre_ping_idle=0: every checkout pings; a dead connection is replaced before use even
    # when the loop has not seen its EOF yet.
    db = Database(pg_url, pool=PoolSettings(size=1, max_overflow=0, pre_ping_idle=0.0))
    first = await db.fetchval("SELECT pg_backend_pid()")
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (first,))
    second = await db.fetchval("SELECT pg_backend_pid()")
    assert second != first
    await db.close()
