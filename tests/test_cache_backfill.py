"""Backfills written in the background (``CacheSettings(max_backfills=N)``), real servers.

A miss then returns as soon as PostgreSQL answered; the fenced set and the lease release
follow in a tracked task. These tests show that the entry lands, that ``drain`` and
``close`` wait for it, that a failing backfill is logged, counted and releases its lease,
and that the set of background backfills is bounded.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from tests._store_helpers import make_items_table, table_name

from sheetanchor.observe import REGISTRY
from sheetanchor.postgres import Database
from sheetanchor.redis import RedisClient
from sheetanchor.state import CachedStore, CacheSettings, StoreHooks

_BACKGROUND = CacheSettings(max_backfills=100)


def _count(table: str, mode: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "sheetanchor_state_backfills_total", {"table": table, "mode": mode}
        )
        or 0.0
    )


@pytest.fixture
async def env(pg_url: str, redis_url: str) -> Any:
    async with Database(pg_url) as db, RedisClient(redis_url) as rc:
        table = table_name()
        await make_items_table(db, table)
        await db.execute(
            f"INSERT INTO {table} (id, name) SELECT g, 'n' || g FROM generate_series(1, 20) g"
        )
        yield db, rc, table


async def test_a_background_backfill_lands_and_releases_the_lease(env: Any) -> None:
    db, rc, table = env
    async with CachedStore(db, rc, table=table, value_columns=["name"], settings=_BACKGROUND) as s:
        r = rc.any_client()
        for cold in (False, True):  # get first, then lease first (GET_OR_LEASE)
            key = 2 if cold else 1
            s._miss_rate = 1.0 if cold else 0.0
            assert await s.get(key) == {"name": f"n{key}"}
            await s.drain()
            assert s.stats().inflight == 0  # the flight ended with its backfill
            assert (await r.get(s.redis_key(key)) or b"").endswith(b'{"name":"n%d"}' % key)
            assert await r.get(s.redis_key(key) + ":lease") is None
        assert _count(table, "background") == 2
        hits = s.stats().hits
        assert await s.get(1) == {"name": "n1"}
        assert s.stats().hits == hits + 1
        assert s.stats().pg_reads == 2


async def test_a_read_right_after_a_miss_shares_its_value(env: Any) -> None:
    db, rc, table = env
    async with CachedStore(db, rc, table=table, value_columns=["name"], settings=_BACKGROUND) as s:
        got = [await s.get(3) for _ in range(5)]  # sequential: the backfill may not be there
        assert got == [{"name": "n3"}] * 5
        assert s.stats().pg_reads == 1  # ...yet no second read of PostgreSQL
        assert s.stats().lease_waits == 0


async def test_close_waits_for_background_backfills_then_backfills_inline(env: Any) -> None:
    db, rc, table = env
    store = CachedStore(db, rc, table=table, value_columns=["name"], settings=_BACKGROUND)
    values = await asyncio.gather(*(store.get(k) for k in range(1, 11)))
    assert values == [{"name": f"n{k}"} for k in range(1, 11)]
    await store.close()
    assert not store._backfills
    cached = await rc.any_client().mget([store.redis_key(k) for k in range(1, 11)])
    assert all(c is not None for c in cached)
    inline = _count(table, "inline")
    assert await store.get(11) == {"name": "n11"}  # after close: written before it returns
    assert _count(table, "inline") == inline + 1
    assert await rc.any_client().get(store.redis_key(11)) is not None


async def test_a_failing_background_backfill_is_counted_and_releases_the_lease(
    env: Any, caplog: pytest.LogCaptureFixture
) -> None:
    db, rc, table = env
    r = rc.any_client()

    async def spoil(key: Any, version: int | None) -> None:
        # After the database read, the key turns into a hash: the fenced set will fail
        # with WRONGTYPE (an error that is not "Redis is down").
        await r.hset(f"sa:{table}:{{{key}}}", "x", "y")

    store = CachedStore(
        db,
        rc,
        table=table,
        value_columns=["name"],
        settings=_BACKGROUND,
        hooks=StoreHooks(after_db_read=spoil),
    )
    with caplog.at_level(logging.WARNING, logger="sheetanchor.state"):
        assert await store.get(4) == {"name": "n4"}  # the caller has its value...
        await store.close()
    assert _count(table, "failed") == 1  # ...the failure is counted and logged
    assert any("backfill of" in m and "WRONGTYPE" in m for m in caplog.messages)
    assert await r.get(store.redis_key(4) + ":lease") is None  # the lease was released
    assert store.stats().breaker == "closed"  # a refusing server is not an outage
    await r.delete(store.redis_key(4))


async def test_background_backfills_are_bounded(env: Any) -> None:
    db, rc, table = env
    gate = asyncio.Event()
    arrived: list[Any] = []

    async def slow(key: Any, version: int | None) -> None:
        arrived.append(key)
        await gate.wait()

    settings = CacheSettings(max_backfills=2)
    store = CachedStore(
        db, rc, table=table, value_columns=["name"], settings=settings, hooks=StoreHooks(slow)
    )
    async with store:
        # Four misses of different keys read at once; at most two backfills run behind.
        readers = [asyncio.create_task(store.get(k)) for k in range(1, 5)]
        while len(arrived) < 4:  # every reader has its row and waits to backfill
            await asyncio.sleep(0.01)
        gate.set()
        assert await asyncio.gather(*readers) == [{"name": f"n{k}"} for k in range(1, 5)]
        # The first two went behind; the other two found the set full and wrote inline.
        assert (_count(table, "background"), _count(table, "inline")) == (2, 2)
    assert not store._backfills
