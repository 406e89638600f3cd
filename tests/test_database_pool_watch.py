"""The Database's pool does its checkout/checkin work itself (``WatchedPool``), not through
event listeners: what the listeners did still happens, a listener the application adds still
sees every checkout (the one-shot reads step aside for it), and the work survives
``engine.dispose()`` and a pool class chosen through ``engine_options``."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import asyncpg
import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.pool import AsyncAdaptedQueuePool

from sheetanchor.config import to_asyncpg_dsn
from sheetanchor.postgres import Database, PoolSettings
from sheetanchor.postgres._pool import IDLE_SINCE, HandoffQueue, WatchedPool

POOL = PoolSettings(size=1, max_overflow=0, timeout=0.5)


def _idle(pool: Any) -> list[Any]:
    """The connection records idle in ``pool``'s queue (the Database's, or SQLAlchemy's own)."""
    queue = pool._pool
    if isinstance(queue, HandoffQueue):
        return list(queue.idle)
    return list(queue._queue._queue)


async def _take_and_drop(db: Database, held: list[AsyncSession]) -> None:
    session = AsyncSession(db.engine())
    held.append(session)
    await session.execute(text("SELECT 1"))


async def test_no_pool_listener_runs_per_checkout_and_the_work_is_still_done(
    pg_url: str,
) -> None:
    db = Database(pg_url, pool=POOL)
    try:
        pool: Any = db.engine().sync_engine.pool
        assert isinstance(pool, WatchedPool)
        assert not pool.dispatch.checkout
        assert not pool.dispatch.checkin
        assert await db.fetchval("SELECT 1") == 1
        [rec] = _idle(pool)
        stamped = rec.info[IDLE_SINCE]
        async with db.session() as s:
            await s.execute(text("SELECT 1"))
            assert db._leaks.outstanding == 1  # the checkout is recorded
            assert db.stats().checked_out == 1
        assert db._leaks.outstanding == 0  # and forgotten on checkin
        assert rec.info[IDLE_SINCE] > stamped  # the idle stamp is renewed on checkin
    finally:
        await db.close()


@pytest.mark.parametrize("name", ["checkout", "checkin", "reset"])
async def test_a_pool_listener_sees_every_one_shot_read(pg_url: str, name: str) -> None:
    # The one-shot reads bypass SQLAlchemy's checkout machinery only while nobody listens.
    db = Database(pg_url, pool=POOL)
    try:
        assert await db.fetchval("SELECT 1") == 1
        pool = db.engine().sync_engine.pool
        seen: list[str] = []
        event.listen(pool, name, lambda *args: seen.append(name))
        for i in range(3):
            assert await db.fetchval("SELECT $1::int", i) == i
        assert seen == [name] * 3
        assert db.stats().checked_out == 0
    finally:
        await db.close()


@pytest.mark.filterwarnings("ignore:The garbage collector is trying to clean up")
async def test_checkouts_are_still_watched_after_engine_dispose(pg_url: str) -> None:
    db = Database(pg_url, pool=POOL, leak_threshold=None)
    try:
        old = db.engine().sync_engine.pool
        await db.engine().dispose()  # swaps in pool.recreate()
        pool: Any = db.engine().sync_engine.pool
        assert pool is not old
        assert isinstance(pool, WatchedPool)
        assert pool._sheetanchor_leaks is not None
        held: list[AsyncSession] = []
        await _take_and_drop(db, held)
        held.clear()  # dropped without close(): SQLAlchemy's "non-checked-in connection" case
        gc.collect()
        [report] = db.leak_reports()
        assert report.kind == "unreturned"
        assert "_take_and_drop" in [frame.function for frame in report.stack]
        assert await db.fetchval("SELECT 1") == 1  # the slot came back
    finally:
        await db.close()


@pytest.mark.filterwarnings("ignore:The garbage collector is trying to clean up")
async def test_a_pool_class_from_engine_options_is_still_watched(pg_url: str) -> None:
    db = Database(
        pg_url, pool=POOL, leak_threshold=None, engine_options={"poolclass": AsyncAdaptedQueuePool}
    )
    try:
        pool: Any = db.engine().sync_engine.pool
        assert not isinstance(pool, WatchedPool)
        assert await db.fetchval("SELECT 1") == 1  # no lease: the fairy path
        held: list[AsyncSession] = []
        await _take_and_drop(db, held)
        held.clear()  # dropped without close(): SQLAlchemy's "non-checked-in connection" case
        gc.collect()
        [report] = db.leak_reports()
        assert report.kind == "unreturned"
        assert "_take_and_drop" in [frame.function for frame in report.stack]
        assert db.stats().checked_out == 0
    finally:
        await db.close()


async def test_a_failed_reconnect_on_checkout_gives_the_slot_back(pg_url: str) -> None:
    # A connection found dead on checkout is replaced; when opening its replacement fails, the
    # caller gets the error and the pool keeps its slot (size 1: a lost slot is a PoolTimeout).
    db = Database(pg_url, pool=POOL, role="reconnect-fails")
    try:
        pid = await db.fetchval("SELECT pg_backend_pid()")
        pool: Any = db.engine().sync_engine.pool
        failures = [RuntimeError("cannot connect now")]

        def connect(dbapi_conn: Any, rec: Any) -> None:
            if failures:
                raise failures.pop()

        event.listen(pool, "connect", connect)
        admin = await asyncpg.connect(to_asyncpg_dsn(pg_url))
        try:
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
        async with asyncio.timeout(10):
            while not _idle(pool)[0].dbapi_connection.driver_connection.is_closed():
                await asyncio.sleep(0.01)  # until this loop has read the EOF
        with pytest.raises(RuntimeError, match="cannot connect now"):
            async with db.session() as s:
                await s.execute(text("SELECT 1"))
        assert not failures
        assert await db.fetchval("SELECT pg_backend_pid()") != pid
        async with db.session() as s:
            assert (await s.execute(text("SELECT 2"))).scalar() == 2
        stats = db.stats()
        assert (stats.checked_out, stats.leaks) == (0, 0)
    finally:
        await db.close()
