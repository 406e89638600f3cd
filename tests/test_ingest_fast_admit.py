"""The fast paths of ingest keep every guarantee of the full ones.

put_nowait's generated validate-and-admit appends within a budget computed by the full path
(``refresh_budget``): the limits, the emergency spill, the flush wake-ups, the counters and
the precise validation errors stay those of the full path. A flush woken at ``batch_rows``
writes whole batches. The chunks of a swap overlap (the next one starts while the previous
one commits) and each is still routed on its own: poison bisected, conflicts merged.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from _ingest_helpers import create_tick_table, table_name, tick, tick_stream
from sheetanchor.errors import BufferFull, RecordError, ResourceClosed, WrongEventLoop
from sheetanchor.ingest import CopySink, SinkOutcome, WriteBuffer
from sheetanchor.ingest._journal import Journal
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


async def test_fast_path_admits_nothing_once_close_began(db: Database, tmp_path: Path) -> None:
    """put_nowait's fast path checks only the budget: close() withdraws it at once."""
    table = table_name()
    await create_tick_table(db, table)
    stream = tick_stream(table, max_rows=1000, batch_rows=1000, flush_interval=3600.0)
    buf = WriteBuffer(db, [stream], deadletter_dir=tmp_path, replay_interval=None)
    with pytest.raises(ResourceClosed):
        buf.put_nowait("ticks", tick(0))  # not open yet
    await buf.open()
    st = buf._states["ticks"]
    for i in range(10):
        buf.put_nowait("ticks", tick(i))
    assert st.fast_rows_left > 0  # a budget is granted and unused
    closing = asyncio.create_task(buf.close())
    await asyncio.sleep(0)  # close() has begun and waits for the flush
    assert not closing.done()
    with pytest.raises(ResourceClosed):
        buf.put_nowait("ticks", tick(10))
    await closing
    with pytest.raises(ResourceClosed):
        buf.put_nowait("ticks", tick(11))
    assert buf.stats().rows_in == 10
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 10


async def test_fast_path_checks_the_event_loop(db: Database, tmp_path: Path) -> None:
    table = table_name()
    await create_tick_table(db, table)
    stream = tick_stream(table, max_rows=1000, batch_rows=1000, flush_interval=3600.0)
    async with WriteBuffer(db, [stream], deadletter_dir=tmp_path, replay_interval=None) as buf:
        for i in range(5):
            buf.put_nowait("ticks", tick(i))
        assert buf._states["ticks"].fast_rows_left > 0
        with pytest.raises(WrongEventLoop):
            await asyncio.to_thread(buf.put_nowait, "ticks", tick(5))  # another thread
        assert buf.stats().rows_in == 5


async def test_bytes_admitted_on_the_budget_leave_with_their_rows(
    db: Database, tmp_path: Path
) -> None:
    """The fast path counts bytes lazily: a swap takes them along, nothing stays behind."""
    table = table_name()
    await create_tick_table(db, table)
    size = Validator(tick_stream(table)).validate(tick(0))[1]
    stream = tick_stream(table, max_rows=1000, batch_rows=1000, flush_interval=3600.0)
    async with WriteBuffer(db, [stream], deadletter_dir=tmp_path, replay_interval=None) as buf:
        st = buf._states["ticks"]
        for rnd in range(3):
            for i in range(rnd * 100, rnd * 100 + 100):
                buf.put_nowait("ticks", tick(i))
            assert st.fast_granted - st.fast_rows_left > 0  # some came in on the budget
            assert st.held_bytes == 100 * size  # (stream_stats would fold the budget)
            await buf.flush()
            s = buf.stream_stats("ticks")
            assert (s.held_rows, s.held_bytes, s.rows_written) == (0, 0, (rnd + 1) * 100)
            assert st.bytes == 0


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
        # Counted written by the chunk, out of flight by its swap a moment later: wait for both.
        s0 = buf.stream_stats
        await wait_until(lambda: (s0("ticks").rows_written, s0("ticks").inflight_rows) == (200, 0))
        s = buf.stream_stats("ticks")
        assert (s.batches, s.buffered_rows, s.held_rows) == (2, 50, 50)
        for i in range(250, 300):
            buf.put_nowait("ticks", tick(i))
        await wait_until(lambda: buf.stats().rows_written == 300)
        assert buf.stats().batches == 3
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 300


async def test_a_wake_up_past_the_high_watermark_swaps_whole_batches(
    db: Database, tmp_path: Path
) -> None:
    """Past the high watermark a swap takes the whole batches only, not a short tail chunk."""
    table = table_name()
    await create_tick_table(db, table)
    stream = tick_stream(
        table, max_rows=1000, batch_rows=100, high_watermark=0.2, flush_interval=3600.0
    )
    async with WriteBuffer(db, [stream], deadletter_dir=tmp_path, replay_interval=None) as buf:
        for i in range(250):  # no await: the flusher sees 250 rows, past the watermark (200)
            buf.put_nowait("ticks", tick(i))
        s0 = buf.stream_stats
        await wait_until(lambda: (s0("ticks").rows_written, s0("ticks").inflight_rows) == (200, 0))
        s = buf.stream_stats("ticks")
        # Two transactions of 100 rows; the 50 left over are not a third one of their own.
        assert (s.batches, s.buffered_rows, s.held_rows) == (2, 50, 50)
        await buf.flush()  # flush() writes everything, the short batch included
        s = buf.stream_stats("ticks")
        assert (s.batches, s.rows_written, s.held_rows) == (3, 250, 0)
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 250


async def test_less_than_a_batch_past_the_high_watermark_is_swapped(
    db: Database, tmp_path: Path
) -> None:
    """Past the watermark with less than one batch buffered, the wake-up still writes it."""
    table = table_name()
    await create_tick_table(db, table)
    stream = tick_stream(
        table, max_rows=1000, batch_rows=500, high_watermark=0.05, flush_interval=3600.0
    )
    async with WriteBuffer(db, [stream], deadletter_dir=tmp_path, replay_interval=None) as buf:
        for i in range(60):  # past the watermark (50 rows), below batch_rows
            buf.put_nowait("ticks", tick(i))
        await wait_until(lambda: buf.stats().rows_written == 60)
        assert buf.stats().batches == 1
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 60


class _HoldFirst(CopySink):
    """The real sink; the first chunk's write waits (after its COPY) until chunk 2 starts."""

    def __init__(self, describe: Any) -> None:
        super().__init__(describe)
        self.events: list[str] = []
        self.second_started = asyncio.Event()

    async def write(
        self,
        conn: asyncpg.Connection,
        rows: Sequence[tuple[Any, ...]],
        *,
        batch_id: str | None,
        sent: asyncio.Event | None = None,
    ) -> SinkOutcome:
        n = len([e for e in self.events if e.startswith("start")]) + 1
        self.events.append(f"start {n}")
        if n == 2:
            self.second_started.set()
        outcome = await super().write(conn, rows, batch_id=batch_id, sent=sent)
        if n == 1:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(20.0):  # generous: only a broken overlap waits
                    await self.second_started.wait()
        self.events.append(f"end {n}")
        return outcome


async def test_the_next_chunk_of_a_swap_starts_while_the_first_commits(
    db: Database, tmp_path: Path
) -> None:
    table = table_name()
    await create_tick_table(db, table)
    stream = tick_stream(table, max_rows=1000, batch_rows=100, flush_interval=3600.0)
    async with WriteBuffer(db, [stream], deadletter_dir=tmp_path, replay_interval=None) as buf:
        sink = _HoldFirst(stream.describe())
        buf._states["ticks"].sink = sink
        await buf.put_many("ticks", [tick(i) for i in range(300)])
        await buf.flush()  # one swap of three chunks
        assert sink.events.index("start 2") < sink.events.index("end 1")
        # Never more than two at once: chunk 3 waits for chunk 1.
        assert sink.events.index("start 3") > sink.events.index("end 1")
        assert buf.stats().rows_written == 300
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 300


async def test_overlapped_chunks_route_poison_and_conflicts(db: Database, tmp_path: Path) -> None:
    """Chunk 2 holds a poison row, chunk 3 a row already in the table: each still routed."""
    table = table_name()
    await create_tick_table(db, table)  # CHECK (price >= 0)
    stream = tick_stream(table, max_rows=1000, batch_rows=100, flush_interval=3600.0)
    async with db.connection() as conn:
        await conn.execute(
            f"INSERT INTO {table} VALUES ($1, $2, 1.0, 250)", tick(250)["ts"], tick(250)["symbol"]
        )
    records = [tick(i, price=-1.0 if i == 150 else 1.0) for i in range(300)]
    async with WriteBuffer(db, [stream], deadletter_dir=tmp_path, replay_interval=None) as buf:
        await buf.put_many("ticks", records)
        await buf.flush()
        stats = buf.stats()
        assert (stats.rows_written, stats.rows_duplicate, stats.rows_quarantined) == (298, 1, 1)
        assert stats.held_rows == 0
        poison = buf.deadletter.files("ticks", "poison")
        assert len(poison) == 1
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 299
    assert await db.fetchval(f"SELECT count(*) FROM {table} WHERE price < 0") == 0


class _OldSignature(CopySink):
    """A user sink written before ``write`` took ``sent``: it must still be called."""

    def __init__(self, describe: Any) -> None:
        super().__init__(describe)
        self.active = 0
        self.most_active = 0

    async def write(  # type: ignore[override]
        self, conn: asyncpg.Connection, rows: Sequence[tuple[Any, ...]], *, batch_id: str | None
    ) -> SinkOutcome:
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            return await super().write(conn, rows, batch_id=batch_id)
        finally:
            self.active -= 1


async def test_a_sink_without_the_sent_keyword_is_called_one_chunk_at_a_time(
    db: Database, tmp_path: Path
) -> None:
    table = table_name()
    await create_tick_table(db, table)
    stream = tick_stream(table, max_rows=1000, batch_rows=100, flush_interval=3600.0)
    async with WriteBuffer(db, [stream], deadletter_dir=tmp_path, replay_interval=None) as buf:
        sink = _OldSignature(stream.describe())
        buf._states["ticks"].sink = sink
        await buf.put_many("ticks", [tick(i) for i in range(300)])
        await buf.flush()  # one swap of three chunks, no TypeError for the missing keyword
        assert buf.stats().rows_written == 300
        assert buf.stats().held_rows == 0
        assert sink.most_active == 1  # nothing tells the writer a chunk was sent: no overlap
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 300


class _HoldFirstSwap(CopySink):
    """The real sink; the first swap's write waits (after its COPY) until swap 2 starts."""

    def __init__(self, describe: Any, events: list[str]) -> None:
        super().__init__(describe)
        self.events = events
        self.second_started = asyncio.Event()
        self.writes = 0

    async def write(
        self,
        conn: asyncpg.Connection,
        rows: Sequence[tuple[Any, ...]],
        *,
        batch_id: str | None,
        sent: asyncio.Event | None = None,
    ) -> SinkOutcome:
        self.writes += 1
        n = self.writes
        self.events.append(f"start {n}")
        if n == 2:
            self.second_started.set()
        outcome = await super().write(conn, rows, batch_id=batch_id, sent=sent)
        if n == 1:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10.0):  # generous: only a missing overlap waits
                    await self.second_started.wait()
        self.events.append(f"end {n}")
        return outcome


class _RecordingJournal(Journal):
    """The real journal; every commit mark is recorded with the sink's events."""

    def __init__(self, directory: Path, events: list[str]) -> None:
        super().__init__(directory, fsync="never")
        self.events = events

    def commit(self, stream: str, upto_seq: int) -> None:
        self.events.append(f"commit {upto_seq}")
        super().commit(stream, upto_seq)


async def test_the_next_swap_starts_while_the_previous_one_commits(
    db: Database, tmp_path: Path
) -> None:
    """concurrency=1: swap 2's chunk starts once swap 1's last chunk has sent its rows, and
    the journal is still committed in swap order (never past swap 1 while it is pending)."""
    table = table_name()
    await create_tick_table(db, table)
    stream = tick_stream(table, max_rows=1000, batch_rows=100, flush_interval=3600.0)
    events: list[str] = []
    journal = _RecordingJournal(tmp_path / "journal", events)
    async with WriteBuffer(
        db, [stream], deadletter_dir=tmp_path / "dl", journal=journal, replay_interval=None
    ) as buf:
        sink = _HoldFirstSwap(stream.describe(), events)
        st = buf._states["ticks"]
        st.sink = sink
        await buf.put_many("ticks", [tick(i) for i in range(100)])  # swap 1 (wakes the flusher)
        await wait_until(lambda: sink.writes == 1)
        await buf.put_many("ticks", [tick(i) for i in range(100, 200)])  # swap 2
        await wait_until(lambda: "end 1" in events and "end 2" in events)
        await buf.flush()
        assert events.index("start 2") < events.index("end 1")
        commits = [int(e.split()[1]) for e in events if e.startswith("commit")]
        assert commits  # the journal was committed ...
        # ... only once swap 1 was done, in order, and up to the last record of swap 2.
        assert events.index(f"commit {commits[0]}") > events.index("end 1")
        assert commits == sorted(commits)
        assert commits[-1] == journal.last_seq
        stats = buf.stats()
        assert (stats.rows_written, stats.batches, stats.held_rows) == (200, 2, 0)
        assert st.sem._value == stream.concurrency  # the stream's slot given back once
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 200
