"""``CachedStore``: a Redis read-through over one PostgreSQL table, never staler than it.

PostgreSQL is the only source of truth. Every write is one statement (one transaction) that
bumps the row's version from a sequence; after the commit the new entry goes to Redis
through the fence script, which refuses anything older than what Redis holds. Reads try
Redis, then load from PostgreSQL under a single-flight (in process) and a lease (across
processes), and backfill with the same fence. If Redis is down or slow, a circuit breaker
sends reads straight to PostgreSQL and remembers the keys written meanwhile; they are
invalidated before Redis is read again.

This module holds the read path; the write path is in :mod:`sheetanchor.state._writes`.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
import weakref
from collections.abc import Awaitable, Hashable, Iterable
from typing import Any

import orjson

from sheetanchor.errors import ResourceClosed
from sheetanchor.state._cacheside import DOWN, FencedItem, _Down
from sheetanchor.state._core import (
    _CORRUPT,
    _MISS,
    _PG_ERRORS,
    _TOKEN_PREFIX,
    _TOKENS,
    PgExecutor,
    StoreStats,
    _json_default,
    _log,
)
from sheetanchor.state._singleflight import Landing
from sheetanchor.state._sql import TableSQL
from sheetanchor.state._writes import _StoreWrites

__all__ = ["CachedStore", "PgExecutor", "StoreStats"]

# The headers of plain row entries ("v<version>"), one per line (see _plain_values).
_PLAIN_HEADS = re.compile(rb"v[0-9]+(?:\nv[0-9]+)*")
# Miss-rate tracking (an exponentially weighted mean over roughly the last 20 lookups):
# above this rate, lookups start with GET_OR_LEASE instead of a plain GET.
_RATE_WEIGHT = 0.05
_LEASE_FIRST_ABOVE = 0.3


class CachedStore(_StoreWrites):
    """A read-through cache of one table, version-fenced, with stampede protection.

    Args:
        db: the database (``sheetanchor.postgres.Database``, or anything with ``fetch``,
            ``fetchrow``, ``fetchval``).
        redis: the :class:`~sheetanchor.redis.RedisClient`.
        table: the table (``name`` or ``schema.name``). It needs a unique key column and a
            ``bigserial`` (or identity) version column: versions come from its sequence.
        key_column: the key (primary key or unique).
        version_column: the version column.
        value_columns: the columns that make up a value; ``None``: every other column.
        read_from: a view to read from instead of ``table`` (same columns).
        schema: optional dataclass or pydantic model; values are validated into it.
        namespace: Redis key prefix (default ``sa:<table>``); keys are
            ``<namespace>:{<key>}`` so one entity's keys share a cluster hash slot.
        settings: :class:`CacheSettings`. By default a miss returns once PostgreSQL
            answered and writes its backfill in the background (``max_backfills``); the
            pending ones are finished before the loop's Redis client closes. Use
            ``async with store`` or :meth:`close` to write them before you go on, and
            :meth:`drain` to wait until they are in Redis.
        breaker: the Redis circuit breaker (default: a new one per store).
        hooks: test seams (:class:`StoreHooks`).
        clock: time sources (:class:`StoreClock`).
        retry: policy for transient database errors on reads and on idempotent writes
            (``put``, ``put_many``, ``delete``); ``create`` and ``update`` are never
            retried blindly (a lost acknowledgement would apply them twice). ``None``: off.

    Example::

        store = CachedStore(db, rc, table="worlds", value_columns=["name", "state"])
        await store.put(42, {"name": "w", "state": {"tick": 1}})
        world = await store.get(42)
    """

    __slots__ = ()  # see _StoreCore: the attributes are slots

    # -- reads ---------------------------------------------------------------------------

    async def get(self, key: Hashable) -> Any:
        """The value of ``key``, or ``None`` when the table has no such row.

        A hit is one round trip. A miss is loaded once per key however many callers want
        it: in this process they share one load (single-flight), across processes the holder
        of the key's lease loads while the others wait for its entry. A write from this
        process detaches the running load, so a read that starts after a write returned sees
        it. While Redis is unreachable, reads go to PostgreSQL (one per key at a time).

        The first call is a plain GET while most lookups hit; when misses dominate (a cold
        cache) it becomes a script that also takes the lease, saving a round trip per miss.
        A miss returns before its entry is written to Redis (in the background; see
        :attr:`CacheSettings.max_backfills`); a read of this process that misses meanwhile
        shares the loaded value instead of waiting.
        """
        sql = self._sql or await self.prepare()
        rkey = f"{self.namespace}:{{{key}}}"  # redis_key(key), without a call
        cache = self.cache
        if cache.breaker.denies():
            # Redis is skipped (seen here, without awaiting a call that would return DOWN):
            # one PostgreSQL read per key at a time, nothing cached.
            self._counts["skipped"] += 1
            return await self._flights.run(rkey, self._read_skipped, sql, key)
        if self._miss_rate > _LEASE_FIRST_ABOVE:
            return await self._get_lease_first(sql, key, rkey)
        data = await cache.get(rkey)
        if data is not None and data is not DOWN:
            value = self._from_cache(data)  # type: ignore[arg-type]
            if value is _CORRUPT:
                await cache.delete_if_equal(rkey, data)  # type: ignore[arg-type]
            elif value is not _MISS:
                self._hit(value)
                return value
        if data is DOWN:
            self._counts["skipped"] += 1
            return await self._flights.run(rkey, self._read_skipped, sql, key)
        self._missed()
        return await self._flights.run(rkey, self._miss, sql, key, rkey)

    def _hit(self, value: Any) -> None:
        self._miss_rate *= 1 - _RATE_WEIGHT
        if value is not None:
            self._counts["hit"] += 1

    def _missed(self) -> None:
        self._miss_rate += _RATE_WEIGHT * (1 - self._miss_rate)
        self._counts["miss"] += 1

    async def _get_lease_first(self, sql: TableSQL, key: Hashable, rkey: str) -> Any:
        # Cold-cache mode: GET_OR_LEASE first, so a miss costs two round trips, not three.
        lease_key = rkey + ":lease"
        token = f"{_TOKEN_PREFIX[0]}{next(_TOKENS)}"
        res = await self.cache.get_or_lease(rkey, lease_key, token, self._lease_ms)
        if res is DOWN:
            self._counts["skipped"] += 1
            return await self._flights.run(rkey, self._read_skipped, sql, key)
        held: bool | None = None
        if isinstance(res, bytes):
            value = self._from_cache(res)
            if value is _CORRUPT:
                await self.cache.delete_if_equal(rkey, res)
            elif value is not _MISS:
                self._hit(value)
                return value
        else:
            held = bool(res)
        self._missed()
        if held:
            if self._flights.running(rkey):
                # A local load already runs and waits for the lease (our reply came back
                # after another caller's "taken"): hand the lease to it instead of making it
                # wait.
                await self.cache.release_lease(lease_key, token)
                held = None
            else:
                # We lead the flight (nothing awaited since it was seen not running): read
                # now, as _load would.
                self._counts["acquired"] += 1
                return await self._flights.run(rkey, self._read, sql, key, rkey, (lease_key, token))
        return await self._flights.run(rkey, self._load, sql, key, rkey, lease_key, token, held)

    async def _miss(self, sql: TableSQL, key: Hashable, rkey: str) -> Any:
        # Look again and try to take the load lease, in one round trip.
        lease_key = rkey + ":lease"
        token = f"{_TOKEN_PREFIX[0]}{next(_TOKENS)}"
        res = await self.cache.get_or_lease(rkey, lease_key, token, self._lease_ms)
        if res is DOWN:
            return await self._read_skipped(sql, key)
        held: bool | None = None
        if isinstance(res, bytes):
            value = self._from_cache(res)
            if value is _CORRUPT:
                await self.cache.delete_if_equal(rkey, res)
            elif value is not _MISS:
                return value  # filled by someone else meanwhile
        elif res:
            self._counts["acquired"] += 1
            return await self._read(sql, key, rkey, (lease_key, token))
        else:
            held = False
        return await self._load(sql, key, rkey, lease_key, token, held)

    async def _load(
        self,
        sql: TableSQL,
        key: Hashable,
        rkey: str,
        lease_key: str,
        token: str,
        held: bool | None,
    ) -> Any:
        # Across processes only the lease holder reads PostgreSQL; the others watch Redis.
        # `held`: the lease outcome already known from GET_OR_LEASE (None: not tried yet).
        s, clock = self.settings, self._clock
        deadline = clock.monotonic() + s.lease_wait
        delay = 0.002
        while True:
            if held is None:
                got = await self.cache.acquire_lease(lease_key, token, int(s.lease_ttl * 1000))
                if got is DOWN:
                    return await self._read_skipped(sql, key)
                held = bool(got)
            if held:
                self._lease("acquired")
                return await self._read(sql, key, rkey, (lease_key, token))
            held = None
            while True:
                if clock.monotonic() >= deadline:
                    self._lease("timeout")
                    return await self._read(sql, key, rkey, None)
                await clock.sleep(delay)
                delay = min(delay * 2, 0.05)
                peek = await self.cache.peek(rkey, lease_key)
                if peek is DOWN:
                    return await self._read_skipped(sql, key)
                data, lease_held = peek  # type: ignore[misc]
                if data is not None:
                    value = self._from_cache(data)
                    if value is _CORRUPT:
                        await self.cache.delete_if_equal(rkey, data)
                    elif value is not _MISS:
                        self._lease("waited")
                        return value
                if not lease_held:
                    break  # the holder is gone without a usable entry: try to take over

    async def _read_skipped(self, sql: TableSQL, key: Hashable) -> Any:
        """Redis is skipped: the row's value read from PostgreSQL, nothing cached.

        The read path of an open breaker (its cost over a plain ``fetchrow`` is the goal of
        the "Redis down" benchmark): no clock, no coroutine of ``_pg``'s, no entry built.
        """
        db = self.db
        try:
            row = await db.fetchrow(sql.read_one, key)
        except _PG_ERRORS as exc:
            row = await self._pg_again(exc, db.fetchrow, (sql.read_one, key))
        self._counts["pg"] += 1
        after_db_read = self._hooks.after_db_read
        if after_db_read is not None:
            await after_db_read(key, None if row is None else row[1])
        if row is None:
            return None
        return self._row_value(self._row_data(sql, row), None)

    async def _read(
        self, sql: TableSQL, key: Hashable, rkey: str, lease: tuple[str, str] | None
    ) -> Any:
        """Read the row from PostgreSQL and backfill Redis through the fence.

        The backfill is written in the background when there is room (see
        :attr:`CacheSettings.max_backfills`): then a :class:`Landing` is returned, which the
        single-flight unwraps. With ``lease`` (key, token) the lease is released in every
        case: together with the backfill when there is one, else on its own.
        """
        clock = self._clock
        handed_over = False
        try:
            started = clock.monotonic()
            db = self.db
            try:
                row = await db.fetchrow(sql.read_one, key)
            except _PG_ERRORS as exc:
                row = await self._pg_again(exc, db.fetchrow, (sql.read_one, key))
            self._counts["pg"] += 1
            after_db_read = self._hooks.after_db_read
            if after_db_read is not None:
                await after_db_read(key, None if row is None else row[1])
            if row is None:
                value = None
                item = self._tomb_item(rkey, 0, self.settings.absent_ttl)
            else:
                data = self._row_data(sql, row)
                payload = orjson.dumps(data, default=_json_default)
                value = self._row_value(data, payload)
                delta_ms = max(1, int((clock.monotonic() - started) * 1000))
                item = self._value_item(rkey, row[1], payload, delta_ms)
            task = self._backfill_later(item, lease, started)
            if task is not None:
                handed_over = True  # the background backfill releases the lease
                return Landing(value, task)
            await self._backfill(item, lease, started)
            handed_over = True  # released with the backfill (or, cancelled, below)
            return value
        finally:
            if lease is not None and not handed_over:
                await self.cache.release_lease(*lease)

    def _backfill_later(
        self, item: FencedItem, lease: tuple[str, str] | None, started: float
    ) -> asyncio.Task[None] | None:
        """Start the backfill as a tracked task of the running loop, or ``None``: write it
        inline (the store is closed, ``max_backfills`` are running, or the Redis client
        cannot finish it before it closes)."""
        backfills = self._backfills
        limit = self.settings.max_backfills
        if self._closed or (len(backfills) >= limit and not (limit and self._pruned())):
            self._counts["backfill_inline"] += 1
            return None
        loop = asyncio.get_running_loop()
        last = self._backfill_loop
        if (last is None or last() is not loop) and not self._watch_loop(loop):
            self._counts["backfill_inline"] += 1
            return None
        task = loop.create_task(self._backfill(item, lease, started))
        backfills[task] = (item, lease, started)
        task.add_done_callback(self._backfill_done)
        self._counts["backfill_background"] += 1
        return task

    def _watch_loop(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Have the Redis client of ``loop`` finish our backfills there before it closes
        (the loop ends, or the client is closed): False when the client is closed."""
        if loop not in self._backfill_loops:
            try:
                self.redis.before_close(functools.partial(_finish_backfills, weakref.ref(self)))
            except ResourceClosed:
                return False
            self._backfill_loops.add(loop)
        self._backfill_loop = weakref.ref(loop)
        return True

    def _pruned(self) -> bool:
        """Forget backfills whose loop was closed without running them (nothing can any
        more); True when that made room."""
        dead = [t for t in self._backfills if t.get_loop().is_closed()]
        for task in dead:
            del self._backfills[task]
            self._counts["backfill_dropped"] += 1
        return len(self._backfills) < self.settings.max_backfills

    def _backfill_done(self, task: asyncio.Task[None]) -> None:
        job = self._backfills.pop(task, None)
        if not task.cancelled():
            return
        if job is None:
            self._counts["backfill_dropped"] += 1  # cut short twice: its lease expires on its own
            return
        # Cut short: asyncio.run cancels every task left when its loop ends (one loop per
        # Celery task), or someone cancelled it. The entry may be unwritten and the lease
        # still held, which would make the other readers of the key wait for a holder that
        # is gone. Run it once more in the same loop, tracked, so that the loop's end
        # waits for it (see _finish_backfills); the fence makes a second write harmless.
        again = task.get_loop().create_task(self._backfill(*job))
        self._backfills[again] = None
        again.add_done_callback(self._backfill_done)

    async def _backfill(
        self, item: FencedItem, lease: tuple[str, str] | None, started: float
    ) -> None:
        """The fenced set of a backfill (releasing the lease); raises nothing but a
        cancellation.

        A Redis that is down is counted by the breaker (the lease then expires on its own); a
        Redis client closed before the store makes it a dropped backfill (counted); any
        other error is logged and counted, and the lease released.
        """
        released = False
        try:
            left = self.settings.backfill_age - (self._clock.monotonic() - started)
            if left <= 0:
                # Too old to be sure a newer entry has not expired meanwhile: don't cache.
                self._refused()
                return
            deadline_ms = int((time.time() + left) * 1000)  # by the server's clock: real time
            # The age must hold when the set runs, not only now: the server refuses a set
            # that arrives past the deadline. Sent at once (an idle connection), it is on
            # the wire now; else it may wait for a connection: the client stops waiting at
            # the deadline (a timer per backfill only then).
            released = lease is not None  # by the script (cancelled: it expires, PX)
            if self.redis.idle_connection():
                cache = self.cache
                ok = await (
                    cache.fenced_set(item, deadline_ms)
                    if lease is None
                    else cache.fenced_set_release(item, *lease, deadline_ms)
                )
            else:
                try:
                    async with asyncio.timeout(left):
                        ok = await self._send_backfill(item, lease, deadline_ms)
                except TimeoutError:
                    released = False  # whether the script ran is unknown: release by token
                    self._refused()
                    return
            if ok is False:
                self._counts["refused"] += 1  # a newer entry is there (the metric is counted)
        except ResourceClosed:
            released = True  # nothing can be sent any more: the lease expires on its own
            self._dropped(item)
        except Exception as exc:  # noqa: BLE001  logged and counted; the read already has its value
            released = False  # whether the script ran is unknown: release (by token) anyway
            self._counts["backfill_failed"] += 1
            _log.warning(
                "cache %s: backfill of %s not written (%s: %s); the next read loads it again",
                self.table,
                item[0],
                type(exc).__name__,
                exc,
            )
        finally:
            if lease is not None and not released:
                try:
                    await self.cache.release_lease(*lease)
                except ResourceClosed:
                    self._dropped(item)
                except Exception as exc:  # noqa: BLE001  logged and counted; it expires (PX)
                    self._counts["backfill_failed"] += 1
                    _log.warning(
                        "cache %s: lease of %s not released (%s: %s); it expires on its own",
                        self.table,
                        item[0],
                        type(exc).__name__,
                        exc,
                    )

    def _send_backfill(
        self, item: FencedItem, lease: tuple[str, str] | None, deadline_ms: int
    ) -> Awaitable[bool | _Down]:
        if lease is not None:
            return self.cache.fenced_set_release(item, *lease, deadline_ms)
        return self.cache.fenced_set(item, deadline_ms)

    def _backfill_left(self, started: float) -> float:
        """Seconds a backfill whose database read started at ``started`` may still be
        written (``max_backfill_age``); <= 0: too old."""
        return self.settings.backfill_age - (self._clock.monotonic() - started)

    def _dropped(self, item: FencedItem) -> None:
        # The Redis client was closed before the store: not an outage, and the reader has
        # its value; counted, logged quietly.
        self._counts["backfill_dropped"] += 1
        _log.debug(
            "cache %s: backfill of %s dropped: the Redis client is closed", self.table, item[0]
        )

    async def drain(self) -> None:
        """Wait until the backfills this event loop started in the background are written
        (or failed: failures are logged and counted; nothing is raised).

        Example::

            value = await store.get(42)   # a miss: returns once PostgreSQL answered
            await store.drain()           # ... and now its entry is in Redis
        """
        loop = asyncio.get_running_loop()
        while pending := [t for t in self._backfills if t.get_loop() is loop]:
            await asyncio.wait(pending)

    async def close(self) -> None:
        """Write the background backfills and stop starting new ones (later misses backfill
        before they return); stop probing Redis in the background (keys still pending are
        written by the next call's probe). The database and Redis clients belong to the
        caller."""
        self._closed = True
        await self.drain()
        self.cache.stop_recovery()

    async def __aenter__(self) -> CachedStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def get_many(self, keys: Iterable[Hashable]) -> dict[Any, Any]:
        """Values of many keys: one MGET, then one ``= ANY($1)`` query for the misses.

        While most lookups hit, the first call is an MGET; the misses then take their leases
        (reading their entries again) in one call, and are read in one query and backfilled
        in one call. When misses dominate (a cold cache) the first call is that lease
        script itself, so a cold ``get_many`` costs two Redis calls in all, whatever the
        number of keys (on a single server; a cluster takes a pipeline per step).

        Returns:
            ``{key: value}`` for the keys that have a row.
        """
        sql = self._sql or await self.prepare()
        unique = list(dict.fromkeys(keys))
        if not unique:
            return {}
        ns = self.namespace
        rkeys = [f"{ns}:{{{k}}}" for k in unique]
        if self._many_miss_rate > _LEASE_FIRST_ABOVE and not self.redis.cluster:
            # (Not on a cluster: there the leases are a SET NX pipeline that reads nothing.)
            return await self._get_many_lease_first(sql, unique, rkeys)
        datas = await self.cache.mget(rkeys)
        out: dict[Any, Any] = {}
        missing: list[Hashable] = []
        hits = 0
        if datas is DOWN:
            self._counts["skipped"] += len(unique)
            await self._read_many(sql, unique, out, fill=False)
            return out
        values = self._plain_values(datas)  # type: ignore[arg-type]
        if values is not None:  # the common case: every key a plain cached row
            self._counts["hit"] += len(values)
            if self._many_miss_rate:
                self._many_miss_rate *= 1 - _RATE_WEIGHT
            return dict(zip(unique, values, strict=True))
        decoded = self._decode_many(datas)  # type: ignore[arg-type]
        for k, data, value in zip(unique, datas, decoded, strict=True):  # type: ignore[arg-type]
            if value is _CORRUPT:
                await self.cache.delete_if_equal(self.redis_key(k), data)  # type: ignore[arg-type]
                missing.append(k)
            elif value is _MISS:
                missing.append(k)
            elif value is not None:
                out[k] = value
                hits += 1
        self._counts["hit"] += hits
        self._rate_many(len(missing), len(unique))
        if missing:
            self._counts["miss"] += len(missing)
            await self._load_many(sql, missing, out, first=False)
        return out

    def _rate_many(self, missed: int, looked: int) -> None:
        # get_many's miss rate (its own: single gets may miss while batches hit) moves by
        # the batch's share of misses, as far as one lookup moves get's.
        self._many_miss_rate += _RATE_WEIGHT * (missed / looked - self._many_miss_rate)

    async def _get_many_lease_first(
        self, sql: TableSQL, keys: list[Hashable], rkeys: list[str]
    ) -> dict[Any, Any]:
        # Cold-cache mode: the lease script first, so the misses cost no MGET before it.
        out: dict[Any, Any] = {}
        found = await self._load_many(sql, keys, out, first=True, rkeys=rkeys)
        if found < 0:
            self._counts["skipped"] += len(keys)
        return out

    async def _load_many(
        self,
        sql: TableSQL,
        keys: list[Hashable],
        out: dict[Any, Any],
        *,
        first: bool,
        rkeys: list[str] | None = None,
    ) -> int:
        """Load ``keys`` once across processes; the number of them served from Redis
        (``-1``: Redis was skipped or failed on the first call, all read from PostgreSQL).

        One call reads their entries again and takes the lease of each key that has none;
        we read the keys we hold (one query) and backfill them, releasing each lease with
        its fenced set; the keys other processes hold, we wait for.
        """
        token = f"{_TOKEN_PREFIX[0]}{next(_TOKENS)}"
        if rkeys is None:
            rkeys = [self.redis_key(k) for k in keys]
        res = await self.cache.get_or_lease_many(rkeys, token, self._lease_ms, first=first)
        if res is DOWN:
            await self._read_many(sql, keys, out, fill=False)
            return -1
        if first and all(type(r) is bytes for r in res):  # type: ignore[union-attr]
            values = self._plain_values(res)  # type: ignore[arg-type]
            if values is not None:  # every key a plain cached row (the cache warmed up)
                self._counts["hit"] += len(values)
                self._many_miss_rate *= 1 - _RATE_WEIGHT
                out.update(zip(keys, values, strict=True))
                return len(keys)
        mine: list[Hashable] = []
        theirs: list[Hashable] = []
        again: list[Hashable] = []  # an entry that is no value (invalid, corrupt, refresh)
        served = 0
        datas = [r if type(r) is bytes else None for r in res]  # type: ignore[union-attr]
        decoded = self._decode_many(datas)
        for k, rkey, r, data, value in zip(keys, rkeys, res, datas, decoded, strict=True):  # type: ignore[arg-type]
            if data is not None:
                if value is _CORRUPT:
                    await self.cache.delete_if_equal(rkey, data)
                    again.append(k)
                elif value is _MISS:
                    again.append(k)
                else:
                    served += 1
                    if value is not None:
                        out[k] = value
            else:
                (mine if r else theirs).append(k)
        if first:
            hits = sum(1 for k in keys if k in out)
            self._counts["hit"] += hits
            missed = len(keys) - served
            self._rate_many(missed, len(keys))
            if missed:
                self._counts["miss"] += missed
        if again:
            held = await self.cache.acquire_leases(
                [self.redis_key(k) + ":lease" for k in again], token, self._lease_ms
            )
            if held is DOWN:
                await self._read_many(sql, again, out, fill=False)
            else:
                for k, h in zip(again, held, strict=True):  # type: ignore[arg-type]
                    (mine if h else theirs).append(k)
        if mine:
            self._lease("acquired", len(mine))
            await self._read_many(sql, mine, out, fill=True, token=token)
        if theirs:
            await self._wait_many(sql, theirs, out)
        return served

    async def _wait_many(self, sql: TableSQL, keys: list[Hashable], out: dict[Any, Any]) -> None:
        # Keys whose lease another loader holds: poll their entries (and leases) with backoff
        # until they are filled; a key whose holder left without filling it, or still
        # unfilled at lease_wait, is read here (with the fence, without a lease).
        clock = self._clock
        deadline = clock.monotonic() + self.settings.lease_wait
        delay = 0.002
        while keys:
            if clock.monotonic() >= deadline:
                self._lease("timeout", len(keys))
                await self._read_many(sql, keys, out, fill=True)
                return
            await clock.sleep(delay)
            delay = min(delay * 2, 0.05)
            rkeys = [self.redis_key(k) for k in keys]
            peek = await self.cache.peek_many(rkeys, [r + ":lease" for r in rkeys])
            if peek is DOWN:
                await self._read_many(sql, keys, out, fill=False)
                return
            datas, leased = peek  # type: ignore[misc]
            waiting: list[Hashable] = []
            orphaned: list[Hashable] = []
            filled = 0
            for k, value, lease_held in zip(keys, self._decode_many(datas), leased, strict=True):
                if value is _MISS or value is _CORRUPT:
                    (waiting if lease_held else orphaned).append(k)
                    continue
                filled += 1
                if value is not None:
                    out[k] = value
            if filled:
                self._lease("waited", filled)
            if orphaned:
                await self._read_many(sql, orphaned, out, fill=True)
            keys = waiting

    def _plain_values(self, datas: list[bytes | None]) -> list[Any] | None:
        """The values when every entry is a plain row entry (one decode, no per-key Python
        beyond a split); ``None`` for anything else (absent, tombstone, corrupt, a schema or
        early refresh to apply): then :meth:`_decode_many` looks at each entry."""
        if self._schema is not None or self.settings.early_refresh or None in datas:
            return None
        parts = [d.split(b"|", 3) for d in datas]  # type: ignore[union-attr]
        heads = b"\n".join([p[0] for p in parts])
        if heads.count(b"\n") != len(parts) - 1 or _PLAIN_HEADS.fullmatch(heads) is None:
            return None
        try:
            batch = orjson.loads(b"[" + b",".join([p[3] for p in parts]) + b"]")
        except (IndexError, orjson.JSONDecodeError):  # a field short, or not JSON
            return None
        # A corrupt payload could merge or split elements: the count and types must match.
        if (
            not isinstance(batch, list)
            or len(batch) != len(parts)
            or set(map(type, batch)) != {dict}
        ):
            return None
        return batch

    def _decode_many(self, datas: list[bytes | None]) -> list[Any]:
        # One orjson call for every plain row entry (a JSON array of the payloads) instead of
        # one call per key; anything unusual takes the careful one-by-one path.
        out: list[Any] = [_MISS] * len(datas)
        plain: list[bytes] = []
        where: list[int] = []
        fast = self._schema is None and not self.settings.early_refresh
        for i, d in enumerate(datas):
            if d is None:
                continue
            if fast and d[:1] == b"v":
                parts = d.split(b"|", 3)
                if len(parts) == 4 and parts[0][1:].isdigit():
                    plain.append(parts[3])
                    where.append(i)
                    continue
            out[i] = self._from_cache(d)
        if plain:
            try:
                batch = orjson.loads(b"[" + b",".join(plain) + b"]")
            except orjson.JSONDecodeError:
                batch = None
            # A corrupt payload could merge or split elements: the count and types must match.
            if (
                isinstance(batch, list)
                and len(batch) == len(plain)
                and all(isinstance(v, dict) for v in batch)
            ):
                for i, value in zip(where, batch, strict=True):
                    out[i] = value
            else:
                for i in where:
                    out[i] = self._from_cache(datas[i])  # type: ignore[arg-type]
        return out

    async def _read_many(
        self,
        sql: TableSQL,
        keys: list[Hashable],
        out: dict[Any, Any],
        *,
        fill: bool,
        token: str | None = None,
    ) -> None:
        """Read ``keys`` in one query; with ``fill``, backfill them through the fence.

        With ``token``, we hold each key's lease: the backfill releases them, and they are
        released in every other case too.
        """
        released = False
        try:
            await self._read_many_leased(sql, keys, out, fill=fill, token=token)
            released = True
        finally:
            if token is not None and not released:
                await self.cache.release_leases([self.redis_key(k) + ":lease" for k in keys], token)

    async def _read_many_leased(
        self,
        sql: TableSQL,
        keys: list[Hashable],
        out: dict[Any, Any],
        *,
        fill: bool,
        token: str | None,
    ) -> None:
        assert self._codec is not None
        started = self._clock.monotonic()
        rows = await self._pg(self.db.fetch, sql.read_many, keys)
        self._counts["pg"] += 1
        delta_ms = max(1, int((self._clock.monotonic() - started) * 1000))
        items: list[FencedItem] = []
        for row in rows:
            payload = self._row_payload(sql, row)
            out[row[0]] = self._codec.loads(payload)
            items.append(self._value_item(self.redis_key(row[0]), row[1], payload, delta_ms))
        for k in keys:
            if k not in out:
                items.append(self._tomb_item(self.redis_key(k), 0, self.settings.absent_ttl))
        left = self._backfill_left(started)
        if not fill or left <= 0:
            if token is not None:
                await self.cache.release_leases([i[0] + ":lease" for i in items], token)
            return
        # As a single backfill: the age holds when the sets run (see _backfill).
        try:
            if self.redis.idle_connection():
                results = await self.cache.backfill_many(items, token, _deadline_ms(left))
            else:
                async with asyncio.timeout(left):
                    results = await self.cache.backfill_many(items, token, _deadline_ms(left))
        except TimeoutError:
            self._m_refused.inc(len(items))
            self._counts["refused"] += len(items)
            if token is not None:
                await self.cache.release_leases([i[0] + ":lease" for i in items], token)
            return
        if results is not DOWN:
            self._counts["refused"] += results.count(False)  # type: ignore[union-attr]


def _deadline_ms(left: float) -> int:
    # The server compares it with its own clock (TIME): real wall time, not the store's
    # injectable one.
    return int((time.time() + left) * 1000)


async def _finish_backfills(ref: weakref.ref[CachedStore]) -> None:
    """Registered with the Redis client of each loop that starts backfills: run in that loop
    before its client closes (the loop ends, or the client is closed), the client still open.

    Waits for the store's backfills of the loop, including those the loop's end cut short
    and started again. Past the client's bound it is cancelled: then the rest are cancelled
    too (a cancelled round trip drops its connection at once), so no task outlives the
    loop, and are counted as dropped.
    """
    store = ref()
    if store is None:
        return
    loop = asyncio.get_running_loop()
    try:
        await store.drain()
    except asyncio.CancelledError:
        left = [t for t in store._backfills if t.get_loop() is loop]
        for task in left:
            store._backfills[task] = None  # no further attempt
            task.cancel()
        if left:
            await asyncio.wait(left)
        raise
    finally:
        # The client of this loop is about to close: a backfill started here later (by a
        # task that ends after it) registers again, with the loop's next client.
        store._backfill_loops.discard(loop)
        last = store._backfill_loop
        if last is not None and last() is loop:
            store._backfill_loop = None
