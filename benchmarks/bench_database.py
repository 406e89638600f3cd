"""Database overhead against plain SQLAlchemy and raw asyncpg, measured in one run over loopback.

Goals (issue "Loop-aware, fork-safe Database client"):

* point query through ``db.session()``  <= 1.10x a plain ``AsyncSession`` on a default engine
* ``db.fetchval``                       <= 1.50x raw asyncpg ``fetchval`` on one connection
* engine lookup for the running loop    <  2 µs
* 50 concurrent tasks, 10-connection pool: >= 0.95x plain SQLAlchemy throughput

Method: the two sides of each pair run in alternating rounds (A, B, A, B, ...) so drift in the
shared server hits both; each figure is the median over rounds of the mean time per operation.
Servers: ``SHEETANCHOR_PG_URL``, or an embedded PostgreSQL. ``SHEETANCHOR_BENCH_QUICK=1`` runs
fewer rounds.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from sheetanchor.config import pg_url_from_env, to_asyncpg_dsn, to_sqlalchemy_url
from sheetanchor.postgres import Database, PoolSettings

POINT = text("SELECT id, name FROM sa_bench WHERE id = :id")
RAW_POINT = "SELECT name FROM sa_bench WHERE id = $1"


@dataclass(frozen=True)
class Result:
    name: str
    ours: float
    base: float
    unit: str
    goal: str
    ok: bool

    @property
    def ratio(self) -> float:
        return self.ours / self.base if self.base else float("nan")


async def _rounds(
    a: Callable[[int], Awaitable[object]],
    b: Callable[[int], Awaitable[object]],
    *,
    rounds: int,
    per_round: int,
) -> tuple[float, float]:
    """Median seconds per call of ``a`` and ``b``, alternating rounds."""
    times_a: list[float] = []
    times_b: list[float] = []
    for fn in (a, b):  # warm-up: connections, statement caches
        for i in range(50):
            await fn(i)
    for r in range(rounds):
        order = ((a, times_a), (b, times_b)) if r % 2 == 0 else ((b, times_b), (a, times_a))
        for fn, out in order:
            start = time.perf_counter()
            for i in range(per_round):
                await fn(i % 100)
            out.append((time.perf_counter() - start) / per_round)
    return statistics.median(times_a), statistics.median(times_b)


async def _throughput(
    one: Callable[[int], Awaitable[object]], *, tasks: int, per_task: int
) -> float:
    """Operations per second with ``tasks`` concurrent workers."""

    async def worker(n: int) -> None:
        for i in range(per_task):
            await one((n * per_task + i) % 100)

    start = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(tasks)))
    return tasks * per_task / (time.perf_counter() - start)


async def run(url: str, *, quick: bool) -> list[Result]:
    rounds, per_round = (6, 200) if quick else (20, 400)
    results: list[Result] = []
    setup = await asyncpg.connect(to_asyncpg_dsn(url))
    await setup.execute(
        "CREATE TABLE IF NOT EXISTS sa_bench (id int PRIMARY KEY, name text);"
        "INSERT INTO sa_bench SELECT g, 'n' || g FROM generate_series(0, 99) g "
        "ON CONFLICT DO NOTHING"
    )
    await setup.close()

    # 1. Point query through a session.
    db = Database(url, name="bench")
    plain = create_async_engine(to_sqlalchemy_url(url))

    async def ours_session(i: int) -> object:
        async with db.session() as s:
            return (await s.execute(POINT, {"id": i})).one()

    async def plain_session(i: int) -> object:
        async with AsyncSession(plain) as s:
            return (await s.execute(POINT, {"id": i})).one()

    ours, base = await _rounds(ours_session, plain_session, rounds=rounds, per_round=per_round)
    results.append(Result("session point query", ours, base, "µs", "<= 1.10x", ours / base <= 1.10))

    # 2. Hot read: db.fetchval vs asyncpg on one dedicated connection.
    raw = await asyncpg.connect(to_asyncpg_dsn(url))

    async def ours_fetchval(i: int) -> object:
        return await db.fetchval(RAW_POINT, i)

    async def raw_fetchval(i: int) -> object:
        return await raw.fetchval(RAW_POINT, i)

    ours, base = await _rounds(ours_fetchval, raw_fetchval, rounds=rounds, per_round=per_round)
    results.append(Result("fetchval", ours, base, "µs", "<= 1.50x", ours / base <= 1.50))
    await raw.close()

    # Context, not a goal: asyncpg's own pool pays a reset query on every release.
    apool = await asyncpg.create_pool(to_asyncpg_dsn(url), min_size=1, max_size=5)

    async def apool_fetchval(i: int) -> object:
        return await apool.fetchval(RAW_POINT, i)

    ours, base = await _rounds(ours_fetchval, apool_fetchval, rounds=rounds, per_round=per_round)
    results.append(Result("fetchval vs asyncpg pool", ours, base, "µs", "(context)", True))
    await apool.close()

    # 3. Engine lookup for the running loop.
    n = 200_000
    db.engine()
    start = time.perf_counter()
    for _ in range(n):
        db.engine()
    lookup = (time.perf_counter() - start) / n
    results.append(Result("engine lookup", lookup, 2e-6, "µs", "< 2 µs", lookup < 2e-6))

    await db.close()
    await plain.dispose()

    # 4. 50 concurrent tasks on a 10-connection pool.
    pool = PoolSettings(size=10, max_overflow=0)
    db10 = Database(url, name="bench10", pool=pool)
    plain10 = create_async_engine(to_sqlalchemy_url(url), pool_size=10, max_overflow=0)

    async def ours10(i: int) -> object:
        async with db10.session() as s:
            return (await s.execute(POINT, {"id": i})).one()

    async def plain10_(i: int) -> object:
        async with AsyncSession(plain10) as s:
            return (await s.execute(POINT, {"id": i})).one()

    per_task = 20 if quick else 40
    ours_tp: list[float] = []
    base_tp: list[float] = []
    for fn in (ours10, plain10_):
        await _throughput(fn, tasks=50, per_task=5)  # warm up all 10 connections
    for r in range(rounds // 2 or 1):
        pair = ((ours10, ours_tp), (plain10_, base_tp))
        for fn, out in pair if r % 2 == 0 else reversed(pair):
            out.append(await _throughput(fn, tasks=50, per_task=per_task))
    ours_ops, base_ops = statistics.median(ours_tp), statistics.median(base_tp)
    # Stored as seconds per op so that ratio = ours/base stays "lower is better".
    results.append(
        Result(
            "50 tasks / 10 conns",
            1 / ours_ops,
            1 / base_ops,
            "µs",
            ">= 0.95x throughput",
            ours_ops / base_ops >= 0.95,
        )
    )
    await db10.close()
    await plain10.dispose()
    return results


def main(argv: list[str] | None = None) -> int:
    url = pg_url_from_env()
    if url is None:
        from sheetanchor.embedded import ensure_servers

        url, _redis = ensure_servers()
    quick = os.environ.get("SHEETANCHOR_BENCH_QUICK") == "1" or "--quick" in (argv or [])
    results = asyncio.run(run(url, quick=quick))
    print("database benchmark (median per operation; ratio = ours / baseline)")
    print(f"{'case':24} {'ours':>10} {'baseline':>10} {'ratio':>7}  goal")
    missed = 0
    for r in results:
        flag = "ok" if r.ok else "MISSED"
        missed += not r.ok
        print(
            f"{r.name:24} {r.ours * 1e6:9.1f}{r.unit[0]} {r.base * 1e6:9.1f}{r.unit[0]} "
            f"{r.ratio:6.2f}x  {r.goal} {flag}"
        )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
