"""A write made during a Redis outage reaches readers that never saw the outage.

Two stores on one table with their own Redis clients stand for two processes. The writer
loses Redis, commits, and then stays idle; the reader made no call during the outage, so
its breaker is closed and it reads Redis as soon as Redis answers. Without more, the reader
would serve the old entry until its TTL ends (minutes), because only the writer knows the
key went stale and it only invalidates when its next call probes Redis. The writer therefore
probes on its own once the breaker allows it: the reader's window is the outage plus one
breaker period.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from tests._store_helpers import FAST_REDIS, make_items_table, proxy_for, table_name

from sheetanchor.postgres import Database
from sheetanchor.redis import RedisClient
from sheetanchor.state import CachedStore, CircuitBreaker
from sheetanchor.testing import FaultProxy


async def test_an_idle_writer_invalidates_what_it_wrote_when_redis_returns(
    pg_url: str, redis_url: str, fault_proxy: Callable[[str, int], FaultProxy]
) -> None:
    proxy = proxy_for(fault_proxy, redis_url)
    table = table_name()
    breaker = CircuitBreaker(reset_timeout=0.05, max_reset_timeout=0.2)
    async with (
        Database(pg_url) as db,
        RedisClient(proxy.url(redis_url), **FAST_REDIS) as writer_rc,
        RedisClient(redis_url) as reader_rc,
    ):
        await make_items_table(db, table)
        writer = CachedStore(db, writer_rc, table=table, value_columns=["name"], breaker=breaker)
        reader = CachedStore(db, reader_rc, table=table, value_columns=["name"])
        await writer.put(1, {"name": "a"})
        assert await reader.get(1) == {"name": "a"}  # cached

        proxy.refuse()  # the writer's Redis is gone (the reader is idle meanwhile)
        proxy.reset_all()
        assert await writer.put(1, {"name": "b"}) is not None  # committed
        assert writer.stats().pending_invalidations == 1
        proxy.pass_through()  # Redis answers again; the writer makes no further call

        # The reader's next reads must reach "b" within a few breaker periods, not the TTL.
        deadline = time.monotonic() + 10.0
        seen = await reader.get(1)
        while seen != {"name": "b"} and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            seen = await reader.get(1)
        assert seen == {"name": "b"}, "the reader kept serving the entry older than the write"
        assert writer.stats().pending_invalidations == 0
        assert writer.stats().breaker == "closed"
        await writer.close()
