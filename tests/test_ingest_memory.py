"""A large swap frees each chunk's rows once written, instead of holding the whole swap
(about twice the stream's bound) until its last chunk is done."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from _ingest_helpers import create_tick_table, table_name, tick, tick_stream
from sheetanchor.ingest import WriteBuffer
from sheetanchor.ingest._sink import CopySink, SinkOutcome
from sheetanchor.postgres import Database, PoolSettings


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[Database]:
    database = Database(pg_url, pool=PoolSettings(size=4, max_overflow=0), name="ingest_memory")
    yield database
    await database.close()


class _Watching(CopySink):
    """The real sink; remembers the first row written and its reference count later."""

    def __init__(self, describe: Any) -> None:
        super().__init__(describe)
        self.first: tuple[Any, ...] | None = None
        self.refs_later: list[int] = []

    async def write(
        self,
        conn: asyncpg.Connection,
        rows: Sequence[tuple[Any, ...]],
        *,
        batch_id: str | None,
        sent: asyncio.Event | None = None,
    ) -> SinkOutcome:
        if self.first is None:
            self.first = rows[0]
        else:
            # Referenced by self.first and getrefcount's argument only, once released.
            self.refs_later.append(sys.getrefcount(self.first))
        return await super().write(conn, rows, batch_id=batch_id, sent=sent)


async def test_written_chunks_of_a_swap_are_released(db: Database, tmp_path: Path) -> None:
    table = table_name()
    await create_tick_table(db, table)
    stream = tick_stream(table, batch_rows=10, max_rows=100, flush_interval=3600.0)
    async with WriteBuffer(
        db, [stream], deadletter_dir=tmp_path / "dl", replay_interval=None
    ) as buffer:
        st = buffer._states["ticks"]
        sink = _Watching(stream.describe())
        st.sink = sink
        await buffer.put_many("ticks", [tick(i) for i in range(50)])
        await buffer.flush()  # one swap of 50 rows, written as 5 chunks
        assert len(sink.refs_later) == 4
        # Chunk 2 may start while chunk 1 still commits (two chunks of a swap overlap), so
        # chunk 1's rows may still be held then; chunk 3 starts only after chunk 1 is done,
        # and from then on the first chunk's rows must be gone.
        assert sink.refs_later[0] in (2, 3)
        assert sink.refs_later[1:] == [2, 2, 2]
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 50
