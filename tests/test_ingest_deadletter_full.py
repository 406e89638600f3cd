"""A full dead-letter store never hangs the buffer: the global write slots stay free for the
other streams, flush() returns, the unsaved rows stay counted and close() says so."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from _ingest_helpers import create_tick_table, table_name, tick, tick_stream
from sheetanchor.errors import DeadLetterFull
from sheetanchor.ingest import DeadLetterStore, WriteBuffer
from sheetanchor.ingest._journal import Journal
from sheetanchor.postgres import Database, PoolSettings


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[Database]:
    database = Database(pg_url, pool=PoolSettings(size=6, max_overflow=0), name="dl_full")
    yield database
    await database.close()


async def test_poison_with_a_full_store_blocks_neither_flush_nor_other_streams(
    db: Database, tmp_path: Path
) -> None:
    tables = [table_name() for _ in range(3)]
    for table in tables:
        await create_tick_table(db, table)
    streams = [
        tick_stream(table, name=f"s{i}", batch_rows=10, flush_interval=3600.0)
        for i, table in enumerate(tables)
    ]
    store = DeadLetterStore(tmp_path / "dl", max_bytes=1)  # takes nothing
    buffer = WriteBuffer(
        db, streams, deadletter=store, max_concurrency=2, replay_interval=None, close_timeout=5.0
    )
    await buffer.open()
    try:
        # Two streams with one poison row each (CHECK price >= 0): both would hold a global
        # slot forever while retrying the full store.
        for name in ("s0", "s1"):
            await buffer.put_many(name, [tick(i, price=-1.0 if i == 3 else 1.0) for i in range(10)])
        await buffer.flush()  # the poison rows are stranded, the slots released
        await buffer.put_many("s2", [tick(i) for i in range(10)])
        async with asyncio.timeout(60):
            await buffer.flush()
        assert await db.fetchval(f"SELECT count(*) FROM {tables[2]}") == 10
        for name, table in (("s0", tables[0]), ("s1", tables[1])):
            assert await db.fetchval(f"SELECT count(*) FROM {table}") == 9
            s = buffer.stream_stats(name)
            assert s.held_rows == 1  # the poison row: in memory, counted against the limit
            assert s.last_error is not None
            assert "DeadLetterFull" in s.last_error
    finally:
        with pytest.raises(DeadLetterFull, match="2 row"):
            await buffer.close()


async def test_stranded_rows_are_saved_once_the_store_has_room(
    db: Database, tmp_path: Path
) -> None:
    table = table_name()
    await create_tick_table(db, table)
    stream = tick_stream(table, batch_rows=10, flush_interval=0.05)
    store = DeadLetterStore(tmp_path / "dl", max_bytes=1)
    async with WriteBuffer(db, [stream], deadletter=store, replay_interval=None) as buffer:
        await buffer.put_many("ticks", [tick(i, price=-1.0 if i == 0 else 1.0) for i in range(10)])
        await buffer.flush()
        assert buffer.stream_stats("ticks").held_rows == 1
        store.max_bytes = 10**9
        async with asyncio.timeout(60):
            while buffer.stream_stats("ticks").held_rows:
                await asyncio.sleep(0.05)
        assert buffer.stream_stats("ticks").rows_quarantined == 1
    assert len(store.files("ticks", "poison")) == 1


class _FailsOnce(DeadLetterStore):
    """A real store whose first write fails with an unexpected error (a bug, not a full disk)."""

    failed = False

    def write(self, *args: Any, **kwargs: Any) -> Path:
        if not self.failed:
            self.failed = True
            raise RuntimeError("unexpected failure in the dead-letter layer")
        return super().write(*args, **kwargs)


async def test_an_unexpected_error_in_a_batch_does_not_pin_the_journal(
    db: Database, tmp_path: Path
) -> None:
    table = table_name()
    await create_tick_table(db, table)
    stream = tick_stream(table, batch_rows=10, flush_interval=0.05)
    store = _FailsOnce(tmp_path / "dl")
    async with WriteBuffer(
        db, [stream], deadletter=store, journal_dir=tmp_path / "j", replay_interval=None
    ) as buffer:
        # The poison row's quarantine fails unexpectedly: the batch must still resolve its
        # journal entry (its rows go to the dead letters), or the journal never shrinks.
        await buffer.put_many("ticks", [tick(i, price=-1.0 if i == 0 else 1.0) for i in range(10)])
        await buffer.flush()
        await buffer.put_many("ticks", [tick(i) for i in range(10, 30)])
        await buffer.flush()
    assert store.failed
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 29
    assert store.files("ticks", "failed")  # the first batch's rows, saved on disk
    journal = Journal(tmp_path / "j")
    try:
        assert journal.recover() == []
    finally:
        await journal.close()
