"""The ``sheetanchor_pg_*`` metrics: counters never go down, and a scrape only reads.

Counters used to be summed over the live ``Database`` objects at scrape time, so dropping a
``Database`` made them fall (Prometheus reads that as a counter reset), and the scrape thread
swept the leak watch and reaped engines of closed loops.
"""

from __future__ import annotations

import asyncio
import gc
import threading

from prometheus_client import generate_latest

from sheetanchor.observe import REGISTRY
from sheetanchor.postgres import Database, PoolSettings


def _sample(metric: str, name: str) -> float:
    value = REGISTRY.get_sample_value(metric, {"database": name})
    assert value is not None, f"{metric}{{database={name!r}}} is not exported"
    return value


def _counters(name: str) -> dict[str, float]:
    return {
        metric: _sample(f"sheetanchor_pg_{metric}_total", name)
        for metric in ("engines_disposed", "leaks", "leaks_unreturned", "commit_failures")
    }


def test_counters_never_decrease_when_a_database_is_collected(pg_url: str) -> None:
    name = "t_monotonic"
    db = Database(pg_url, name=name, pool=PoolSettings(size=1, max_overflow=0), leak_threshold=0.05)

    async def leak_one(db: Database) -> None:
        async with db.connection():
            await asyncio.sleep(0.2)  # held past the threshold: the loop's sweep reports it
        assert db.stats().leaks == 1

    asyncio.run(leak_one(db))  # and the engine is disposed when asyncio.run ends
    assert asyncio.run(db.fetchval("SELECT 1")) == 1  # a second engine, disposed too
    before = _counters(name)
    assert before["engines_disposed"] == 2
    assert before["leaks"] == 1

    del db
    gc.collect()
    after = _counters(name)
    assert after == before  # nothing taken away with the Database
    assert _sample("sheetanchor_pg_engines", name) == 0  # gauges do follow the live objects

    # A new Database of the same name adds to the same series.
    again = Database(pg_url, name=name)
    assert asyncio.run(again.fetchval("SELECT 1")) == 1
    assert _counters(name)["engines_disposed"] == 3
    del again
    gc.collect()
    assert _counters(name)["engines_disposed"] == 3


def test_a_scrape_neither_reaps_engines_nor_sweeps_leaks(pg_url: str) -> None:
    name = "t_readonly_scrape"
    db = Database(pg_url, name=name, pool=PoolSettings(size=1, max_overflow=0))
    loop = asyncio.new_event_loop()
    loop.run_until_complete(db.fetchval("SELECT 1"))
    type(loop).close(loop)  # closed without the hooks: the engine waits to be reaped

    scraped: list[bytes] = []
    scraper = threading.Thread(target=lambda: scraped.append(generate_latest(REGISTRY)))
    scraper.start()
    scraper.join(timeout=30)
    assert scraped, "the scrape did not finish"
    # The scrape saw the engine, and left it (and the counters) alone.
    assert _sample("sheetanchor_pg_engines", name) == 1
    assert _sample("sheetanchor_pg_engines_disposed_total", name) == 0
    assert db._engines.alive == 1

    # The application's own stats() call reaps it (no I/O: its loop is closed), and counts it.
    stats = db.stats()
    assert (stats.engines_alive, stats.engines_disposed) == (0, 1)
    assert _sample("sheetanchor_pg_engines_disposed_total", name) == 1
    gc.collect()  # no ResourceWarning: the abandoned engine's sockets were closed
