"""Journaled puts of one stream share journal appends (group append), and each put still
returns only once its own record is durable; a group the journal refuses fails every put of
it and gives their room back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from _ingest_helpers import create_tick_table, table_name, tick, tick_stream
from sheetanchor.errors import JournalFull, ResourceClosed
from sheetanchor.ingest import WriteBuffer
from sheetanchor.ingest._journal import Journal
from sheetanchor.postgres import Database, PoolSettings


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[Database]:
    database = Database(pg_url, pool=PoolSettings(size=4, max_overflow=0), name="ingest_group")
    yield database
    await database.close()


class _CountingJournal(Journal):
    """A real journal that counts its append calls and the records they carried."""

    calls: list[int]

    async def append(self, stream: str, records: Sequence[Mapping[str, Any]]) -> int:
        self.calls.append(len(records))
        return await super().append(stream, records)

    async def append_rows(
        self, stream: str, fields: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> int:
        self.calls.append(len(rows))
        return await super().append_rows(stream, fields, rows)


@pytest.mark.parametrize("fsync", ["batch", "never", "always"])
async def test_concurrent_puts_share_appends_and_return_once_durable(
    db: Database, tmp_path: Path, fsync: Any
) -> None:
    table = table_name()
    await create_tick_table(db, table)
    journal = _CountingJournal(tmp_path / "j", fsync=fsync)
    journal.calls = []
    producers, per_producer = 40, 5
    late: list[tuple[int, int]] = []
    returned = 0
    stream = tick_stream(table, batch_rows=50, flush_interval=0.05)
    async with WriteBuffer(
        db, [stream], deadletter_dir=tmp_path / "dl", journal=journal, replay_interval=None
    ) as buffer:

        async def producer(p: int) -> None:
            nonlocal returned
            for k in range(per_producer):
                await buffer.put("ticks", tick(p * per_producer + k))
                returned += 1
                # Durable: every record whose put returned is written by the journal.
                written = journal.stats().records_appended
                if written < returned:
                    late.append((returned, written))

        await asyncio.gather(*(producer(p) for p in range(producers)))
    total = producers * per_producer
    assert late == []
    assert sum(journal.calls) == total
    # Concurrent puts were coalesced: far fewer appends than records.
    assert len(journal.calls) <= total // 10
    assert max(journal.calls) == producers
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == total
    reopened = Journal(tmp_path / "j")
    try:
        assert reopened.recover() == []
    finally:
        await reopened.close()


async def test_a_group_the_journal_refuses_fails_each_put_and_frees_its_room(
    db: Database, tmp_path: Path
) -> None:
    table = table_name()
    await create_tick_table(db, table)
    # Room for a few records only: a burst of concurrent puts overflows it in one group.
    journal = Journal(tmp_path / "j", segment_bytes=400, max_bytes=800)
    stream = tick_stream(table, batch_rows=1000, max_rows=1000, flush_interval=3600.0)
    async with WriteBuffer(
        db, [stream], deadletter_dir=tmp_path / "dl", journal=journal, replay_interval=None
    ) as buffer:
        results = await asyncio.gather(
            *(buffer.put("ticks", tick(i)) for i in range(20)), return_exceptions=True
        )
        assert all(isinstance(r, JournalFull) for r in results), results
        stats = buffer.stream_stats("ticks")
        # Nothing was accepted and the reserved room was given back.
        assert (stats.held_rows, stats.held_bytes, stats.rows_in) == (0, 0, 0)
        # The next (smaller) group is taken.
        await buffer.put("ticks", tick(100))
        assert buffer.stream_stats("ticks").rows_in == 1
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 1


class _StalledJournal(Journal):
    """A real journal whose appends stall (a disk that stopped answering) once armed."""

    stalled: asyncio.Event

    async def append_rows(
        self, stream: str, fields: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> int:
        if self.stalled.is_set():
            await asyncio.sleep(3600)
        return await super().append_rows(stream, fields, rows)


async def test_puts_of_a_group_cut_off_by_close_get_an_error_not_cancelled(
    db: Database, tmp_path: Path
) -> None:
    # close() cancels a group whose append outlives close_timeout. The puts in that group
    # were not cancelled by their callers: they must get an error they can handle
    # (ResourceClosed), not a CancelledError that looks like their own cancellation.
    table = table_name()
    await create_tick_table(db, table)
    journal = _StalledJournal(tmp_path / "j")
    journal.stalled = asyncio.Event()
    stream = tick_stream(table, batch_rows=100, flush_interval=3600.0)
    buffer = WriteBuffer(
        db,
        [stream],
        deadletter_dir=tmp_path / "dl",
        journal=journal,
        replay_interval=None,
        close_timeout=0.2,
    )
    await buffer.open()
    await buffer.put("ticks", tick(0))  # accepted before the stall
    journal.stalled.set()
    puts = [asyncio.create_task(buffer.put("ticks", tick(i))) for i in range(1, 6)]
    await asyncio.sleep(0.1)  # the group's append is stalled now
    await buffer.close()
    results = await asyncio.gather(*puts, return_exceptions=True)
    assert all(isinstance(r, ResourceClosed) for r in results), results
    assert all("may be in the journal" in str(r) for r in results), results
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 1


class _RefusingOnceJournal(Journal):
    """A real journal whose first append is refused, after a moment (a full journal)."""

    refused: int

    async def append_rows(
        self, stream: str, fields: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> int:
        if not self.refused:
            self.refused = len(rows)
            await asyncio.sleep(0.2)
            raise JournalFull("journal full (refused once by the test)")
        return await super().append_rows(stream, fields, rows)


async def test_room_freed_by_a_refused_group_wakes_waiting_puts(
    db: Database, tmp_path: Path
) -> None:
    # A group holds room for its puts while the journal writes it. When the journal refuses
    # it, that room is free again at once: a put waiting for room must get it then, not wait
    # out its put_timeout and fail with BufferFull.
    table = table_name()
    await create_tick_table(db, table)
    journal = _RefusingOnceJournal(tmp_path / "j")
    journal.refused = 0
    stream = tick_stream(table, batch_rows=4, max_rows=4, flush_interval=3600.0, put_timeout=3.0)
    async with WriteBuffer(
        db, [stream], deadletter_dir=tmp_path / "dl", journal=journal, replay_interval=None
    ) as buffer:
        group = [asyncio.create_task(buffer.put("ticks", tick(i))) for i in range(4)]
        await asyncio.sleep(0.05)  # the group of four holds all the room now
        loop = asyncio.get_running_loop()
        started = loop.time()
        await buffer.put("ticks", tick(10))  # waits for room
        waited = loop.time() - started
        results = await asyncio.gather(*group, return_exceptions=True)
    assert journal.refused == 4
    assert all(isinstance(r, JournalFull) for r in results), results
    # Woken when the group was refused (~0.2 s), far before put_timeout (3 s).
    assert waited < 1.5, waited
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 1
