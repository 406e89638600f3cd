"""The Redis calls of a get_many with misses, counted by the server (INFO commandstats).

A get_many whose keys are not cached used to cost an MGET, a ``SET NX`` per key (one
pipeline) and a fence script per key (another pipeline). Now the misses take their leases
in one script call (which also reads their entries again) and are backfilled in one script
call; in a cold cache the lease script is the first call, without the MGET. Each command
here is sent on its own (no pipeline), so the client's command counts are its round trips.
commandstats also counts the commands a script runs (GET, SET, DEL, TIME): those are set
apart. A private server: the counts are of this test's commands only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from tests._store_helpers import make_items_table, table_name

from sheetanchor.embedded import EmbeddedRedis
from sheetanchor.postgres import Database
from sheetanchor.redis import RedisClient
from sheetanchor.state import CachedStore
from sheetanchor.state._entry import KIND_INVALID, build

# The commands of the counting itself, and the connection's housekeeping.
_NOT_COUNTED = {"info", "config|resetstat", "config", "ping", "client", "hello", "select"}
# What the store's scripts call inside the server (commandstats counts those too).
_IN_SCRIPTS = {"get", "set", "del", "time"}


@pytest.fixture
async def env(pg_url: str, private_redis: EmbeddedRedis) -> AsyncIterator[Any]:
    table = table_name()
    direct = aioredis.Redis.from_url(private_redis.url)
    async with Database(pg_url) as db, RedisClient(private_redis.url) as rc:
        await make_items_table(db, table)
        await db.execute(
            f"INSERT INTO {table} (id, name) SELECT g, 'n' || g FROM generate_series(1, 40) g"
        )
        store = CachedStore(db, rc, table=table, value_columns=["name"])
        assert await store.get_many([1]) == {1: {"name": "n1"}}  # connected, scripts loaded
        await store.drain()
        try:
            yield store, direct
        finally:
            await store.close()
            await direct.aclose()


async def _commands(direct: aioredis.Redis) -> tuple[dict[str, int], dict[str, int]]:
    """The client's commands, and those its scripts ran, since the last CONFIG RESETSTAT."""
    stats = await direct.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    client = {n: c for n, c in calls.items() if n not in _NOT_COUNTED | _IN_SCRIPTS}
    return client, {n: c for n, c in calls.items() if n in _IN_SCRIPTS}


async def _landed(store: CachedStore, direct: aioredis.Redis, keys: range) -> None:
    rkeys = [store.redis_key(k) for k in keys]
    entries = await direct.mget(rkeys)
    assert all(e is not None and e.endswith(b'"}') for e in entries)
    assert await direct.mget([r + ":lease" for r in rkeys]) == [None] * len(rkeys)


async def test_misses_take_their_leases_and_backfill_in_one_call_each(env: Any) -> None:
    store, direct = env
    await direct.config_resetstat()
    keys = range(2, 12)
    assert await store.get_many(keys) == {k: {"name": f"n{k}"} for k in keys}
    # The MGET, the lease script of the ten misses, their backfill script; nothing per key.
    client, scripts = await _commands(direct)
    assert client == {"mget": 1, "evalsha": 2}
    assert scripts["set"] == 20  # ten leases, ten entries
    await _landed(store, direct, keys)
    assert store.stats().leases_acquired == 1 + 10


async def test_a_cold_cache_get_many_is_two_calls(env: Any) -> None:
    store, direct = env
    store._many_miss_rate = 1.0  # misses dominate: the lease script comes first
    await direct.config_resetstat()
    keys = range(12, 32)
    assert await store.get_many([*keys, 1]) == {k: {"name": f"n{k}"} for k in [*keys, 1]}
    client, scripts = await _commands(direct)
    assert client == {"evalsha": 2}
    assert scripts["set"] == 40  # twenty leases, twenty entries
    await _landed(store, direct, keys)
    stats = store.stats()
    assert (stats.hits, stats.misses) == (1, 1 + 20)  # key 1 was cached (by the fixture)
    await direct.config_resetstat()  # all cached now: the same one call serves them
    assert await store.get_many([*keys, 1]) == {k: {"name": f"n{k}"} for k in [*keys, 1]}
    assert (await _commands(direct))[0] == {"evalsha": 1}
    assert store.stats().hits == 1 + 21


async def test_entries_that_only_fence_are_loaded_in_the_same_calls(env: Any) -> None:
    # A deletion's tombstone and an invalidation are no values: the lease script takes
    # their leases at once (no extra SET NX round trip).
    store, direct = env
    await store.delete(33)
    assert (await direct.get(store.redis_key(33)) or b"")[:1] == b"t"
    await direct.set(store.redis_key(34), build(KIND_INVALID, 0, 0, 0))  # after an outage
    await direct.config_resetstat()
    assert await store.get_many([33, 34, 35]) == {34: {"name": "n34"}, 35: {"name": "n35"}}
    client, _scripts = await _commands(direct)
    assert client == {"mget": 1, "evalsha": 2}
