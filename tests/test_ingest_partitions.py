from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sheetanchor.config import to_asyncpg_dsn
from sheetanchor.errors import ConfigError
from sheetanchor.ingest.partitions import (
    create_partitioned_table,
    drop_partitions_older_than,
    ensure_partitions,
    partition_bounds,
    quote_ident,
)

NOW = dt.datetime(2026, 11, 23, 15, 30, tzinfo=dt.UTC)  # a Monday
COLUMNS = {
    "symbol": "text NOT NULL",
    "ts": "timestamptz NOT NULL",
    "price": "double precision NOT NULL",
}


@pytest.fixture
async def conn(pg_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(to_asyncpg_dsn(pg_url))
    try:
        # A session time zone far from UTC proves the bounds do not depend on it.
        await connection.execute("SET TIME ZONE 'America/Los_Angeles'")
        yield connection
    finally:
        await connection.close()


async def _partitions(conn: asyncpg.Connection, table: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = $1::regclass ORDER BY 1",
        table,
    )
    return [r["relname"] for r in rows]


async def test_rows_route_into_their_day_partition(conn: asyncpg.Connection) -> None:
    await create_partitioned_table(conn, "ticks_day", COLUMNS, primary_key=("symbol", "ts"))
    created = await ensure_partitions(conn, "ticks_day", interval="day", ahead=2, now=NOW)
    assert created == ["ticks_day_p20261123", "ticks_day_p20261124", "ticks_day_p20261125"]

    rows = [
        ("A", dt.datetime(2026, 11, 23, 0, 0, tzinfo=dt.UTC), "ticks_day_p20261123"),
        ("A", dt.datetime(2026, 11, 23, 23, 59, 59, tzinfo=dt.UTC), "ticks_day_p20261123"),
        ("A", dt.datetime(2026, 11, 24, 0, 0, tzinfo=dt.UTC), "ticks_day_p20261124"),
        # 20:00 in New York on the 24th is already the 25th in UTC.
        (
            "A",
            dt.datetime(2026, 11, 24, 20, 0, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
            "ticks_day_p20261125",
        ),
    ]
    for symbol, ts, _ in rows:
        await conn.execute("INSERT INTO ticks_day VALUES ($1, $2, 1.0)", symbol, ts)
    placed = await conn.fetch("SELECT tableoid::regclass::text AS part, ts FROM ticks_day")
    where = {r["ts"]: r["part"] for r in placed}
    for _, ts, expected in rows:
        assert where[ts] == expected


async def test_running_twice_is_a_no_op(conn: asyncpg.Connection) -> None:
    await create_partitioned_table(conn, "ticks_twice", COLUMNS)
    await create_partitioned_table(conn, "ticks_twice", COLUMNS)
    first = await ensure_partitions(conn, "ticks_twice", ahead=3, behind=1, now=NOW)
    assert len(first) == 5
    before = await _partitions(conn, "ticks_twice")
    assert await ensure_partitions(conn, "ticks_twice", ahead=3, behind=1, now=NOW) == []
    assert await _partitions(conn, "ticks_twice") == before
    # A day later only the new day at the far end is added.
    later = await ensure_partitions(conn, "ticks_twice", ahead=3, now=NOW + dt.timedelta(days=1))
    assert later == ["ticks_twice_p20261127"]


async def test_rows_beyond_the_created_range_fail_with_postgres_error(
    conn: asyncpg.Connection,
) -> None:
    # Why "ahead" matters: if the job stops, data after the last partition is refused.
    await create_partitioned_table(conn, "ticks_edge", COLUMNS)
    await ensure_partitions(conn, "ticks_edge", ahead=1, now=NOW)
    await conn.execute(
        "INSERT INTO ticks_edge VALUES ('A', $1, 1.0)", dt.datetime(2026, 11, 24, 23, tzinfo=dt.UTC)
    )
    with pytest.raises(asyncpg.CheckViolationError, match="no partition of relation"):
        await conn.execute(
            "INSERT INTO ticks_edge VALUES ('A', $1, 1.0)",
            dt.datetime(2026, 11, 25, 0, tzinfo=dt.UTC),
        )


async def test_week_and_month_partitions_on_timestamp_and_date(conn: asyncpg.Connection) -> None:
    await create_partitioned_table(conn, "bars_w", {"ts": "timestamp NOT NULL", "v": "int"})
    weeks = await ensure_partitions(conn, "bars_w", interval="week", ahead=1, now=NOW)
    assert weeks == ["bars_w_p2026w48", "bars_w_p2026w49"]
    await conn.execute("INSERT INTO bars_w VALUES ($1, 1)", dt.datetime(2026, 11, 29, 23, 59))
    await conn.execute("INSERT INTO bars_w VALUES ($1, 2)", dt.datetime(2026, 11, 30))
    placed = await conn.fetch("SELECT tableoid::regclass::text AS part FROM bars_w ORDER BY v")
    assert [r["part"] for r in placed] == weeks

    await create_partitioned_table(conn, "days_m", {"day": "date NOT NULL"}, column="day")
    months = await ensure_partitions(
        conn, "days_m", column="day", interval="month", ahead=2, now=NOW
    )
    assert months == ["days_m_p202611", "days_m_p202612", "days_m_p202701"]
    await conn.execute("INSERT INTO days_m VALUES ($1)", dt.date(2027, 1, 31))
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute("INSERT INTO days_m VALUES ($1)", dt.date(2027, 2, 1))


async def test_odd_names_are_quoted(conn: asyncpg.Connection) -> None:
    await conn.execute('CREATE SCHEMA IF NOT EXISTS "Market Data"')
    table = 'Market Data.odd"Ticks; DROP'
    await create_partitioned_table(conn, table, COLUMNS)
    created = await ensure_partitions(conn, table, ahead=0, now=NOW)
    assert created == ['odd"Ticks; DROP_p20261123']
    await conn.execute(
        'INSERT INTO "Market Data"."odd""Ticks; DROP" VALUES ($1, $2, 1.0)', "A", NOW
    )
    assert await drop_partitions_older_than(conn, table, NOW + dt.timedelta(days=2)) == created


async def test_drop_partitions_older_than(conn: asyncpg.Connection) -> None:
    await create_partitioned_table(conn, "ticks_old", COLUMNS)
    await ensure_partitions(conn, "ticks_old", ahead=1, behind=3, now=NOW)
    # A partition we did not name is never touched.
    await conn.execute(
        "CREATE TABLE ticks_old_manual PARTITION OF ticks_old "
        "FOR VALUES FROM ('2000-01-01 00:00:00+00') TO ('2000-01-02 00:00:00+00')"
    )
    # Midday on the 21st: the 20th has ended, the 21st still holds younger rows.
    dropped = await drop_partitions_older_than(
        conn, "ticks_old", dt.datetime(2026, 11, 21, 12, tzinfo=dt.UTC)
    )
    assert dropped == ["ticks_old_p20261120"]
    assert await drop_partitions_older_than(conn, "ticks_old", dt.date(2026, 11, 23)) == [
        "ticks_old_p20261121",
        "ticks_old_p20261122",
    ]
    assert await _partitions(conn, "ticks_old") == [
        "ticks_old_manual",
        "ticks_old_p20261123",
        "ticks_old_p20261124",
    ]


async def test_clear_errors(conn: asyncpg.Connection) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        await ensure_partitions(conn, "nope", now=NOW)
    await conn.execute("CREATE TABLE plain (ts timestamptz)")
    with pytest.raises(ConfigError, match="not partitioned"):
        await ensure_partitions(conn, "plain", now=NOW)
    await create_partitioned_table(
        conn, "by_id", {"id": "bigint", "ts": "timestamptz"}, column="id"
    )
    with pytest.raises(ConfigError, match="BY RANGE"):
        await ensure_partitions(conn, "by_id", now=NOW)
    with pytest.raises(ConfigError, match="has type bigint"):
        await ensure_partitions(conn, "by_id", column="id", now=NOW)
    with pytest.raises(ConfigError, match="must include the partition column"):
        await create_partitioned_table(conn, "x", COLUMNS, primary_key=("symbol",))
    with pytest.raises(ConfigError, match="longer than 63 bytes"):
        await create_partitioned_table(conn, "t" * 64, COLUMNS)
    # Changing the interval would overlap: PostgreSQL's refusal becomes a clear error.
    await create_partitioned_table(conn, "ticks_change", COLUMNS)
    await ensure_partitions(conn, "ticks_change", interval="day", ahead=0, now=NOW)
    with pytest.raises(ConfigError, match="was the interval changed"):
        await ensure_partitions(conn, "ticks_change", interval="week", ahead=0, now=NOW)


async def test_works_with_a_pool(pg_url: str) -> None:
    pool = await asyncpg.create_pool(to_asyncpg_dsn(pg_url), min_size=1, max_size=2)
    try:
        await create_partitioned_table(pool, "ticks_pool", COLUMNS)
        assert len(await ensure_partitions(pool, "ticks_pool", ahead=1, now=NOW)) == 2
    finally:
        await pool.close()


def test_quote_ident() -> None:
    assert quote_ident('a"b') == '"a""b"'
    with pytest.raises(ConfigError):
        quote_ident("")


@given(
    st.dates(dt.date(1990, 1, 1), dt.date(2100, 1, 1)),
    st.sampled_from(["day", "week", "month"]),
    st.integers(-60, 60),
)
def test_partition_bounds_tile_time(day: dt.date, interval: Any, steps: int) -> None:
    start, end, suffix = partition_bounds(day, interval, steps)
    nxt_start, _, nxt_suffix = partition_bounds(day, interval, steps + 1)
    assert start < end == nxt_start  # contiguous, no gaps or overlaps
    assert suffix != nxt_suffix
    here_start, _, _ = partition_bounds(day, interval)
    assert here_start <= day < partition_bounds(day, interval)[1]
    assert partition_bounds(start, interval)[:2] == (start, end)
