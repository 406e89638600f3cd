"""Incident 004 through a real fault proxy: the database goes away while records arrive.

Naive (the harvester's pattern): a failed save pushes the rows back into the list, so the list
grows with every retry until memory runs out. WriteBuffer: after the retry budget the batch goes
to the dead-letter store, memory stays within the stream's bound, and once the database is back
the dead letters are replayed automatically, every row landing exactly once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from _ingest_helpers import create_tick_table, fast_retry, table_name, tick, tick_stream
from sheetanchor.config import parse_url
from sheetanchor.errors import BufferFull
from sheetanchor.ingest import DeadLetterStore, WriteBuffer, replay_files
from sheetanchor.ingest._validate import Validator
from sheetanchor.postgres import Database, PoolSettings
from sheetanchor.testing import FaultProxy

pytestmark = pytest.mark.faults


def _proxied(pg_url: str, fault_proxy: Callable[[str, int], FaultProxy]) -> FaultProxy:
    parsed = parse_url(pg_url)
    assert parsed.host is not None
    return fault_proxy(parsed.host, parsed.port or 5432)


def _db(url: str) -> Database:
    return Database(
        url, pool=PoolSettings(size=3, max_overflow=0, timeout=2.0), connect_timeout=1.0
    )


async def test_naive_requeue_grows_while_ours_dead_letters_and_replays_exactly_once(
    pg_url: str, fault_proxy: Callable[[str, int], FaultProxy], tmp_path: Path
) -> None:
    proxy = _proxied(pg_url, fault_proxy)
    direct = _db(pg_url)
    db = _db(proxy.url(pg_url))
    try:
        table = table_name()
        await create_tick_table(direct, table)
        columns = ["ts", "symbol", "price", "volume"]

        # Naive: list buffer, re-queue on failure.
        proxy.refuse()
        proxy.reset_all()
        naive: list[tuple[Any, ...]] = []
        sizes = []
        for round_ in range(10):
            naive.extend(tuple(tick(round_ * 100 + i).values()) for i in range(100))
            batch, naive = naive, []
            try:
                async with db.connection() as conn:
                    await conn.copy_records_to_table(table, records=batch, columns=columns)
            except Exception:
                naive = batch + naive  # "don't lose data": back into memory
            sizes.append(len(naive))
        assert sizes == sorted(sizes)
        assert sizes[-1] == 1000  # grows with everything offered while the database is down

        # Ours: same outage, bounded memory, dead letters, automatic replay.
        proxy.pass_through()
        stream = tick_stream(table, max_rows=300, batch_rows=100, flush_interval=0.02)
        store = DeadLetterStore(tmp_path)
        offered = 3000
        peak = 0
        async with WriteBuffer(
            db, [stream], deadletter=store, retry=fast_retry(), replay_interval=0.1
        ) as buffer:
            proxy.refuse()
            proxy.reset_all()
            for i in range(offered):
                await buffer.put("ticks", tick(i))
                peak = max(peak, buffer.stream_stats("ticks").held_rows)
            async with asyncio.timeout(60):
                while buffer.stream_stats("ticks").held_rows:
                    await asyncio.sleep(0.02)
            s = buffer.stream_stats("ticks")
            assert s.rows_failed > 0
            assert store.files("ticks", "failed")
            assert await direct.fetchval(f"SELECT count(*) FROM {table}") == s.rows_written
            proxy.pass_through()
            async with asyncio.timeout(60):  # the background replayer does the rest
                while store.files("ticks"):
                    await asyncio.sleep(0.05)
        assert peak <= stream.max_rows
        assert await direct.fetchval(f"SELECT count(*) FROM {table}") == offered
        assert await direct.fetchval(f"SELECT count(DISTINCT (ts, symbol)) FROM {table}") == offered
        assert buffer.stats().rows_in == offered
    finally:
        await db.close()
        await direct.close()


async def test_replay_keeps_the_file_until_rows_commit_and_is_idempotent(
    pg_url: str, fault_proxy: Callable[[str, int], FaultProxy], tmp_path: Path
) -> None:
    proxy = _proxied(pg_url, fault_proxy)
    direct = _db(pg_url)
    db = _db(proxy.url(pg_url))
    try:
        table = table_name()
        await create_tick_table(direct, table)
        stream = tick_stream(table)
        v = Validator(stream)
        store = DeadLetterStore(tmp_path)
        rows = [v.validate(tick(i))[0] for i in range(200)]
        store.write(stream.describe(), "failed", rows[:150])
        store.write(stream.describe(), "failed", rows[100:])  # overlaps the first file

        proxy.refuse()
        proxy.reset_all()
        down = await replay_files(db, store, retry=fast_retry())
        assert down[0].error is not None
        assert not down[0].deleted
        assert len(store.files()) == 2  # nothing deleted while the database was away

        proxy.pass_through()
        done = await replay_files(db, store, retry=fast_retry())
        assert [r.deleted for r in done] == [True, True]
        assert store.files() == []
        assert await direct.fetchval(f"SELECT count(*) FROM {table}") == 200

        # Replaying the same rows again (a copy of a dead letter) changes nothing.
        store.write(stream.describe(), "failed", rows)
        await replay_files(db, store, retry=fast_retry())
        assert await direct.fetchval(f"SELECT count(*) FROM {table}") == 200
    finally:
        await db.close()
        await direct.close()


async def test_dead_letter_store_full_keeps_rows_in_flight_bounded_then_writes_them(
    pg_url: str, fault_proxy: Callable[[str, int], FaultProxy], tmp_path: Path
) -> None:
    """Database down AND dead-letter disk full: rows stay in flight (counted against the
    stream's bound, producers wait) and land once the database is back; none is lost."""
    proxy = _proxied(pg_url, fault_proxy)
    direct = _db(pg_url)
    db = _db(proxy.url(pg_url))
    try:
        table = table_name()
        await create_tick_table(direct, table)
        stream = tick_stream(
            table, max_rows=40, batch_rows=10, flush_interval=0.02, put_timeout=0.3
        )
        store = DeadLetterStore(tmp_path, max_bytes=64)  # too small for any batch
        async with WriteBuffer(
            db, [stream], deadletter=store, retry=fast_retry(), replay_interval=None
        ) as buffer:
            proxy.refuse()
            proxy.reset_all()
            for i in range(40):
                await buffer.put("ticks", tick(i))
            async with asyncio.timeout(30):
                while "DeadLetterFull" not in (buffer.stream_stats("ticks").last_error or ""):
                    await asyncio.sleep(0.02)
            with pytest.raises(BufferFull):
                await buffer.put("ticks", tick(99))  # bounded: the producer is told to wait
            assert buffer.stream_stats("ticks").held_rows == 40
            proxy.pass_through()
            async with asyncio.timeout(60):
                while buffer.stream_stats("ticks").held_rows:
                    await asyncio.sleep(0.05)
        assert await direct.fetchval(f"SELECT count(*) FROM {table}") == 40
        assert store.files() == []
    finally:
        await db.close()
        await direct.close()


class _CountingRetry:
    """A real RetryPolicy that counts how many writes were given a retry budget."""

    def __init__(self) -> None:
        self.calls = 0
        self._policy = fast_retry()

    async def call(self, fn: Any, /, *args: Any) -> Any:
        self.calls += 1
        return await self._policy.call(fn, *args)


async def test_one_exhausted_budget_per_swap_while_the_database_is_down(
    pg_url: str, fault_proxy: Callable[[str, int], FaultProxy], tmp_path: Path
) -> None:
    """A swap of 10 chunks with the database down: the first chunk spends the retry budget,
    the other nine go straight to the dead letters (the stream does not stay full 10x longer)."""
    proxy = _proxied(pg_url, fault_proxy)
    direct = _db(pg_url)
    db = _db(proxy.url(pg_url))
    try:
        table = table_name()
        await create_tick_table(direct, table)
        stream = tick_stream(
            table,
            max_rows=100,
            batch_rows=10,
            high_watermark=1.0,
            emergency_watermark=1.0,
            flush_interval=3600.0,
        )
        retry = _CountingRetry()
        store = DeadLetterStore(tmp_path)
        async with WriteBuffer(
            db, [stream], deadletter=store, retry=retry, replay_interval=None
        ) as buffer:
            retry.calls = 0  # open() used it to check the table
            for i in range(100):
                buffer.put_nowait("ticks", tick(i))
            proxy.refuse()
            proxy.reset_all()
            await buffer.flush()
            assert retry.calls == 1
            assert buffer.stream_stats("ticks").rows_failed == 100
            assert len(store.files("ticks", "failed")) == 10
            proxy.pass_through()
    finally:
        await db.close()
        await direct.close()
