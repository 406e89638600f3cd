"""The write path of ``CachedStore``: one statement per write, then a fenced set.

Every write bumps the row's version from the table's sequence in the same statement (one
transaction); only after the commit is the new entry written to Redis, through the fence.
Unchanged rows are not written at all.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

import orjson

from sheetanchor.errors import VersionConflict
from sheetanchor.state._core import _json_default, _StoreCore

__all__: list[str] = []


class _StoreWrites(_StoreCore):
    """put / put_many / create / update / delete (see :class:`CachedStore`)."""

    __slots__ = ()

    async def put(self, key: Hashable, value: Any) -> int | None:
        """Insert or replace the row of ``key``; returns the new version.

        Only a changed row is written: an identical value returns ``None`` and bumps
        nothing. After the commit the entry is set in Redis through the fence. (A retried
        call that finds the row unchanged also returns ``None``: its first attempt may have
        committed unseen; the Redis entry is refreshed from the row either way.)
        """
        sql = self._sql or await self.prepare()
        row, params = self._params(sql, value)
        rec, retried = await self._pg_retried(self.db.fetchrow, sql.upsert_one, key, *params)
        if rec is None:
            if retried:
                # Maybe our first attempt committed and only its acknowledgement was lost.
                await self._resync_after_retry(key)
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
        recs = await self._pg(self.db.fetch, sql.upsert_many, keys, *columns)
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
        again, up to ``settings.update_attempts`` times. When ``fn`` returns a value equal to
        the current one, nothing is written and the version does not change.

        Raises:
            VersionConflict: every attempt lost to a concurrent writer.
        """
        sql = self._sql or await self.prepare()
        assert self._codec is not None
        attempts = self.settings.update_attempts
        for attempt in range(attempts):
            cur = await self._pg(self.db.fetchrow, sql.read_current, key)
            current = None if cur is None else self._codec.loads(self._row_payload(sql, cur))
            new = fn(current)
            row, params = self._params(sql, new)
            payload = orjson.dumps(row, default=_json_default)
            if cur is not None and orjson.loads(payload) == orjson.loads(
                self._row_payload(sql, cur)
            ):
                # Unchanged: nothing is written and the version stays (as in put).
                return current
            if cur is None:
                version = await self.db.fetchval(sql.insert_new, key, *params)
            else:
                version = await self.db.fetchval(sql.update_cas, key, *params, cur[1])
            if version is not None:
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
        """Delete the row; leaves a short-lived versioned tombstone in Redis. True if deleted.

        A retried call that finds no row returns False (its first attempt may have deleted
        it unseen) and still fences a tombstone over any older cached entry.
        """
        sql = self._sql or await self.prepare()
        version, retried = await self._pg_retried(self.db.fetchval, sql.delete, key)
        if version is None:
            if retried:
                # Maybe our first attempt deleted it and only its acknowledgement was lost.
                await self._resync_after_retry(key)
            return False
        await self._written(
            [self._tomb_item(self.redis_key(key), int(version), self.settings.tombstone_ttl)]
        )
        return True
