"""Incident 004 at full size: 1,000,000 records offered while the database is down.

The issue's promise: the buffer's memory stays within its configured bound by construction
(the excess goes to dead-letter files, never into memory), and nothing is lost: once the
database is back, replaying the dead letters lands every record exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from tests._ingest_helpers import create_tick_table, fast_retry, table_name, tick, tick_stream

from sheetanchor.config import parse_url
from sheetanchor.errors import BufferFull
from sheetanchor.ingest import WriteBuffer
from sheetanchor.postgres import Database
from sheetanchor.testing import FaultProxy

OFFERED = 1_000_000


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.timeout(600)
async def test_a_million_records_with_the_database_down_stay_within_the_bound(
    pg_url: str,
    fault_proxy: Callable[[str, int], FaultProxy],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Each dead-lettered batch logs a WARNING; pytest's capture would keep ~2,000 of them in
    # memory inside the measured window, so only errors are captured here.
    caplog.set_level(logging.ERROR, logger="sheetanchor")
    server = parse_url(pg_url)
    assert server.host is not None
    assert server.port is not None
    direct = Database(pg_url)
    table = table_name()
    await create_tick_table(direct, table, check=False)
    proxy = fault_proxy(server.host, server.port)
    db = Database(proxy.url(pg_url))
    stream = tick_stream(table, kind="best_effort", max_rows=5_000, batch_rows=1_000)
    held_peak = 0
    tracemalloc.start()
    try:
        async with WriteBuffer(
            db, [stream], deadletter_dir=tmp_path, retry=fast_retry(), replay_interval=None
        ) as buffer:
            # The database goes away: new connections refused, open ones reset.
            proxy.refuse()
            proxy.reset_all()
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            for i in range(OFFERED):
                record = tick(i)  # made on the fly: only the buffer may hold records
                while True:
                    try:
                        buffer.put_nowait("ticks", record)
                        break
                    except BufferFull:
                        await asyncio.sleep(0.001)
                if i % 1_000 == 0:
                    held_peak = max(held_peak, buffer.stream_stats("ticks").held_rows)
                    await asyncio.sleep(0)
            peak_bytes = tracemalloc.get_traced_memory()[1] - base
            held_bytes_at_end = buffer.stream_stats("ticks").held_bytes
        stats = buffer.stream_stats("ticks")
    finally:
        tracemalloc.stop()

    assert held_peak <= stream.max_rows
    assert held_bytes_at_end <= stream.max_bytes
    # Loose, not a benchmark: a list of 1,000,000 ticks alone would take hundreds of MB.
    assert peak_bytes < 32 * 1024 * 1024, f"{peak_bytes / 2**20:.1f} MiB traced at peak"
    assert stats.rows_in == OFFERED
    assert stats.rows_written == 0, "the database was down the whole time"
    assert stats.rows_spilled + stats.rows_failed == OFFERED, stats

    # The database is back: replaying the dead letters lands every record exactly once.
    proxy.pass_through()
    async with WriteBuffer(
        direct, [stream], deadletter_dir=tmp_path, replay_interval=None
    ) as again:
        results = await again.replay()
    assert results
    assert await direct.fetchval(f"SELECT count(*) FROM {table}") == OFFERED
    assert await direct.fetchval(f"SELECT count(DISTINCT (ts, symbol)) FROM {table}") == OFFERED
    await db.close()
    await direct.close()
