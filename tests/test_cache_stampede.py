"""Stampede protection: one missing key read by 1,000 callers in 4 processes hits PostgreSQL once.

PostgreSQL reads are counted by PostgreSQL itself: the store reads through a view whose
one-time filter calls a function that increments a counter row (and sleeps 0.2 s, so that
all callers really are concurrent with the load).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import traceback
from typing import Any

import orjson
import pytest
from tests._store_helpers import make_items_table, table_name

from sheetanchor.postgres import Database
from sheetanchor.redis import RedisClient
from sheetanchor.state import CachedStore, CacheSettings

PROCESSES = 4
CALLERS = 250


async def _setup(pg_url: str) -> str:
    table = table_name()
    async with Database(pg_url) as db:
        await make_items_table(db, table)
        await db.execute(f"INSERT INTO {table} (id, name) VALUES (1, 'hot')")
        await db.execute(f"CREATE TABLE {table}_reads (n bigint NOT NULL)")
        await db.execute(f"INSERT INTO {table}_reads VALUES (0)")
        await db.execute(
            f"""
            CREATE FUNCTION {table}_count() RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
            BEGIN
                UPDATE {table}_reads SET n = n + 1;
                PERFORM pg_sleep(0.2);
                RETURN true;
            END $$
            """
        )
        await db.execute(
            f"CREATE VIEW {table}_counted AS "
            f"SELECT i.* FROM {table} i WHERE (SELECT {table}_count())"
        )
    return table


async def _reads(pg_url: str, table: str) -> int:
    async with Database(pg_url) as db:
        return int(await db.fetchval(f"SELECT n FROM {table}_reads"))


def _worker(pg_url: str, redis_url: str, table: str, barrier: Any, queue: Any, cold: bool) -> None:
    async def main() -> dict[str, Any]:
        async with Database(pg_url) as db, RedisClient(redis_url) as rc:
            # Generous lease times: a loaded CI machine must not turn waiters into readers.
            store = CachedStore(
                db,
                rc,
                table=table,
                value_columns=["name"],
                read_from=f"{table}_counted",
                settings=CacheSettings(
                    lease_ttl=60.0, lease_wait=60.0, tombstone_ttl=200.0, max_backfill_age=60.0
                ),
            )
            await store.prepare()
            if cold:
                store._miss_rate = 1.0  # as after many misses: lookups start with the lease
            await asyncio.to_thread(barrier.wait, 60)
            values = await asyncio.gather(*(store.get(1) for _ in range(CALLERS)))
            assert all(v == {"name": "hot"} for v in values), values[:3]
            return store.stats()._asdict()

    try:
        queue.put(asyncio.run(main()))
    except BaseException:
        queue.put(traceback.format_exc())  # the parent shows it instead of waiting
        raise


def test_naive_read_through_stampedes_postgres(pg_url: str, redis_url: str) -> None:
    table = asyncio.run(_setup(pg_url))

    async def main() -> None:
        async with Database(pg_url) as db, RedisClient(redis_url) as rc:

            async def naive_get() -> Any:
                cached = await rc.client().get("naive:1")
                if cached is not None:
                    return orjson.loads(cached)
                row = await db.fetchrow(f"SELECT name FROM {table}_counted WHERE id = 1")
                await rc.client().set("naive:1", orjson.dumps({"name": row[0]}))
                return {"name": row[0]}

            await asyncio.gather(*(naive_get() for _ in range(20)))

    asyncio.run(main())
    assert asyncio.run(_reads(pg_url, table)) == 20  # every concurrent caller hit PostgreSQL


@pytest.mark.parametrize("cold", [False, True], ids=["get-first", "lease-first"])
def test_one_postgres_read_for_a_thousand_callers_in_four_processes(
    pg_url: str, redis_url: str, cold: bool
) -> None:
    table = asyncio.run(_setup(pg_url))
    # spawn, not fork: the test process has threads (fixtures, proxies) whose locks a forked
    # child could inherit held.
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(pg_url, redis_url, table, barrier, queue, cold))
        for _ in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    stats = [queue.get(timeout=90) for _ in procs]
    assert all(isinstance(s, dict) for s in stats), [s for s in stats if isinstance(s, str)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert asyncio.run(_reads(pg_url, table)) == 1, stats
    assert sum(s["pg_reads"] for s in stats) == 1
    assert sum(s["leases_acquired"] for s in stats) == 1
    # The other processes waited for the holder's entry (or found it already there). Not
    # bounded to one wait per process: a caller whose lookup Redis answered "lease taken"
    # just before the entry landed, but that runs after its process's shared load ended,
    # starts a (short) wait of its own; a loaded machine makes that likelier.
    for s in stats:
        assert s["leases_acquired"] == 1 or s["lease_waits"] >= 1 or s["hits"] >= 1, s
    assert sum(s["lease_timeouts"] for s in stats) == 0
    # Every caller was served: from Redis, or by its process's one shared load.
    assert sum(s["hits"] + s["misses"] for s in stats) == PROCESSES * CALLERS
