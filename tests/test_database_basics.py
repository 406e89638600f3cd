"""Database: sessions, transactions, raw connections, settings validation (real PostgreSQL)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from sheetanchor.config import to_sqlalchemy_url
from sheetanchor.errors import ConfigError, WrongEventLoop
from sheetanchor.postgres import Database, PoolSettings
from sheetanchor.postgres._pool import checkout_without_io


def _boom() -> None:
    raise RuntimeError("boom")


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[Database]:
    database = Database(pg_url, pool=PoolSettings(size=2, max_overflow=1), name="basics")
    await database.execute("CREATE TABLE IF NOT EXISTS items (id int PRIMARY KEY, doc jsonb)")
    await database.execute("TRUNCATE items")
    yield database
    await database.close()


async def test_session_commits_on_success(db: Database) -> None:
    async with db.session() as s:
        await s.execute(text("INSERT INTO items (id) VALUES (1)"))
    assert await db.fetchval("SELECT count(*) FROM items") == 1


async def test_session_rolls_back_on_error(db: Database) -> None:
    async def failing() -> None:
        async with db.session() as s:
            await s.execute(text("INSERT INTO items (id) VALUES (2)"))
            _boom()

    with pytest.raises(RuntimeError, match="boom"):
        await failing()
    assert await db.fetchval("SELECT count(*) FROM items") == 0
    assert db.stats().checked_out == 0


async def test_transaction_commits_and_rolls_back(db: Database) -> None:
    async with db.transaction() as conn:
        await conn.execute(text("INSERT INTO items (id) VALUES (3)"))

    async def failing() -> None:
        async with db.transaction() as conn:
            await conn.execute(text("INSERT INTO items (id) VALUES (4)"))
            _boom()

    with pytest.raises(RuntimeError, match="boom"):
        await failing()
    assert await db.fetch("SELECT id FROM items ORDER BY id") == [(3,)]


async def test_raw_connection_is_from_the_pool_and_rolled_back(db: Database) -> None:
    async with db.connection() as conn:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("INSERT INTO items (id) VALUES (5)")
        # left open on purpose: the pool must roll it back
    assert await db.fetchval("SELECT count(*) FROM items") == 0
    stats = db.stats()
    assert (stats.checked_out, stats.pool_size) == (0, 1)


async def test_hot_reads(db: Database) -> None:
    assert await db.fetchval("SELECT $1::int * 2", 21) == 42
    row = await db.fetchrow("SELECT 1 AS a, 'x' AS b")
    assert row is not None
    assert dict(row) == {"a": 1, "b": "x"}
    assert await db.execute("INSERT INTO items (id) VALUES (6)") == "INSERT 0 1"


async def test_connection_settings_are_applied(db: Database) -> None:
    name = await db.fetchval("SELECT current_setting('application_name')")
    import os

    assert name == f"sheetanchor:app:{os.getpid()}"
    assert await db.fetchval("SELECT current_setting('statement_timeout')") == "30s"
    idle = await db.fetchval("SELECT current_setting('idle_in_transaction_session_timeout')")
    assert idle == "1min"


def test_engine_needs_a_running_loop(pg_url: str) -> None:
    with pytest.raises(WrongEventLoop):
        Database(pg_url).engine()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"size": 0}, "size"),
        ({"max_overflow": -1}, "max_overflow"),
        ({"timeout": 0}, "timeout"),
        ({"recycle": float("nan")}, "recycle"),
        ({"pre_ping_idle": -1.0}, "pre_ping_idle"),
        ({"size": True}, "size"),
    ],
)
def test_pool_settings_validate_eagerly(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        PoolSettings(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"statement_timeout": -1}, "statement_timeout"),
        ({"connect_timeout": 0}, "connect_timeout"),
        ({"leak_threshold": "soon"}, "leak_threshold"),
        ({"role": "a:b"}, "role"),
        ({"pgbouncer": "yes"}, "pgbouncer"),
    ],
)
def test_database_validates_eagerly(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Database("postgresql://u@127.0.0.1/db", **kwargs)  # type: ignore[arg-type]


def test_database_needs_a_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHEETANCHOR_PG_URL", raising=False)
    with pytest.raises(ConfigError, match="SHEETANCHOR_PG_URL"):
        Database()


def test_repr_masks_the_password() -> None:
    db = Database("postgresql://app:s3cret@127.0.0.1:5432/x")
    assert "s3cret" not in repr(db)


def test_global_database_across_asyncio_run(pg_url: str) -> None:
    db = Database(pg_url, pool=PoolSettings(size=1, max_overflow=0))

    async def use() -> int:
        value: int = await db.fetchval("SELECT 1")
        async with db.session() as s:
            await s.execute(text("SELECT 1"))
        return value

    assert [asyncio.run(use()) for _ in range(5)] == [1] * 5
    stats = db.stats()
    assert (stats.engines_alive, stats.engines_disposed) == (0, 5)


async def test_overflow_connections_are_closed_on_return(pg_url: str) -> None:
    db = Database(pg_url, pool=PoolSettings(size=1, max_overflow=1), name="overflow")
    held = asyncio.Event()

    async def hold() -> None:
        async with db.connection() as conn:
            await conn.fetchval("SELECT 1")
            await held.wait()

    task = asyncio.create_task(hold())
    async with asyncio.timeout(10):
        while db.stats().checked_out < 1:
            await asyncio.sleep(0.01)
    assert await db.fetchval("SELECT 2") == 2  # served by the overflow connection
    held.set()
    await task
    stats = db.stats()
    # The overflow connection was closed on return (the greenlet path), the other kept.
    assert (stats.pool_size, stats.idle, stats.checked_out, stats.overflow) == (1, 1, 0, 0)
    await db.close()


async def test_stats_show_overflow_and_waiting_tasks_under_contention(pg_url: str) -> None:
    # size 1 + overflow 1, both held: a third session waits. stats() counts the overflow
    # connection and the waiting task, and both fall back to 0 when the holders let go.
    db = Database(pg_url, pool=PoolSettings(size=1, max_overflow=1, timeout=10), name="busy")
    release = asyncio.Event()

    async def hold() -> int:
        async with db.session() as s:
            value = (await s.execute(text("SELECT 1"))).scalar_one()
            await release.wait()
        return int(value)

    holders = [asyncio.create_task(hold()) for _ in range(2)]
    async with asyncio.timeout(10):
        while db.stats().checked_out < 2:
            await asyncio.sleep(0.01)
    waiter = asyncio.create_task(db.fetchval("SELECT 3"))
    async with asyncio.timeout(10):
        while db.stats().waiting < 1:
            await asyncio.sleep(0.01)
    busy = db.stats()
    assert (busy.checked_out, busy.overflow, busy.waiting, busy.idle) == (2, 1, 1, 0)
    assert not waiter.done()
    release.set()
    assert await asyncio.gather(*holders) == [1, 1]
    assert await waiter == 3
    calm = db.stats()
    assert (calm.checked_out, calm.overflow, calm.waiting) == (0, 0, 0)
    await db.close()


@pytest.mark.parametrize(
    ("option", "field"),
    [("pool_pre_ping", "pre_ping_idle"), ("pool_size", "size"), ("pool_recycle", "recycle")],
)
def test_pool_options_in_engine_options_are_refused(option: str, field: str) -> None:
    # pool_pre_ping=True used to break every fast-path read after the first (MissingGreenlet).
    with pytest.raises(ConfigError, match=rf"{option}.*PoolSettings\({field}="):
        Database("postgresql://u@127.0.0.1/db", engine_options={option: True})


async def test_fast_checkout_declines_a_pool_that_pre_pings(pg_url: str) -> None:
    # A pre-pinging pool needs I/O on every checkout: the greenlet-free path must not take it.
    engine = create_async_engine(to_sqlalchemy_url(pg_url), pool_size=1, pool_pre_ping=True)
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))  # leaves one idle connection in the pool
        assert checkout_without_io(engine.sync_engine.pool, None) is None
    finally:
        await engine.dispose()


async def test_a_read_running_through_engine_dispose_returns_to_the_live_pool(
    pg_url: str,
) -> None:
    # engine.dispose() swaps in a new pool. A one-shot read that was running then must not
    # keep its connection in the old pool, where later reads would reuse it uncounted and
    # close() would never close it; it is closed when it comes back.
    db = Database(pg_url, pool=PoolSettings(size=2, max_overflow=0), role="dispose-race")
    app = await db.fetchval("SELECT current_setting('application_name')")
    assert app.startswith("sheetanchor:dispose-race:")
    try:
        slow = asyncio.create_task(db.fetchval("SELECT pg_sleep(0.3)"))  # leased: idle conn
        await asyncio.sleep(0.1)
        await db.engine().dispose()
        await slow
        for _ in range(3):
            assert await db.fetchval("SELECT 1") == 1
        assert db.stats().pool_size >= 1  # the connection in use is the live pool's
    finally:
        await db.close()
    async with Database(pg_url, name="observer") as watcher:
        left = None
        for _ in range(40):
            left = await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app
            )
            if left == 0:
                break
            await asyncio.sleep(0.05)
        assert left == 0, f"{left} backend(s) of a closed Database still connected"
