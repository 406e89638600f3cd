"""Reconciler: drift between PostgreSQL and Redis is found, reported and repaired.

Incident 000 wanted "a reconciler that finds and repairs drift" and never built one: without
it, a write that bypassed the cache (a migration, a manual fix) stays invisible to readers
until the entry expires.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tests._store_helpers import make_items_table, table_name
from typer.testing import CliRunner

from sheetanchor.cli import app
from sheetanchor.postgres import Database
from sheetanchor.redis import RedisClient
from sheetanchor.state import CachedStore, Reconciler


async def _drifted(db: Database, rc: RedisClient, table: str) -> CachedStore:
    await make_items_table(db, table)
    store = CachedStore(db, rc, table=table, value_columns=["name"])
    await store.put_many({i: {"name": f"n{i}"} for i in range(10)})
    await store.get_many(range(10))
    r = rc.client()
    # 1: updated behind the cache's back -> stale
    await db.execute(f"UPDATE {table} SET name = 'fixed', version = DEFAULT WHERE id = 1")
    # 2: cache claims a version the database never had -> ahead
    await r.set(store.redis_key(2), b'v999999999|0|0|{"name":"future"}')
    # 3: row deleted behind the cache's back -> orphan
    await db.execute(f"DELETE FROM {table} WHERE id = 3")
    # 4: not cached -> missing (not drift)
    await r.delete(store.redis_key(4))
    # 5: cache says "no such row" -> stale
    await r.set(store.redis_key(5), b"t0|0|0|")
    # 6: same version, other bytes -> stale
    v6 = await db.fetchval(f"SELECT version FROM {table} WHERE id = 6")
    await r.set(store.redis_key(6), b'v%d|0|0|{"name":"other"}' % v6)
    return store


async def test_drift_is_reported_and_repaired(pg_url: str, redis_url: str) -> None:
    async with Database(pg_url) as db, RedisClient(redis_url) as rc:
        store = await _drifted(db, rc, table_name())
        # Without a reconciler, readers keep getting what the cache says:
        assert await store.get(1) == {"name": "n1"}  # the database says "fixed"
        assert await store.get(3) == {"name": "n3"}  # the row is gone
        report = await Reconciler(store, batch=3).run()
        assert (report.checked, report.missing, report.stale, report.ahead, report.orphan) == (
            9,
            1,
            3,
            1,
            1,
        )
        assert report.drift == 5
        assert report.repaired == 0
        assert any(e.startswith("orphan") for e in report.examples)

        fixed = await Reconciler(store, batch=3).run(repair=True)
        assert fixed.repaired == 5
        again = await Reconciler(store).run()
        assert again.drift == 0
        assert await store.get(1) == {"name": "fixed"}
        assert await store.get(2) == {"name": "n2"}
        assert await store.get(3) is None
        assert await store.get(5) == {"name": "n5"}
        assert await store.get(6) == {"name": "n6"}


async def test_limit_start_and_sample(pg_url: str, redis_url: str) -> None:
    async with Database(pg_url) as db, RedisClient(redis_url) as rc:
        store = await _drifted(db, rc, table_name())
        part = await Reconciler(store).run(start=0, limit=3)
        assert part.checked == 3  # keys 1, 2, 4
        assert part.orphan == 0  # orphans need a whole-table pass
        sampled = await Reconciler(store, rand=lambda: 0.0).run(sample=0.5)
        assert sampled.checked == 9
        none = await Reconciler(store, rand=lambda: 0.99).run(sample=0.5, orphans=False)
        assert none.checked == 0


async def test_run_periodically_stops(pg_url: str, redis_url: str) -> None:
    async with Database(pg_url) as db, RedisClient(redis_url) as rc:
        store = await _drifted(db, rc, table_name())
        stop = asyncio.Event()
        task = asyncio.create_task(Reconciler(store).run_periodically(0.01, repair=True, stop=stop))
        for _ in range(500):
            if (await Reconciler(store).run()).drift == 0:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, 30)
        assert (await Reconciler(store).run()).drift == 0


def test_cli_reconcile(pg_url: str, redis_url: str) -> None:
    table = table_name()

    async def setup() -> None:
        async with Database(pg_url) as db, RedisClient(redis_url) as rc:
            await _drifted(db, rc, table)

    asyncio.run(setup())
    runner = CliRunner()
    args = ["reconcile", "--table", table, "--columns", "name", "--pg", pg_url]
    args += ["--redis", redis_url, "--json"]
    found = runner.invoke(app, args)
    assert found.exit_code == 1, found.output
    data: dict[str, Any] = json.loads(found.output)
    assert data["drift"] == 5
    repaired = runner.invoke(app, [*args, "--repair", "--fill-missing"])
    assert repaired.exit_code == 0, repaired.output
    fixed: dict[str, Any] = json.loads(repaired.output)
    # Filling an uncached row is not a drift repair: reported apart.
    assert (fixed["drift"], fixed["repaired"], fixed["filled"]) == (5, 5, 1)
    assert fixed["remaining"] == 0
    clean = runner.invoke(app, args)
    assert clean.exit_code == 0, clean.output
    assert json.loads(clean.output)["drift"] == 0
    assert runner.invoke(app, ["reconcile", "--table", table, "--sample", "2"]).exit_code == 2
