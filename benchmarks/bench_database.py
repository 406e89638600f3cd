"""Database overhead against plain SQLAlchemy and raw asyncpg, measured in one run over loopback.

Goals (issue "Loop-aware, fork-safe Database client"):

* point query through ``db.session()``  <= 1.10x a plain ``AsyncSession`` on a default engine
* ``db.fetchval``                       <= 1.50x raw asyncpg ``fetchval`` on one connection
* engine lookup for the running loop    <  2 µs
* 50 concurrent tasks, 10-connection pool: >= 0.95x plain SQLAlchemy throughput

Method: the two sides of each pair run in short alternating rounds (A, B, B, A, ...) so drift
in a shared machine hits both. For each side it prints the median and the best round (wall
time per operation) and the client's CPU time per operation (median round), which other load
on the machine moves less. With 50 tasks on 10 connections the client's one thread is busy
all the time, so that case's wall ratio follows its CPU ratio. The goal is judged on the
median; on a loaded machine read the best-round and CPU columns too. Servers:
``SHEETANCHOR_PG_URL``, or an embedded PostgreSQL. ``SHEETANCHOR_BENCH_QUICK=1`` runs fewer
rounds.
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

Op = Callable[[int], Awaitable[object]]


@dataclass(frozen=True)
class Side:
    """Seconds per operation: median and best round (wall clock), and client CPU."""

    median: float
    best: float
    cpu: float


@dataclass(frozen=True)
class Result:
    name: str
    ours: Side
    base: Side
    goal: str
    limit: float | None  # ratio limit on the median (ours/base, lower is better)

    @property
    def ratio(self) -> float:
        return self.ours.median / self.base.median

    @property
    def best_ratio(self) -> float:
        return self.ours.best / self.base.best

    @property
    def cpu_ratio(self) -> float:
        return self.ours.cpu / self.base.cpu if self.base.cpu else float("nan")

    @property
    def ok(self) -> bool:
        return self.limit is None or self.ratio <= self.limit


async def _round(fn: Op, n: int) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(n):
        await fn(i % 100)
    return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n


async def _pair(a: Op, b: Op, *, rounds: int, per_round: int) -> tuple[Side, Side]:
    """Alternate rounds of ``a`` and ``b``; return both sides' figures."""
    for fn in (a, b):  # warm-up: connections, statement caches
        for i in range(100):
            await fn(i)
    runs: dict[int, list[tuple[float, float]]] = {0: [], 1: []}
    for r in range(rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for side in order:
            runs[side].append(await _round((a, b)[side], per_round))
    sides = []
    for side in (0, 1):
        walls = [w for w, _ in runs[side]]
        cpus = [c for _, c in runs[side]]
        sides.append(Side(statistics.median(walls), min(walls), statistics.median(cpus)))
    return sides[0], sides[1]


async def _throughput(one: Op, *, tasks: int, per_task: int) -> tuple[float, float]:
    """Seconds per operation (wall, client CPU) with ``tasks`` concurrent workers."""

    async def worker(n: int) -> None:
        for i in range(per_task):
            await one((n * per_task + i) % 100)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(tasks)))
    ops = tasks * per_task
    return (time.perf_counter() - wall) / ops, (time.process_time() - cpu) / ops


async def _setup(url: str) -> None:
    conn = await asyncpg.connect(to_asyncpg_dsn(url))
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS sa_bench (id int PRIMARY KEY, name text);"
            "INSERT INTO sa_bench SELECT g, 'n' || g FROM generate_series(0, 99) g "
            "ON CONFLICT DO NOTHING"
        )
    finally:
        await conn.close()


async def run(url: str, *, quick: bool) -> tuple[list[Result], float]:
    """Every pair; returns the results and the engine lookup time (seconds)."""
    rounds, per_round = (10, 100) if quick else (40, 150)
    await _setup(url)
    results: list[Result] = []

    # 1. Point query through a session, against a plain AsyncSession on a default engine.
    db = Database(url, name="bench")
    plain = create_async_engine(to_sqlalchemy_url(url))

    async def ours_session(i: int) -> object:
        async with db.session() as s:
            return (await s.execute(POINT, {"id": i})).one()

    async def plain_session(i: int) -> object:
        async with AsyncSession(plain) as s:
            return (await s.execute(POINT, {"id": i})).one()

    ours, base = await _pair(ours_session, plain_session, rounds=rounds, per_round=per_round)
    results.append(Result("session point query", ours, base, "<= 1.10x", 1.10))

    # 2. Hot read: db.fetchval against asyncpg on one dedicated connection.
    raw = await asyncpg.connect(to_asyncpg_dsn(url))

    async def ours_fetchval(i: int) -> object:
        return await db.fetchval(RAW_POINT, i)

    async def raw_fetchval(i: int) -> object:
        return await raw.fetchval(RAW_POINT, i)

    ours, base = await _pair(ours_fetchval, raw_fetchval, rounds=rounds, per_round=per_round)
    results.append(Result("fetchval vs 1 connection", ours, base, "<= 1.50x", 1.50))
    await raw.close()

    # Context, not a goal: asyncpg's own pool (it sends a reset query on every release).
    apool = await asyncpg.create_pool(to_asyncpg_dsn(url), min_size=1, max_size=5)

    async def apool_fetchval(i: int) -> object:
        return await apool.fetchval(RAW_POINT, i)

    ours, base = await _pair(ours_fetchval, apool_fetchval, rounds=rounds, per_round=per_round)
    results.append(Result("fetchval vs asyncpg pool", ours, base, "(context)", None))
    await apool.close()

    # 3. Engine lookup for the running loop.
    n = 200_000
    db.engine()
    start = time.perf_counter()
    for _ in range(n):
        db.engine()
    lookup = (time.perf_counter() - start) / n
    await db.close()
    await plain.dispose()

    # 4. 50 concurrent tasks on a 10-connection pool (seconds per op: lower is better).
    db10 = Database(url, name="bench10", pool=PoolSettings(size=10, max_overflow=0))
    plain10 = create_async_engine(to_sqlalchemy_url(url), pool_size=10, max_overflow=0)

    async def ours10(i: int) -> object:
        async with db10.session() as s:
            return (await s.execute(POINT, {"id": i})).one()

    async def plain10_(i: int) -> object:
        async with AsyncSession(plain10) as s:
            return (await s.execute(POINT, {"id": i})).one()

    per_task = 10 if quick else 20
    tp: dict[int, list[tuple[float, float]]] = {0: [], 1: []}
    for fn in (ours10, plain10_):
        await _throughput(fn, tasks=50, per_task=5)  # warm up all 10 connections
    for r in range(rounds // 2):
        for side in (0, 1) if r % 2 == 0 else (1, 0):
            tp[side].append(
                await _throughput((ours10, plain10_)[side], tasks=50, per_task=per_task)
            )
    sides = [
        Side(
            statistics.median(w for w, _ in tp[s]),
            min(w for w, _ in tp[s]),
            statistics.median(c for _, c in tp[s]),
        )
        for s in (0, 1)
    ]
    # Throughput >= 0.95x  <=>  time per op <= 1/0.95 = 1.053x.
    results.append(Result("50 tasks / 10 conns", sides[0], sides[1], ">= 0.95x tput", 1 / 0.95))
    await db10.close()
    await plain10.dispose()
    return results, lookup


def main(argv: list[str] | None = None) -> int:
    url = pg_url_from_env()
    if url is None:
        from sheetanchor.embedded import ensure_servers

        url, _redis = ensure_servers()
    quick = os.environ.get("SHEETANCHOR_BENCH_QUICK") == "1" or "--quick" in (argv or [])
    load = os.getloadavg()[0]
    results, lookup = asyncio.run(run(url, quick=quick))
    print(f"database benchmark; {os.cpu_count()} cores, load average {load:.1f} at start")
    print("µs per operation (wall, median round; cpu = client CPU per operation)")
    print("ratio = ours / baseline (lower is better)")
    head = (
        f"{'case':26} {'ours':>8} {'base':>8} {'ratio':>6} {'best':>6} "
        f"{'cpu ours':>8} {'cpu base':>8} {'cpu':>6}  goal"
    )
    print(head)
    missed = 0
    for r in results:
        flag = "" if r.limit is None else (" ok" if r.ok else " MISSED")
        missed += not r.ok
        print(
            f"{r.name:26} {r.ours.median * 1e6:8.1f} {r.base.median * 1e6:8.1f} "
            f"{r.ratio:5.2f}x {r.best_ratio:5.2f}x "
            f"{r.ours.cpu * 1e6:8.1f} {r.base.cpu * 1e6:8.1f} {r.cpu_ratio:5.2f}x  {r.goal}{flag}"
        )
    lookup_ok = lookup < 2e-6
    missed += not lookup_ok
    verdict = "ok" if lookup_ok else "MISSED"
    print(f"{'engine lookup':26} {lookup * 1e6:8.2f} µs  goal < 2 µs {verdict}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
