"""The store calls its Lua scripts by SHA and registers them again when the server lost them."""

from __future__ import annotations

import redis.asyncio as aioredis
from tests._store_helpers import make_items_table, table_name

from sheetanchor.embedded import EmbeddedRedis
from sheetanchor.postgres import Database
from sheetanchor.redis import RedisClient
from sheetanchor.redis._metrics import SCRIPT_RELOADS
from sheetanchor.state import CachedStore


async def test_scripts_flushed_on_the_server_are_loaded_again(
    pg_url: str, private_redis: EmbeddedRedis
) -> None:
    table = table_name()
    direct = aioredis.Redis.from_url(private_redis.url)
    reloads = SCRIPT_RELOADS.labels("fenced_set")
    async with Database(pg_url) as db, RedisClient(private_redis.url) as rc:
        await make_items_table(db, table)
        store = CachedStore(db, rc, table=table, value_columns=["name"])
        await store.put(1, {"name": "a"})
        await store.put(2, {"name": "b"})
        for round_ in range(2):
            before = reloads._value.get()
            await direct.script_flush()
            await store.put(1, {"name": f"a{round_}"})  # FENCED_SET: NOSCRIPT, reload, again
            assert reloads._value.get() == before + 1
            assert await direct.get(store.redis_key(1)) is not None
            await direct.delete(store.redis_key(2))
            await direct.script_flush()
            store._miss_rate = 1.0  # lease-first: GET_OR_LEASE, then FENCED_SET_RELEASE
            assert await store.get(2) == {"name": "b"}
            await store.drain()  # the backfill is written in the background
            assert await direct.get(store.redis_key(2)) is not None  # the backfill landed
            assert await direct.get(store.redis_key(2) + ":lease") is None  # released
            assert store.stats().breaker == "closed"
    await direct.aclose()
