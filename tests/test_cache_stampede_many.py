"""Stampede protection for ``get_many``: 4 processes asking for the same 50 missing keys at
once read each key from PostgreSQL once.

Each row read is counted by PostgreSQL itself: the store reads through a view whose filter
calls, per row, a function that counts the key and sleeps a little (so that every process
really is concurrent with the loads).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import traceback
from typing import Any

from tests._store_helpers import make_items_table, table_name

from sheetanchor.postgres import Database
from sheetanchor.redis import RedisClient
from sheetanchor.state import CachedStore, CacheSettings

PROCESSES = 4
KEYS = 50


async def _setup(pg_url: str) -> str:
    table = table_name()
    async with Database(pg_url) as db:
        await make_items_table(db, table)
        await db.execute(
            f"INSERT INTO {table} (id, name) SELECT g, 'n' || g FROM generate_series(1, $1) g",
            KEYS,
        )
        await db.execute(f"CREATE TABLE {table}_reads (id bigint NOT NULL)")
        await db.execute(
            f"""
            CREATE FUNCTION {table}_count(k bigint) RETURNS boolean LANGUAGE plpgsql
            VOLATILE AS $$
            BEGIN
                INSERT INTO {table}_reads VALUES (k);
                PERFORM pg_sleep(0.005);
                RETURN true;
            END $$
            """
        )
        await db.execute(
            f"CREATE VIEW {table}_counted AS SELECT i.* FROM {table} i WHERE {table}_count(i.id)"
        )
    return table


def _worker(pg_url: str, redis_url: str, table: str, barrier: Any, queue: Any) -> None:
    async def main() -> dict[str, Any]:
        async with Database(pg_url) as db, RedisClient(redis_url) as rc:
            store = CachedStore(
                db,
                rc,
                table=table,
                value_columns=["name"],
                read_from=f"{table}_counted",
                # Generous lease times: a loaded CI machine must not turn waiters into readers.
                settings=CacheSettings(
                    lease_ttl=60.0, lease_wait=60.0, tombstone_ttl=200.0, max_backfill_age=60.0
                ),
            )
            await store.prepare()
            await asyncio.to_thread(barrier.wait, 60)
            got = await store.get_many(range(1, KEYS + 1))
            assert got == {k: {"name": f"n{k}"} for k in range(1, KEYS + 1)}, got
            return store.stats()._asdict()

    try:
        queue.put(asyncio.run(main()))
    except BaseException:
        queue.put(traceback.format_exc())
        raise


def test_get_many_of_the_same_missing_keys_in_four_processes_reads_each_key_once(
    pg_url: str, redis_url: str
) -> None:
    table = asyncio.run(_setup(pg_url))
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(pg_url, redis_url, table, barrier, queue))
        for _ in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    stats = [queue.get(timeout=90) for _ in procs]
    assert all(isinstance(s, dict) for s in stats), [s for s in stats if isinstance(s, str)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0

    async def reads() -> dict[int, int]:
        async with Database(pg_url) as db:
            rows = await db.fetch(f"SELECT id, count(*) FROM {table}_reads GROUP BY id")
            return {int(r[0]): int(r[1]) for r in rows}

    counted = asyncio.run(reads())
    assert counted == dict.fromkeys(range(1, KEYS + 1), 1), stats
    assert sum(s["leases_acquired"] for s in stats) == KEYS
    assert sum(s["lease_timeouts"] for s in stats) == 0


async def test_get_many_releases_its_leases_and_waits_for_a_holder(
    pg_url: str, redis_url: str
) -> None:
    table = await _setup(pg_url)
    async with Database(pg_url) as db, RedisClient(redis_url) as rc:
        store = CachedStore(db, rc, table=table, value_columns=["name"])
        r = rc.any_client()
        # Another loader holds the lease of key 3 and fills it a moment later.
        await r.set(store.redis_key(3) + ":lease", "someone", px=60_000)

        async def holder() -> None:
            await asyncio.sleep(0.1)
            other = CachedStore(db, rc, table=table, value_columns=["name"])
            await other.put(3, {"name": "from the holder"})
            await r.delete(store.redis_key(3) + ":lease")

        fill = asyncio.create_task(holder())
        got = await store.get_many([1, 2, 3, 99])  # 99: no such row
        await fill
        assert got == {1: {"name": "n1"}, 2: {"name": "n2"}, 3: {"name": "from the holder"}}
        stats = store.stats()
        assert (stats.leases_acquired, stats.lease_waits, stats.lease_timeouts) == (3, 1, 0)
        leases = await r.mget([store.redis_key(k) + ":lease" for k in (1, 2, 3, 99)])
        assert leases == [None] * 4  # ours were released with the backfill
        assert await store.get_many([1, 2, 99]) == {1: {"name": "n1"}, 2: {"name": "n2"}}
        assert store.stats().hits == 2
        assert store.stats().absent_hits == 1
