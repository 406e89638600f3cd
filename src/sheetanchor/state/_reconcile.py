"""``Reconciler``: find and repair drift between PostgreSQL and the cache.

It walks the table in key order (or a random sample of it), reads the cached entries of each
page with one MGET, and classifies every key:

* ``missing``  the row is not cached (not wrong, but reported; filled with ``fill_missing``,
               and counted as ``filled``, never as a repair)
* ``stale``    the cache holds an older version, a different value for the same version, an
               undecodable entry, or "no such row" while the row exists
* ``ahead``    the cache holds a *newer* version than the database (restored backup, writes
               that bypassed the store and then rolled back)
* ``orphan``   the cache holds a row the database does not have (found by SCAN)

Repairs only ever go through the fence (a newer entry always wins) or a compare-and-delete
of the exact bytes that were judged wrong, so a repair racing a live writer can never undo
the writer's entry.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import orjson

from sheetanchor.errors import ConnectionLost, TransientError
from sheetanchor.observe import get_logger
from sheetanchor.state import _entry, _metrics
from sheetanchor.state._cacheside import DOWN, REDIS_DOWN_ERRORS, FencedItem, mget
from sheetanchor.state._store import CachedStore

__all__ = ["DriftReport", "Reconciler"]

_log = get_logger("state")
_MAX_EXAMPLES = 20
# Expected pass failures (an outage): logged without a traceback; others get one.
_PASS_ERRORS: tuple[type[BaseException], ...] = (*REDIS_DOWN_ERRORS, TransientError)


class DriftReport(NamedTuple):
    """What one reconciliation pass found (and repaired).

    Attributes:
        table: the store's table.
        checked: rows of the database compared.
        cached: of those, how many had a usable cache entry.
        missing, stale, ahead, orphan: drift counts (see the module docstring).
        repaired: drifted entries fixed (only with ``repair=True``); a fill is not a repair.
        filled: uncached rows cached (only with ``repair=True`` and ``fill_missing``).
        examples: up to 20 ``"kind key"`` strings, for a human.
        seconds: how long the pass took.
    """

    table: str
    checked: int
    cached: int
    missing: int
    stale: int
    ahead: int
    orphan: int
    repaired: int
    filled: int
    examples: tuple[str, ...]
    seconds: float

    @property
    def drift(self) -> int:
        """Entries that are wrong (``missing`` is not wrong, only uncached)."""
        return self.stale + self.ahead + self.orphan

    @property
    def remaining(self) -> int:
        """Drift this pass found and did not repair (a refused or failed repair included):
        what ``sheetanchor reconcile`` exits 1 for. Run the pass again to see what is left."""
        return self.drift - self.repaired


def _same(cached: bytes, fresh: bytes) -> bool:
    # Compare decoded values: jsonb reorders object keys, and 1 == 1.0 is not drift.
    if cached == fresh:
        return True
    try:
        return bool(orjson.loads(cached) == orjson.loads(fresh))
    except orjson.JSONDecodeError:
        return False


class _Tally:
    def __init__(self, table: str) -> None:
        self.table = table
        self.counts = dict.fromkeys(
            ("checked", "cached", "missing", "stale", "ahead", "orphan", "repaired", "filled"),
            0,
        )
        self.examples: list[str] = []

    def add(self, kind: str, key: Hashable) -> None:
        self.counts[kind] += 1
        if kind in ("missing", "stale", "ahead", "orphan", "repaired", "filled"):
            _metrics.DRIFT.labels(self.table, kind).inc()
        if kind in ("stale", "ahead", "orphan") and len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{kind} {key!r}")


class Reconciler:
    """Compare a :class:`CachedStore`'s table with its cache; report and optionally repair.

    Args:
        store: the store to check.
        batch: rows per page (one query and one MGET each).
        fill_missing: with ``repair=True``, also cache rows that are not cached.
        rand: random source for sampling (injectable).

    Example::

        report = await Reconciler(store).run(repair=True)
        if report.drift: log.warning("repaired %d drifted cache entries", report.repaired)
    """

    def __init__(
        self,
        store: CachedStore,
        *,
        batch: int = 500,
        fill_missing: bool = False,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.store = store
        self.batch = batch
        self.fill_missing = fill_missing
        self._rand = rand

    async def run(
        self,
        *,
        start: Any = None,
        limit: int | None = None,
        sample: float | None = None,
        repair: bool = False,
        orphans: bool = True,
    ) -> DriftReport:
        """One pass over the keys after ``start`` (at most ``limit`` rows).

        Args:
            start: compare keys greater than this (``None``: from the first key).
            limit: stop after this many rows (``None``: the whole table).
            sample: compare only this fraction of rows, chosen at random (0 < sample <= 1).
            repair: fix what is wrong (through the fence or a compare-and-delete).
            orphans: also SCAN the cache for entries whose row is gone (whole-table passes
                only, i.e. without ``start``/``limit``).

        Raises:
            ConnectionLost / redis errors: the database or Redis failed mid-pass.
        """
        if sample is not None and not 0 < sample <= 1:
            raise ValueError(f"sample must be in (0, 1], got {sample}")
        store = self.store
        sql = await store.prepare()
        tally = _Tally(store.table)
        began = time.monotonic()
        after = start
        seen = 0
        while limit is None or seen < limit:
            size = self.batch if limit is None else min(self.batch, limit - seen)
            rows = await store.db.fetch(sql.scan, after, size)
            if not rows:
                break
            seen += len(rows)
            after = rows[-1][0]
            if sample is not None:
                rows = [r for r in rows if self._rand() < sample]
            if rows:
                await self._page(rows, tally, repair)
            if len(rows) < size and sample is None:
                break
        if orphans and start is None and limit is None:
            await self._orphans(tally, repair)
        c = tally.counts
        report = DriftReport(
            table=store.table,
            checked=c["checked"],
            cached=c["cached"],
            missing=c["missing"],
            stale=c["stale"],
            ahead=c["ahead"],
            orphan=c["orphan"],
            repaired=c["repaired"],
            filled=c["filled"],
            examples=tuple(tally.examples),
            seconds=time.monotonic() - began,
        )
        if report.drift:
            _log.warning(
                "reconcile %s: %d stale, %d ahead, %d orphan (%d repaired, %d left) of %d checked",
                store.table,
                report.stale,
                report.ahead,
                report.orphan,
                report.repaired,
                report.remaining,
                report.checked,
            )
        return report

    async def _page(self, rows: list[Any], tally: _Tally, repair: bool) -> None:
        store = self.store
        sql = await store.prepare()
        client = store.redis.any_client()
        rkeys = [store.redis_key(r[0]) for r in rows]
        datas = await mget(client, rkeys)
        # (item, what setting it counts as): "filled" for an uncached row, else "repaired".
        fixes: list[tuple[FencedItem, str]] = []
        deletes: list[tuple[str, bytes]] = []
        for row, rkey, data in zip(rows, rkeys, datas, strict=True):
            key, version = row[0], int(row[1])
            tally.add("checked", key)
            payload = store._row_payload(sql, row)
            entry = _entry.parse(data) if data is not None else None
            if data is None or (entry is not None and entry.kind == _entry.KIND_INVALID):
                tally.add("missing", key)
                if repair and self.fill_missing:
                    fixes.append((store._value_item(rkey, version, payload, 0), "filled"))
                continue
            if entry is None:
                tally.add("stale", key)  # undecodable
                deletes.append((rkey, data))
                continue
            if entry.kind == _entry.KIND_TOMBSTONE:
                if entry.version == 0 or entry.version < version:
                    if entry.version == 0:
                        tally.add("stale", key)  # "no such row", but there is one
                    else:
                        tally.add("missing", key)  # old deletion; readers go to PostgreSQL
                    if repair and (entry.version == 0 or self.fill_missing):
                        kind = "repaired" if entry.version == 0 else "filled"
                        fixes.append((store._value_item(rkey, version, payload, 0), kind))
                else:
                    tally.add("ahead", key)
                    deletes.append((rkey, data))
                continue
            if entry.version < version or (
                entry.version == version and not _same(entry.payload, payload)
            ):
                tally.add("stale", key)
                if entry.version == version:
                    deletes.append((rkey, data))  # same version, other bytes: remove it
                else:
                    fixes.append((store._value_item(rkey, version, payload, 0), "repaired"))
            elif entry.version > version:
                tally.add("ahead", key)
                deletes.append((rkey, data))
            else:
                tally.add("cached", key)
        if repair:
            await self._repair(fixes, deletes, tally)

    async def _repair(
        self,
        fixes: list[tuple[FencedItem, str]],
        deletes: list[tuple[str, bytes]],
        tally: _Tally,
    ) -> None:
        store = self.store
        for rkey, data in deletes:
            # Only a real deletion is a repair: the entry may have changed since it was
            # judged (a live writer won), or Redis may have failed.
            if await store.cache.delete_if_equal(rkey, data) is True:
                tally.add("repaired", rkey)
        if fixes:
            results = await store.cache.fenced_set_many([item for item, _ in fixes])
            if results is DOWN:
                raise ConnectionLost(
                    f"Redis unreachable while repairing {store.table}; run the pass again"
                )
            for (item, kind), ok in zip(fixes, results, strict=True):  # type: ignore[arg-type]
                if ok:
                    tally.add(kind, item[0])

    async def _orphans(self, tally: _Tally, repair: bool) -> None:
        store = self.store
        sql = await store.prepare()
        client = store.redis.any_client()
        prefix = f"{store.namespace}:{{"
        batch: list[str] = []

        async def flush() -> None:
            datas = await mget(client, batch)
            keys = [k[len(prefix) : -1] for k in batch]
            present = {
                str(r[0])
                for r in await store.db.fetch(
                    f"SELECT {sql.key_expr}::text FROM {sql.table_expr} "
                    f"WHERE {sql.key_expr}::text = ANY($1::text[])",
                    keys,
                )
            }
            for rkey, key, data in zip(batch, keys, datas, strict=True):
                if key in present or data is None:
                    continue
                entry = _entry.parse(data)
                if entry is None or entry.kind != _entry.KIND_VALUE:
                    continue  # tombstones and invalidations of missing rows are right
                tally.add("orphan", key)
                if repair:
                    # Fence a tombstone over it: a concurrent insert (newer version) still wins.
                    item = store._tomb_item(rkey, entry.version, store.settings.tombstone_ttl)
                    if await store.cache.fenced_set(item) is True:
                        tally.add("repaired", key)
            batch.clear()

        async for raw in client.scan_iter(match=f"{prefix}*}}", count=1000):
            batch.append(raw.decode() if isinstance(raw, bytes) else raw)
            if len(batch) >= self.batch:
                await flush()
        if batch:
            await flush()

    async def run_periodically(
        self, interval: float, *, repair: bool = False, stop: asyncio.Event | None = None
    ) -> None:
        """Run a pass every ``interval`` seconds (jittered) until ``stop`` is set or cancelled.

        A failed pass is logged and counted, and the next one runs on schedule.
        """
        if interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        stop = stop or asyncio.Event()
        while not stop.is_set():
            try:
                await self.run(repair=repair)
            except Exception as exc:  # noqa: BLE001  logged, counted; retried next interval
                # Any failed pass (not only an outage: a dropped table, a bad row) is logged
                # and counted; the loop must keep running. Cancellation still ends it.
                _metrics.DRIFT.labels(self.store.table, "failed_pass").inc()
                _log.warning(
                    "reconcile %s: pass failed (%s: %s); next in %.0fs",
                    self.store.table,
                    type(exc).__name__,
                    exc,
                    interval,
                    exc_info=not isinstance(exc, _PASS_ERRORS),
                )
            wait = interval * (0.9 + 0.2 * self._rand())
            try:
                await asyncio.wait_for(stop.wait(), wait)
            except TimeoutError:
                continue
