"""A backfill held up past max_backfill_age is not written, however late it gets going.

The age check (a backfill whose database read started too long ago could land after the
tombstone of a deletion expired) used to run before the backfill waited for a pooled Redis
connection: under pool contention the set could run long after the check passed. The age
now holds when the set runs: the client stops waiting at the deadline, and the fence
scripts refuse a set that reaches the server past it (a deadline compared with TIME).
Real servers; the contended pool is a pool of one connection held by a blocking pop.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from tests._store_helpers import make_items_table, table_name

from sheetanchor.postgres import Database
from sheetanchor.redis import RedisClient
from sheetanchor.state import CachedStore, CacheSettings, StoreHooks
from sheetanchor.state._entry import KIND_VALUE, RANK, build
from sheetanchor.state._fence import FENCED_SET, FENCED_SET_RELEASE, FENCED_SET_RELEASE_MANY

_AGE = 0.3


@pytest.fixture
async def env(pg_url: str, redis_url: str) -> AsyncIterator[Any]:
    table = table_name()
    async with Database(pg_url) as db:
        await make_items_table(db, table)
        await db.execute(
            f"INSERT INTO {table} (id, name) SELECT g, 'n' || g FROM generate_series(1, 5) g"
        )
        direct = aioredis.Redis.from_url(redis_url)
        try:
            yield db, direct, table
        finally:
            await direct.aclose()


@pytest.mark.parametrize("max_backfills", [64, 0], ids=["background", "inline"])
async def test_a_backfill_that_waits_for_a_busy_pool_past_its_age_is_not_written(
    env: Any, redis_url: str, max_backfills: int
) -> None:
    db, direct, table = env
    queue = f"sa-test:late:{uuid.uuid4().hex}"
    held: list[asyncio.Task[Any]] = []
    settings = CacheSettings(max_backfill_age=_AGE, max_backfills=max_backfills)
    async with RedisClient(redis_url, max_connections=1, pool_timeout=30.0) as rc:

        async def occupy(key: Any, version: int | None) -> None:
            # Right after the database read: the only connection is busy (a blocking pop).
            held.append(asyncio.create_task(rc.client().blpop([queue], timeout=0)))
            while rc.stats().connections_in_use == 0:
                await asyncio.sleep(0.001)

        store = CachedStore(
            db,
            rc,
            table=table,
            value_columns=["name"],
            settings=settings,
            hooks=StoreHooks(after_db_read=occupy),
        )
        reader = asyncio.create_task(store.get(1))
        await asyncio.sleep(_AGE * 2)  # the backfill waits for the pool past its age
        await direct.lpush(queue, "go")  # the pool frees up
        assert await reader == {"name": "n1"}
        assert len(held) == 1
        assert await held[0] is not None
        await store.drain()
        assert await direct.get(store.redis_key(1)) is None  # too old: not written
        assert await direct.get(store.redis_key(1) + ":lease") is None  # released
        assert store.stats().fence_refused == 1
        assert store.stats().breaker == "closed"  # a busy pool is no outage

        await store.close()
        plain = CachedStore(db, rc, table=table, value_columns=["name"], settings=settings)
        assert await plain.get(2) == {"name": "n2"}  # in time: written as usual
        await plain.drain()
        assert await direct.get(plain.redis_key(2)) is not None
        await plain.close()


async def _server_ms(direct: aioredis.Redis) -> int:
    seconds, micros = await direct.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def test_the_fence_scripts_refuse_a_set_past_its_deadline(env: Any) -> None:
    _db, direct, _table = env
    tag = uuid.uuid4().hex
    k1, k2 = f"sa-test:{{{tag}a}}", f"sa-test:{{{tag}b}}"
    entry = build("v", 5, 0, 0, b'{"name":"x"}')
    assert entry[:1] == KIND_VALUE.encode()
    rank = RANK[KIND_VALUE]
    now = await _server_ms(direct)
    past, future = now - 1_000, now + 60_000

    assert await FENCED_SET(direct, keys=(k1,), args=(entry, 5, rank, 60_000, past)) == 0
    assert await direct.get(k1) is None
    assert await FENCED_SET(direct, keys=(k1,), args=(entry, 5, rank, 60_000, future)) == 1
    assert await FENCED_SET(direct, keys=(k2,), args=(entry, 5, rank, 60_000)) == 1  # none
    await direct.delete(k1, k2)

    await direct.set(k1 + ":lease", "tok")
    args = (entry, 5, rank, 60_000, "tok", past)
    assert await FENCED_SET_RELEASE(direct, keys=(k1, k1 + ":lease"), args=args) == 0
    assert (await direct.get(k1), await direct.get(k1 + ":lease")) == (None, None)

    await direct.set(k1 + ":lease", "tok")
    await direct.set(k2 + ":lease", "tok")
    keys = (k1, k2, k1 + ":lease", k2 + ":lease")
    many = (2, "tok", past, entry, 5, rank, 60_000, entry, 5, rank, 60_000)
    assert await FENCED_SET_RELEASE_MANY(direct, keys=keys, args=many) == [0, 0]
    assert await direct.mget(keys) == [None] * 4  # refused, and the leases released
    many = (2, "", int(time.time() * 1000) + 60_000, entry, 5, rank, 60_000, entry, 5, rank, 60_000)
    assert await FENCED_SET_RELEASE_MANY(direct, keys=(k1, k2), args=many) == [1, 1]
    assert await direct.mget(k1, k2) == [entry, entry]
    await direct.delete(k1, k2)
