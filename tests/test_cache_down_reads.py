"""Reads while the breaker is open: straight to PostgreSQL, and the same values as the cache.

A read that skips Redis returns the row's value without its JSON round trip where that
round trip cannot change anything (text, integer, boolean and null fields); everything
else (floats: NaN and infinities come back as null; numerics; JSON) still goes through it.
Either way the value must be what a read of the cached entry gives.
"""

from __future__ import annotations

import asyncio
import math
from decimal import Decimal
from typing import Any

import pytest
from tests._store_helpers import FakeClock, table_name

from sheetanchor.postgres import Database
from sheetanchor.redis import RedisClient
from sheetanchor.retry import RetryPolicy
from sheetanchor.state import CachedStore, CircuitBreaker
from sheetanchor.state._breaker import DENY, PROBE
from sheetanchor.state._singleflight import SingleFlight

_ROWS: list[tuple[Any, ...]] = [
    # id, t, i, b, f, n, j
    (1, "plain", 7, True, None, None, None),
    (2, 'é \u2028 "q"', -(2**63), False, float("nan"), Decimal("1.50"), '{"a": [1, 2.5]}'),
    (3, None, None, None, float("inf"), Decimal("-0"), '"s"'),
    (4, "", 0, None, 0.1, Decimal("12345678901234567890.1"), "null"),
]


def _open_for_long() -> CircuitBreaker:
    return CircuitBreaker(failure_threshold=1, reset_timeout=3600.0, max_reset_timeout=3600.0)


def _shape(value: Any) -> Any:
    """The value with the type of every field, NaN made comparable."""
    return {
        k: (type(v).__name__, "nan" if isinstance(v, float) and math.isnan(v) else v)
        for k, v in value.items()
    }


async def test_a_read_with_the_breaker_open_gives_what_the_cache_gives(
    pg_url: str, redis_url: str
) -> None:
    table = table_name("kinds")
    async with Database(pg_url) as db, RedisClient(redis_url) as rc:
        await db.execute(
            f"CREATE TABLE {table} (id bigint PRIMARY KEY, version bigserial NOT NULL, "
            "t text, i bigint, b boolean, f float8, n numeric, j jsonb)"
        )
        for row in _ROWS:
            await db.execute(
                f"INSERT INTO {table} (id, t, i, b, f, n, j) VALUES ($1, $2, $3, $4, $5, $6, "
                "$7::jsonb)",
                *row,
            )
        async with RedisClient(
            "redis://127.0.0.1:1/0", socket_connect_timeout=0.1, retry=RetryPolicy(max_attempts=1)
        ) as dead:
            # Every column; text, integer and boolean only (the round trip is skipped for
            # these); text and a float (NaN and infinity come back from the cache as null).
            for columns in (None, ["t", "i", "b"], ["t", "f"]):
                ns = f"sa:test:{table}:{columns}"
                cached = CachedStore(db, rc, table=table, value_columns=columns, namespace=ns)
                down = CachedStore(
                    db,
                    dead,
                    table=table,
                    value_columns=columns,
                    namespace=ns,
                    breaker=_open_for_long(),
                )
                for key, *_ in _ROWS:
                    await cached.get(key)  # a miss: loads and caches it...
                    await cached.drain()  # ...in the background: wait until it is written
                    hit = await cached.get(key)
                    assert _shape(await down.get(key)) == _shape(hit)
                    assert down.cache.breaker.state == "open"
                assert cached.stats().hits == len(_ROWS)
                assert down.stats().skipped == len(_ROWS)  # (the first one failed on Redis)
                assert down.stats().pg_reads == len(_ROWS)
                assert await down.get(99) is None
                if columns != ["t", "i", "b"]:
                    assert (await down.get(2))["f"] is None  # NaN, as the cache gives it
                await cached.close()


def test_denies_is_check_without_handing_out_the_probe() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=1.0, jitter=0.0, clock=clock)
    assert not breaker.denies()  # closed
    breaker.failure()
    assert breaker.denies()
    assert breaker.check() == DENY
    clock.now += 1.5
    assert not breaker.denies()  # a probe is due: the caller must go and take it
    assert not breaker.denies()  # ... and asking again hands nothing out
    assert breaker.check() == PROBE
    assert breaker.denies()  # the probe runs: everyone else skips Redis
    assert breaker.check() == DENY
    breaker.success()
    assert not breaker.denies()


def test_the_store_has_no_instance_dict() -> None:
    # Its attributes are slots: past 30 attributes in an instance dict, every attribute
    # access on the hot paths would be a dict lookup.
    store = CachedStore(object(), RedisClient("redis://127.0.0.1:1/0"), table="t")  # type: ignore[arg-type]
    assert not hasattr(store, "__dict__")
    with pytest.raises(AttributeError):
        store.unknown = 1  # type: ignore[attr-defined]


def test_flights_of_alternating_loops_stay_apart() -> None:
    # The single-flight remembers the last loop's table: a call from another loop (here
    # one running in a thread while this loop's flight is still open) must get its own.
    flights = SingleFlight()
    loads: list[str] = []

    async def burst(name: str, during: Any = None) -> list[str]:
        gate = asyncio.Event()

        async def load() -> str:
            loads.append(name)
            await gate.wait()
            return name

        tasks = [asyncio.ensure_future(flights.run("k", load)) for _ in range(5)]
        await asyncio.sleep(0)
        if during is not None:
            assert await asyncio.to_thread(during) == ["c"] * 5
        gate.set()
        return list(await asyncio.gather(*tasks))

    assert asyncio.run(burst("a")) == ["a"] * 5
    assert asyncio.run(burst("b", during=lambda: asyncio.run(burst("c")))) == ["b"] * 5
    assert asyncio.run(burst("d")) == ["d"] * 5
    assert loads == ["a", "b", "c", "d"]
    assert flights.inflight() == 0
