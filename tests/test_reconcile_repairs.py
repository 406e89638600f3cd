"""The reconciler counts only repairs that happened, and its periodic loop survives any
failed pass (real servers)."""

from __future__ import annotations

import asyncio

from tests._store_helpers import make_items_table, table_name

from sheetanchor.postgres import Database
from sheetanchor.redis import RedisClient
from sheetanchor.state import CachedStore, Reconciler, _metrics
from sheetanchor.state._reconcile import _Tally


async def test_a_delete_that_did_not_happen_is_not_a_repair(pg_url: str, redis_url: str) -> None:
    table = table_name()
    async with Database(pg_url) as db, RedisClient(redis_url) as rc:
        await make_items_table(db, table)
        store = CachedStore(db, rc, table=table, value_columns=["name"])
        await store.put(1, {"name": "a"})
        assert await store.get(1) == {"name": "a"}
        rkey = store.redis_key(1)
        judged = b"v1|0|0|not what is there now"  # the entry changed since it was judged
        tally = _Tally(table)
        await Reconciler(store)._repair([], [(rkey, judged)], tally)
        assert tally.counts["repaired"] == 0
        assert await rc.any_client().get(rkey) is not None  # the live entry was kept
        current = await rc.any_client().get(rkey)
        assert current is not None
        await Reconciler(store)._repair([], [(rkey, current)], tally)
        assert tally.counts["repaired"] == 1
        assert await rc.any_client().get(rkey) is None


async def test_the_periodic_loop_survives_a_pass_that_fails(pg_url: str, redis_url: str) -> None:
    table = table_name()
    async with Database(pg_url) as db, RedisClient(redis_url) as rc:
        await make_items_table(db, table)
        store = CachedStore(db, rc, table=table, value_columns=["name"])
        await store.put(1, {"name": "a"})
        await store.prepare()
        await db.execute(f"DROP TABLE {table}")  # every pass now fails (not an outage)
        failed = _metrics.DRIFT.labels(table, "failed_pass")
        stop = asyncio.Event()
        task = asyncio.create_task(Reconciler(store).run_periodically(0.01, stop=stop))
        while failed._value.get() < 2 and not task.done():
            await asyncio.sleep(0.01)
        assert not task.done(), task.exception()
        stop.set()
        await task
        assert failed._value.get() >= 2
