"""Dead-letter warnings are rate-limited: with the database down, the first batch of a stream
is logged at once, the rest are counted and summed up, never one line per batch."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from _ingest_helpers import create_tick_table, fast_retry, table_name, tick, tick_stream
from sheetanchor.config import parse_url
from sheetanchor.ingest import DeadLetterStore, WriteBuffer
from sheetanchor.ingest._throttle import LogThrottle
from sheetanchor.postgres import Database, PoolSettings
from sheetanchor.testing import FaultProxy


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name.startswith("sheetanchor.ingest")
    ]


@pytest.mark.faults
async def test_database_down_logs_a_few_lines_not_one_per_batch(
    pg_url: str,
    fault_proxy: Callable[[str, int], FaultProxy],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    parsed = parse_url(pg_url)
    assert parsed.host is not None
    proxy = fault_proxy(parsed.host, parsed.port or 5432)
    pool = PoolSettings(size=3, max_overflow=0, timeout=2.0)
    direct = Database(pg_url, pool=pool, connect_timeout=1.0)
    db = Database(proxy.url(pg_url), pool=pool, connect_timeout=1.0)
    swaps, per_swap = 20, 10
    try:
        table = table_name()
        await create_tick_table(direct, table)
        stream = tick_stream(table, batch_rows=per_swap, flush_interval=3600.0)
        store = DeadLetterStore(tmp_path / "dl")
        caplog.set_level(logging.WARNING, logger="sheetanchor")
        async with WriteBuffer(
            db, [stream], deadletter=store, retry=fast_retry(), replay_interval=None
        ) as buffer:
            proxy.refuse()
            proxy.reset_all()
            for s in range(swaps):
                for i in range(per_swap):
                    buffer.put_nowait("ticks", tick(s * per_swap + i))
                await buffer.flush()  # one swap, one batch: written nowhere but on disk
            stats = buffer.stream_stats("ticks")
        total = swaps * per_swap
        # The counts stay exact: every row is counted failed and is in a dead-letter file.
        assert stats.rows_failed == total
        assert len(store.files("ticks", "failed")) == swaps
        lines = _warnings(caplog)
        # First batch not written and first file at once, then one summary each at close.
        assert len(lines) <= 4, lines
        assert any(
            f"{swaps - 1} more failed event(s), {total - per_swap} row(s)" in line for line in lines
        ), lines
        assert any(
            f"{swaps - 1} more not written event(s), {total - per_swap} row(s)" in line
            for line in lines
        ), lines
    finally:
        proxy.pass_through()
        await db.close()
        await direct.close()


def test_throttle_logs_first_then_one_line_per_interval_with_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    throttle = LogThrottle(
        logging.getLogger("sheetanchor.ingest.test"), interval=30.0, clock=lambda: now[0]
    )
    caplog.set_level(logging.WARNING, logger="sheetanchor.ingest.test")
    for t, rows in ((0.0, 5), (1.0, 5), (2.0, 7), (31.0, 1)):
        now[0] = t
        throttle.event(("s", "failed"), rows, "batch of %d rows", rows)
    throttle.event(("t", "failed"), 2, "other stream %d", 2)  # another key: its own first line
    now[0] = 32.0
    throttle.event(("s", "failed"), 3, "batch of %d rows", 3)
    throttle.flush()
    throttle.flush()  # nothing left: no line
    assert [r.getMessage() for r in caplog.records] == [
        "batch of 5 rows",
        "batch of 1 rows (and 2 earlier event(s), 12 row(s), since the last such line)",
        "other stream 2",
        "stream s: 1 more failed event(s), 3 row(s), since the last such line",
    ]
