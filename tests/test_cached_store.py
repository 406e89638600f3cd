"""CachedStore: reads, writes, and the incident 000 race (a slow backfill vs a newer write).

Incident 000: reads went to Redis first and backfilled from PostgreSQL. A backfill that read
the row, then lost the CPU while a writer committed a newer version and set Redis, then
wrote its old copy into Redis: readers saw the two stores disagree until the entry expired.
The naive read-through below reproduces it with a controlled interleaving; CachedStore's
fenced set refuses the stale copy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from tests._store_helpers import make_items_table, table_name

from sheetanchor.errors import VersionConflict
from sheetanchor.postgres import Database
from sheetanchor.redis import RedisClient
from sheetanchor.state import CachedStore, CacheSettings, StoreClock, StoreHooks


class _Pause:
    """A hook that stops the first backfill after its database read until released."""

    def __init__(self) -> None:
        self.paused = asyncio.Event()
        self.resume = asyncio.Event()
        self.armed = True

    async def __call__(self, key: Any, version: int | None) -> None:
        if self.armed:
            self.armed = False
            self.paused.set()
            await self.resume.wait()


class NaiveReadThrough:
    """The incident's pattern: GET, else read PostgreSQL and SET (no version check)."""

    def __init__(
        self, db: Database, rc: RedisClient, table: str, hook: Callable[[], Awaitable[None]]
    ) -> None:
        self.db, self.rc, self.table, self.hook = db, rc, table, hook

    async def get(self, key: int) -> dict[str, Any] | None:
        cached = await self.rc.client().get(f"naive:{key}")
        if cached is not None:
            value: dict[str, Any] = orjson.loads(cached)
            return value
        row = await self.db.fetchrow(f"SELECT name FROM {self.table} WHERE id = $1", key)
        if row is None:
            return None
        await self.hook()
        value = {"name": row[0]}
        await self.rc.client().set(f"naive:{key}", orjson.dumps(value))
        return value

    async def put(self, key: int, name: str) -> None:
        await self.db.execute(f"UPDATE {self.table} SET name = $2 WHERE id = $1", key, name)
        await self.rc.client().set(f"naive:{key}", orjson.dumps({"name": name}))


@pytest.fixture
async def env(pg_url: str, redis_url: str) -> Any:
    async with Database(pg_url) as db, RedisClient(redis_url) as rc:
        table = table_name()
        await make_items_table(db, table)
        yield db, rc, table


async def test_naive_backfill_overwrites_a_newer_write(env: Any) -> None:
    db, rc, table = env
    await db.execute(f"INSERT INTO {table} (id, name) VALUES (1, 'v1')")
    pause = _Pause()

    async def hook() -> None:
        await pause(1, None)

    naive = NaiveReadThrough(db, rc, table, hook)
    reader = asyncio.create_task(naive.get(1))
    await asyncio.wait_for(pause.paused.wait(), 30)
    await naive.put(1, "v2")  # committed and cached while the backfill sleeps
    pause.resume.set()
    await reader
    # The stores disagree: PostgreSQL says v2, Redis (and every later reader) says v1.
    assert await db.fetchval(f"SELECT name FROM {table} WHERE id = 1") == "v2"
    assert await naive.get(1) == {"name": "v1"}


async def test_fenced_backfill_never_overwrites_a_newer_write(env: Any) -> None:
    db, rc, table = env
    pause = _Pause()
    reader_store = CachedStore(
        db, rc, table=table, value_columns=["name"], hooks=StoreHooks(after_db_read=pause)
    )
    writer_store = CachedStore(db, rc, table=table, value_columns=["name"])
    await writer_store.put(1, {"name": "v1"})
    await rc.client().delete(writer_store.redis_key(1))  # cold cache: the next get backfills

    reader = asyncio.create_task(reader_store.get(1))
    await asyncio.wait_for(pause.paused.wait(), 30)
    await writer_store.put(1, {"name": "v2"})
    pause.resume.set()
    assert await reader == {"name": "v1"}  # it was concurrent with the write: either is fine
    await reader_store.drain()  # its backfill is written in the background
    assert reader_store.stats().fence_refused == 1  # ...but its stale copy was refused
    assert await reader_store.get(1) == {"name": "v2"}
    assert reader_store.stats().hits == 1


async def test_backfill_after_delete_is_refused_by_the_tombstone(env: Any) -> None:
    db, rc, table = env
    pause = _Pause()
    reader_store = CachedStore(
        db, rc, table=table, value_columns=["name"], hooks=StoreHooks(after_db_read=pause)
    )
    writer_store = CachedStore(db, rc, table=table, value_columns=["name"])
    await writer_store.put(1, {"name": "v1"})
    await rc.client().delete(writer_store.redis_key(1))
    reader = asyncio.create_task(reader_store.get(1))
    await asyncio.wait_for(pause.paused.wait(), 30)
    assert await writer_store.delete(1)
    pause.resume.set()
    await reader
    await reader_store.drain()
    assert reader_store.stats().fence_refused == 1
    assert await reader_store.get(1) is None
    # A re-insert gets a newer version from the sequence and is cached over the tombstone.
    await writer_store.put(1, {"name": "again"})
    assert await reader_store.get(1) == {"name": "again"}


async def test_crud_and_versions(env: Any) -> None:
    db, rc, table = env
    store = CachedStore(db, rc, table=table)  # value columns: every other column
    v1 = await store.put(7, {"name": "a", "data": {"x": [1, 2]}})
    assert v1 is not None
    assert await store.put(7, {"name": "a", "data": {"x": [1, 2]}}) is None  # unchanged
    assert await store.get(7) == {"name": "a", "data": {"x": [1, 2]}}
    v2 = await store.put(7, {"name": "b", "data": {}})
    assert v2 is not None
    assert v2 > v1
    assert await store.get(7) == {"name": "b", "data": {}}
    assert await store.get(8) is None
    await store.drain()  # the absence is cached in the background
    assert await store.get(8) is None  # cached absence
    assert store.stats().absent_hits == 1
    new = await store.update(7, lambda cur: {**cur, "name": cur["name"] + "!"})
    assert new == {"name": "b!", "data": {}}
    assert await store.get(7) == new
    assert await store.delete(7)
    assert not await store.delete(7)
    assert await store.get(7) is None


async def test_get_many_and_put_many_one_round_trip_each(env: Any) -> None:
    db, rc, table = env
    store = CachedStore(db, rc, table=table, value_columns=["name"])
    changed = await store.put_many({i: {"name": f"n{i}"} for i in range(10)})
    assert sorted(changed) == list(range(10))
    assert await store.put_many({i: {"name": f"n{i}"} for i in range(10)}) == {}  # unchanged
    changed = await store.put_many({3: {"name": "three"}, 4: {"name": "n4"}})
    assert list(changed) == [3]  # only the changed row was written
    await rc.client().delete(*(store.redis_key(i) for i in range(5)))
    before = store.stats().pg_reads
    got = await store.get_many([*range(12), 3])
    assert got == {i: {"name": "three" if i == 3 else f"n{i}"} for i in range(10)}
    assert store.stats().pg_reads == before + 1  # one query for all the misses
    got2 = await store.get_many(range(12))
    assert got2 == got
    assert store.stats().pg_reads == before + 1  # all from Redis now (absences too)


async def test_update_conflicts_are_retried_then_reported(env: Any) -> None:
    db, rc, table = env
    store = CachedStore(db, rc, table=table, value_columns=["name"])
    await store.put(1, {"name": "0"})

    async def bump() -> None:
        await store.update(1, lambda cur: {"name": str(int(cur["name"]) + 1)})

    await asyncio.gather(*(bump() for _ in range(20)))
    assert await store.get(1) == {"name": "20"}  # no lost update

    tiny = CachedStore(
        db, rc, table=table, value_columns=["name"], settings=CacheSettings(update_attempts=1)
    )
    # Hold the row lock with an uncommitted change: our UPDATE (version checked) waits on it,
    # then finds the version moved when it commits.
    async with db.connection() as conn:
        tx = conn.transaction()
        await tx.start()
        await conn.execute(f"UPDATE {table} SET name = 'other', version = DEFAULT WHERE id = 1")
        task = asyncio.create_task(tiny.update(1, lambda cur: {"name": "mine"}))
        for _ in range(3000):
            waiting = await db.fetchval(
                # This database only: other test runs may share the server.
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
            if waiting:
                break
            await asyncio.sleep(0.01)
        await tx.commit()
    with pytest.raises(VersionConflict, match="lost to concurrent writers 1 times"):
        await task
    assert await db.fetchval(f"SELECT name FROM {table} WHERE id = 1") == "other"


@dataclass
class Item:
    name: str


async def test_corrupt_and_invalid_entries_are_misses(env: Any) -> None:
    db, rc, table = env
    store = CachedStore(db, rc, table=table, value_columns=["name"], schema=Item)
    await store.put(1, Item("a"))
    r = rc.client()
    # Each miss's backfill is written in the background: drained before the next entry is
    # spoiled, so that each read finds the spoiled entry.
    await r.set(store.redis_key(1), b"garbage")
    assert await store.get(1) == Item("a")
    await store.drain()
    await r.set(store.redis_key(1), b"v999999|0|0|{not json")
    assert await store.get(1) == Item("a")
    await store.drain()
    await r.set(store.redis_key(1), b'v999999|0|0|{"name": 5}')
    assert await store.get(1) == Item("a")
    await store.drain()
    assert store.stats().corrupt == 3
    assert await store.get(1) == Item("a")
    assert store.stats().hits == 1


async def test_a_read_after_a_write_never_joins_an_older_lookup(env: Any) -> None:
    db, rc, table = env
    pause = _Pause()
    store = CachedStore(
        db, rc, table=table, value_columns=["name"], hooks=StoreHooks(after_db_read=pause)
    )
    await store.put(1, {"name": "v1"})
    await rc.client().delete(store.redis_key(1))
    slow = asyncio.create_task(store.get(1))  # a lookup that read v1, then stalls
    await asyncio.wait_for(pause.paused.wait(), 30)
    await store.put(1, {"name": "v2"})
    # Started after the write returned: must not share the stalled lookup's v1.
    assert await store.get(1) == {"name": "v2"}
    pause.resume.set()
    assert await slow == {"name": "v1"}


async def test_get_many_with_corrupt_entries_among_good_ones(env: Any) -> None:
    db, rc, table = env
    store = CachedStore(db, rc, table=table, value_columns=["name"])
    await store.put_many({i: {"name": f"n{i}"} for i in range(6)})
    r = rc.client()
    await r.set(store.redis_key(1), b"garbage")
    await r.set(store.redis_key(3), b'v999999|0|0|{"name":"x"},{"name":"y"}')  # would shift
    await r.set(store.redis_key(4), b"v999999|0|0|[1]")
    got = await store.get_many(range(6))
    assert got == {i: {"name": f"n{i}"} for i in range(6)}
    assert store.stats().corrupt == 3
    assert await store.get_many(range(6)) == got
    assert store.stats().corrupt == 3  # repaired: removed, then filled afresh


@pytest.mark.parametrize(
    "bad",
    [
        b'v1\nv2|0|0|{"name":"x"}',  # a header that reads as two in a joined batch
        b'vx|0|0|{"name":"x"}',
        b'v|0|0|{"name":"x"}',
        b'v1|0|{"name":"x"}',  # a field short
        b'v999999|0|0|{"name":"x"},{"name":"y"}',
        b'v999999|0|0|{"name":"x"',
    ],
)
async def test_get_many_of_all_cached_keys_with_one_malformed_entry(env: Any, bad: bytes) -> None:
    # Every key has an entry, so the one-decode path for plain rows is tried: one malformed
    # entry must send the batch to the careful path (a miss, counted), never into a value.
    db, rc, table = env
    store = CachedStore(db, rc, table=table, value_columns=["name"])
    await store.put_many({i: {"name": f"n{i}"} for i in range(4)})
    await rc.client().set(store.redis_key(2), bad)
    assert await store.get_many(range(4)) == {i: {"name": f"n{i}"} for i in range(4)}
    assert store.stats().corrupt == 1
    hits = store.stats().hits
    assert await store.get_many(range(4)) == {i: {"name": f"n{i}"} for i in range(4)}
    assert store.stats().hits == hits + 4  # repaired: all plain entries again


async def test_ttl_jitter_and_probabilistic_early_refresh(env: Any) -> None:
    db, rc, table = env
    now = [1_000_000.0]
    rand = [0.5]
    clock = StoreClock(wall=lambda: now[0], rand=lambda: rand[0])
    settings = CacheSettings(ttl=100.0, ttl_jitter=0.2, early_refresh=True)
    store = CachedStore(db, rc, table=table, value_columns=["name"], settings=settings, clock=clock)
    await store.put(1, {"name": "a"})
    await rc.client().delete(store.redis_key(1))
    assert await store.get(1) == {"name": "a"}  # miss: loaded, cached with its load time
    await store.drain()  # (in the background)
    ttl_ms = await rc.client().pttl(store.redis_key(1))
    assert 80_000 - 1_000 <= ttl_ms <= 90_000  # 100 s minus 20 % * 0.5 of jitter
    reads = store.stats().pg_reads
    assert await store.get(1) == {"name": "a"}  # far from expiry: a plain hit
    assert store.stats().pg_reads == reads
    now[0] += 89.99  # a hair before expiry...
    rand[0] = 1e-9  # ...and an unlucky draw: this reader refreshes early
    assert await store.get(1) == {"name": "a"}
    assert store.stats().pg_reads == reads + 1
    assert await rc.client().pttl(store.redis_key(1)) > 0


async def test_text_keys_jsonb_and_a_pydantic_schema(env: Any) -> None:
    pydantic = pytest.importorskip("pydantic")
    db, rc, table = env

    class Doc(pydantic.BaseModel):
        title: str
        tags: list[str]

    await db.execute(
        f"CREATE TABLE {table}_docs (slug text PRIMARY KEY, version bigserial NOT NULL, "
        "title text NOT NULL, tags jsonb NOT NULL)"
    )
    store = CachedStore(db, rc, table=f"{table}_docs", key_column="slug", schema=Doc)
    await store.put("a:b}c", Doc(title="t", tags=["x", "y"]))
    assert await store.get("a:b}c") == Doc(title="t", tags=["x", "y"])  # miss
    assert await store.get("a:b}c") == Doc(title="t", tags=["x", "y"])  # hit
    await rc.client().set(store.redis_key("a:b}c"), b'v999|0|0|{"title": 1, "tags": "no"}')
    assert await store.get("a:b}c") == Doc(title="t", tags=["x", "y"])  # invalid -> miss
    assert store.stats().corrupt == 1
    assert await store.get_many(["a:b}c", "zzz"]) == {"a:b}c": Doc(title="t", tags=["x", "y"])}


async def test_cold_cache_mode_takes_the_lease_in_the_first_call(env: Any) -> None:
    db, rc, table = env
    store = CachedStore(db, rc, table=table, value_columns=["name"])
    await store.put_many({i: {"name": f"n{i}"} for i in range(30)})
    await rc.client().delete(*(store.redis_key(i) for i in range(30)))
    for i in range(10):  # a run of misses switches the store to lease-first lookups
        assert await store.get(i) == {"name": f"n{i}"}
    assert store._miss_rate > 0.3
    reads = store.stats().pg_reads
    values = await asyncio.gather(*(store.get(29) for _ in range(100)))
    assert values == [{"name": "n29"}] * 100
    assert store.stats().pg_reads == reads + 1
    for i in range(10, 29):
        assert await store.get(i) == {"name": f"n{i}"}
    for _ in range(60):  # a run of hits switches it back to a plain GET first
        assert await store.get(29) == {"name": "n29"}
    assert store._miss_rate < 0.3
    assert await store.get(0) == {"name": "n0"}
