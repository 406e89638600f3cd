"""Drill 004: a market-data feed keeps arriving while PostgreSQL goes away.

The incident: the harvester buffered ticks in plain lists; when a save failed it pushed the
rows back into the list, so while the database was away (and for ever after, once a bad row
sat in the list) the list only grew, until the process ran out of memory.

Both halves get the same feed (200,000 ticks at a steady rate, a few poison rows among them)
and the same outage of a few seconds through a fault proxy. The naive list is capped so the
demo cannot actually exhaust memory; its growth is what it shows. The report is an HTML page
with the memory and buffer fill of both halves over time, written next to the terminal table.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from sheetanchor.config import parse_url, to_asyncpg_dsn
from sheetanchor.demo._drill import DemoContext, DrillResult
from sheetanchor.demo._svg import Band, Panel, Series, write_html
from sheetanchor.errors import RecordError, SheetAnchorError
from sheetanchor.ingest import DeadLetterStore, Stream, WriteBuffer
from sheetanchor.postgres import Database, PoolSettings
from sheetanchor.retry import RetryPolicy

__all__ = ["DRILL", "IngestDrill"]

_BASE = dt.datetime(2026, 1, 5, 9, 30, tzinfo=dt.UTC)
_SYMBOLS = [f"SYM{i:02d}" for i in range(50)]
_COLUMNS = {"ts": "timestamptz", "symbol": "text", "price": "float8", "volume": "bigint"}
_DDL = (
    "CREATE TABLE {t} (ts timestamptz NOT NULL, symbol text NOT NULL, "
    "price float8 NOT NULL CHECK (price > 0), volume bigint NOT NULL, PRIMARY KEY (ts, symbol))"
)


def _tick(i: int, db_poison: set[int], put_poison: set[int]) -> dict[str, Any]:
    symbol = _SYMBOLS[i % len(_SYMBOLS)]
    return {
        "ts": _BASE + dt.timedelta(milliseconds=i // len(_SYMBOLS)),
        "symbol": symbol + "\x00" if i in put_poison else symbol,
        "price": -1.0 if i in db_poison else 100.0 + (i % 997) / 100,
        "volume": 1 + i % 500,
    }


class _Sampler:
    """Samples (seconds, rows held, process RSS in MB) every ``interval`` seconds."""

    def __init__(self, held: Callable[[], int], interval: float = 0.05) -> None:
        self._held = held
        self._interval = interval
        self._proc = psutil.Process(os.getpid())
        self._start = time.monotonic()
        self.rows: list[tuple[float, float]] = []
        self.rss: list[tuple[float, float]] = []
        self._task: asyncio.Task[None] | None = None

    def now(self) -> float:
        return time.monotonic() - self._start

    def sample(self) -> None:
        t = self.now()
        self.rows.append((t, float(self._held())))
        self.rss.append((t, self._proc.memory_info().rss / 1e6))

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self._interval)

    def __enter__(self) -> _Sampler:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        self.sample()


class IngestDrill:
    """Drill 004 (see module docstring)."""

    id = "004"
    title = "ingest buffers while PostgreSQL goes away (and poison rows arrive)"

    def __init__(
        self,
        *,
        ticks: int = 200_000,
        rate: float = 40_000.0,
        outage: float = 2.5,
        naive_cap: int = 200_000,
    ) -> None:
        self.ticks = ticks
        self.rate = rate
        self.outage = outage
        self.naive_cap = naive_cap
        # Poison arrives after the outage, so the naive half first shows the outage (growth,
        # then a drain once the database is back) and then the poison (stuck for good).
        self.db_poison = {int(ticks * (0.80 + 0.03 * k)) + 11 for k in range(5)}  # CHECK fails
        self.put_poison = {int(ticks * 0.85) + 29, int(ticks * 0.97) + 3}  # NUL byte in text

    async def _feed(
        self, offer: Callable[[dict[str, Any]], Any], outage: Callable[[], None]
    ) -> None:
        """Offer every tick at ``rate``; start the outage at 20 % of the feed."""
        start = time.monotonic()
        for i in range(self.ticks):
            if i == int(self.ticks * 0.2):
                outage()
            result = offer(_tick(i, self.db_poison, self.put_poison))
            if asyncio.iscoroutine(result):
                await result
            if i % 1000 == 0:
                ahead = start + i / self.rate - time.monotonic()
                await asyncio.sleep(max(0.0, ahead))

    async def _naive(self, url: str, table: str, outage: Callable[[], None]) -> dict[str, Any]:
        db = Database(url, pool=PoolSettings(size=2, max_overflow=0, timeout=1.0), name="d004n")
        buffer: list[tuple[Any, ...]] = []
        capped = 0
        cols = list(_COLUMNS)

        async def rotate() -> None:
            nonlocal buffer
            while True:
                await asyncio.sleep(0.25)
                batch, buffer = buffer, []
                if not batch:
                    continue
                try:
                    async with db.connection() as conn:
                        await conn.copy_records_to_table(table, records=batch, columns=cols)
                except (SheetAnchorError, asyncpg.PostgresError, OSError):
                    buffer = batch + buffer  # the incident's "don't lose it": back into memory

        def offer(record: dict[str, Any]) -> None:
            nonlocal capped
            if len(buffer) >= self.naive_cap:
                capped += 1  # the demo's safety cap, not part of the naive pattern
                return
            buffer.append(tuple(record.values()))

        with _Sampler(lambda: len(buffer)) as sampler:
            rotator = asyncio.create_task(rotate())
            await self._feed(offer, outage)
            await asyncio.sleep(2.0)  # the database is back: does the list drain?
            rotator.cancel()
            await asyncio.gather(rotator, return_exceptions=True)
        try:
            written = int(await db.fetchval(f"SELECT count(*) FROM {table}"))
        finally:
            await db.close()
        return {
            "sampler": sampler,
            "peak_rows": int(max(v for _, v in sampler.rows)),
            "left_in_memory": len(buffer),
            "written": written,
            "capped": capped,
        }

    async def _ours(
        self, url: str, table: str, workdir: Path, outage: Callable[[], None]
    ) -> dict[str, Any]:
        db = Database(url, pool=PoolSettings(size=4, max_overflow=0, timeout=1.0), name="d004")
        stream = Stream(
            "ticks",
            table=table,
            columns=_COLUMNS,
            natural_key=("ts", "symbol"),
            max_rows=20_000,
            batch_rows=5_000,
            flush_interval=0.2,
        )
        # A fresh store per run: counts in the report are this run's only.
        await asyncio.to_thread(shutil.rmtree, workdir / "deadletter", True)
        store = DeadLetterStore(workdir / "deadletter")
        retry = RetryPolicy(max_attempts=3, initial=0.05, maximum=0.2, deadline=1.0)
        rejected = 0
        buffer = WriteBuffer(db, [stream], deadletter=store, retry=retry, replay_interval=0.5)

        async def offer(record: dict[str, Any]) -> None:
            nonlocal rejected
            try:
                await buffer.put("ticks", record)
            except RecordError:
                rejected += 1  # refused at put with stream, field and value: never buffered

        try:
            async with buffer:
                with _Sampler(lambda: buffer.stream_stats("ticks").held_rows) as sampler:
                    await self._feed(offer, outage)
                    await buffer.flush()
                    async with asyncio.timeout(30):  # background replay of the dead letters
                        while store.files("ticks", "failed"):  # noqa: ASYNC110  (files on disk)
                            await asyncio.sleep(0.1)
            stats = buffer.stream_stats("ticks")
            count = int(await db.fetchval(f"SELECT count(*) FROM {table}"))
            distinct = int(await db.fetchval(f"SELECT count(DISTINCT (ts, symbol)) FROM {table}"))
        finally:
            await db.close()
        poison = [store.read(f.path) for f in store.files("ticks", "poison")]
        reasons = sorted({str(e.get("sqlstate")) for b in poison for e in b.errors if e})
        return {
            "sampler": sampler,
            "stats": stats,
            "count": count,
            "distinct": distinct,
            "rejected": rejected,
            "quarantined": sum(len(b.rows) for b in poison),
            "poison_sqlstates": reasons,
            "peak_rows": int(max(v for _, v in sampler.rows)),
        }

    async def run(self, ctx: DemoContext) -> DrillResult:
        from sheetanchor.testing import FaultProxy

        url = await ctx.fresh_database("d004")
        parsed = parse_url(url)
        admin = await asyncpg.connect(to_asyncpg_dsn(url))
        try:
            for t in ("naive_ticks", "ticks"):
                await admin.execute(_DDL.format(t=t))
        finally:
            await admin.close()
        good = self.ticks - len(self.db_poison) - len(self.put_poison)
        started = time.monotonic()
        with FaultProxy(parsed.host or "127.0.0.1", parsed.port or 5432) as proxy:
            proxied = proxy.url(url)
            loop = asyncio.get_running_loop()
            bands: dict[str, Band] = {}

            def outage_for(name: str, sampler_now: Callable[[], float]) -> Callable[[], None]:
                def begin() -> None:
                    proxy.refuse()
                    proxy.reset_all()
                    t0 = sampler_now()
                    bands[name] = Band("database down", t0, t0 + self.outage)
                    loop.call_later(self.outage, proxy.pass_through)

                return begin

            clock = time.monotonic
            n0 = clock()
            naive = await self._naive(
                proxied, "naive_ticks", outage_for("naive", lambda: clock() - n0)
            )
            await asyncio.sleep(self.outage)  # make sure the proxy is passing again
            o0 = clock()
            ours = await self._ours(
                proxied, "ticks", ctx.workdir / "d004", outage_for("ours", lambda: clock() - o0)
            )
        elapsed = time.monotonic() - started
        stats = ours["stats"]
        naive_failed = naive["written"] < good or naive["left_in_memory"] > 0
        ours_ok = (
            ours["count"] == good
            and ours["distinct"] == good
            and ours["quarantined"] == len(self.db_poison)
            and ours["rejected"] == len(self.put_poison)
            and ours["peak_rows"] <= 20_000
        )
        chart = write_html(
            ctx.workdir / "d004_ingest.html",
            "Drill 004: ingest while PostgreSQL goes away",
            [
                Panel(
                    "Rows held in memory",
                    "rows",
                    [
                        Series("naive list (re-queue on failure)", naive["sampler"].rows),
                        Series("WriteBuffer (max_rows=20,000)", ours["sampler"].rows),
                    ],
                    [bands[k] for k in ("naive", "ours") if k in bands],
                ),
                Panel(
                    "Process RSS",
                    "MB",
                    [
                        Series("naive half", naive["sampler"].rss),
                        Series("WriteBuffer half", ours["sampler"].rss),
                    ],
                ),
            ],
            notes=[
                f"{self.ticks:,} ticks offered at {self.rate:,.0f}/s; outage {self.outage:.1f} s",
                f"naive: peak {naive['peak_rows']:,} rows in memory, {naive['written']:,} "
                f"written, {naive['left_in_memory']:,} still in memory at the end",
                f"WriteBuffer: peak {ours['peak_rows']:,} rows held, {ours['count']:,} rows "
                f"written once each, {ours['quarantined']} quarantined "
                f"(SQLSTATE {', '.join(ours['poison_sqlstates'])}), "
                f"{ours['rejected']} refused at put",
            ],
        )
        return DrillResult(
            drill=self.id,
            title=self.title,
            naive=(
                f"list grew to {naive['peak_rows']:,} rows; {naive['written']:,}/{good:,} "
                f"written; {naive['left_in_memory']:,} stuck in memory (poison rows block it)"
            ),
            naive_failed=naive_failed,
            ours=(
                f"{ours['count']:,}/{good:,} rows exactly once; peak {ours['peak_rows']:,} "
                f"rows held; {stats.rows_failed:,} dead-lettered and replayed; "
                f"{ours['quarantined']} poison quarantined, {ours['rejected']} refused at put"
            ),
            ours_ok=ours_ok,
            seconds=elapsed,
            details={
                "chart": str(chart),
                "ticks": self.ticks,
                "good_rows": good,
                "naive_peak_rows": naive["peak_rows"],
                "naive_written": naive["written"],
                "naive_left_in_memory": naive["left_in_memory"],
                "ours_peak_rows": ours["peak_rows"],
                "ours_rows": ours["count"],
                "ours_dead_lettered": stats.rows_failed,
                "ours_quarantined": ours["quarantined"],
                "ours_rejected_at_put": ours["rejected"],
                "poison_sqlstates": ours["poison_sqlstates"],
            },
        )


DRILL = IngestDrill()
