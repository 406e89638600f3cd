"""Sink idempotency and bisection of poison records, against real PostgreSQL."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from _ingest_helpers import create_tick_table, fast_retry, table_name, tick, tick_stream
from sheetanchor.errors import ConfigError
from sheetanchor.ingest import CopySink, DeadLetterStore, WriteBuffer, bisect_write
from sheetanchor.ingest._classify import is_data_error
from sheetanchor.ingest._validate import Validator
from sheetanchor.postgres import Database, PoolSettings


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[Database]:
    database = Database(pg_url, pool=PoolSettings(size=4, max_overflow=2), name="ingest_sink")
    yield database
    await database.close()


async def test_same_batch_twice_gives_one_copy_of_each_row(db: Database) -> None:
    table = table_name()
    await create_tick_table(db, table)
    stream = tick_stream(table)
    sink = CopySink(stream.describe())
    v = Validator(stream)
    rows = [v.validate(tick(i))[0] for i in range(500)]
    async with db.connection() as conn:
        await sink.prepare(conn)
        first = await sink.write(conn, rows, batch_id=None)
        again = await sink.write(conn, rows, batch_id=None)
        # A batch overlapping the first one: only the new half lands.
        overlap = [v.validate(tick(i))[0] for i in range(250, 750)]
        third = await sink.write(conn, overlap, batch_id=None)
    assert (first.path, first.inserted) == ("copy", 500)
    assert (again.path, again.inserted) == ("staging", 0)
    assert (third.path, third.inserted) == ("staging", 250)
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 750
    assert await db.fetchval(f"SELECT count(DISTINCT (ts, symbol)) FROM {table}") == 750


async def test_ledger_recognises_a_committed_batch(db: Database) -> None:
    table = table_name()
    await create_tick_table(db, table)
    stream = tick_stream(table)
    sink = CopySink(stream.describe())
    v = Validator(stream)
    rows = [v.validate(tick(i))[0] for i in range(100)]
    async with db.connection() as conn:
        await sink.prepare(conn)
        assert (
            await sink.write(conn, rows, batch_id="00000000-0000-0000-0000-00000000000a")
        ).path == "copy"
        again = await sink.write(conn, rows, batch_id="00000000-0000-0000-0000-00000000000a")
        assert await sink.committed(conn, "00000000-0000-0000-0000-00000000000a")
    assert again.path == "ledger"
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 100


async def test_direct_copy_with_a_new_batch_id_falls_back_on_a_conflict(db: Database) -> None:
    """BEGIN and the ledger row go in one query; a conflict still takes the staging merge."""
    table = table_name()
    await create_tick_table(db, table)
    stream = tick_stream(table)
    sink = CopySink(stream.describe())
    v = Validator(stream)
    first_id = "00000000-0000-0000-0000-0000000000b1"
    second_id = "00000000-0000-0000-0000-0000000000b2"
    async with db.connection() as conn:
        await sink.prepare(conn)
        first = await sink.write(
            conn, [v.validate(tick(i))[0] for i in range(100)], batch_id=first_id
        )
        assert not conn.is_in_transaction()
        # Rows 50-149 under a new batch id: 50 exist, so the direct COPY hits 23505.
        second = await sink.write(
            conn, [v.validate(tick(i))[0] for i in range(50, 150)], batch_id=second_id
        )
        assert not conn.is_in_transaction()
        assert await sink.committed(conn, first_id)
        assert await sink.committed(conn, second_id)
        again = await sink.write(conn, [v.validate(tick(0))[0]], batch_id=second_id)
    assert (first.path, first.inserted) == ("copy", 100)
    assert (second.path, second.inserted) == ("staging", 50)
    assert again.path == "ledger"
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 150
    assert (
        await db.fetchval(
            "SELECT rows FROM sheetanchor_ingest_batches WHERE batch_id = $1", second_id
        )
        == 100
    )


async def test_direct_copy_rolls_back_a_data_error_and_keeps_no_ledger_row(db: Database) -> None:
    """A poison row on the one-query path: nothing lands, no ledger row, connection reusable."""
    table = table_name()
    await create_tick_table(db, table)  # CHECK (price >= 0)
    stream = tick_stream(table)
    sink = CopySink(stream.describe())
    v = Validator(stream)
    rows = [v.validate(tick(i, price=-1.0 if i == 7 else 1.0))[0] for i in range(20)]
    bid = "00000000-0000-0000-0000-0000000000c1"
    async with db.connection() as conn:
        await sink.prepare(conn)
        with pytest.raises(asyncpg.CheckViolationError):
            await sink.write(conn, rows, batch_id=bid)
        assert not conn.is_in_transaction()
        assert not await sink.committed(conn, bid)
        good = [r for i, r in enumerate(rows) if i != 7]
        assert (await sink.write(conn, good, batch_id=bid)).path == "copy"
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 19


async def test_naive_insert_twice_duplicates_rows(db: Database) -> None:
    """The naive half: without a natural key, a re-sent batch doubles the rows."""
    table = table_name("naive")
    await db.execute(
        f"CREATE TABLE {table} (ts timestamptz, symbol text, price float8, volume bigint)"
    )
    v = Validator(tick_stream("x"))
    rows = [v.validate(tick(i))[0] for i in range(100)]
    async with db.connection() as conn:
        for _ in range(2):
            await conn.copy_records_to_table(table, records=rows)
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 200


async def test_prepare_refuses_a_table_without_unique_natural_key(db: Database) -> None:
    table = table_name("nokey")
    await db.execute(
        f"CREATE TABLE {table} (ts timestamptz, symbol text, price float8, volume bigint)"
    )
    sink = CopySink(tick_stream(table).describe())
    async with db.connection() as conn:
        with pytest.raises(ConfigError, match="unique index"):
            await sink.prepare(conn)
        with pytest.raises(ConfigError, match="does not exist"):
            await CopySink(tick_stream("missing_table").describe()).prepare(conn)


@pytest.mark.parametrize(
    ("n", "bad"), [(1000, [17]), (1000, [3, 500, 999]), (4096, [0, 1, 2, 3000, 4095])]
)
async def test_bisection_isolates_k_poison_rows_in_k_log_n_round_trips(
    db: Database, n: int, bad: list[int]
) -> None:
    table = table_name()
    await create_tick_table(db, table)
    stream = tick_stream(table)
    sink = CopySink(stream.describe(), ledger=False)
    v = Validator(stream)
    # Negative prices pass validation (a float) but violate the table's CHECK constraint.
    rows = [v.validate(tick(i, price=-1.0 if i in bad else 1.0))[0] for i in range(n)]
    async with db.connection() as conn:
        await sink.prepare(conn)

    async def write(segment: object) -> object:
        async with db.connection() as conn:
            return await sink.write(conn, segment, batch_id=None)  # type: ignore[arg-type]

    result = await bisect_write(rows, write, is_data_error)
    k = len(bad)
    assert sorted(r[3] for r, _ in result.poison) == sorted(bad)
    assert result.written == n - k
    assert all(getattr(e, "sqlstate", None) == "23514" for _, e in result.poison)
    assert result.round_trips <= 2 * k * math.ceil(math.log2(n)) + 1
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == n - k


async def test_buffer_quarantines_poison_with_postgres_error(db: Database, tmp_path: Path) -> None:
    table = table_name()
    await create_tick_table(db, table)
    await db.execute(f"CREATE TABLE {table}_big (id int PRIMARY KEY, amount numeric(6,2) NOT NULL)")
    from sheetanchor.ingest import Stream

    money = Stream(
        "money", table=f"{table}_big", columns={"id": "int", "amount": "numeric"}, natural_key="id"
    )
    store = DeadLetterStore(tmp_path / "dl")
    async with WriteBuffer(
        db, [tick_stream(table), money], deadletter=store, retry=fast_retry(), replay_interval=None
    ) as buffer:
        for i in range(300):
            await buffer.put("ticks", tick(i, price=-5.0 if i in (10, 200) else 2.0))
        for i in range(50):
            await buffer.put("money", {"id": i, "amount": 10**7 if i == 7 else i})
    stats = buffer.stats()
    assert stats.rows_written == 298 + 49
    assert stats.rows_quarantined == 3
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 298
    poison = store.files(reason="poison")
    assert {f.stream for f in poison} == {"ticks", "money"}
    for f in poison:
        assert f.path.stat().st_mode & 0o777 == 0o600
        batch = store.read(f.path)
        for err in batch.errors:
            assert err is not None
            assert err["sqlstate"] in {"23514", "22003"}
            assert err["message"]


async def test_raw_asyncpg_rejects_out_of_range_numeric() -> None:
    """Sanity: the numeric overflow above is PostgreSQL's own refusal (22003)."""
    assert issubclass(asyncpg.NumericValueOutOfRangeError, asyncpg.DataError)
