"""Issue 5, item 2: a slow stream never blocks another, with the slowness on the wire.

The buffer's Database connects through the real TCP fault proxy. The proxy holds every
statement that names the slow table (``FaultProxy.hold_matching``): the slow stream's COPY
waits at the proxy for seconds, while the other stream, sharing the buffer, its global write
slots and the same connection pool, keeps landing its records. Then the slow one lands too,
exactly once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from _ingest_helpers import create_tick_table, table_name, tick, tick_stream
from sheetanchor.config import parse_url
from sheetanchor.ingest import WriteBuffer
from sheetanchor.postgres import Database, PoolSettings
from sheetanchor.testing import FaultProxy

pytestmark = pytest.mark.faults

HELD_AT_LEAST = 2.0  # seconds the slow table's writes are held, at least


@pytest.fixture
async def direct(pg_url: str) -> AsyncIterator[Database]:
    """A Database that does not go through the proxy: what has landed, seen from outside."""
    database = Database(pg_url, pool=PoolSettings(size=2, max_overflow=0), name="iso_direct")
    yield database
    await database.close()


@pytest.fixture
def proxy(fault_proxy: Callable[[str, int], FaultProxy], pg_url: str) -> FaultProxy:
    parsed = parse_url(pg_url)
    assert parsed.host is not None
    assert parsed.port is not None
    return fault_proxy(parsed.host, parsed.port)


async def _until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll ``predicate`` (a generous bound: never a timing assertion)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def _count(db: Database, table: str) -> int:
    return int(await db.fetchval(f"SELECT count(*) FROM {table}"))


async def test_a_stream_held_on_the_wire_never_blocks_another(
    pg_url: str, proxy: FaultProxy, direct: Database, tmp_path: Path
) -> None:
    slow_t, fast_t = table_name("slow"), table_name("fast")
    await create_tick_table(direct, slow_t)
    await create_tick_table(direct, fast_t)
    db = Database(proxy.url(pg_url), pool=PoolSettings(size=4, max_overflow=2), name="iso")
    streams = [
        tick_stream(slow_t, name="slow", batch_rows=10, flush_interval=0.05),
        tick_stream(fast_t, name="fast", batch_rows=10, flush_interval=0.05),
    ]
    try:
        async with WriteBuffer(db, streams, deadletter_dir=tmp_path, replay_interval=None) as buf:
            # After open(): its checks of the tables name them too, and must not be held.
            proxy.hold_matching(f'"{slow_t}"'.encode())
            for i in range(50):
                await buf.put("slow", tick(i))
            await _until(lambda: proxy.stats.held >= 1)  # the slow COPY waits at the proxy
            held_since = time.monotonic()

            for i in range(200):
                await buf.put("fast", tick(i))
            async with asyncio.timeout(30):
                while await _count(direct, fast_t) < 200:
                    await asyncio.sleep(0.01)
            # The fast stream landed while the slow one is still held (checked by state).
            assert proxy.stats.held >= 1
            assert buf.stream_stats("slow").rows_written == 0
            assert await _count(direct, slow_t) == 0
            assert buf.stream_stats("fast").rows_written == 200

            # Held for seconds, not a blip; the slow table still has nothing meanwhile.
            await asyncio.sleep(max(0.0, HELD_AT_LEAST - (time.monotonic() - held_since)))
            assert proxy.stats.held >= 1
            assert await _count(direct, slow_t) == 0

            proxy.pass_through()
            await _until(lambda: buf.stream_stats("slow").rows_written == 50)
            # More fast records after the slow ones landed: the pool is not left damaged.
            for i in range(200, 300):
                await buf.put("fast", tick(i))
        stats = buf.stats()
    finally:
        await db.close()
    assert await _count(direct, slow_t) == 50
    assert await _count(direct, fast_t) == 300
    # Exactly once: every record written once, none duplicated, failed or dead-lettered.
    assert stats.rows_written == 350
    assert stats.rows_duplicate == 0
    assert stats.rows_failed == 0
    assert buf.deadletter.files() == []
    assert proxy.stats.matched >= 1
