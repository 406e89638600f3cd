"""Issue 5, item 8: WriteBuffer ingest into a table made by sheetanchor's partition helper.

Rows land in the partition of their day; the natural key (the partitioned primary key) keeps
writes idempotent through the staging/conflict path; a row for which no partition exists is
quarantined with PostgreSQL's own error while the others land.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from _ingest_helpers import BASE, table_name, tick_stream
from sheetanchor.ingest import WriteBuffer
from sheetanchor.ingest._sink import CopySink
from sheetanchor.ingest._validate import Validator
from sheetanchor.ingest.partitions import create_partitioned_table, ensure_partitions
from sheetanchor.postgres import Database, PoolSettings

COLUMNS = {
    "ts": "timestamptz NOT NULL",
    "symbol": "text NOT NULL",
    "price": "double precision NOT NULL",
    "volume": "bigint NOT NULL",
}
HOURS = 72  # three daily partitions, 24 rows each


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[Database]:
    database = Database(pg_url, pool=PoolSettings(size=4, max_overflow=2), name="ingest_part")
    yield database
    await database.close()


async def _partitioned(db: Database) -> str:
    table = table_name("ptick")
    await create_partitioned_table(db, table, COLUMNS, column="ts", primary_key=("ts", "symbol"))
    created = await ensure_partitions(db, table, column="ts", interval="day", ahead=2, now=BASE)
    assert created == [f"{table}_p20260101", f"{table}_p20260102", f"{table}_p20260103"]
    return table


def _tick(hour: int, symbol: str = "A") -> dict[str, Any]:
    return {"ts": BASE + dt.timedelta(hours=hour), "symbol": symbol, "price": 1.5, "volume": hour}


async def test_rows_land_in_their_partitions_and_a_row_without_one_is_quarantined(
    db: Database, tmp_path: Path
) -> None:
    table = await _partitioned(db)
    stream = tick_stream(table, batch_rows=1000, flush_interval=60.0)
    outside = _tick(24 * 5)  # 2026-01-06: no partition was created for it
    async with WriteBuffer(db, [stream], deadletter_dir=tmp_path, replay_interval=None) as buf:
        for hour in range(HOURS):
            await buf.put("ticks", _tick(hour))
        await buf.put("ticks", outside)
    stats = buf.stream_stats("ticks")
    assert (stats.rows_written, stats.rows_quarantined, stats.rows_duplicate) == (HOURS, 1, 0)

    placed = await db.fetch(f"SELECT tableoid::regclass::text AS part, ts FROM {table}")
    assert len(placed) == HOURS
    for row in placed:
        assert row["part"] == f"{table}_p{row['ts'].astimezone(dt.UTC):%Y%m%d}"
    per_part = await db.fetch(
        f"SELECT tableoid::regclass::text AS part, count(*) AS n FROM {table} GROUP BY 1"
    )
    assert sorted((r["part"], r["n"]) for r in per_part) == [
        (f"{table}_p20260101", 24),
        (f"{table}_p20260102", 24),
        (f"{table}_p20260103", 24),
    ]
    # The refused row is in the poison file with PostgreSQL's reason: no partition for it.
    poison = buf.deadletter.files(reason="poison")
    assert len(poison) == 1
    errors = buf.deadletter.read(poison[0].path).errors
    assert errors is not None
    assert errors[0]["sqlstate"] == "23514"
    assert "partition" in errors[0]["message"]


async def test_a_batch_written_twice_never_duplicates_in_a_partitioned_table(
    db: Database, tmp_path: Path
) -> None:
    table = await _partitioned(db)
    stream = tick_stream(table, batch_rows=1000, flush_interval=60.0)
    first = [_tick(hour) for hour in range(HOURS)]
    async with WriteBuffer(db, [stream], deadletter_dir=tmp_path, replay_interval=None) as buf:
        await buf.put_many("ticks", first)
    assert buf.stream_stats("ticks").rows_written == HOURS

    # A new buffer (new batch ids, so no ledger shortcut) offers every row again in one
    # batch with new ones across all three partitions: the direct COPY hits the partitions'
    # unique index and the batch goes through the staging table and ON CONFLICT.
    again = [*first, *(_tick(hour, symbol="B") for hour in range(HOURS))]
    async with WriteBuffer(db, [stream], deadletter_dir=tmp_path, replay_interval=None) as buf:
        await buf.put_many("ticks", again)
        await buf.flush()
        await buf.put_many("ticks", again)  # and the same batch once more
    stats = buf.stream_stats("ticks")
    assert (stats.rows_written, stats.rows_duplicate) == (HOURS, HOURS + 2 * HOURS)
    assert (stats.rows_failed, stats.rows_quarantined) == (0, 0)
    assert buf.deadletter.files() == []
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 2 * HOURS
    assert (
        await db.fetchval(f"SELECT count(*) FROM (SELECT DISTINCT ts, symbol FROM {table}) AS d")
        == 2 * HOURS
    )
    per_part = await db.fetch(f"SELECT count(*) AS n FROM {table} GROUP BY tableoid")
    assert sorted(r["n"] for r in per_part) == [48, 48, 48]


async def test_the_sink_takes_the_staging_path_on_a_partitioned_table(db: Database) -> None:
    table = await _partitioned(db)
    stream = tick_stream(table)
    sink = CopySink(stream.describe(), ledger=False)
    validator = Validator(stream)
    rows = [validator.validate(_tick(hour))[0] for hour in range(0, HOURS, 5)]
    more = [validator.validate(_tick(hour, symbol="C"))[0] for hour in range(0, HOURS, 7)]
    async with db.connection() as conn:
        await sink.prepare(conn)  # finds the partitioned primary key as the natural key
        assert await sink.write(conn, rows, batch_id=None) == ("copy", len(rows))
        assert await sink.write(conn, rows, batch_id=None) == ("staging", 0)
        assert await sink.write(conn, [*rows, *more], batch_id=None) == ("staging", len(more))
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == len(rows) + len(more)
