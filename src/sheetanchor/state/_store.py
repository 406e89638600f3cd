"""``CachedStore``: a Redis read-through over one PostgreSQL table, never staler than it.

PostgreSQL is the only source of truth. Every write is one statement (one transaction) that
bumps the row's version from a sequence; after the commit the new entry goes to Redis
through the fence script, which refuses anything older than what Redis holds. Reads try
Redis, then load from PostgreSQL under a single-flight (in process) and a lease (across
processes), and backfill with the same fence. If Redis is down or slow, a circuit breaker
sends reads straight to PostgreSQL and remembers the keys written meanwhile; they are
invalidated before Redis is read again.
"""

from __future__ import annotations

import itertools
import math
import os
import secrets
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any, NamedTuple, Protocol

import orjson

from sheetanchor.errors import ConfigError, VersionConflict
from sheetanchor.observe import get_logger
from sheetanchor.redis import RedisClient
from sheetanchor.state import _entry, _metrics
from sheetanchor.state._breaker import CircuitBreaker
from sheetanchor.state._cacheside import DOWN, CacheSide, FencedItem
from sheetanchor.state._codec import CorruptValue, RowCodec
from sheetanchor.state._pending import PendingInvalidations
from sheetanchor.state._settings import (
    DEFAULT_CACHE_SETTINGS,
    CacheSettings,
    StoreClock,
    StoreHooks,
)
from sheetanchor.state._singleflight import SingleFlight
from sheetanchor.state._sql import TableSQL, describe_sql, quote_ident, sequence_sql

__all__ = ["CachedStore", "PgExecutor", "StoreStats"]

_log = get_logger("state")
_MISS = object()  # "not usable from the cache": load it
_CORRUPT = object()  # undecodable: remove it, then load

# Lease tokens: a random prefix per process (new after fork) and a counter per lookup.
_TOKEN_PREFIX = [secrets.token_hex(8) + ":"]
_TOKENS = itertools.count()


def _new_token_prefix() -> None:
    _TOKEN_PREFIX[0] = secrets.token_hex(8) + ":"


os.register_at_fork(after_in_child=_new_token_prefix)


class PgExecutor(Protocol):
    """What the store needs from the database (``sheetanchor.postgres.Database`` fits)."""

    async def fetch(self, sql: str, *args: Any) -> list[Any]: ...

    async def fetchrow(self, sql: str, *args: Any) -> Any: ...

    async def fetchval(self, sql: str, *args: Any) -> Any: ...


class StoreStats(NamedTuple):
    """Counters of one store in this process."""

    hits: int
    misses: int
    absent_hits: int
    corrupt: int
    skipped: int
    pg_reads: int
    fence_refused: int
    leases_acquired: int
    lease_waits: int
    lease_timeouts: int
    breaker: str
    pending_invalidations: int
    inflight: int


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        return str(obj)
    raise TypeError(f"cannot cache a {type(obj).__name__} value as JSON")


class CachedStore:
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
        settings: :class:`CacheSettings`.
        breaker: the Redis circuit breaker (default: a new one per store).
        hooks: test seams (:class:`StoreHooks`).
        clock: time sources (:class:`StoreClock`).

    Example::

        store = CachedStore(db, rc, table="worlds", value_columns=["name", "state"])
        await store.put(42, {"name": "w", "state": {"tick": 1}})
        world = await store.get(42)
    """

    def __init__(
        self,
        db: PgExecutor,
        redis: RedisClient,
        *,
        table: str,
        key_column: str = "id",
        version_column: str = "version",
        value_columns: Sequence[str] | None = None,
        read_from: str | None = None,
        schema: type[Any] | None = None,
        namespace: str | None = None,
        settings: CacheSettings = DEFAULT_CACHE_SETTINGS,
        breaker: CircuitBreaker | None = None,
        hooks: StoreHooks | None = None,
        clock: StoreClock | None = None,
    ) -> None:
        for name in (table, key_column, version_column, *(value_columns or ()), read_from):
            if name is not None:
                quote_ident(name)  # validates
        ns = namespace if namespace is not None else f"sa:{table}"
        if "{" in ns or "}" in ns:
            raise ConfigError(f"namespace must not contain braces (hash tags), got {ns!r}")
        self.db = db
        self.redis = redis
        self.table = table
        self.key_column = key_column
        self.version_column = version_column
        self.namespace = ns
        self.settings = settings
        self._value_columns = tuple(value_columns) if value_columns is not None else None
        self._read_from = read_from or table
        self._schema = schema
        self._hooks = hooks or StoreHooks()
        self._clock = clock or StoreClock()
        self._sql: TableSQL | None = None
        self._codec: RowCodec | None = None
        self._flights = SingleFlight(settings.max_flights)
        self.cache = CacheSide(
            redis,
            table=table,
            namespace=ns,
            breaker=breaker or CircuitBreaker(),
            pending=PendingInvalidations(settings.max_pending),
            timeout=settings.timeout,
        )
        lookups = _metrics.CACHE
        self._m_hit = lookups.labels(table, "hit")
        self._m_miss = lookups.labels(table, "miss")
        self._m_absent = lookups.labels(table, "absent")
        self._m_corrupt = lookups.labels(table, "corrupt")
        self._m_skipped = lookups.labels(table, "skipped")
        self._m_pg = _metrics.PG_READS.labels(table)
        self._m_refused = _metrics.FENCE_REFUSED.labels(table)
        self._m_lease = {
            o: _metrics.LEASE.labels(table, o) for o in ("acquired", "waited", "timeout")
        }
        self._counts = dict.fromkeys(
            (
                "hit",
                "miss",
                "absent",
                "corrupt",
                "skipped",
                "pg",
                "refused",
                "acquired",
                "waited",
                "timeout",
            ),
            0,
        )

    def __repr__(self) -> str:
        return f"CachedStore(table={self.table!r}, namespace={self.namespace!r})"

    # -- set-up --------------------------------------------------------------------------

    async def prepare(self) -> TableSQL:
        """Read the table's columns and version sequence (done on first use; idempotent).

        Raises:
            ConfigError: a column is missing, or the version column has no sequence.
        """
        if self._sql is not None:
            return self._sql
        rows = await self.db.fetch(describe_sql, quote_ident(self.table))
        types = {r[0]: (r[1], r[2]) for r in rows}
        if not types:
            raise ConfigError(f"table {self.table!r} not found or has no columns")
        seq = await self.db.fetchval(sequence_sql, quote_ident(self.table), self.version_column)
        if seq is None:
            raise ConfigError(
                f"version column {self.table}.{self.version_column} has no sequence: declare "
                "it bigserial (or an identity column) so versions keep growing across deletes"
            )
        columns = self._value_columns
        if columns is None:
            columns = tuple(c for c in types if c not in (self.key_column, self.version_column))
        sql = TableSQL.build(
            table=self.table,
            read_from=self._read_from,
            key=self.key_column,
            version=self.version_column,
            columns=columns,
            types=types,
            sequence=seq,
        )
        self._codec = RowCodec(sql.columns, self._schema)
        self._sql = sql
        return sql

    # -- keys and entries ----------------------------------------------------------------

    def redis_key(self, key: Hashable) -> str:
        """The Redis key of ``key``: ``<namespace>:{<key>}``."""
        return f"{self.namespace}:{{{key}}}"

    def _ttl_ms(self, ttl: float) -> int:
        s = self.settings
        return max(1, int(ttl * 1000 * (1 - s.ttl_jitter * self._clock.rand())))

    def _value_item(self, rkey: str, version: int, payload: bytes, delta_ms: int) -> FencedItem:
        ttl_ms = self._ttl_ms(self.settings.ttl)
        expires = int(self._clock.wall() * 1000) + ttl_ms
        entry = _entry.build(_entry.KIND_VALUE, version, expires, delta_ms, payload)
        return (rkey, entry, version, _entry.RANK[_entry.KIND_VALUE], ttl_ms)

    def _tomb_item(self, rkey: str, version: int, ttl: float) -> FencedItem:
        ttl_ms = self._ttl_ms(ttl)
        expires = int(self._clock.wall() * 1000) + ttl_ms
        entry = _entry.build(_entry.KIND_TOMBSTONE, version, expires, 0)
        return (rkey, entry, version, _entry.RANK[_entry.KIND_TOMBSTONE], ttl_ms)

    def _row_payload(self, sql: TableSQL, row: Any) -> bytes:
        # row = (key, version, *columns); JSON columns arrive as text.
        data = {
            c: (
                orjson.loads(row[i + 2])
                if c in sql.json_columns and row[i + 2] is not None
                else row[i + 2]
            )
            for i, c in enumerate(sql.columns)
        }
        return orjson.dumps(data, default=_json_default)

    def _from_cache(self, data: bytes) -> Any:
        """The value in a cached entry, ``None`` (cached absence), ``_MISS`` or ``_CORRUPT``."""
        if data[:1] == b"v" and not self.settings.early_refresh:
            # The hot path: a plain row. Only the payload is needed (one split, one decode).
            parts = data.split(b"|", 3)
            if len(parts) == 4 and parts[0][1:].isdigit():
                assert self._codec is not None
                try:
                    return self._codec.loads(parts[3])
                except CorruptValue as exc:
                    self._corrupt(exc)
                    return _CORRUPT
        entry = _entry.parse(data)
        if entry is None:
            self._corrupt()
            return _CORRUPT
        if entry.kind == _entry.KIND_VALUE:
            assert self._codec is not None
            try:
                value = self._codec.loads(entry.payload)
            except CorruptValue as exc:
                self._corrupt(exc)
                return _CORRUPT
            if self.settings.early_refresh and self._refresh_now(entry):
                return _MISS
            return value
        if entry.kind == _entry.KIND_TOMBSTONE and entry.version == 0:
            # A cached "no such row". Deletion tombstones (version > 0) are not trusted for
            # reads (a re-insert may carry an older sequence value); they only fence.
            self._m_absent.inc()
            self._counts["absent"] += 1
            return None
        return _MISS

    def _corrupt(self, exc: Exception | None = None) -> None:
        self._m_corrupt.inc()
        self._counts["corrupt"] += 1
        _log.warning("cache %s: undecodable cached entry treated as a miss (%s)", self.table, exc)

    def _refresh_now(self, entry: _entry.Entry) -> bool:
        # Probabilistic early expiration: refresh when now - delta * beta * ln(rand) >= expiry.
        if entry.delta_ms <= 0:
            return False
        now_ms = self._clock.wall() * 1000
        r = max(self._clock.rand(), 1e-12)
        return (
            now_ms - entry.delta_ms * self.settings.early_refresh_beta * math.log(r)
            >= entry.expires_ms
        )

    # -- reads ---------------------------------------------------------------------------

    async def get(self, key: Hashable) -> Any:
        """The value of ``key``, or ``None`` when the table has no such row.

        A hit is one GET. A miss is loaded once per key however many callers want it: in
        this process they share one load (single-flight), across processes the holder of the
        key's lease loads while the others wait for its entry. A write from this process
        detaches the running load, so a read that starts after a write returned sees it.
        While Redis is unreachable, reads go to PostgreSQL (one per key at a time).
        """
        sql = self._sql or await self.prepare()
        rkey = self.redis_key(key)
        data = await self.cache.get(rkey)
        if data is not None and data is not DOWN:
            value = self._from_cache(data)  # type: ignore[arg-type]
            if value is _CORRUPT:
                await self.cache.delete_if_equal(rkey, data)  # type: ignore[arg-type]
            elif value is not _MISS:
                if value is not None:
                    self._m_hit.inc()
                    self._counts["hit"] += 1
                return value
        if data is DOWN:
            # Redis is skipped: one PostgreSQL read per key at a time, nothing cached.
            self._m_skipped.inc()
            self._counts["skipped"] += 1
            return await self._flights.run(rkey, lambda: self._read(sql, key, rkey, fill=False))
        self._m_miss.inc()
        self._counts["miss"] += 1
        return await self._flights.run(rkey, lambda: self._miss(sql, key, rkey))

    async def _miss(self, sql: TableSQL, key: Hashable, rkey: str) -> Any:
        # Look again and try to take the load lease, in one round trip.
        lease_key = rkey + ":lease"
        token = f"{_TOKEN_PREFIX[0]}{next(_TOKENS)}"
        lease_ms = int(self.settings.lease_ttl * 1000)
        res = await self.cache.get_or_lease(rkey, lease_key, token, lease_ms)
        if res is DOWN:
            return await self._read(sql, key, rkey, fill=False)
        held: bool | None = None
        if isinstance(res, bytes):
            value = self._from_cache(res)
            if value is _CORRUPT:
                await self.cache.delete_if_equal(rkey, res)
            elif value is not _MISS:
                return value  # filled by someone else meanwhile
        else:
            held = bool(res)
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
                    return await self._read(sql, key, rkey, fill=False)
                held = bool(got)
            if held:
                self._lease("acquired")
                return await self._read(sql, key, rkey, fill=True, lease=(lease_key, token))
            held = None
            while True:
                if clock.monotonic() >= deadline:
                    self._lease("timeout")
                    return await self._read(sql, key, rkey, fill=True)
                await clock.sleep(delay)
                delay = min(delay * 2, 0.05)
                peek = await self.cache.peek(rkey, lease_key)
                if peek is DOWN:
                    return await self._read(sql, key, rkey, fill=False)
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

    def _lease(self, outcome: str) -> None:
        self._m_lease[outcome].inc()
        self._counts[outcome] += 1

    async def _read(
        self,
        sql: TableSQL,
        key: Hashable,
        rkey: str,
        *,
        fill: bool,
        lease: tuple[str, str] | None = None,
    ) -> Any:
        """Read the row from PostgreSQL; with ``fill``, backfill Redis through the fence.

        With ``lease`` (key, token) the lease is released in every case: together with the
        backfill when there is one, else on its own.
        """
        assert self._codec is not None
        clock = self._clock
        released = False
        try:
            started = clock.monotonic()
            row = await self.db.fetchrow(sql.read_one, key)
            self._m_pg.inc()
            self._counts["pg"] += 1
            if self._hooks.after_db_read is not None:
                await self._hooks.after_db_read(key, None if row is None else row[1])
            if row is None:
                if not fill:
                    return None
                value = None
                item = self._tomb_item(rkey, 0, self.settings.absent_ttl)
            else:
                payload = self._row_payload(sql, row)
                value = self._codec.loads(payload)
                if not fill:
                    return value
                delta_ms = max(1, int((clock.monotonic() - started) * 1000))
                item = self._value_item(rkey, row[1], payload, delta_ms)
            if clock.monotonic() - started > self.settings.backfill_age:
                # Too old to be sure a newer entry has not expired meanwhile: don't cache.
                self._refused()
                return value
            if lease is not None:
                ok = await self.cache.fenced_set_release(item, *lease)
                released = True
            else:
                ok = await self.cache.fenced_set(item)
            if ok is False:
                self._counts["refused"] += 1  # a newer entry is there (the metric is counted)
            return value
        finally:
            if lease is not None and not released:
                await self.cache.release_lease(*lease)

    def _refused(self) -> None:
        self._m_refused.inc()
        self._counts["refused"] += 1

    async def get_many(self, keys: Iterable[Hashable]) -> dict[Any, Any]:
        """Values of many keys: one MGET, then one ``= ANY($1)`` query for the misses.

        Returns:
            ``{key: value}`` for the keys that have a row.
        """
        sql = self._sql or await self.prepare()
        unique = list(dict.fromkeys(keys))
        if not unique:
            return {}
        ns = self.namespace
        rkeys = [f"{ns}:{{{k}}}" for k in unique]
        datas = await self.cache.mget(rkeys)
        out: dict[Any, Any] = {}
        missing: list[Hashable] = []
        hits = 0
        if datas is DOWN:
            self._m_skipped.inc(len(unique))
            self._counts["skipped"] += len(unique)
            missing = unique
        else:
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
            self._m_hit.inc(hits)
            self._counts["hit"] += hits
            if missing:
                self._m_miss.inc(len(missing))
                self._counts["miss"] += len(missing)
        if missing:
            await self._read_many(sql, missing, out, fill=datas is not DOWN)
        return out

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
        self, sql: TableSQL, keys: list[Hashable], out: dict[Any, Any], *, fill: bool
    ) -> None:
        assert self._codec is not None
        started = self._clock.monotonic()
        rows = await self.db.fetch(sql.read_many, keys)
        self._m_pg.inc()
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
        if fill and self._clock.monotonic() - started <= self.settings.backfill_age:
            results = await self.cache.fenced_set_many(items)
            if results is not DOWN:
                self._counts["refused"] += results.count(False)  # type: ignore[union-attr]

    # -- writes --------------------------------------------------------------------------

    async def _written(self, items: list[FencedItem]) -> None:
        # After the commit: detach in-flight reads of these keys, then the fenced set.
        for item in items:
            self._flights.forget(item[0])
        await self.cache.after_write(items)

    def _params(self, sql: TableSQL, value: Any) -> tuple[dict[str, Any], list[Any]]:
        assert self._codec is not None
        row = self._codec.to_row(value)
        params = [
            orjson.dumps(row[c], default=_json_default).decode()
            if c in sql.json_columns
            else row[c]
            for c in sql.columns
        ]
        return row, params

    async def put(self, key: Hashable, value: Any) -> int | None:
        """Insert or replace the row of ``key``; returns the new version.

        Only a changed row is written: an identical value returns ``None`` and bumps
        nothing. After the commit the entry is set in Redis through the fence.
        """
        sql = self._sql or await self.prepare()
        row, params = self._params(sql, value)
        rec = await self.db.fetchrow(sql.upsert_one, key, *params)
        if rec is None:
            return None
        version = int(rec[1])
        payload = orjson.dumps(row, default=_json_default)
        await self._written([self._value_item(self.redis_key(key), version, payload, 0)])
        return version

    async def put_many(self, values: Mapping[Hashable, Any]) -> dict[Any, int]:
        """Write many rows in one statement (one round trip); only changed rows are written.

        Returns:
            ``{key: new version}`` for the rows that changed.
        """
        sql = self._sql or await self.prepare()
        if not values:
            return {}
        keys = list(values)
        rows: dict[Hashable, dict[str, Any]] = {}
        columns: list[list[Any]] = [[] for _ in sql.columns]
        for k in keys:
            row, params = self._params(sql, values[k])
            rows[k] = row
            for col, p in zip(columns, params, strict=True):
                col.append(p)
        recs = await self.db.fetch(sql.upsert_many, keys, *columns)
        changed = {rec[0]: int(rec[1]) for rec in recs}
        items = [
            self._value_item(self.redis_key(k), v, orjson.dumps(rows[k], default=_json_default), 0)
            for k, v in changed.items()
        ]
        if items:
            await self._written(items)
        return changed

    async def create(self, value: Any) -> Any:
        """Insert a new row whose key the database assigns (identity or default); return it."""
        sql = self._sql or await self.prepare()
        row, params = self._params(sql, value)
        rec = await self.db.fetchrow(sql.create, *params)
        key, version = rec[0], int(rec[1])
        payload = orjson.dumps(row, default=_json_default)
        await self._written([self._value_item(self.redis_key(key), version, payload, 0)])
        return key

    async def update(self, key: Hashable, fn: Callable[[Any], Any]) -> Any:
        """Read-modify-write with optimistic concurrency; returns the new value.

        ``fn(current)`` gets the current value (``None`` if there is no row) and returns the
        new one. The UPDATE checks the version read; on a conflict the whole step runs
        again, up to ``settings.update_attempts`` times.

        Raises:
            VersionConflict: every attempt lost to a concurrent writer.
        """
        sql = self._sql or await self.prepare()
        assert self._codec is not None
        attempts = self.settings.update_attempts
        for attempt in range(attempts):
            cur = await self.db.fetchrow(sql.read_current, key)
            current = None if cur is None else self._codec.loads(self._row_payload(sql, cur))
            new = fn(current)
            row, params = self._params(sql, new)
            if cur is None:
                version = await self.db.fetchval(sql.insert_new, key, *params)
            else:
                version = await self.db.fetchval(sql.update_cas, key, *params, cur[1])
            if version is not None:
                payload = orjson.dumps(row, default=_json_default)
                await self._written(
                    [self._value_item(self.redis_key(key), int(version), payload, 0)]
                )
                return self._codec.loads(payload)
            # Lost the race: back off (exponential, full jitter) and read again.
            await self._clock.sleep(min(0.2, 0.002 * 2**attempt) * self._clock.rand())
        raise VersionConflict(
            f"update of {self.table} key {key!r} lost to concurrent writers {attempts} times; "
            "retry later, reduce contention on this key, or raise CacheSettings.update_attempts"
        )

    async def delete(self, key: Hashable) -> bool:
        """Delete the row; leaves a short-lived versioned tombstone in Redis. True if deleted."""
        sql = self._sql or await self.prepare()
        version = await self.db.fetchval(sql.delete, key)
        if version is None:
            return False
        await self._written(
            [self._tomb_item(self.redis_key(key), int(version), self.settings.tombstone_ttl)]
        )
        return True

    # -- introspection -------------------------------------------------------------------

    def stats(self) -> StoreStats:
        """Counters of this store in this process."""
        c = self._counts
        return StoreStats(
            hits=c["hit"],
            misses=c["miss"],
            absent_hits=c["absent"],
            corrupt=c["corrupt"],
            skipped=c["skipped"],
            pg_reads=c["pg"],
            fence_refused=c["refused"],
            leases_acquired=c["acquired"],
            lease_waits=c["waited"],
            lease_timeouts=c["timeout"],
            breaker=self.cache.breaker.state,
            pending_invalidations=len(self.cache.pending),
            inflight=self._flights.inflight(),
        )
