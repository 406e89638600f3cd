"""WriteBuffer wiring: the disk journal, quality checks at put, the bounded tail."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from _ingest_helpers import create_tick_table, table_name, tick, tick_stream
from sheetanchor.errors import ConfigError, RecordError
from sheetanchor.ingest import WriteBuffer
from sheetanchor.ingest._journal import Journal
from sheetanchor.ingest.quality import ZeroVolume
from sheetanchor.observe import REGISTRY
from sheetanchor.postgres import Database, PoolSettings


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[Database]:
    database = Database(pg_url, pool=PoolSettings(size=4, max_overflow=0), name="ingest_wiring")
    yield database
    await database.close()


async def test_journaled_puts_land_and_the_journal_is_committed(
    db: Database, tmp_path: Path
) -> None:
    table = table_name()
    await create_tick_table(db, table)
    stream = tick_stream(table, batch_rows=50, flush_interval=0.05)
    async with WriteBuffer(
        db,
        [stream],
        deadletter_dir=tmp_path / "dl",
        journal_dir=tmp_path / "j",
        replay_interval=None,
    ) as buffer:
        with pytest.raises(ConfigError, match=r"await buffer\.put"):
            buffer.put_nowait("ticks", tick(0))
        for i in range(120):
            await buffer.put("ticks", tick(i))
        await buffer.put_many("ticks", [tick(i) for i in range(120, 400)])
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 400
    journal = Journal(tmp_path / "j")
    try:
        assert journal.recover() == []  # everything written was committed in the journal
    finally:
        await journal.close()


async def test_open_recovers_what_the_journal_never_committed(db: Database, tmp_path: Path) -> None:
    table = table_name()
    await create_tick_table(db, table)
    stream = tick_stream(table)
    # A producer that appended and died before its rows reached PostgreSQL.
    journal = Journal(tmp_path / "j")
    await journal.append("ticks", [tick(i) for i in range(30)])
    await journal.close()
    async with WriteBuffer(
        db,
        [stream],
        deadletter_dir=tmp_path / "dl",
        journal_dir=tmp_path / "j",
        replay_interval=None,
    ):
        pass
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 30
    journal = Journal(tmp_path / "j")
    try:
        assert journal.recover() == []
    finally:
        await journal.close()


async def test_quality_checks_count_or_reject_and_tail_is_bounded(
    db: Database, tmp_path: Path
) -> None:
    table = table_name()
    await create_tick_table(db, table)
    flagged = tick_stream(table, checks=[ZeroVolume()], tail_rows=5)
    strict = tick_stream(table, name="strict", checks=[ZeroVolume(reject=True)])
    async with WriteBuffer(
        db, [flagged, strict], deadletter_dir=tmp_path, replay_interval=None
    ) as buffer:
        for i in range(10):
            buffer.put_nowait("ticks", tick(i))  # tick(0) has volume 0: counted, still written
        with pytest.raises(RecordError):
            buffer.put_nowait("strict", tick(0, symbol="Z"))
        assert [r["volume"] for r in buffer.tail("ticks", 3)] == [7, 8, 9]
        assert len(buffer.tail("ticks", 100)) == 5
        with pytest.raises(ConfigError, match="tail_rows"):
            buffer.tail("strict", 1)
    assert buffer.stream_stats("ticks").rows_written == 10
    assert buffer.stream_stats("strict").rows_rejected == 1


async def test_put_from_another_thread_is_a_clear_error(db: Database, tmp_path: Path) -> None:
    import asyncio

    from sheetanchor.errors import WrongEventLoop

    table = table_name()
    await create_tick_table(db, table)
    async with WriteBuffer(
        db, [tick_stream(table)], deadletter_dir=tmp_path, replay_interval=None
    ) as buffer:
        with pytest.raises(WrongEventLoop, match="event loop"):
            await asyncio.to_thread(buffer.put_nowait, "ticks", tick(1))
        assert buffer.stream_stats("ticks").rows_in == 0


async def test_each_swap_is_timed_as_a_phase(db: Database, tmp_path: Path) -> None:
    table = table_name()
    await create_tick_table(db, table)
    labels = {"part": "ingest", "phase": "write_batch"}

    def count() -> float:
        value = REGISTRY.get_sample_value("sheetanchor_phase_duration_seconds_count", labels)
        return value or 0.0

    before = count()
    stream = tick_stream(table, flush_interval=3600.0)
    async with WriteBuffer(
        db, [stream], deadletter_dir=tmp_path / "dl", replay_interval=None
    ) as buffer:
        for swap in range(3):
            for i in range(10):
                buffer.put_nowait("ticks", tick(swap * 10 + i))
            await buffer.flush()
    assert count() - before == 3
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 30
