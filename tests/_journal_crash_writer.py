"""Child process of test_ingest_journal_crash: a producer that is SIGKILLed mid-ingest.

    python _journal_crash_writer.py write   PG_URL TABLE WORKDIR JOURNAL(0|1) BATCH_ROWS
    python _journal_crash_writer.py recover PG_URL TABLE WORKDIR

``write`` puts records forever from several producer tasks and prints each id to stdout
(flushed) once ``put`` returned: that id is acknowledged. ``recover`` opens the buffer on the
same journal (which re-enqueues what was never committed), closes it (flush) and exits.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
from pathlib import Path

from sheetanchor.ingest import Stream, WriteBuffer
from sheetanchor.postgres import Database

PRODUCERS = 8
BASE = dt.datetime(2026, 11, 23, tzinfo=dt.UTC)


def _stream(table: str, batch_rows: int) -> Stream:
    return Stream(
        "acked",
        table=table,
        columns={"id": "bigint", "ts": "timestamptz", "price": "float8"},
        natural_key=("id",),
        batch_rows=batch_rows,
        max_rows=max(batch_rows * 4, 1000),
        # Long-lived when batch_rows is large: nothing is written before the kill.
        flush_interval=0.05 if batch_rows < 1000 else 3600.0,
    )


def _buffer(db: Database, table: str, workdir: Path, journal: bool, batch_rows: int) -> WriteBuffer:
    return WriteBuffer(
        db,
        [_stream(table, batch_rows)],
        deadletter_dir=workdir / "deadletter",
        journal_dir=workdir / "journal" if journal else None,
        replay_interval=None,
    )


async def _write(url: str, table: str, workdir: Path, journal: bool, batch_rows: int) -> None:
    db = Database(url)
    buffer = _buffer(db, table, workdir, journal, batch_rows)
    await buffer.open()

    async def producer(p: int) -> None:
        i = p
        while True:
            await buffer.put("acked", {"id": i, "ts": BASE + dt.timedelta(seconds=i), "price": 1.5})
            sys.stdout.write(f"{i}\n")
            sys.stdout.flush()
            i += PRODUCERS

    # Runs until the test kills the process; nothing here is ever closed on purpose.
    await asyncio.gather(*(producer(p) for p in range(PRODUCERS)))


async def _recover(url: str, table: str, workdir: Path) -> None:
    db = Database(url)
    try:
        async with _buffer(db, table, workdir, True, 100):
            pass  # open() re-enqueued the journal's records; close() writes them
    finally:
        await db.close()


def main(argv: list[str]) -> None:
    mode, url, table, workdir = argv[1], argv[2], argv[3], Path(argv[4])
    if mode == "write":
        asyncio.run(_write(url, table, workdir, argv[5] == "1", int(argv[6])))
    elif mode == "recover":
        asyncio.run(_recover(url, table, workdir))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv)
