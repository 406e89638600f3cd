"""The README's examples, run as written (so the documentation cannot drift from the code)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from sheetanchor.config import parse_url
from sheetanchor.postgres import Database
from sheetanchor.retry import DEFAULT_POLICY
from sheetanchor.testing import FaultProxy


async def test_survives_a_reset(pg_url: str, fault_proxy: Callable[[str, int], FaultProxy]) -> None:
    server = parse_url(pg_url)
    assert server.host is not None
    assert server.port is not None
    proxy = fault_proxy(server.host, server.port)
    db = Database(proxy.url(pg_url))
    assert await db.fetchval("SELECT 1") == 1
    proxy.reset_all()  # every open connection gets a TCP RST
    # A query racing the reset fails with ConnectionLost (transient); the policy retries it.
    assert await DEFAULT_POLICY.call(db.fetchval, "SELECT 1") == 1
    await db.close()


async def test_cached_store_example(pg_url: str, redis_url: str) -> None:
    from sheetanchor import CachedStore, RedisClient

    db, rc = Database(pg_url), RedisClient(redis_url)
    await db.execute(
        "CREATE TABLE worlds (id bigint PRIMARY KEY, version bigserial NOT NULL, "
        "name text, state jsonb)"
    )
    worlds = CachedStore(db, rc, table="worlds", value_columns=["name", "state"])
    await worlds.put(42, {"name": "w", "state": {"tick": 1}})
    assert await worlds.get(42) == {"name": "w", "state": {"tick": 1}}
    await worlds.update(42, lambda w: {**w, "state": {"tick": 2}})
    many = await worlds.get_many([1, 2, 42])
    assert many[42] == {"name": "w", "state": {"tick": 2}}
    assert many.get(1) is None
    await rc.close()
    await db.close()


async def test_write_buffer_example(pg_url: str, tmp_path: Path) -> None:
    from sheetanchor import Stream, WriteBuffer

    db = Database(pg_url)
    await db.execute(
        "CREATE TABLE tick (ts timestamptz, symbol text, price float8, volume bigint, "
        "PRIMARY KEY (ts, symbol))"
    )
    now = datetime.now(UTC)
    ticks = Stream(
        "ticks",
        table="tick",
        columns={"ts": "timestamptz", "symbol": "text", "price": "float8", "volume": "bigint"},
        natural_key=("ts", "symbol"),
        max_rows=100_000,
        tail_rows=100,
    )
    async with WriteBuffer(
        db, streams=[ticks], journal_dir=tmp_path / "journal", deadletter_dir=tmp_path / "dl"
    ) as buffer:
        await buffer.put("ticks", {"ts": now, "symbol": "ABC", "price": 1.5, "volume": 3})
        assert len(buffer.tail("ticks", 100)) == 1
    assert await db.fetchval("SELECT count(*) FROM tick") == 1
    await db.close()
