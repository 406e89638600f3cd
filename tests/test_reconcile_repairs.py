"""The reconciler counts only repairs that happened, and its periodic loop survives any
failed pass (real servers)."""

from __future__ import annotations

import asyncio
from typing import Any

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


class _LiveWriterDb:
    """The real database, plus a writer that races the orphan pass (a test seam, no mock).

    Right after the reconciler learned that key 3 has no row, and before it repairs the
    cached entry it judged an orphan, another writer caches a newer entry for that key: the
    fenced repair is refused, so that drift is not repaired.
    """

    def __init__(self, db: Database, race: Any) -> None:
        self._db = db
        self._race = race

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        rows = await self._db.fetch(sql, *args)
        if "= ANY($1::text[])" in sql:
            await self._race()
        return rows

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        return await self._db.fetchrow(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._db.fetchval(sql, *args)


async def test_filled_rows_are_not_counted_as_repaired_drift(pg_url: str, redis_url: str) -> None:
    table = table_name()
    async with Database(pg_url) as db, RedisClient(redis_url) as rc:
        await make_items_table(db, table)
        plain = CachedStore(db, rc, table=table, value_columns=["name"])
        await plain.put_many({i: {"name": f"n{i}"} for i in range(6)})
        await plain.get_many(range(6))
        r = rc.any_client()
        for k in (4, 5):
            await r.delete(plain.redis_key(k))  # missing: filled with fill_missing
        await db.execute(f"DELETE FROM {table} WHERE id = 3")  # orphan: drift

        async def race() -> None:
            # A rogue writer caches a far newer entry for the orphan key meanwhile.
            await r.set(plain.redis_key(3), b'v999999999|0|0|{"name":"rogue"}')

        store = CachedStore(_LiveWriterDb(db, race), rc, table=table, value_columns=["name"])
        report = await Reconciler(store, fill_missing=True).run(repair=True)
        assert (report.missing, report.orphan, report.drift) == (2, 1, 1)
        assert report.repaired == 0  # the one drifted entry was not repaired
        assert report.filled == 2  # the two uncached rows were cached
        assert report.remaining == 1  # ... so drift remains (and the CLI exits 1)
        again = await Reconciler(plain).run()
        assert again.missing == 0
        assert again.orphan == 1
