"""Journal throughput per fsync policy, and WriteBuffer throughput with the journal on vs off.

    .venv/bin/python -m benchmarks.bench_journal

The WriteBuffer part needs SHEETANCHOR_PG_URL (it creates and drops its own table).
All figures and ratios come from this one run on this machine.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sheetanchor.config import pg_url_from_env
from sheetanchor.ingest._journal import Journal

PRODUCERS = 64
REPEAT = 3  # best of three: the machine is shared, the best run is the least disturbed
RECORD: dict[str, Any] = {"symbol": "ABCD", "price": 101.25, "volume": 300, "ts": 1.7e9}


async def _journal_rate(policy: Any, total: int, per_append: int) -> tuple[float, str]:
    with tempfile.TemporaryDirectory() as tmp:
        async with Journal(Path(tmp), fsync=policy) as journal:
            appends = total // per_append // PRODUCERS
            records = [RECORD] * per_append

            async def producer() -> None:
                for _ in range(appends):
                    await journal.append("ticks", records)

            started = time.perf_counter()
            await asyncio.gather(*(producer() for _ in range(PRODUCERS)))
            elapsed = time.perf_counter() - started
            stats = journal.stats()
    done = appends * PRODUCERS * per_append
    per_group = stats.records_appended / max(stats.group_writes, 1)
    return done / elapsed, f"{stats.fsyncs} fsyncs, {per_group:.1f} records/group"


async def _buffer_rate(
    url: str,
    journal_dir: Path | None,
    total: int,
    fsync: str = "batch",
    per_put: int = 1,
    producers: int = PRODUCERS,
) -> float:
    from sheetanchor.ingest import Stream, WriteBuffer
    from sheetanchor.postgres import Database

    table = f"bench_{uuid.uuid4().hex[:8]}"
    base = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    db = Database(url)
    try:
        await db.execute(
            f"CREATE TABLE {table} (id bigint PRIMARY KEY, ts timestamptz, price float8)"
        )
        stream = Stream(
            "bench",
            table=table,
            columns={"id": "bigint", "ts": "timestamptz", "price": "float8"},
            natural_key=("id",),
            batch_rows=2000,
        )
        with tempfile.TemporaryDirectory() as tmp:
            buffer = WriteBuffer(
                db,
                [stream],
                deadletter_dir=Path(tmp) / "deadletter",
                journal_dir=journal_dir,
                journal_fsync=fsync,
                replay_interval=None,
            )
            async with buffer:
                started = time.perf_counter()

                async def producer(p: int) -> None:
                    ids = range(p, total, producers)
                    for start in range(0, len(ids), per_put):
                        records = [
                            {"id": i, "ts": base + dt.timedelta(seconds=i), "price": 1.5}
                            for i in ids[start : start + per_put]
                        ]
                        if per_put == 1:
                            await buffer.put("bench", records[0])
                        else:
                            await buffer.put_many("bench", records)

                await asyncio.gather(*(producer(p) for p in range(producers)))
                await buffer.flush()
                elapsed = time.perf_counter() - started
        written = await db.fetchval(f"SELECT count(*) FROM {table}")
        assert written == total, f"wrote {written} of {total}"
        return total / elapsed
    finally:
        await db.execute(f"DROP TABLE IF EXISTS {table}")
        await db.close()


async def _main() -> None:
    print(f"Journal.append, {PRODUCERS} concurrent producers")
    rates: dict[str, float] = {}
    for policy, total in (("never", 64_000), ("batch", 64_000), ("always", 6_400)):
        for per_append in (1, 100):
            n = total * (10 if per_append > 1 else 1)
            runs = [await _journal_rate(policy, n, per_append) for _ in range(REPEAT)]
            rate, detail = max(runs)
            rates[f"{policy}/{per_append}"] = rate
            print(
                f"  fsync={policy:<6} {per_append:>3} rec/append: "
                f"{rate:>11,.0f} records/s  ({detail})"
            )
    print(
        "  ratios (1 rec/append): batch/never "
        f"{rates['batch/1'] / rates['never/1']:.2f}x, "
        f"batch/always {rates['batch/1'] / rates['always/1']:.1f}x"
    )

    url = pg_url_from_env()
    if url is None:
        print("WriteBuffer: skipped (set SHEETANCHOR_PG_URL)")
        return
    total = 30_000
    print(f"WriteBuffer, {PRODUCERS} producers, {total} records, one authoritative stream")
    # Runs with the journal off and on alternate (off, batch, never, off, ...; best of REPEAT
    # each): a journaled put waits for an fsync on a disk shared with PostgreSQL and other
    # work, so a ratio of best runs taken minutes apart measures the disk's mood, not the
    # journal. Each baseline is still the best of its own REPEAT runs.
    put_rates: dict[str | None, float] = {}
    for per_put in (1, 100):
        call = "put" if per_put == 1 else f"put_many({per_put})"
        configs: list[tuple[str | None, str]] = [(None, "batch"), ("journal", "batch")]
        configs.append(("journal", "never"))
        best = await _best_rates(url, total, configs, per_put=per_put)
        off = best[0]
        print(f"  {call:<13} journal off        : {off:>9,.0f} records/s")
        for (_, policy), on in zip(configs[1:], best[1:], strict=True):
            print(
                f"  {call:<13} journal fsync={policy:<6}: {on:>9,.0f} records/s, "
                f"ratio on/off {on / off:.2f}x (goal >= 0.5x)"
            )
        if per_put == 1:
            put_rates = {None: off, "batch": best[1]}
    # A journaled put returns once its record is fsynced, so with P producers each waiting
    # on its own put, one fsync can cover at most P records: throughput <= P / fsync latency.
    # How the single-record put with fsync=batch fares as concurrency grows (same record
    # count as above; the 64-producer row is the put row of the table above, not a second
    # measurement of the same thing):
    print(f"WriteBuffer put (one record), fsync=batch vs journal off, {total} records")
    for producers in (PRODUCERS, 256, 1024):
        if producers == PRODUCERS:
            off, on = put_rates[None], put_rates["batch"]
        else:
            pair = [(None, "batch"), ("journal", "batch")]
            off, on = await _best_rates(url, total, pair, producers=producers)
        print(
            f"  {producers:>5} producers: off {off:>9,.0f}/s, on {on:>9,.0f}/s, "
            f"ratio on/off {on / off:.2f}x"
        )


async def _best_rates(
    url: str,
    total: int,
    configs: list[tuple[str | None, str]],
    per_put: int = 1,
    producers: int = PRODUCERS,
) -> list[float]:
    """Best of REPEAT runs of each ``(journal, fsync)`` config, the configs run in turn.

    ``journal`` names a fresh journal directory per run (or None: journal off).
    """
    best = [0.0] * len(configs)
    for _ in range(REPEAT):
        for i, (journal, fsync) in enumerate(configs):
            with tempfile.TemporaryDirectory() as tmp:
                directory = None if journal is None else Path(tmp) / journal
                rate = await _buffer_rate(url, directory, total, fsync, per_put, producers)
            best[i] = max(best[i], rate)
    return best


def main() -> None:
    """Run the benchmark and print figures and ratios."""
    asyncio.run(_main())


if __name__ == "__main__":
    main()
