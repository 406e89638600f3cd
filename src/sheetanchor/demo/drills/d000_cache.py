"""Drill 000: a Redis read-through over PostgreSQL that disagreed with it.

Three scenes from the incident, each run the naive way and the sheetanchor way:

1. *Concurrent attach*: 100 concurrent attaches of one script to one entity. The naive
   registry checks in memory, does I/O, then records: it counts the pair many times.
   :class:`~sheetanchor.state.Links` is one ``INSERT ... ON CONFLICT`` on a unique constraint.
2. *Stale backfill*: a reader misses, reads version 1 from PostgreSQL and stalls; a writer
   commits version 2 and caches it; the reader then writes version 1 into Redis. Naive: every
   later reader gets version 1. CachedStore: the fence refuses the older version.
3. *Redis restart*: a Redis server of the drill's own is stopped while writes and reads go
   on, then started again. Naive reads fail while it is down (and a write made while Redis
   is merely unreachable is served stale afterwards); CachedStore reads from PostgreSQL
   behind its breaker, and every read after the restart returns the latest write.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import orjson
import redis.exceptions

from sheetanchor.demo._drill import DemoContext, DrillResult
from sheetanchor.postgres import Database
from sheetanchor.redis import RedisClient
from sheetanchor.retry import RetryPolicy
from sheetanchor.state import CachedStore, CircuitBreaker, Links, StoreHooks

__all__ = ["DRILL", "CacheDrill"]

_REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


class _Pause:
    """Stops the first backfill after its database read until ``resume`` is set."""

    def __init__(self) -> None:
        self.paused = asyncio.Event()
        self.resume = asyncio.Event()
        self.armed = True

    async def __call__(self, *_: Any) -> None:
        if self.armed:
            self.armed = False
            self.paused.set()
            await self.resume.wait()


async def _attach_scene(db: Database, suffix: str) -> tuple[int, int]:
    naive_table, table = f"d000_naive_links_{suffix}", f"d000_links_{suffix}"
    await db.execute(f"CREATE TABLE {naive_table} (entity_id bigint, script_id bigint)")
    await db.execute(
        f"CREATE TABLE {table} (entity_id bigint, script_id bigint, "
        "PRIMARY KEY (entity_id, script_id))"
    )
    registry: set[tuple[int, int]] = set()
    counts: dict[int, int] = {}

    async def naive_attach(entity: int, script: int) -> None:
        if (entity, script) in registry:
            return
        await db.execute(f"INSERT INTO {naive_table} VALUES ($1, $2)", entity, script)
        registry.add((entity, script))
        counts[entity] = counts.get(entity, 0) + 1

    await asyncio.gather(*(naive_attach(1, 7) for _ in range(100)))
    links = Links(db, table=table, left="entity_id", right="script_id")
    await asyncio.gather(*(links.attach(1, 7) for _ in range(100)))
    return counts[1], await links.count(1)


async def _race_scene(db: Database, rc: RedisClient, table: str, ns: str) -> tuple[str, str]:
    await db.execute(
        f"CREATE TABLE {table} (id bigint PRIMARY KEY, version bigserial NOT NULL, "
        "name text NOT NULL)"
    )
    r = rc.client()
    # Naive: GET, else SELECT, (stall), SET.
    await db.execute(f"INSERT INTO {table} (id, name) VALUES (1, 'v1')")
    pause = _Pause()

    async def naive_get() -> str:
        cached = await r.get(f"{ns}:naive:1")
        if cached is not None:
            return str(orjson.loads(cached))
        name = str(await db.fetchval(f"SELECT name FROM {table} WHERE id = 1"))
        await pause()
        await r.set(f"{ns}:naive:1", orjson.dumps(name))
        return name

    reader = asyncio.create_task(naive_get())
    await pause.paused.wait()
    await db.execute(f"UPDATE {table} SET name = 'v2' WHERE id = 1")
    await r.set(f"{ns}:naive:1", orjson.dumps("v2"))
    pause.resume.set()
    await reader
    naive_after = await naive_get()

    # sheetanchor: the same interleaving through CachedStore.
    pause = _Pause()
    reader_store = CachedStore(
        db, rc, table=table, namespace=ns, hooks=StoreHooks(after_db_read=pause)
    )
    writer = CachedStore(db, rc, table=table, namespace=ns)
    await writer.put(2, {"name": "v1"})
    await r.delete(writer.redis_key(2))
    reader2 = asyncio.create_task(reader_store.get(2))
    await pause.paused.wait()
    await writer.put(2, {"name": "v2"})
    pause.resume.set()
    await reader2
    ours_after = (await reader_store.get(2))["name"]
    return naive_after, str(ours_after)


def _fast_client(url: str) -> RedisClient:
    # Short timeouts and no retries: a stopped server shows up at once, in both halves.
    return RedisClient(
        url, socket_timeout=0.3, socket_connect_timeout=0.3, retry=RetryPolicy(max_attempts=1)
    )


async def _restart_scene(db: Database, table: str) -> dict[str, int]:
    from sheetanchor.embedded import EmbeddedRedis

    server = EmbeddedRedis(private=True)
    await asyncio.to_thread(server.start)
    try:
        async with _fast_client(server.url) as rc, _fast_client(server.url) as naive_rc:
            await db.execute(
                f"CREATE TABLE {table} (id bigint PRIMARY KEY, version bigserial NOT NULL, "
                "n bigint NOT NULL)"
            )
            breaker = CircuitBreaker(failure_threshold=1, reset_timeout=0.05, max_reset_timeout=0.2)
            store = CachedStore(db, rc, table=table, breaker=breaker)
            naive_failed = ours_failed = ours_stale = 0

            async def naive_get(key: int) -> Any:
                cached = await naive_rc.client().get(f"naive:{key}")
                if cached is None:
                    row = await db.fetchval(f"SELECT n FROM {table} WHERE id = $1", key)
                    await naive_rc.client().set(f"naive:{key}", orjson.dumps(row))
                    return row
                return orjson.loads(cached)

            latest = dict.fromkeys(range(10), 0)
            await store.put_many({k: {"n": 0} for k in latest})

            async def tick(step: int) -> None:
                nonlocal naive_failed, ours_failed, ours_stale
                for key in latest:
                    latest[key] = step
                    await store.put(key, {"n": step})  # writes commit even while Redis is down
                    try:
                        await naive_get(key)
                    except _REDIS_DOWN:
                        naive_failed += 1
                    try:
                        value = await store.get(key)
                    except _REDIS_DOWN:
                        ours_failed += 1
                        continue
                    if value is None or value["n"] != latest[key]:
                        ours_stale += 1

            step = 0
            for phase in ("up", "down", "up-again"):
                if phase == "down":
                    await asyncio.to_thread(server.stop)
                elif phase == "up-again":
                    await asyncio.to_thread(server.start)
                for _ in range(5):
                    step += 1
                    await tick(step)
                    await asyncio.sleep(0.05)
            stats = store.stats()
            return {
                "naive_failed_reads": naive_failed,
                "ours_failed_reads": ours_failed,
                "ours_stale_reads": ours_stale,
                "ours_reads_from_pg_while_down": stats.skipped,
                "ours_hits_after_restart": stats.hits,
            }
    finally:
        await asyncio.to_thread(server.remove)


class CacheDrill:
    """Drill 000 (see the module docstring)."""

    id = "000"
    title = "cache and database disagree (double attach, stale backfill, Redis restart)"

    async def run(self, ctx: DemoContext) -> DrillResult:
        started = time.monotonic()
        url = await ctx.fresh_database("d000")
        suffix = uuid.uuid4().hex[:8]
        ns = f"sa:d000:{suffix}"
        async with Database(url) as db, RedisClient(ctx.redis_url) as rc:
            try:
                naive_count, ours_count = await _attach_scene(db, suffix)
                naive_after, ours_after = await _race_scene(db, rc, f"d000_items_{suffix}", ns)
                restart = await _restart_scene(db, f"d000_ticks_{suffix}")
            finally:
                with contextlib.suppress(*_REDIS_DOWN):
                    keys = [k async for k in rc.client().scan_iter(match=f"{ns}:*")]
                    if keys:
                        await rc.client().unlink(*keys)
        naive_failed = naive_count > 1 or naive_after != "v2" or restart["naive_failed_reads"] > 0
        ours_ok = (
            ours_count == 1
            and ours_after == "v2"
            and restart["ours_failed_reads"] == 0
            and restart["ours_stale_reads"] == 0
            and restart["ours_hits_after_restart"] > 0
        )
        return DrillResult(
            drill=self.id,
            title=self.title,
            naive=(
                f"attach counted {naive_count}x; stale backfill served {naive_after!r} after "
                f"'v2' was written; {restart['naive_failed_reads']} reads failed while Redis "
                "was down"
            ),
            naive_failed=naive_failed,
            ours=(
                f"attach counted {ours_count}x; reader got {ours_after!r}; "
                f"{restart['ours_failed_reads']} failed and {restart['ours_stale_reads']} stale "
                f"reads across the restart ({restart['ours_reads_from_pg_while_down']} served "
                "by PostgreSQL)"
            ),
            ours_ok=ours_ok,
            seconds=time.monotonic() - started,
            details={
                "naive_attach_count": naive_count,
                "ours_attach_count": ours_count,
                "naive_read_after_race": naive_after,
                "ours_read_after_race": ours_after,
                **restart,
            },
        )


DRILL = CacheDrill()
