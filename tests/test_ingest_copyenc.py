"""The generated binary COPY encoder stores exactly what asyncpg's codecs store (real server)."""

from __future__ import annotations

import datetime as dt
import uuid
import zoneinfo
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from _ingest_helpers import create_tick_table, table_name, tick, tick_stream
from sheetanchor.ingest import CopySink, Stream, WriteBuffer
from sheetanchor.ingest._validate import Validator
from sheetanchor.postgres import Database, PoolSettings

COLUMNS = {
    "k": "int8",
    "i2": "int2",
    "i4": "int4",
    "f8": "float8",
    "b": "bool",
    "tz": "timestamptz",
    "ts": "timestamp",
    "d": "date",
    "u": "uuid",
    "t": "text",
    "by": "bytea",
}
NULLABLE = set(COLUMNS) - {"k"}
UTC = dt.UTC
PARIS = zoneinfo.ZoneInfo("Europe/Paris")


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[Database]:
    database = Database(pg_url, pool=PoolSettings(size=2, max_overflow=1), name="ingest_copyenc")
    yield database
    await database.close()


def _stream(table: str) -> Stream:
    return Stream("enc", table=table, columns=COLUMNS, natural_key=("k",), nullable=tuple(NULLABLE))


async def _create(db: Database, table: str) -> None:
    await db.execute(
        f"CREATE TABLE {table} (k bigint PRIMARY KEY, i2 smallint, i4 integer, f8 float8, "
        "b boolean, tz timestamptz, ts timestamp, d date, u uuid, t text, by bytea)"
    )


def _records() -> list[dict[str, Any]]:
    values: dict[str, list[Any]] = {
        "i2": [-32768, 32767, 0, None],
        "i4": [-(2**31), 2**31 - 1, 7, None],
        "f8": [0.1, -0.0, float("inf"), float("-inf"), float("nan"), 1e308, None],
        "b": [True, False, None],
        "tz": [
            dt.datetime.max.replace(tzinfo=UTC),  # asyncpg sends +infinity
            dt.datetime.min.replace(tzinfo=UTC),  # -infinity
            dt.datetime(2000, 1, 1, tzinfo=UTC),
            dt.datetime(1969, 7, 20, 20, 17, 40, 123456, tzinfo=UTC),
            dt.datetime(2026, 3, 29, 2, 30, tzinfo=dt.timezone(dt.timedelta(hours=-7))),
            dt.datetime(2026, 10, 25, 2, 30, fold=1, tzinfo=PARIS),
            None,
        ],
        "ts": [dt.datetime.max, dt.datetime.min, dt.datetime(1999, 12, 31, 23, 59, 59, 1), None],
        "d": [dt.date.max, dt.date.min, dt.date(2000, 1, 1), dt.date(1900, 2, 28), None],
        "u": [uuid.UUID(int=0), uuid.uuid4(), None],
        "t": ["", "plain", "é€😀 ünïcode", "x" * 5000, None],
        "by": [b"", b"\x00\xff" * 10, None],
    }
    out = []
    for k in range(40):
        record: dict[str, Any] = {"k": k}
        for name, options in values.items():
            record[name] = options[(k + len(name)) % len(options)]
        out.append(record)
    return out


async def test_fast_encoder_stores_what_asyncpg_stores(db: Database) -> None:
    ours, theirs = table_name("enc"), table_name("enc")
    await _create(db, ours)
    await _create(db, theirs)
    stream = _stream(ours)
    validator = Validator(stream)
    rows = [validator.validate(r)[0] for r in _records()]
    sink = CopySink(stream.describe())
    async with db.connection() as conn:
        await sink.prepare(conn)
        assert sink.fast_encoding
        outcome = await sink.write(conn, rows, batch_id=str(uuid.uuid4()))
        await conn.copy_records_to_table(theirs, records=rows, columns=list(COLUMNS))
    assert outcome == ("copy", len(rows))
    cols = ", ".join(COLUMNS)
    for a, b in ((ours, theirs), (theirs, ours)):
        diff = await db.fetch(f"SELECT {cols} FROM {a} EXCEPT SELECT {cols} FROM {b}")
        assert diff == []
    assert await db.fetchval(f"SELECT count(*) FROM {ours}") == len(rows)
    # The sentinels really are PostgreSQL's infinities.
    assert await db.fetchval(f"SELECT count(*) FROM {ours} WHERE tz = 'infinity'") > 0
    assert await db.fetchval(f"SELECT count(*) FROM {ours} WHERE d = '-infinity'") > 0


async def test_a_value_the_encoder_cannot_pack_falls_back_to_asyncpg(db: Database) -> None:
    table = table_name("enc")
    await _create(db, table)
    stream = _stream(table)
    validator = Validator(stream)
    records = _records()
    # The full validator accepts bytearray and memoryview for bytea; the generated
    # encoder packs only bytes, so this chunk is rolled back and written by asyncpg.
    records[30]["by"] = bytearray(b"\x01\x02")
    records[31]["by"] = memoryview(b"\x03")
    rows = [validator.validate(r)[0] for r in records]
    sink = CopySink(stream.describe())
    async with db.connection() as conn:
        await sink.prepare(conn)
        outcome = await sink.write(conn, rows, batch_id=str(uuid.uuid4()))
        # The connection is clean afterwards (no cancel request left in flight).
        assert await conn.fetchval("SELECT 41 + 1") == 42
        assert not conn.is_in_transaction()
    assert outcome == ("copy", len(rows))
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == len(rows)
    assert await db.fetchval(f"SELECT by FROM {table} WHERE k = 30") == b"\x01\x02"
    assert await db.fetchval(f"SELECT by FROM {table} WHERE k = 31") == b"\x03"
    ledger = await db.fetchval(
        "SELECT count(*) FROM sheetanchor_ingest_batches WHERE stream = 'enc'"
    )
    assert ledger >= 1


async def test_a_column_of_another_type_keeps_asyncpg_encoding(db: Database) -> None:
    # The stream says text, the table has varchar(8): asyncpg encodes by the real type.
    table = table_name()
    await db.execute(
        f"CREATE TABLE {table} (ts timestamptz NOT NULL, symbol varchar(8) NOT NULL, "
        "price float8 NOT NULL, volume bigint NOT NULL, PRIMARY KEY (ts, symbol))"
    )
    stream = tick_stream(table)
    sink = CopySink(stream.describe())
    validator = Validator(stream)
    rows = [validator.validate(tick(i))[0] for i in range(50)]
    async with db.connection() as conn:
        await sink.prepare(conn)
        assert not sink.fast_encoding
        assert (await sink.write(conn, rows, batch_id=None)).path == "copy"
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 50


async def test_tick_table_uses_the_fast_encoder_and_stays_idempotent(db: Database) -> None:
    table = table_name()
    await create_tick_table(db, table)
    stream = tick_stream(table)
    sink = CopySink(stream.describe())
    validator = Validator(stream)
    rows = [validator.validate(tick(i))[0] for i in range(5000)]
    async with db.connection() as conn:
        await sink.prepare(conn)
        assert sink.fast_encoding
        first = await sink.write(conn, rows, batch_id=None)
        again = await sink.write(conn, rows[2500:] + rows[:10], batch_id=None)
    assert (first.path, first.inserted) == ("copy", 5000)
    assert (again.path, again.inserted) == ("staging", 0)
    got = await db.fetch(f"SELECT ts, symbol, price, volume FROM {table} ORDER BY volume")
    assert [tuple(r) for r in got] == rows


async def test_write_buffer_streams_encode_fast_once_open(db: Database, tmp_path: Path) -> None:
    table = table_name()
    await create_tick_table(db, table)
    stream = tick_stream(table)
    async with WriteBuffer(db, [stream], deadletter_dir=tmp_path, replay_interval=None) as buf:
        assert buf._states["ticks"].sink.fast_encoding
        for i in range(300):
            buf.put_nowait("ticks", tick(i))
    validator = Validator(stream)
    got = await db.fetch(f"SELECT ts, symbol, price, volume FROM {table} ORDER BY volume")
    assert [tuple(r) for r in got] == [validator.validate(tick(i))[0] for i in range(300)]
