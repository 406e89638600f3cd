"""The core of ``CachedStore``: settings, SQL, keys, entries and counters.

See :mod:`sheetanchor.state._store` for the read path and :mod:`sheetanchor.state._writes`
for the write path.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import secrets
import weakref
from collections.abc import Awaitable, Callable, Hashable, Sequence
from decimal import Decimal
from typing import Any, NamedTuple, Protocol, TypeVar

import asyncpg
import orjson

from sheetanchor.errors import ConfigError, SheetAnchorError
from sheetanchor.observe import get_logger
from sheetanchor.redis import RedisClient
from sheetanchor.retry import DEFAULT_POLICY, RetryPolicy, is_transient
from sheetanchor.state import _entry, _metrics
from sheetanchor.state._breaker import CircuitBreaker
from sheetanchor.state._cacheside import CacheSide, FencedItem
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

__all__ = ["PgExecutor", "StoreStats"]

_log = get_logger("state")
_T = TypeVar("_T")
# What a failed database call may raise (the Database translates driver errors to ours).
_PG_ERRORS: tuple[type[BaseException], ...] = (SheetAnchorError, OSError, asyncpg.PostgresError)
_MISS = object()  # "not usable from the cache": load it
_CORRUPT = object()  # undecodable: remove it, then load

# A backfill: the fenced item, the lease it releases (key, token), when its read started.
_Backfill = tuple[FencedItem, tuple[str, str] | None, float]

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


# Field types that come back from the cache's JSON round trip as they went in (floats do
# not: NaN and infinities come back as null).
_JSON_IDENTITY = frozenset({str, int, bool, type(None)})


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        return str(obj)
    raise TypeError(f"cannot cache a {type(obj).__name__} value as JSON")


class _StoreCore:
    """State and helpers shared by the read and write paths of :class:`CachedStore`."""

    # Slots, not an instance dict: past 30 attributes CPython (3.11+) stops sharing the
    # keys of instance dicts and every ``self.x`` and ``self.method()`` of the hot paths
    # becomes a dict lookup (about a third slower). The subclasses add none.
    __slots__ = (
        "__weakref__",
        "_backfill_loop",
        "_backfill_loops",
        "_backfills",
        "_clock",
        "_closed",
        "_codec",
        "_counts",
        "_flights",
        "_hooks",
        "_lease_ms",
        "_m_refused",
        "_many_miss_rate",
        "_miss_rate",
        "_read_from",
        "_retry",
        "_schema",
        "_sql",
        "_value_columns",
        "cache",
        "db",
        "key_column",
        "namespace",
        "redis",
        "settings",
        "table",
        "version_column",
    )

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
        retry: RetryPolicy | None = DEFAULT_POLICY,
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
        self._retry = retry.named(f"cache {table}") if retry is not None else None
        self._flights = SingleFlight(settings.max_flights)
        self._lease_ms = int(settings.lease_ttl * 1000)
        self._miss_rate = 0.0  # recent share of lookups that missed (see CachedStore.get)
        self._many_miss_rate = 0.0  # the same for the keys of get_many (its own mode)
        # Backfills being written in the background (bounded by settings.max_backfills), each
        # with what it writes; None for the second attempt of a backfill cut short.
        self._backfills: dict[asyncio.Task[None], _Backfill | None] = {}
        # The loops whose Redis client finishes our backfills before it closes, and the last
        # of them (the common case: one loop, one weak-reference call per backfill).
        self._backfill_loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        self._backfill_loop: weakref.ref[asyncio.AbstractEventLoop] | None = None
        self._closed = False
        _metrics.BACKFILLS_INFLIGHT.labels(table).set_function(self._backfills.__len__)
        _metrics.FLIGHTS.labels(table).set_function(self._flights.inflight)
        self.cache = CacheSide(
            redis,
            table=table,
            namespace=ns,
            breaker=breaker or CircuitBreaker(),
            pending=PendingInvalidations(settings.max_pending),
            timeout=settings.timeout,
        )
        self._m_refused = _metrics.FENCE_REFUSED.labels(table)
        # Plain ints (see _metrics.StoreCounters): the Prometheus lookups, database reads,
        # leases and backfills are read from them at scrape time, and stats() too.
        self._counts = _metrics.COUNTS.register(self, table)

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

    async def _pg(self, fn: Callable[..., Awaitable[_T]], *args: Any) -> _T:
        """One database call; a transient failure is retried under the store's policy.

        The first attempt runs without the policy's machinery (no cost on success, not
        even a coroutine frame of its own: every read of the store passes here).
        """
        try:
            return await fn(*args)
        except _PG_ERRORS as exc:
            return await self._pg_again(exc, fn, args)

    async def _pg_retried(self, fn: Callable[..., Awaitable[_T]], *args: Any) -> tuple[_T, bool]:
        """:meth:`_pg`, and whether the call was retried (an earlier attempt may have committed
        without us seeing the acknowledgement)."""
        try:
            return await fn(*args), False
        except _PG_ERRORS as exc:
            return await self._pg_again(exc, fn, args), True

    async def _pg_again(
        self, exc: BaseException, fn: Callable[..., Awaitable[_T]], args: tuple[Any, ...]
    ) -> _T:
        # The first attempt of _pg / _pg_retried failed with exc: retry it under the policy
        # if it is transient, else let it propagate.
        if self._retry is None or not is_transient(exc):
            raise exc
        _log.info("cache %s: transient database error, retrying (%s)", self.table, exc)
        return await self._retry.call(fn, *args)

    async def _resync_after_retry(self, key: Hashable) -> None:
        """A retried write found nothing to change: an earlier attempt may have committed.

        Its acknowledgement was lost, and so was its Redis update: fence-set the row as it
        is now, or (no row) a tombstone with a fresh version from the table's sequence, so
        an entry older than that commit cannot stay cached.
        """
        sql = self._sql or await self.prepare()
        rkey = self.redis_key(key)
        cur = await self._pg(self.db.fetchrow, sql.read_current, key)
        if cur is None:
            version = int(await self._pg(self.db.fetchval, sql.next_version))
            item = self._tomb_item(rkey, version, self.settings.tombstone_ttl)
        else:
            item = self._value_item(rkey, int(cur[1]), self._row_payload(sql, cur), 0)
        _log.info(
            "cache %s: retried write of %r changed nothing; Redis entry refreshed", self.table, key
        )
        await self._written([item])

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

    def _row_data(self, sql: TableSQL, row: Any) -> dict[str, Any]:
        # row = (key, version, *columns); JSON columns arrive as text.
        if not sql.json_columns:
            return dict(zip(sql.columns, row[2:], strict=True))  # no Python step per column
        return {
            c: (
                orjson.loads(row[i + 2])
                if c in sql.json_columns and row[i + 2] is not None
                else row[i + 2]
            )
            for i, c in enumerate(sql.columns)
        }

    def _row_payload(self, sql: TableSQL, row: Any) -> bytes:
        return orjson.dumps(self._row_data(sql, row), default=_json_default)

    def _row_value(self, data: dict[str, Any], payload: bytes | None) -> Any:
        """The value of a row (``data``: :meth:`_row_data`), as a read of its cached entry
        gives it: the JSON round trip of ``payload`` (the encoded ``data``; ``None``: not
        encoded yet). Skipped when it cannot change anything: every field a ``str``,
        ``int``, ``bool`` or ``None`` (text, integer and boolean columns)."""
        if set(map(type, data.values())) <= _JSON_IDENTITY:
            return data if self._schema is None else self._codec.from_mapping(data)  # type: ignore[union-attr]
        if payload is None:
            payload = orjson.dumps(data, default=_json_default)
        assert self._codec is not None
        return self._codec.loads(payload)

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
            self._counts["absent"] += 1
            return None
        return _MISS

    def _corrupt(self, exc: Exception | None = None) -> None:
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

    def _lease(self, outcome: str, n: int = 1) -> None:
        self._counts[outcome] += n

    def _refused(self) -> None:
        self._m_refused.inc()
        self._counts["refused"] += 1

    async def _written(self, items: list[FencedItem]) -> None:
        # After the commit: detach in-flight reads of these keys, then the fenced set.
        for item in items:
            self._flights.forget(item[0])
        try:
            await self.cache.after_write(items)
        except BaseException as exc:
            # Cancelled, or Redis refused (ResponseError): the old entry may still be there
            # and nothing would replace it before its TTL. Pending + open, then re-raise.
            self.cache.not_written(items)
            _log.warning(
                "cache %s: Redis update after a commit did not complete (%s); %d key(s) "
                "pending invalidation",
                self.table,
                type(exc).__name__,
                len(items),
            )
            raise

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
