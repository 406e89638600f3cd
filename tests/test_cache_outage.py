"""Redis down or slow: reads fall back to PostgreSQL behind a breaker; nothing stale after.

Incident 000's readers saw the two stores disagree. The worst case is a write made while Redis
is unreachable: PostgreSQL commits, Redis keeps the old entry, and when Redis answers again a
naive cache serves the old value. CachedStore remembers such keys and invalidates them (with
the fence) before it reads Redis again. Faults come from a TCP proxy and from a Redis server
this test session started itself, stopped and restarted mid-run.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
import redis.exceptions
from tests._store_helpers import FAST_REDIS as _FAST
from tests._store_helpers import FakeClock, make_items_table, table_name
from tests._store_helpers import proxy_for as _proxy_for

from sheetanchor.config import parse_url
from sheetanchor.embedded import EmbeddedRedis
from sheetanchor.errors import SheetAnchorError
from sheetanchor.postgres import Database
from sheetanchor.redis import RedisClient
from sheetanchor.retry import RetryPolicy
from sheetanchor.state import CachedStore, CacheSettings, CircuitBreaker
from sheetanchor.testing import FaultProxy


async def test_naive_cache_serves_a_stale_value_after_an_outage(
    pg_url: str, redis_url: str, fault_proxy: Callable[[str, int], FaultProxy]
) -> None:
    proxy = _proxy_for(fault_proxy, redis_url)
    table = table_name()
    async with Database(pg_url) as db, RedisClient(proxy.url(redis_url), **_FAST) as rc:
        await make_items_table(db, table)

        async def naive_put(key: int, name: str) -> None:
            await db.execute(
                f"INSERT INTO {table} (id, name) VALUES ($1, $2) "
                "ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name",
                key,
                name,
            )
            # "The cache is only a cache": the incident's reasoning.
            with contextlib.suppress(redis.exceptions.ConnectionError):
                await rc.client().set(f"naive:{key}", orjson.dumps({"name": name}))

        async def naive_get(key: int) -> Any:
            try:
                cached = await rc.client().get(f"naive:{key}")
            except redis.exceptions.ConnectionError:
                cached = None
            if cached is not None:
                return orjson.loads(cached)
            row = await db.fetchrow(f"SELECT name FROM {table} WHERE id = $1", key)
            return {"name": row[0]}

        await naive_put(1, "a")
        proxy.refuse()
        proxy.reset_all()
        await naive_put(1, "b")  # committed; the cache could not be told
        proxy.pass_through()
        assert await naive_get(1) == {"name": "a"}  # stale: the database says "b"


async def test_writes_during_an_outage_are_invalidated_before_redis_is_read_again(
    pg_url: str, redis_url: str, fault_proxy: Callable[[str, int], FaultProxy]
) -> None:
    proxy = _proxy_for(fault_proxy, redis_url)
    table = table_name()
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=1.0, clock=clock)
    direct = aioredis.Redis.from_url(redis_url)
    try:
        async with Database(pg_url) as db, RedisClient(proxy.url(redis_url), **_FAST) as rc:
            await make_items_table(db, table)
            store = CachedStore(db, rc, table=table, value_columns=["name"], breaker=breaker)
            await store.put(1, {"name": "a"})
            assert await store.get(1) == {"name": "a"}

            proxy.refuse()
            proxy.reset_all()
            assert await store.put(1, {"name": "b"}) is not None  # PostgreSQL committed
            assert store.stats().breaker == "open"
            assert store.stats().pending_invalidations == 1
            # Redis still holds "a" (it was never down, only unreachable from here)...
            assert (await direct.get(store.redis_key(1)) or b"").endswith(b'{"name":"a"}')
            # ...but no read uses it: the breaker is open, reads go to PostgreSQL, and a
            # dead Redis costs no call at all (the proxy accepts nothing meanwhile).
            accepted = proxy.stats.accepted
            for _ in range(50):
                assert await store.get(1) == {"name": "b"}
            assert proxy.stats.accepted == accepted
            assert store.stats().skipped == 50

            proxy.pass_through()
            assert await store.get(1) == {"name": "b"}  # still open: not probed yet
            clock.now += 2.0  # the breaker lets one probe through: pending keys first
            assert await store.get(1) == {"name": "b"}
            await store.drain()  # that read's backfill is written in the background
            assert store.stats().breaker == "closed"
            assert store.stats().pending_invalidations == 0
            assert (await direct.get(store.redis_key(1)) or b"").endswith(b'{"name":"b"}')
            assert await store.get(1) == {"name": "b"}
            assert store.stats().hits >= 1
    finally:
        await direct.aclose()


async def test_pending_overflow_drops_the_namespace(
    pg_url: str, redis_url: str, fault_proxy: Callable[[str, int], FaultProxy]
) -> None:
    proxy = _proxy_for(fault_proxy, redis_url)
    table = table_name()
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=1.0, clock=clock)
    direct = aioredis.Redis.from_url(redis_url)
    try:
        async with Database(pg_url) as db, RedisClient(proxy.url(redis_url), **_FAST) as rc:
            await make_items_table(db, table)
            store = CachedStore(
                db,
                rc,
                table=table,
                value_columns=["name"],
                breaker=breaker,
                settings=CacheSettings(max_pending=2),
            )
            await store.put_many({i: {"name": "old"} for i in range(5)})
            await direct.set("unrelated", b"1")
            proxy.refuse()
            proxy.reset_all()
            await store.put_many({i: {"name": "new"} for i in range(5)})
            assert store.cache.pending.overflowed
            proxy.pass_through()
            clock.now += 2.0
            assert await store.get_many(range(5)) == {i: {"name": "new"} for i in range(5)}
            assert not store.cache.pending.overflowed
            # Every entry of the namespace went, then the misses were filled afresh.
            for i in range(5):
                assert (await direct.get(store.redis_key(i)) or b"").endswith(b'"new"}')
            assert await direct.get("unrelated") == b"1"
    finally:
        await direct.aclose()


async def test_slow_redis_is_bypassed(
    pg_url: str, redis_url: str, fault_proxy: Callable[[str, int], FaultProxy]
) -> None:
    proxy = _proxy_for(fault_proxy, redis_url)
    table = table_name()
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=1.0, clock=clock)
    async with Database(pg_url) as db, RedisClient(proxy.url(redis_url), **_FAST) as rc:
        await make_items_table(db, table)
        store = CachedStore(
            db,
            rc,
            table=table,
            value_columns=["name"],
            breaker=breaker,
            settings=CacheSettings(timeout=0.2),
        )
        await store.put(1, {"name": "a"})
        proxy.blackhole()  # a partition: connects hang, replies never come
        assert await store.get(1) == {"name": "a"}  # one timeout, then PostgreSQL
        assert store.stats().breaker == "open"
        assert await store.put(1, {"name": "b"}) is not None
        for _ in range(20):
            assert await store.get(1) == {"name": "b"}
        proxy.pass_through()
        proxy.reset_all()
        clock.now += 2.0
        assert await store.get(1) == {"name": "b"}
        assert store.stats().breaker == "closed"


async def test_redis_stopped_and_restarted_mid_run(
    pg_url: str, private_redis: EmbeddedRedis
) -> None:
    table = table_name()
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=0.05, max_reset_timeout=0.2)
    async with Database(pg_url) as db, RedisClient(private_redis.url, **_FAST) as rc:
        await make_items_table(db, table)
        store = CachedStore(db, rc, table=table, value_columns=["name"], breaker=breaker)
        await store.put_many({i: {"name": f"{i}-v1"} for i in range(10)})
        assert len(await store.get_many(range(10))) == 10

        await asyncio.to_thread(private_redis.stop)
        for i in range(10):  # writes still commit while Redis is down
            assert await store.put(i, {"name": f"{i}-v2"}) is not None
        for i in range(10):
            assert await store.get(i) == {"name": f"{i}-v2"}
        assert store.stats().breaker != "closed"

        await asyncio.to_thread(private_redis.start)
        for _ in range(500):  # wait (bounded) for a probe to close the breaker
            if store.stats().breaker == "closed":
                break
            assert await store.get(0) == {"name": "0-v2"}
            await asyncio.sleep(0.02)
        assert store.stats().breaker == "closed"
        assert await store.get_many(range(10)) == {i: {"name": f"{i}-v2"} for i in range(10)}
        hits = store.stats().hits
        assert await store.get(3) == {"name": "3-v2"}
        assert store.stats().hits == hits + 1  # served by the restarted Redis again


async def test_a_restarted_redis_that_kept_its_data_never_serves_a_pre_outage_value(
    pg_url: str, tmp_path: Path
) -> None:
    # The server comes back with every entry it had (persistence on), so the entries of
    # the keys written while it was down are still the old ones until they are invalidated.
    server = EmbeddedRedis(tmp_path / "redis", private=True, persistent=True)
    server.start()
    direct = aioredis.Redis.from_url(server.url)
    table = table_name()
    keys = range(20)
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=0.05, max_reset_timeout=0.2)
    try:
        async with Database(pg_url) as db, RedisClient(server.url, **_FAST) as rc:
            await make_items_table(db, table)
            store = CachedStore(db, rc, table=table, value_columns=["name"], breaker=breaker)
            await store.put_many({i: {"name": f"{i}-v1"} for i in keys})
            assert await store.get_many(keys) == {i: {"name": f"{i}-v1"} for i in keys}
            for i in keys:
                assert b"-v1" in (await direct.get(store.redis_key(i)) or b"")
            await direct.set("kept", "yes")

            await asyncio.to_thread(server.stop)
            for i in keys:  # acknowledged while Redis is down
                assert await store.put(i, {"name": f"{i}-v2"}) is not None
            assert store.stats().breaker != "closed"

            await asyncio.to_thread(server.start)
            await direct.connection_pool.disconnect()  # its connection died with the server
            assert await direct.get("kept") == b"yes"  # the restart kept the data
            want = {i: {"name": f"{i}-v2"} for i in keys}
            for _ in range(500):  # every read, while the breaker closes and after
                closed = store.stats().breaker == "closed"
                assert await store.get_many(keys) == want
                for i in keys:
                    assert await store.get(i) == want[i]
                if closed:
                    break
                await asyncio.sleep(0.02)
            assert store.stats().breaker == "closed"
            for i in keys:  # nothing of before the outage is left in Redis
                assert b"-v1" not in (await direct.get(store.redis_key(i)) or b"")
            # Another process (its own breaker, no pending keys) reads the same Redis.
            other = CachedStore(db, rc, table=table, value_columns=["name"])
            assert await other.get_many(keys) == want
            assert [await other.get(i) for i in keys] == [want[i] for i in keys]
            await store.close()
            await other.close()
    finally:
        await direct.aclose()
        await asyncio.to_thread(server.remove)


async def test_transient_database_errors_are_retried(
    pg_url: str, redis_url: str, fault_proxy: Callable[[str, int], FaultProxy]
) -> None:
    parsed = parse_url(pg_url)
    proxy = fault_proxy(parsed.host or "127.0.0.1", parsed.port or 5432)
    table = table_name()
    waits: list[float] = []

    async def heal_then_wait(seconds: float) -> None:
        # The policy's wait before a retry: the fault ends here, so the retry succeeds.
        waits.append(seconds)
        proxy.pass_through()
        await asyncio.sleep(seconds)

    fast = RetryPolicy(
        max_attempts=5, initial=0.01, maximum=0.05, deadline=10.0, sleep=heal_then_wait
    )
    async with Database(proxy.url(pg_url)) as db, RedisClient(redis_url) as rc:
        await make_items_table(db, table)
        store = CachedStore(db, rc, table=table, value_columns=["name"], retry=fast)
        once = CachedStore(db, rc, table=table, value_columns=["name"], retry=None)
        await store.put(1, {"name": "a"})
        # Every pooled database connection dies and reconnecting is refused: the pool sees
        # the dead connections at checkout but cannot replace them yet.
        proxy.reset_all()
        proxy.refuse()
        with pytest.raises(SheetAnchorError):
            await once.put(1, {"name": "x"})  # without the policy the caller sees it
        assert await store.put(1, {"name": "b"}) is not None  # retried on a new connection
        assert len(waits) == 1
        proxy.reset_all()
        proxy.refuse()
        await rc.client().delete(store.redis_key(1))
        assert await store.get(1) == {"name": "b"}
        assert len(waits) == 2
