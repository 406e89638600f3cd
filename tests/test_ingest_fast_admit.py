"""put_nowait's generated validate-and-admit path keeps every bound and decision of the full one.

The fast path appends within a budget computed by the full path (``refresh_budget``); these
tests drive records through it and check that the limits, the emergency spill, the flush
wake-ups, the counters and the precise validation errors are exactly those of the full path.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from _ingest_helpers import create_tick_table, table_name, tick, tick_stream
from sheetanchor.errors import BufferFull, RecordError
from sheetanchor.ingest import WriteBuffer
from sheetanchor.ingest._validate import Validator
from sheetanchor.postgres import Database, PoolSettings


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[Database]:
    database = Database(pg_url, pool=PoolSettings(size=4, max_overflow=2), name="ingest_fast")
    yield database
    await database.close()


async def wait_until(predicate: object, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.01)


async def test_fast_path_is_used_and_counts_every_record(db: Database, tmp_path: Path) -> None:
    table = table_name()
    await create_tick_table(db, table)
    stream = tick_stream(table, max_rows=1000, batch_rows=1000, flush_interval=3600.0)
    async with WriteBuffer(db, [stream], deadletter_dir=tmp_path, replay_interval=None) as buf:
        st = buf._states["ticks"]
        assert st.fast_admit is not None
        for i in range(300):
            buf.put_nowait("ticks", tick(i))
        # All but the first record (which set the budget up) took the generated path.
        assert st.fast_granted - st.fast_rows_left == 299
        assert buf.stats().rows_in == 300
        assert buf.stream_stats("ticks").buffered_rows == 300
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 300


async def test_fast_path_wakes_the_flusher_at_batch_rows_each_time(
    db: Database, tmp_path: Path
) -> None:
    """With a flush interval of an hour, only the batch_rows wake-up can write these rows."""
    table = table_name()
    await create_tick_table(db, table)
    stream = tick_stream(table, max_rows=10_000, batch_rows=100, flush_interval=3600.0)
    async with WriteBuffer(db, [stream], deadletter_dir=tmp_path, replay_interval=None) as buf:
        for rnd in range(3):
            for i in range(rnd * 100, rnd * 100 + 100):
                buf.put_nowait("ticks", tick(i))
            want = (rnd + 1) * 100
            await wait_until(lambda w=want: buf.stats().rows_written == w)  # type: ignore[misc]
        assert buf.stats().batches == 3


async def test_fast_path_stops_at_max_rows(db: Database, tmp_path: Path) -> None:
    table = table_name()
    await create_tick_table(db, table)
    stream = tick_stream(table, max_rows=50, batch_rows=50, flush_interval=3600.0)
    async with WriteBuffer(db, [stream], deadletter_dir=tmp_path, replay_interval=None) as buf:
        for i in range(50):
            buf.put_nowait("ticks", tick(i))  # no await: nothing can be flushed meanwhile
        with pytest.raises(BufferFull):
            buf.put_nowait("ticks", tick(50))
        assert buf.stream_stats("ticks").held_rows == 50
        assert buf.stats().rows_in == 50


async def test_fast_path_stops_at_max_bytes(db: Database, tmp_path: Path) -> None:
    table = table_name()
    await create_tick_table(db, table)
    size = Validator(tick_stream(table)).validate(tick(0))[1]
    stream = tick_stream(
        table,
        max_rows=1000,
        batch_rows=1000,
        max_bytes=size * 20 + size // 2,
        flush_interval=3600.0,
    )
    async with WriteBuffer(db, [stream], deadletter_dir=tmp_path, replay_interval=None) as buf:
        for i in range(20):
            buf.put_nowait("ticks", tick(i))
        with pytest.raises(BufferFull):
            buf.put_nowait("ticks", tick(20))
        assert buf.stream_stats("ticks").held_bytes <= stream.max_bytes
        assert buf.stats().rows_in == 20


async def test_best_effort_still_spills_past_the_emergency_watermark(
    db: Database, tmp_path: Path
) -> None:
    table = table_name()
    await create_tick_table(db, table)
    stream = tick_stream(
        table,
        kind="best_effort",
        max_rows=100,
        batch_rows=100,
        high_watermark=0.3,  # the flush is requested first, then the spill starts
        emergency_watermark=0.5,
        flush_interval=3600.0,
    )
    async with WriteBuffer(db, [stream], deadletter_dir=tmp_path, replay_interval=None) as buf:
        for i in range(80):
            buf.put_nowait("ticks", tick(i))  # no await in between: nothing is flushed
        s = buf.stream_stats("ticks")
        assert (s.buffered_rows, s.spill_rows) == (50, 30)
    assert buf.stats().rows_spilled == 30


async def test_a_bad_record_among_fast_ones_names_field_and_value(
    db: Database, tmp_path: Path
) -> None:
    table = table_name()
    await create_tick_table(db, table)
    stream = tick_stream(table, max_rows=1000, batch_rows=1000, flush_interval=3600.0)
    async with WriteBuffer(db, [stream], deadletter_dir=tmp_path, replay_interval=None) as buf:
        for i in range(10):
            buf.put_nowait("ticks", tick(i))
        bad = tick(10, symbol="S\x00X")
        with pytest.raises(RecordError) as info:
            buf.put_nowait("ticks", bad)
        assert info.value.field == "symbol"
        assert info.value.value == "S\x00X"
        wrong = dict(tick(11), volume=2**63)
        with pytest.raises(RecordError) as info:
            buf.put_nowait("ticks", wrong)
        assert (info.value.field, info.value.value) == ("volume", 2**63)
        for i in range(12, 20):
            buf.put_nowait("ticks", tick(i))
        stats = buf.stats()
        assert (stats.rows_in, stats.rows_rejected) == (18, 2)
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 18


async def test_a_size_wake_up_swaps_whole_batches_and_keeps_the_rest(
    db: Database, tmp_path: Path
) -> None:
    """Rows that arrive between the wake-up and the swap wait for the next batch."""
    table = table_name()
    await create_tick_table(db, table)
    stream = tick_stream(table, max_rows=10_000, batch_rows=100, flush_interval=3600.0)
    async with WriteBuffer(db, [stream], deadletter_dir=tmp_path, replay_interval=None) as buf:
        for i in range(250):  # no await: the flusher sees all 250 at once
            buf.put_nowait("ticks", tick(i))
        await wait_until(lambda: buf.stats().rows_written == 200)
        s = buf.stream_stats("ticks")
        assert (s.batches, s.buffered_rows, s.held_rows) == (2, 50, 50)
        for i in range(250, 300):
            buf.put_nowait("ticks", tick(i))
        await wait_until(lambda: buf.stats().rows_written == 300)
        assert buf.stats().batches == 3
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 300
