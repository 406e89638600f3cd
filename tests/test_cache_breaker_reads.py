"""Reads while the breaker is open take the lean path: still counted (stats and metrics),
one PostgreSQL read per key at a time, and the breaker half-opens after its reset timeout
so the store goes back to Redis."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from tests._store_helpers import FakeClock, make_items_table, table_name

from sheetanchor.observe import REGISTRY
from sheetanchor.postgres import Database
from sheetanchor.redis import RedisClient
from sheetanchor.state import CachedStore, CircuitBreaker, StoreHooks
from sheetanchor.state._singleflight import Landing, SingleFlight


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(f"sheetanchor_state_{name}", labels) or 0.0


async def test_skipped_reads_are_counted_and_the_breaker_half_opens(
    pg_url: str, redis_url: str
) -> None:
    table = table_name()
    clock = FakeClock()
    async with Database(pg_url) as db, RedisClient(redis_url) as rc:
        await make_items_table(db, table)
        await db.execute(f"INSERT INTO {table} (id, name) VALUES (1, 'a'), (2, 'b')")
        breaker = CircuitBreaker(failure_threshold=1, reset_timeout=5.0, jitter=0.0, clock=clock)
        store = CachedStore(
            db, rc, table=table, value_columns=["name"], namespace=f"sa:t:{table}", breaker=breaker
        )
        breaker.trip()  # as if Redis had been unreachable
        for key in (1, 2, 1):
            assert (await store.get(key)) == {"name": "ab"[key - 1]}
        assert await store.get(3) is None
        stats = store.stats()
        assert (stats.skipped, stats.pg_reads, stats.hits, stats.misses) == (4, 4, 0, 0)
        assert stats.breaker == "open"
        assert _sample("cache_lookups_total", table=table, result="skipped") == 4
        assert _sample("pg_reads_total", table=table) == 4
        assert await rc.execute_command("EXISTS", store.redis_key(1)) == 0  # nothing cached

        clock.now += 5.0  # the reset timeout: the next read is the probe
        assert (await store.get(1)) == {"name": "a"}
        assert store.stats().breaker == "closed"
        await store.drain()
        assert (await store.get(1)) == {"name": "a"}  # from Redis now
        stats = store.stats()
        assert (stats.skipped, stats.misses, stats.hits, stats.pg_reads) == (4, 1, 1, 5)
        assert _sample("cache_lookups_total", table=table, result="hit") == 1
        assert _sample("lease_events_total", table=table, outcome="acquired") == 1
        assert _sample("backfills_total", table=table, mode="background") == 1
        await store.close()


async def test_concurrent_skipped_reads_of_a_key_share_one_database_read(
    pg_url: str, redis_url: str
) -> None:
    table = table_name()
    gate = asyncio.Event()
    reads: list[Any] = []

    async def after_db_read(key: Any, version: int | None) -> None:
        reads.append(key)
        await gate.wait()

    async with Database(pg_url) as db, RedisClient(redis_url) as rc:
        await make_items_table(db, table)
        await db.execute(f"INSERT INTO {table} (id, name) VALUES (1, 'a')")
        breaker = CircuitBreaker(
            failure_threshold=1, reset_timeout=3600.0, max_reset_timeout=3600.0
        )
        store = CachedStore(
            db,
            rc,
            table=table,
            value_columns=["name"],
            namespace=f"sa:t:{table}",
            breaker=breaker,
            hooks=StoreHooks(after_db_read=after_db_read),
        )
        await store.prepare()  # else the callers reach the flight one prepare apart
        breaker.trip()
        tasks = [asyncio.ensure_future(store.get(1)) for _ in range(5)]
        while not reads:
            await asyncio.sleep(0.001)
        gate.set()
        assert await asyncio.gather(*tasks) == [{"name": "a"}] * 5
        assert reads == [1]
        stats = store.stats()
        assert (stats.skipped, stats.pg_reads, stats.inflight) == (5, 1, 0)


async def test_a_caller_joining_a_landed_flight_takes_its_value() -> None:
    flights = SingleFlight()
    background = asyncio.Event()
    loads = 0

    async def work() -> None:
        await background.wait()

    async def load() -> Landing:
        nonlocal loads
        loads += 1
        return Landing("v", asyncio.ensure_future(work()))

    assert await flights.run("k", load) == "v"
    assert flights.inflight() == 1  # lingers until the background work ends
    assert await flights.run("k", load) == "v"  # joined: no second load
    assert (loads, flights.shared) == (1, 1)
    background.set()
    await asyncio.sleep(0.01)
    assert flights.inflight() == 0


async def test_a_store_gone_keeps_its_counts_in_the_metrics(pg_url: str, redis_url: str) -> None:
    table = table_name()
    async with Database(pg_url) as db, RedisClient(redis_url) as rc:
        await make_items_table(db, table)
        breaker = CircuitBreaker(failure_threshold=1)
        store = CachedStore(db, rc, table=table, namespace=f"sa:t:{table}", breaker=breaker)
        breaker.trip()
        await store.get(1)
        await store.get(2)
        del store
        gc.collect()
        assert _sample("cache_lookups_total", table=table, result="skipped") == 2
        again = CachedStore(db, rc, table=table, namespace=f"sa:t:{table}", breaker=breaker)
        await again.get(3)
        assert _sample("cache_lookups_total", table=table, result="skipped") == 3
