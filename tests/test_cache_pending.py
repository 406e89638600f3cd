"""Review fixes of CachedStore's Redis side, each on real servers with the default breaker.

The older outage tests all used ``failure_threshold=1``, which hid that one failed write
left the breaker closed and its pending invalidation unwritten.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis
import redis.exceptions
from tests._store_helpers import FAST_REDIS as _FAST
from tests._store_helpers import FakeClock, make_items_table, table_name
from tests._store_helpers import proxy_for as _proxy_for

from sheetanchor.embedded import EmbeddedRedis
from sheetanchor.postgres import Database
from sheetanchor.redis import RedisClient
from sheetanchor.retry import RetryPolicy
from sheetanchor.state import CachedStore, CircuitBreaker
from sheetanchor.state._entry import parse
from sheetanchor.testing import FaultProxy


async def _cached_version(redis_url: str, rkey: str) -> int | None:
    direct = aioredis.Redis.from_url(redis_url)
    try:
        data = await direct.get(rkey)
    finally:
        await direct.aclose()
    if data is None:
        return None
    entry = parse(data)
    assert entry is not None
    return entry.version


async def test_one_failed_write_with_the_default_breaker_serves_no_stale_read(
    pg_url: str, redis_url: str, fault_proxy: Callable[[str, int], FaultProxy]
) -> None:
    proxy = _proxy_for(fault_proxy, redis_url)
    table = table_name()
    clock = FakeClock()
    async with Database(pg_url) as db, RedisClient(proxy.url(redis_url), **_FAST) as rc:
        await make_items_table(db, table)
        # The default threshold (2); only the clock is injected.
        store = CachedStore(
            db, rc, table=table, value_columns=["name"], breaker=CircuitBreaker(clock=clock)
        )
        await store.put(1, {"name": "a"})
        assert await store.get(1) == {"name": "a"}
        proxy.refuse()
        proxy.reset_all()
        version = await store.put(1, {"name": "b"})  # committed; Redis could not be told
        assert version is not None
        assert store.stats().pending_invalidations == 1
        assert store.stats().breaker == "open"
        proxy.pass_through()
        # Redis answers again and still holds "a": no read may return it.
        assert [await store.get(1) for _ in range(3)] == [{"name": "b"}] * 3
        clock.now += 60  # the open period is over: the next read probes and writes pending
        assert await store.get(1) == {"name": "b"}
        assert store.stats().breaker == "closed"
        assert store.stats().pending_invalidations == 0
        cached = await _cached_version(redis_url, store.redis_key(1))
        assert cached is not None
        assert cached >= version
        assert await store.get(1) == {"name": "b"}


async def test_a_refused_redis_update_after_the_commit_leaves_the_key_pending(
    pg_url: str, private_redis: EmbeddedRedis
) -> None:
    table = table_name()
    clock = FakeClock()
    direct = aioredis.Redis.from_url(private_redis.url)
    async with Database(pg_url) as db, RedisClient(private_redis.url, **_FAST) as rc:
        await make_items_table(db, table)
        store = CachedStore(
            db, rc, table=table, value_columns=["name"], breaker=CircuitBreaker(clock=clock)
        )
        await store.put(1, {"name": "a"})
        assert await store.get(1) == {"name": "a"}
        # Redis answers, but refuses writes (OOM): a ResponseError, not "unreachable".
        await direct.config_set("maxmemory-policy", "noeviction")
        await direct.config_set("maxmemory", "1")
        try:
            with pytest.raises(redis.exceptions.ResponseError):
                await store.put(1, {"name": "b"})
            assert store.stats().pending_invalidations == 1
            assert store.stats().breaker == "open"
            assert await store.get(1) == {"name": "b"}  # from PostgreSQL, not the old entry
        finally:
            await direct.config_set("maxmemory", "0")
            await direct.aclose()
        clock.now += 60
        assert await store.get(1) == {"name": "b"}
        assert store.stats().pending_invalidations == 0
        assert store.stats().breaker == "closed"
        assert await store.get(1) == {"name": "b"}


async def test_a_cancelled_redis_update_after_the_commit_leaves_the_key_pending(
    pg_url: str, redis_url: str, fault_proxy: Callable[[str, int], FaultProxy]
) -> None:
    proxy = _proxy_for(fault_proxy, redis_url)
    table = table_name()
    clock = FakeClock()
    slow = dict(socket_timeout=60, socket_connect_timeout=5, retry=RetryPolicy(max_attempts=1))
    async with Database(pg_url) as db, RedisClient(proxy.url(redis_url), **slow) as rc:
        await make_items_table(db, table)
        store = CachedStore(
            db, rc, table=table, value_columns=["name"], breaker=CircuitBreaker(clock=clock)
        )
        await store.put(1, {"name": "a"})
        assert await store.get(1) == {"name": "a"}
        proxy.add_latency(120)  # requests reach Redis; the answers are held
        sent = proxy.stats.bytes_to_server
        task = asyncio.create_task(store.put(1, {"name": "b"}))
        # The only Redis request of the put is the fenced set after the commit.
        while proxy.stats.bytes_to_server == sent and not task.done():
            await asyncio.sleep(0.01)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        proxy.pass_through()
        assert store.stats().pending_invalidations == 1
        assert store.stats().breaker == "open"
        assert await store.get(1) == {"name": "b"}
        clock.now += 60
        assert await store.get(1) == {"name": "b"}
        assert store.stats().pending_invalidations == 0
        assert await store.get(1) == {"name": "b"}


async def test_failures_apart_do_not_open_the_default_breaker(
    pg_url: str, redis_url: str, fault_proxy: Callable[[str, int], FaultProxy]
) -> None:
    # Threshold 2 means two *consecutive* failures: a success in between resets the count.
    proxy = _proxy_for(fault_proxy, redis_url)
    table = table_name()
    async with Database(pg_url) as db, RedisClient(proxy.url(redis_url), **_FAST) as rc:
        await make_items_table(db, table)
        store = CachedStore(db, rc, table=table, value_columns=["name"])
        await store.put(1, {"name": "a"})
        for _ in range(3):
            proxy.refuse()
            proxy.reset_all()
            assert await store.get(1) == {"name": "a"}  # one failed GET, served from PG
            proxy.pass_through()
            assert await store.get(1) == {"name": "a"}  # from Redis again
            assert store.stats().breaker == "closed"
