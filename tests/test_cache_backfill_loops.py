"""Background backfills (the default) and the end of their event loop, real servers.

A miss returns once PostgreSQL answered and its fenced set follows in a task of the running
loop. Celery's pattern runs each task in its own ``asyncio.run``, which cancels every task
left when the task's coroutine returns: a backfill cancelled there must not leave its lease
held (the next reader of that key would wait ``lease_wait`` for a dead holder), nor a task
destroyed while pending, nor an error in the logs. The same holds when the Redis client is
closed while backfills are pending.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import pytest
from tests._store_helpers import make_items_table, table_name

from sheetanchor.observe import REGISTRY
from sheetanchor.postgres import Database
from sheetanchor.redis import RedisClient
from sheetanchor.state import CachedStore, CacheSettings, StoreHooks

# A lease held by a dead holder would make the next reader wait this long, then time out.
_SETTINGS = CacheSettings(lease_ttl=30.0, lease_wait=20.0)


# A backfill usually puts its script on the wire in its first step, before the end of its
# loop can cancel it; not when it must wait first: for a reconnect, a health check, or a busy
# pool. The tests make the last happen every time: a pool of one connection, which a task of
# the application holds (a blocking pop) when the backfill wants it.
_ONE_CONNECTION: dict[str, Any] = dict(max_connections=1)


def _occupy_the_pool(rc: RedisClient, held: list[asyncio.Task[Any]]) -> StoreHooks:
    async def after_db_read(key: Any, version: int | None) -> None:
        held.append(asyncio.create_task(rc.client().blpop(["sa-test:nothing"], timeout=0.5)))
        while rc.stats().connections_in_use == 0:
            await asyncio.sleep(0.001)

    return StoreHooks(after_db_read=after_db_read)


def _count(table: str, mode: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "sheetanchor_state_backfills_total", {"table": table, "mode": mode}
        )
        or 0.0
    )


def _setup(pg_url: str, table: str, rows: int) -> None:
    async def create() -> None:
        async with Database(pg_url) as db:
            await make_items_table(db, table)
            await db.execute(
                f"INSERT INTO {table} (id, name) "
                f"SELECT g, 'n' || g FROM generate_series(1, {rows}) g"
            )

    asyncio.run(create())


def test_successive_asyncio_runs_leave_no_lease_and_no_pending_task(
    pg_url: str, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    table = table_name()
    _setup(pg_url, table, 10)
    # Module-level objects, as in a Celery worker: one store for every task's loop.
    db, rc = Database(pg_url), RedisClient(redis_url, name="t_backfill_runs", **_ONE_CONNECTION)
    held: list[asyncio.Task[Any]] = []
    store = CachedStore(
        db,
        rc,
        table=table,
        value_columns=["name"],
        settings=_SETTINGS,
        hooks=_occupy_the_pool(rc, held),
    )

    async def task(key: int) -> Any:
        # The previous task's key first: its backfill was cut short by that loop's end.
        before = await store.get(key - 1) if key > 1 else None
        return before, await store.get(key)  # a miss; the task ends as soon as it has it

    async def redis_state(key: int) -> list[Any]:
        async with RedisClient(redis_url) as check:
            return list(
                await check.client().mget(store.redis_key(key), store.redis_key(key) + ":lease")
            )

    with caplog.at_level(logging.WARNING):
        for key in range(1, 6):
            before, value = asyncio.run(task(key))
            assert value == {"name": f"n{key}"}
            if key > 1:
                assert before == {"name": f"n{key - 1}"}
            # The loop is gone: its backfill was written (and its lease released) in it.
            entry, lease = asyncio.run(redis_state(key))
            assert lease is None
            assert entry is not None
            assert entry.endswith(b'{"name":"n%d"}' % key)
        gc.collect()  # a task destroyed while pending is reported when it is collected
        asyncio.run(db.close())
        asyncio.run(rc.close())
    assert len(held) == 5  # the pool was busy at each miss's backfill
    assert store.stats().lease_timeouts == 0  # no reader waited for a dead holder
    assert store.stats().lease_waits == 0
    assert store.stats().pg_reads == 5  # each key read once: the entries landed
    assert not store._backfills
    assert _count(table, "failed") == 0
    assert _count(table, "dropped") == 0
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert problems == [], [r.getMessage() for r in problems]


def test_a_loop_closed_by_hand_finishes_its_backfills(
    pg_url: str, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The other usual Celery helper: new_event_loop / run_until_complete / close, which
    # never cancels the tasks left in the loop.
    table = table_name()
    _setup(pg_url, table, 5)
    db = Database(pg_url)
    rc = RedisClient(redis_url, name="t_backfill_by_hand", **_ONE_CONNECTION)
    held: list[asyncio.Task[Any]] = []
    store = CachedStore(
        db,
        rc,
        table=table,
        value_columns=["name"],
        settings=_SETTINGS,
        hooks=_occupy_the_pool(rc, held),
    )
    with caplog.at_level(logging.WARNING):
        for key in (1, 2):
            loop = asyncio.new_event_loop()
            try:
                assert loop.run_until_complete(store.get(key)) == {"name": f"n{key}"}
            finally:
                loop.close()
        gc.collect()

        async def check() -> list[Any]:
            async with RedisClient(redis_url) as c:
                keys = [store.redis_key(k) for k in (1, 2)]
                return list(await c.client().mget([*keys, *(k + ":lease" for k in keys)]))

        entries = asyncio.run(check())
        asyncio.run(db.close())
        asyncio.run(rc.close())
    assert len(held) == 2
    assert all(e is not None for e in entries[:2])
    assert entries[2:] == [None, None]
    assert not store._backfills
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert problems == [], [r.getMessage() for r in problems]


async def test_closing_the_redis_client_with_backfills_pending_is_quiet(
    pg_url: str, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    table = table_name()
    async with Database(pg_url) as db:
        await make_items_table(db, table)
        await db.execute(
            f"INSERT INTO {table} (id, name) SELECT g, 'n' || g FROM generate_series(1, 5) g"
        )
        arrived, gate = asyncio.Event(), asyncio.Event()

        async def held(key: Any, version: int | None) -> None:
            if key == 3:  # key 3 has its row and its lease when the client closes
                arrived.set()
                await gate.wait()

        rc = RedisClient(redis_url, name="t_backfill_closed")
        store = CachedStore(
            db, rc, table=table, value_columns=["name"], settings=_SETTINGS, hooks=StoreHooks(held)
        )
        dropped = _count(table, "dropped")
        with caplog.at_level(logging.WARNING):
            reader = asyncio.create_task(store.get(3))
            await asyncio.wait_for(arrived.wait(), 30)
            values = [await store.get(k) for k in (1, 2)]
            assert store._backfills  # key 2's backfill at least is still to be written
            await rc.close()  # the caller forgot to close the store first
            assert not store._backfills  # the client finished them before it closed
            gate.set()
            assert await reader == {"name": "n3"}  # no exception escapes to the caller
            await store.close()
        assert values == [{"name": "n1"}, {"name": "n2"}]
        assert not store._backfills
        assert _count(table, "dropped") == dropped + 1  # key 3's: counted, not logged
        assert _count(table, "failed") == 0
        assert store.stats().breaker == "closed"  # a closed client is no outage
        problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert problems == [], [r.getMessage() for r in problems]
        async with RedisClient(redis_url) as check:
            r = check.client()
            keys = [store.redis_key(k) for k in (1, 2)]
            # The pending backfills were written before the client closed.
            assert all(e is not None for e in await r.mget(keys))
            leases = await r.mget([store.redis_key(k) + ":lease" for k in (1, 2)])
            assert leases == [None, None]
            # Key 3's lease could not be released (no client): it expires on its own.
            assert await r.delete(store.redis_key(3) + ":lease") == 1


async def test_a_cancelled_backfill_is_run_once_more(pg_url: str, redis_url: str) -> None:
    table = table_name()
    async with Database(pg_url) as db, RedisClient(redis_url, **_ONE_CONNECTION) as rc:
        await make_items_table(db, table)
        await db.execute(f"INSERT INTO {table} (id, name) VALUES (1, 'n1'), (2, 'n2')")
        held: list[asyncio.Task[Any]] = []
        store = CachedStore(
            db,
            rc,
            table=table,
            value_columns=["name"],
            settings=_SETTINGS,
            hooks=_occupy_the_pool(rc, held),
        )
        dropped = _count(table, "dropped")
        async with store:
            assert await store.get(1) == {"name": "n1"}
            (first,) = store._backfills  # waiting for the connection the application holds
            first.cancel()  # by someone else than the loop's end
            await store.drain()
            r = rc.client()
            assert (await r.get(store.redis_key(1)) or b"").endswith(b'{"name":"n1"}')
            assert await r.get(store.redis_key(1) + ":lease") is None
            # Cut short twice: dropped, counted; the lease is left to expire.
            assert await store.get(2) == {"name": "n2"}
            (first,) = store._backfills
            first.cancel()
            while first in store._backfills:  # until its second attempt replaced it
                await asyncio.sleep(0)
            (again,) = store._backfills
            again.cancel()
            await store.drain()
            assert _count(table, "dropped") == dropped + 1
            assert await r.get(store.redis_key(2) + ":lease") is not None
            await r.delete(store.redis_key(2) + ":lease")
        for task in held:
            await task
