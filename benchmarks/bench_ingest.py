"""Ingest throughput: WriteBuffer against raw COPY, SQLAlchemy inserts, replay, journal.

``python -m benchmarks.bench_ingest``. 200,000 ticks (ts, symbol, price, volume) into a table
whose primary key is the natural key (ts, symbol); every figure's baseline is measured in the
same run. Uses SHEETANCHOR_PG_URL (a scratch database is created and dropped).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import sqlalchemy as sa

from sheetanchor.config import pg_url_from_env, to_asyncpg_dsn
from sheetanchor.errors import BufferFull
from sheetanchor.ingest import CopySink, DeadLetterStore, Stream, WriteBuffer, replay_files
from sheetanchor.ingest._validate import Validator
from sheetanchor.postgres import Database, PoolSettings

N = 200_000
BATCH = 20_000
COLUMNS = {"ts": "timestamptz", "symbol": "text", "price": "float8", "volume": "bigint"}
BASE = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
SYMBOLS = [f"SYM{i:03d}" for i in range(100)]


def _records(n: int) -> list[dict[str, Any]]:
    return [
        {
            "ts": BASE + dt.timedelta(milliseconds=i // len(SYMBOLS)),
            "symbol": SYMBOLS[i % len(SYMBOLS)],
            "price": 100.0 + (i % 1000) / 100,
            "volume": i % 5000 + 1,
        }
        for i in range(n)
    ]


def _stream(table: str, **kwargs: Any) -> Stream:
    return Stream("bench", table=table, columns=COLUMNS, natural_key=("ts", "symbol"), **kwargs)


async def _fresh_table(db: Database, table: str) -> None:
    await db.execute(f"DROP TABLE IF EXISTS {table}")
    await db.execute(
        f"CREATE TABLE {table} (ts timestamptz NOT NULL, symbol text NOT NULL, "
        "price float8 NOT NULL, volume bigint NOT NULL, PRIMARY KEY (ts, symbol))"
    )
    await db.execute("CHECKPOINT")


async def _best(times: int, run: Callable[[], Awaitable[float]]) -> float:
    return min([await run() for _ in range(times)])


def _rate(seconds: float, n: int = N) -> str:
    return f"{n / seconds:>10,.0f} rows/s  ({seconds:.3f} s)"


async def _bench(url: str) -> None:
    db = Database(url, pool=PoolSettings(size=6, max_overflow=2), name="bench_ingest")
    records = _records(N)
    table = "bench_tick"
    validator = Validator(_stream(table))
    rows = [validator.validate(r)[0] for r in records]
    cols = list(COLUMNS)
    tmp = Path(tempfile.mkdtemp(prefix="sa-bench-ingest-"))
    try:
        # 1. Raw COPY, the baseline.
        async def raw() -> float:
            await _fresh_table(db, table)
            start = time.perf_counter()
            async with db.connection() as conn:
                await conn.copy_records_to_table(table, records=rows, columns=cols)
            return time.perf_counter() - start

        t_raw = await _best(3, raw)
        print(f"raw copy_records_to_table        {_rate(t_raw)}")

        # 2. WriteBuffer, sustained: from the first put to close() (everything committed).
        async def buffered() -> float:
            await _fresh_table(db, table)
            stream = _stream(table, max_rows=100_000, batch_rows=BATCH, flush_interval=0.5)
            buffer = WriteBuffer(db, [stream], deadletter_dir=tmp / "dl", replay_interval=None)
            await buffer.open()
            start = time.perf_counter()
            for i, r in enumerate(records):
                try:
                    buffer.put_nowait("bench", r)
                except BufferFull:
                    await buffer.put("bench", r)
                if i % 5000 == 0:
                    await asyncio.sleep(0)  # a real producer yields now and then
            await buffer.close()
            elapsed = time.perf_counter() - start
            assert await db.fetchval(f"SELECT count(*) FROM {table}") == N
            return elapsed

        # Alternated with raw COPY (the machine's load drifts); the best of each is kept, and
        # the median of the paired ratios shows how much the ratio moves with the load.
        e2e_pairs = [(await raw(), await buffered()) for _ in range(3)]
        t_raw = min(t_raw, *(r for r, _ in e2e_pairs))
        t_buf = min(b for _, b in e2e_pairs)
        e2e_median = sorted(r / b for r, b in e2e_pairs)[len(e2e_pairs) // 2]
        print(
            f"WriteBuffer end to end           {_rate(t_buf)}  ratio {t_raw / t_buf:.2f}x raw "
            f"(best of 3; median of paired runs {e2e_median:.2f}x; includes validating every "
            "record in this one Python thread)"
        )

        # 2b. The write path alone: 200,000 rows already buffered, then flushed (what the
        # buffer adds on top of COPY: swap, batching, ledger row, concurrency, accounting).
        async def write_path() -> float:
            await _fresh_table(db, table)
            stream = _stream(
                table,
                max_rows=N,
                batch_rows=BATCH,
                high_watermark=1.0,
                emergency_watermark=1.0,
                flush_interval=3600.0,
            )
            buffer = WriteBuffer(db, [stream], deadletter_dir=tmp / "dl", replay_interval=None)
            await buffer.open()
            for r in records:
                buffer.put_nowait("bench", r)
            start = time.perf_counter()
            await buffer.flush()
            elapsed = time.perf_counter() - start
            await buffer.close()
            assert await db.fetchval(f"SELECT count(*) FROM {table}") == N
            return elapsed

        # Alternate with raw COPY so both see the same machine load; keep the best of each.
        pairs = [(await raw(), await write_path()) for _ in range(5)]
        t_raw = min(t_raw, *(r for r, _ in pairs))
        t_wp = min(w for _, w in pairs)
        median = sorted(r / w for r, w in pairs)[len(pairs) // 2]
        print(
            f"WriteBuffer write path (flush)   {_rate(t_wp)}  ratio {t_raw / t_wp:.2f}x raw "
            f"(best of 5; median of paired runs {median:.2f}x)"
        )

        # 3. SQLAlchemy executemany of insert(): what services usually do.
        meta = sa.MetaData()
        sa_table = sa.Table(
            table,
            meta,
            sa.Column("ts", sa.DateTime(timezone=True), primary_key=True),
            sa.Column("symbol", sa.Text, primary_key=True),
            sa.Column("price", sa.Float),
            sa.Column("volume", sa.BigInteger),
        )

        async def sqlalchemy_insert() -> float:
            await _fresh_table(db, table)
            start = time.perf_counter()
            async with db.session() as s:
                await s.execute(sa.insert(sa_table), records)
            return time.perf_counter() - start

        t_sa = await _best(1, sqlalchemy_insert)
        print(
            f"SQLAlchemy session.execute(insert) {_rate(t_sa)}  WriteBuffer end to end is "
            f"{t_sa / t_buf:.2f}x, write path {t_sa / t_wp:.2f}x"
        )

        # 4. Replay of batches that were already written (COMMIT acknowledgement lost).
        await _fresh_table(db, table)
        sink = CopySink(_stream(table).describe())
        store = DeadLetterStore(tmp / "replay")
        ids = [str(uuid.uuid4()) for _ in range(0, N, BATCH)]
        start = time.perf_counter()
        async with db.connection() as conn:
            await sink.prepare(conn)
            for bid, s in zip(ids, range(0, N, BATCH), strict=True):
                await sink.write(conn, rows[s : s + BATCH], batch_id=bid)
        t_first = time.perf_counter() - start
        describe = _stream(table).describe()
        for bid, s in zip(ids, range(0, N, BATCH), strict=True):
            store.write(describe, "failed", rows[s : s + BATCH], batch_id=bid)
        start = time.perf_counter()
        done = await replay_files(db, store)
        t_replay = time.perf_counter() - start
        assert all(r.deleted and r.skipped_batch for r in done)
        print(f"first write (sink, 10 batches)   {_rate(t_first)}")
        print(
            f"replay, already written (ledger) {_rate(t_replay)}  "
            f"ratio {t_first / t_replay:.2f}x first write"
        )
        # Without a batch id (e.g. rows re-sent by hand): the natural-key path does the work.
        for s in range(0, N, BATCH):
            store.write(describe, "failed", rows[s : s + BATCH])
        start = time.perf_counter()
        await replay_files(db, store)
        t_nk = time.perf_counter() - start
        print(
            f"replay, already written (no id)  {_rate(t_nk)}  "
            f"ratio {t_first / t_nk:.2f}x first write (reads + decodes NDJSON, staging merge)"
        )
        assert await db.fetchval(f"SELECT count(*) FROM {table}") == N

        # 5. put_nowait with validation, nothing flushed meanwhile.
        await _fresh_table(db, table)
        big = _stream(
            table,
            max_rows=N,
            batch_rows=N,
            high_watermark=1.0,
            emergency_watermark=1.0,
            flush_interval=3600.0,
        )
        async with WriteBuffer(
            db, [big], deadletter_dir=tmp / "dl2", replay_interval=None
        ) as buffer:
            start = time.perf_counter()
            for r in records:
                buffer.put_nowait("bench", r)
            t_put = time.perf_counter() - start
            start = time.perf_counter()
            plain: list[tuple[Any, ...]] = []
            for r in records:
                plain.append(tuple(r.values()))
            t_list = time.perf_counter() - start
        print(
            f"put_nowait + validation          {N / t_put:>10,.0f} records/s  "
            f"(plain list.append(tuple(...)): {N / t_list:,.0f}/s, ratio {t_list / t_put:.2f})"
        )

        # 6. Journal on vs off (4 producers, put_many of 1,000 records, fsync="batch").
        async def journaled(on: bool) -> float:
            await _fresh_table(db, table)
            stream = _stream(table, max_rows=100_000, batch_rows=BATCH, flush_interval=0.5)
            jdir = tmp / f"journal-{uuid.uuid4().hex[:6]}" if on else None
            buffer = WriteBuffer(
                db, [stream], deadletter_dir=tmp / "dl3", journal_dir=jdir, replay_interval=None
            )
            await buffer.open()
            start = time.perf_counter()

            async def producer(p: int) -> None:
                # 4 producers, 1,000 records per call: concurrent appends share one fsync.
                for s in range(p * 1000, N, 4000):
                    await buffer.put_many("bench", records[s : s + 1000])

            await asyncio.gather(*(producer(p) for p in range(4)))
            await buffer.close()
            assert await db.fetchval(f"SELECT count(*) FROM {table}") == N
            return time.perf_counter() - start

        t_off = await _best(2, lambda: journaled(False))
        t_on = await _best(2, lambda: journaled(True))
        print(f"put_many, journal off            {_rate(t_off)}")
        print(f"put_many, journal on (batch)     {_rate(t_on)}  ratio {t_off / t_on:.2f}x off")
    finally:
        await db.execute(f"DROP TABLE IF EXISTS {table}")
        await db.close()
        for path in sorted(tmp.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        tmp.rmdir()


async def _with_scratch_database(run: Callable[[str], Awaitable[None]]) -> None:
    url = pg_url_from_env()
    if url is None:
        raise SystemExit("set SHEETANCHOR_PG_URL to a PostgreSQL server for this benchmark")
    name = f"sa_bench_ingest_{os.getpid()}"
    admin = await asyncpg.connect(to_asyncpg_dsn(url))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base, _, query = url.partition("?")
    scratch = base.rsplit("/", 1)[0] + f"/{name}" + (f"?{query}" if query else "")
    try:
        await run(scratch)
    finally:
        admin = await asyncpg.connect(to_asyncpg_dsn(url))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def main() -> None:
    """Run the ingest benchmark and print every figure with its ratio."""
    print(f"ingest: {N:,} ticks, batches of {BATCH:,}, primary key (ts, symbol)")
    asyncio.run(_with_scratch_database(_bench))


if __name__ == "__main__":
    main()
