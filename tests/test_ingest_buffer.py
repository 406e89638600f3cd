"""WriteBuffer: bounds, waiting, spilling, isolation of slow streams, accounting (real PostgreSQL).

Incident 004: plain lists grew without bound when writes were slow, and one slow stream held
the rotation lock while writing, blocking all others. Each naive pattern is shown failing here
next to the WriteBuffer surviving it. Slow writes come from a real lock on the target table.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client import generate_latest

from _ingest_helpers import create_tick_table, fast_retry, table_name, tick, tick_stream
from sheetanchor.config import to_asyncpg_dsn
from sheetanchor.errors import BufferFull, ConfigError, RecordError, ResourceClosed
from sheetanchor.ingest import DeadLetterStore, Stream, WriteBuffer
from sheetanchor.observe import REGISTRY
from sheetanchor.postgres import Database, PoolSettings


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[Database]:
    database = Database(pg_url, pool=PoolSettings(size=6, max_overflow=2), name="ingest_buf")
    yield database
    await database.close()


@asynccontextmanager
async def locked(pg_url: str, table: str) -> AsyncIterator[None]:
    """Hold an ACCESS EXCLUSIVE lock on ``table``: every COPY into it waits (a slow stream)."""
    conn = await asyncpg.connect(to_asyncpg_dsn(pg_url))
    tr = conn.transaction()
    await tr.start()
    await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
    try:
        yield
    finally:
        await tr.rollback()
        await conn.close()


async def wait_until(predicate: Any, timeout: float = 30.0) -> None:
    """Poll ``predicate`` (generous timeout: never a timing assertion)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def lock_waiters(db: Database, table: str) -> int:
    return int(
        await db.fetchval(
            "SELECT count(*) FROM pg_locks WHERE relation = to_regclass($1) AND NOT granted", table
        )
    )


def test_stream_settings_are_validated_eagerly() -> None:
    cols = {"id": "int"}
    bad: list[dict[str, Any]] = [
        {"name": "bad name!"},
        {"table": "x; drop"},
        {"columns": {}},
        {"columns": {"id": "money"}},
        {"natural_key": ("nope",)},
        {"kind": "sometimes"},
        {"max_rows": 0},
        {"batch_rows": 10, "max_rows": 5},
        {"high_watermark": 0.95, "emergency_watermark": 0.9},
        {"emergency_watermark": 1.5},
        {"flush_interval": 0},
        {"nullable": ("id",)},
    ]
    for override in bad:
        kwargs: dict[str, Any] = {"name": "s", "table": "t", "columns": cols, "natural_key": "id"}
        kwargs.update(override)
        with pytest.raises(ConfigError):
            Stream(**kwargs)
    s = Stream("s", table="t", columns=cols, natural_key="id")
    assert s.natural_key == ("id",)
    with pytest.raises(ConfigError, match="used twice"):
        WriteBuffer(None, [s, s])  # type: ignore[arg-type]
    two = [s, Stream("u", table="t", columns=cols, natural_key="id", concurrency=4)]
    with pytest.raises(ConfigError, match="never block"):
        WriteBuffer(None, two, max_concurrency=4)  # type: ignore[arg-type]


async def test_put_rejects_bad_records_naming_stream_field_and_value(
    db: Database, tmp_path: Path
) -> None:
    table = table_name()
    await create_tick_table(db, table)
    async with WriteBuffer(
        db, [tick_stream(table)], deadletter_dir=tmp_path, replay_interval=None
    ) as buffer:
        cases = [
            ({k: v for k, v in tick(1).items() if k != "price"}, "price", "missing"),
            ({**tick(1), "price": "1.5"}, "price", "expected float"),
            ({**tick(1), "symbol": "A\x00B"}, "symbol", "NUL"),
            ({**tick(1), "volume": 2**63}, "volume", "out of range"),
            ({**tick(1), "ts": tick(1)["ts"].replace(tzinfo=None)}, "ts", "timezone"),
            ({**tick(1), "extra": 1}, "extra", "unknown"),
        ]
        for record, field, words in cases:
            with pytest.raises(RecordError, match=words) as info:
                buffer.put_nowait("ticks", record)
            assert info.value.stream == "ticks"
            assert info.value.field == field
            assert "ticks" in str(info.value)
        with pytest.raises(ConfigError, match="unknown stream"):
            buffer.put_nowait("nope", tick(1))
        assert buffer.stats().rows_rejected == len(cases)
    with pytest.raises(ResourceClosed):
        buffer.put_nowait("ticks", tick(1))


async def test_authoritative_put_waits_then_raises_buffer_full(
    db: Database, pg_url: str, tmp_path: Path
) -> None:
    table = table_name()
    await create_tick_table(db, table)
    stream = tick_stream(table, max_rows=10, batch_rows=5, put_timeout=0.2, flush_interval=0.05)
    async with WriteBuffer(db, [stream], deadletter_dir=tmp_path, replay_interval=None) as buffer:
        async with locked(pg_url, table):
            for i in range(10):
                buffer.put_nowait("ticks", tick(i))
            with pytest.raises(BufferFull, match="ticks"):
                buffer.put_nowait("ticks", tick(10))
            with pytest.raises(BufferFull, match="put_timeout"):
                await buffer.put("ticks", tick(10))
            assert buffer.stream_stats("ticks").held_rows == 10
            assert buffer.stream_stats("ticks").waits == 1
            # A producer that waits long enough gets in once the lock goes away.
            waiter = asyncio.create_task(buffer.put("ticks", tick(11)))
            await asyncio.sleep(0)
        object.__setattr__(stream, "put_timeout", 30.0)
        await asyncio.wait_for(waiter, 30)
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 11
    assert buffer.stats().rows_written == 11


async def test_best_effort_spills_past_emergency_watermark(
    db: Database, pg_url: str, tmp_path: Path
) -> None:
    table = table_name()
    await create_tick_table(db, table)
    stream = tick_stream(
        table,
        kind="best_effort",
        max_rows=100,
        batch_rows=20,
        high_watermark=0.2,
        emergency_watermark=0.5,
        flush_interval=0.05,
    )
    store = DeadLetterStore(tmp_path)
    offered = 1000
    peak = 0
    async with (
        WriteBuffer(db, [stream], deadletter=store, replay_interval=None) as buffer,
        locked(pg_url, table),
    ):
        i = 0
        while i < offered:
            try:
                await buffer.put("ticks", tick(i))
                i += 1
            except BufferFull:  # spill backlog full: the disk is behind; wait a little
                await asyncio.sleep(0.01)
            peak = max(peak, buffer.stream_stats("ticks").held_rows)
        await wait_until(lambda: buffer.stream_stats("ticks").spill_rows == 0)
        s = buffer.stream_stats("ticks")
        assert s.rows_spilled > 0
        assert s.rows_written == 0
    s = buffer.stream_stats("ticks")
    assert peak <= 100
    assert s.rows_in == offered
    assert s.rows_written + s.rows_spilled == offered
    spilled = sum(store.read(f.path).header["rows"] for f in store.files("ticks", "spilled"))
    assert spilled == s.rows_spilled
    # Nothing was lost: replaying the spill brings the table to every offered row, once.
    async with WriteBuffer(db, [stream], deadletter=store, replay_interval=None) as again:
        await again.replay()
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == offered
    assert store.files() == []


async def test_memory_stays_bounded_while_writes_are_blocked(
    db: Database, pg_url: str, tmp_path: Path
) -> None:
    """Offer many records while the table is locked: the buffer holds at most its bound."""
    table = table_name()
    await create_tick_table(db, table)
    stream = tick_stream(
        table, kind="best_effort", max_rows=2_000, batch_rows=500, emergency_watermark=0.8
    )
    offered = 100_000
    records = [tick(i) for i in range(offered)]

    # Naive: a plain list that keeps every record while the writer cannot write.
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        naive: list[tuple[Any, ...]] = []
        for r in records:
            naive.append(tuple(r.values()))
        naive_bytes = tracemalloc.get_traced_memory()[0] - base
        del naive
        async with (
            WriteBuffer(db, [stream], deadletter_dir=tmp_path, replay_interval=None) as buffer,
            locked(pg_url, table),
        ):
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            held_peak = 0
            for i, r in enumerate(records):
                while True:
                    try:
                        buffer.put_nowait("ticks", r)
                        break
                    except BufferFull:
                        await asyncio.sleep(0.005)
                if i % 100 == 0:
                    held_peak = max(held_peak, buffer.stream_stats("ticks").held_rows)
                    await asyncio.sleep(0)
            ours_bytes = tracemalloc.get_traced_memory()[1] - base
            s = buffer.stream_stats("ticks")
            assert s.held_bytes <= stream.max_bytes
    finally:
        tracemalloc.stop()
    assert held_peak <= stream.max_rows
    assert s.rows_in == offered
    # The naive list grows with what is offered; ours is flat (a loose bound, not a benchmark).
    assert ours_bytes < 6 * 1024 * 1024, ours_bytes
    assert naive_bytes > 3 * ours_bytes, (naive_bytes, ours_bytes)


async def test_a_slow_stream_never_blocks_another(
    db: Database, pg_url: str, tmp_path: Path
) -> None:
    slow_t, fast_t = table_name("slow"), table_name("fast")
    await create_tick_table(db, slow_t)
    await create_tick_table(db, fast_t)

    # Naive (incident 004): one rotation lock held while writing; the slow write blocks all.
    rotation = asyncio.Lock()

    async def naive_write(table: str, rows: list[dict[str, Any]]) -> None:
        async with rotation, db.connection() as conn:
            await conn.copy_records_to_table(table, records=[tuple(r.values()) for r in rows])

    async with locked(pg_url, slow_t):
        slow_task = asyncio.create_task(naive_write(slow_t, [tick(1)]))
        await wait_until(lambda: rotation.locked())
        fast_task = asyncio.create_task(naive_write(fast_t, [tick(2)]))
        async with asyncio.timeout(30):
            while await lock_waiters(db, slow_t) == 0:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert not fast_task.done()  # the fast stream is stuck behind the slow one's lock
    await asyncio.gather(slow_task, fast_task)
    await db.execute(f"TRUNCATE {slow_t}, {fast_t}")

    streams = [
        tick_stream(slow_t, name="slow", batch_rows=10, flush_interval=0.05),
        tick_stream(fast_t, name="fast", batch_rows=10, flush_interval=0.05),
    ]
    async with (
        WriteBuffer(db, streams, deadletter_dir=tmp_path, replay_interval=None) as buffer,
        locked(pg_url, slow_t),
    ):
        for i in range(50):
            await buffer.put("slow", tick(i))
        async with asyncio.timeout(30):
            while await lock_waiters(db, slow_t) == 0:
                await asyncio.sleep(0.01)
        for i in range(200):
            await buffer.put("fast", tick(i))
        await wait_until(lambda: buffer.stream_stats("fast").rows_written == 200)
        assert buffer.stream_stats("slow").rows_written == 0
    assert await db.fetchval(f"SELECT count(*) FROM {slow_t}") == 50
    assert await db.fetchval(f"SELECT count(*) FROM {fast_t}") == 200


async def test_close_flushes_and_stats_add_up(db: Database, tmp_path: Path) -> None:
    table = table_name()
    await create_tick_table(db, table)
    stream = tick_stream(table, flush_interval=60.0, batch_rows=1000)
    async with WriteBuffer(
        db, [stream], deadletter_dir=tmp_path, replay_interval=None, retry=fast_retry()
    ) as buffer:
        for i in range(123):
            buffer.put_nowait("ticks", tick(i))
        for i in range(100):  # the same records again: idempotent
            buffer.put_nowait("ticks", tick(i))
        assert buffer.stream_stats("ticks").buffered_rows == 223
    s = buffer.stats()
    assert s.rows_in == 223
    assert s.rows_written == 123
    assert s.rows_duplicate == 100
    assert s.held_rows == 0
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 123
    metrics = generate_latest(REGISTRY).decode()
    for name in (
        "sheetanchor_ingest_rows_in_total",
        "sheetanchor_ingest_rows_written_total",
        "sheetanchor_ingest_rows_duplicate_total",
        "sheetanchor_ingest_fill_ratio",
        "sheetanchor_ingest_held_rows",
        "sheetanchor_ingest_flush_seconds_count",
    ):
        assert f'{name}{{stream="ticks"}}' in metrics, name


async def test_close_past_its_deadline_dead_letters_what_is_unwritten(
    db: Database, pg_url: str, tmp_path: Path
) -> None:
    table = table_name()
    await create_tick_table(db, table)
    stream = tick_stream(table, batch_rows=10, flush_interval=0.02)
    store = DeadLetterStore(tmp_path)
    buffer = WriteBuffer(db, [stream], deadletter=store, replay_interval=None, close_timeout=0.3)
    await buffer.open()
    async with locked(pg_url, table):
        for i in range(100):
            buffer.put_nowait("ticks", tick(i))
        async with asyncio.timeout(30):
            while await lock_waiters(db, table) == 0:
                await asyncio.sleep(0.01)
        await buffer.close()  # the writes are stuck behind the lock: close gives up on them
    s = buffer.stream_stats("ticks")
    assert s.held_rows == 0
    assert s.rows_written == 0
    assert s.rows_failed == 100
    assert sum(store.read(f.path).header["rows"] for f in store.files()) == 100
    async with WriteBuffer(db, [stream], deadletter=store, replay_interval=None) as again:
        await again.replay()
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 100
