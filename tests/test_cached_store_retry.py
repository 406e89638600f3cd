"""A write retried after a lost commit acknowledgement still updates Redis.

The first attempt commits and the acknowledgement is lost (the connection drops after the
commit). The retry then finds nothing to change (the row already holds the value, or is
already gone), and used to skip the Redis update: the old entry stayed cached until its TTL.
The lost acknowledgement is simulated around a real Database: the statement runs and
commits on the real server, then the caller sees ConnectionLost once.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from tests._store_helpers import make_items_table, table_name

from sheetanchor.errors import ConnectionLost
from sheetanchor.postgres import Database
from sheetanchor.redis import RedisClient
from sheetanchor.retry import RetryPolicy
from sheetanchor.state import CachedStore
from sheetanchor.state._entry import KIND_TOMBSTONE, KIND_VALUE, parse


class LoseOneAck:
    """Forwards to the real database; the next statement starting with ``prefix`` commits
    and then reports ConnectionLost (its acknowledgement is lost)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.prefix: str | None = None

    async def _after(self, sql: str, result: Any) -> Any:
        if self.prefix is not None and sql.startswith(self.prefix):
            self.prefix = None
            raise ConnectionLost("connection lost after the commit (simulated lost ack)")
        return result

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        return list(await self._after(sql, await self.db.fetch(sql, *args)))

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        return await self._after(sql, await self.db.fetchrow(sql, *args))

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._after(sql, await self.db.fetchval(sql, *args))


_RETRY = RetryPolicy(max_attempts=3, initial=0.0, maximum=0.0)


async def _entry(redis_url: str, rkey: str) -> Any:
    direct = aioredis.Redis.from_url(redis_url)
    try:
        data = await direct.get(rkey)
    finally:
        await direct.aclose()
    assert data is not None
    return parse(data)


async def test_retried_put_after_a_lost_ack_updates_redis(pg_url: str, redis_url: str) -> None:
    table = table_name()
    async with Database(pg_url) as real, RedisClient(redis_url) as rc:
        await make_items_table(real, table)
        db = LoseOneAck(real)
        store = CachedStore(db, rc, table=table, value_columns=["name"], retry=_RETRY)
        await store.put(1, {"name": "a"})
        assert await store.get(1) == {"name": "a"}
        db.prefix = "INSERT"
        await store.put(1, {"name": "b"})  # commits, ack lost, retry changes nothing
        assert db.prefix is None
        assert await store.get(1) == {"name": "b"}
        entry = await _entry(redis_url, store.redis_key(1))
        assert entry.kind == KIND_VALUE
        assert entry.version == await real.fetchval(f"SELECT version FROM {table} WHERE id = 1")


async def test_retried_delete_after_a_lost_ack_fences_a_tombstone(
    pg_url: str, redis_url: str
) -> None:
    table = table_name()
    async with Database(pg_url) as real, RedisClient(redis_url) as rc:
        await make_items_table(real, table)
        db = LoseOneAck(real)
        store = CachedStore(db, rc, table=table, value_columns=["name"], retry=_RETRY)
        await store.put(1, {"name": "a"})
        assert await store.get(1) == {"name": "a"}
        db.prefix = "DELETE"
        await store.delete(1)  # commits, ack lost, retry finds no row
        assert db.prefix is None
        assert await store.get(1) is None
        entry = await _entry(redis_url, store.redis_key(1))
        assert entry.kind == KIND_TOMBSTONE


async def test_resync_after_retry_refreshes_the_entry_from_the_row(
    pg_url: str, redis_url: str
) -> None:
    # The handler itself: the row changed behind the cache (as a commit whose Redis update
    # was lost); the resync fences the current row, then a tombstone once it is gone.
    table = table_name()
    async with Database(pg_url) as db, RedisClient(redis_url) as rc:
        await make_items_table(db, table)
        store = CachedStore(db, rc, table=table, value_columns=["name"])
        await store.put(1, {"name": "a"})
        assert await store.get(1) == {"name": "a"}
        seq = f"pg_get_serial_sequence('{table}', 'version')"
        await db.execute(f"UPDATE {table} SET name = 'b', version = nextval({seq}) WHERE id = 1")
        assert await store.get(1) == {"name": "a"}  # stale until resynced
        await store._resync_after_retry(1)
        assert await store.get(1) == {"name": "b"}
        await db.execute(f"DELETE FROM {table} WHERE id = 1")
        await store._resync_after_retry(1)
        assert await store.get(1) is None


async def test_update_that_changes_nothing_writes_nothing(pg_url: str, redis_url: str) -> None:
    table = table_name()
    async with Database(pg_url) as db, RedisClient(redis_url) as rc:
        await make_items_table(db, table)
        store = CachedStore(db, rc, table=table, value_columns=["name"])
        version = await store.put(1, {"name": "a"})
        assert await store.update(1, lambda cur: dict(cur)) == {"name": "a"}
        assert await db.fetchval(f"SELECT version FROM {table} WHERE id = 1") == version
        assert await store.update(1, lambda cur: {"name": "b"}) == {"name": "b"}
        assert await db.fetchval(f"SELECT version FROM {table} WHERE id = 1") > version
        assert await store.get(1) == {"name": "b"}
