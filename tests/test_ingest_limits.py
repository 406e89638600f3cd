"""Issue 5, item 2: the concurrency limits and the flush at the high watermark (real PostgreSQL).

Writers in flight are counted by PostgreSQL itself: the target tables are locked, so every
batch write that got a write slot waits in the server for the lock, and ``pg_locks`` shows
one waiting backend per writer. With more batches ready than slots, the count reaches the
limit and never passes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from _ingest_helpers import create_tick_table, table_name, tick, tick_stream
from sheetanchor.config import to_asyncpg_dsn
from sheetanchor.ingest import WriteBuffer
from sheetanchor.postgres import Database, PoolSettings

SAMPLE_SECONDS = 1.5  # how long the count of writers is watched once the limit is reached


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[Database]:
    database = Database(pg_url, pool=PoolSettings(size=10, max_overflow=4), name="ingest_lim")
    yield database
    await database.close()


@asynccontextmanager
async def locked(pg_url: str, tables: Sequence[str]) -> AsyncIterator[None]:
    """ACCESS EXCLUSIVE locks on ``tables``: every write into them waits in the server."""
    conn = await asyncpg.connect(to_asyncpg_dsn(pg_url))
    tr = conn.transaction()
    await tr.start()
    await conn.execute(f"LOCK TABLE {', '.join(tables)} IN ACCESS EXCLUSIVE MODE")
    try:
        yield
    finally:
        await tr.rollback()
        await conn.close()


async def waiting_writers(pg_url: str, tables: Sequence[str]) -> int:
    """Backends waiting for a lock on ``tables``: the batch writes in flight."""
    conn = await asyncpg.connect(to_asyncpg_dsn(pg_url))
    try:
        return int(
            await conn.fetchval(
                "SELECT count(DISTINCT pid) FROM pg_locks WHERE NOT granted AND relation IN "
                "(SELECT to_regclass(t) FROM unnest($1::text[]) AS t)",
                list(tables),
            )
        )
    finally:
        await conn.close()


async def until(predicate: Any, timeout: float = 30.0) -> None:
    """Poll ``predicate`` (a generous bound: never a timing assertion)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def until_writers(pg_url: str, tables: Sequence[str], n: int) -> None:
    async with asyncio.timeout(30):
        while await waiting_writers(pg_url, tables) < n:
            await asyncio.sleep(0.02)


async def most_writers(pg_url: str, tables: Sequence[str], check: Any) -> int:
    """The most writers seen at once over ``SAMPLE_SECONDS``; ``check()`` runs each sample."""
    loop = asyncio.get_running_loop()
    end = loop.time() + SAMPLE_SECONDS
    most = 0
    while loop.time() < end:
        most = max(most, await waiting_writers(pg_url, tables))
        check()
        await asyncio.sleep(0.05)
    return most


async def test_no_more_than_max_concurrency_batches_are_written_at_once(
    db: Database, pg_url: str, tmp_path: Path
) -> None:
    tables = [table_name(f"glob{i}") for i in range(4)]
    for t in tables:
        await create_tick_table(db, t)
    # Four streams may write two batches each (8 wanted at once); the buffer allows 3.
    streams = [
        tick_stream(t, name=f"s{i}", batch_rows=10, flush_interval=0.05, concurrency=2)
        for i, t in enumerate(tables)
    ]
    names = [s.name for s in streams]
    async with WriteBuffer(
        db, streams, deadletter_dir=tmp_path, replay_interval=None, max_concurrency=3
    ) as buf:
        async with locked(pg_url, tables):
            for round_ in range(2):  # two swaps per stream: each stream wants both its slots
                for name in names:
                    for i in range(10):
                        buf.put_nowait(name, tick(round_ * 10 + i))
                await until(
                    lambda r=round_: all(
                        buf.stream_stats(n).inflight_rows >= 10 * (r + 1) for n in names
                    )
                )
            await until_writers(pg_url, tables, 3)

            def demand() -> None:
                # Eight batches are swapped out and waiting to be written all along.
                assert all(buf.stream_stats(n).inflight_rows == 20 for n in names)

            assert await most_writers(pg_url, tables, demand) == 3
            assert buf.stats().rows_written == 0
        await buf.flush()
        assert buf.stats().rows_written == 80
    for t in tables:
        assert await db.fetchval(f"SELECT count(*) FROM {t}") == 20


async def test_no_more_than_stream_concurrency_batches_of_a_stream_at_once(
    db: Database, pg_url: str, tmp_path: Path
) -> None:
    table = table_name("per")
    await create_tick_table(db, table)
    stream = tick_stream(table, batch_rows=10, flush_interval=0.05, concurrency=2)
    async with WriteBuffer(
        db, [stream], deadletter_dir=tmp_path, replay_interval=None, max_concurrency=4
    ) as buf:
        async with locked(pg_url, [table]):
            for n in (1, 2):  # one swap at a time: each waits in the server
                for i in range(10):
                    buf.put_nowait("ticks", tick((n - 1) * 10 + i))
                await until_writers(pg_url, [table], n)
            for i in range(20, 30):  # a third batch, ready but without a stream slot
                buf.put_nowait("ticks", tick(i))

            def demand() -> None:
                s = buf.stream_stats("ticks")
                assert s.inflight_rows == 20
                assert s.buffered_rows == 10  # waits for one of the stream's two slots

            assert await most_writers(pg_url, [table], demand) == 2
        await buf.flush()
        assert buf.stats().rows_written == 30
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 30


@pytest.mark.parametrize("how", ["put", "put_nowait"])
async def test_a_flush_starts_when_the_fill_passes_the_high_watermark(
    db: Database, tmp_path: Path, how: str
) -> None:
    table = table_name("hwm")
    await create_tick_table(db, table)
    # The high watermark is at 500 rows: below batch_rows (800), and the interval is an
    # hour, so neither the size nor the interval can be what starts the flush.
    stream = tick_stream(
        table,
        max_rows=1000,
        max_bytes=1 << 30,
        high_watermark=0.5,
        emergency_watermark=0.9,
        batch_rows=800,
        flush_interval=3600.0,
    )

    async def put(i: int) -> None:
        if how == "put":
            await buf.put("ticks", tick(i))
        else:
            buf.put_nowait("ticks", tick(i))

    async with WriteBuffer(db, [stream], deadletter_dir=tmp_path, replay_interval=None) as buf:
        for i in range(499):  # fill 0.499: below the watermark
            await put(i)
        await asyncio.sleep(0.5)  # room for a flush that should not happen
        s = buf.stream_stats("ticks")
        assert (s.batches, s.rows_written, s.buffered_rows) == (0, 0, 499)
        assert s.fill < 0.5

        for i in range(499, 502):  # fill 0.502: past the watermark
            await put(i)

        # Written, and the swap's in-flight accounting done (it follows the count a moment
        # later).
        def landed() -> bool:
            s = buf.stream_stats("ticks")
            return s.rows_written == 502 and s.held_rows == 0

        await until(landed)
        s = buf.stream_stats("ticks")
        assert s.batches == 1  # one flush took it all, long before the interval
        assert await db.fetchval(f"SELECT count(*) FROM {table}") == 502
