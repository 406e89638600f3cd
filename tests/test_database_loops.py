"""Incident 002: one engine per (process, event loop); never a dead loop's engine.

The naive half reproduces the incident: a module-level ``create_async_engine`` used by
successive ``asyncio.run`` calls fails with "attached to a different loop" / "another
operation is in progress". ``Database`` passes every run, in threads with their own loops, in
pytest-asyncio's per-test loops, and in a forked child, and disposes the engines of closed loops.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
import subprocess
import sys
import threading
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from sheetanchor.config import to_sqlalchemy_url
from sheetanchor.postgres import Database, PoolSettings
from sheetanchor.postgres._loops import PerLoop

INCIDENT_002 = ("attached to a different loop", "another operation is in progress")


def _small(url: str, **kwargs: Any) -> Database:
    return Database(url, pool=PoolSettings(size=2, max_overflow=0), **kwargs)


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_naive_global_engine_fails_across_asyncio_run(pg_url: str) -> None:
    naive = {"engine": create_async_engine(to_sqlalchemy_url(pg_url), pool_size=2)}

    async def handler() -> int:
        async with AsyncSession(naive["engine"]) as session:
            value: int = (await session.execute(text("SELECT 1"))).scalar_one()
            return value

    errors: list[str] = []
    for _ in range(5):
        try:
            asyncio.run(handler())
        except Exception as exc:
            errors.append(str(exc))
    assert errors, "the naive pattern should fail: the test would prove nothing"
    assert all(any(kind in e for kind in INCIDENT_002) for e in errors), errors
    naive["engine"].sync_engine.dispose(close=False)  # its sockets belong to closed loops
    naive.clear()
    gc.collect()  # their ResourceWarnings belong to this test, not the next one


def test_database_passes_every_asyncio_run_and_disposes_each_engine(pg_url: str) -> None:
    db = _small(pg_url)

    async def handler() -> int:
        async with db.session() as session:
            value: int = (await session.execute(text("SELECT 1"))).scalar_one()
        return value + await db.fetchval("SELECT 1")

    assert [asyncio.run(handler()) for _ in range(5)] == [2] * 5
    stats = db.stats()
    assert (stats.engines_alive, stats.engines_disposed, stats.pool_size) == (0, 5, 0)


def test_loop_closed_by_hand_disposes_its_engine(pg_url: str) -> None:
    # The usual Celery helper: new_event_loop / run_until_complete / close, no asyncio.run.
    db = _small(pg_url)
    for _ in range(3):
        loop = asyncio.new_event_loop()
        try:
            assert loop.run_until_complete(db.fetchval("SELECT 7")) == 7
        finally:
            loop.close()
    stats = db.stats()
    assert (stats.engines_alive, stats.engines_disposed) == (0, 3)


def test_engine_of_a_loop_closed_without_hooks_is_abandoned_and_counted(pg_url: str) -> None:
    db = _small(pg_url, role="abandon")
    loop = asyncio.new_event_loop()
    loop.run_until_complete(db.fetchval("SELECT 1"))
    type(loop).close(loop)  # bypasses the instance hook, like a loop we cannot patch (uvloop)
    assert asyncio.run(db.fetchval("SELECT 2")) == 2  # reaps the dead loop's engine
    stats = db.stats()
    assert (stats.engines_alive, stats.engines_disposed) == (0, 2)
    gc.collect()  # no ResourceWarning: the abandoned sockets were closed, not left to the GC

    async def backends() -> int:
        async with asyncio.timeout(10):
            while True:  # the server notices the closed sockets within milliseconds
                count: int = await db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE $1",
                    "sheetanchor:abandon:%",
                )
                if count == 1:  # only the connection asking
                    return count
                await asyncio.sleep(0.02)

    assert asyncio.run(backends()) == 1


def test_threads_with_their_own_loops(pg_url: str) -> None:
    db = Database(pg_url, pool=PoolSettings(size=1, max_overflow=0))
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    async def work(n: int) -> None:
        engine = db.engine()
        await asyncio.to_thread(barrier.wait, 10)  # all four loops are alive at once
        assert db.stats().engines_alive == 4
        for i in range(5):
            assert await db.fetchval("SELECT $1::int", n * 10 + i) == n * 10 + i
            async with db.session() as s:
                await s.execute(text("SELECT 1"))
        assert db.engine() is engine

    def thread(n: int) -> None:
        try:
            asyncio.run(work(n))
            asyncio.run(work2())
        except BaseException as exc:
            errors.append(exc)

    async def work2() -> None:
        await db.fetchval("SELECT 1")

    threads = [threading.Thread(target=thread, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    stats = db.stats()
    assert (stats.engines_alive, stats.engines_disposed, stats.checked_out) == (0, 8, 0)


class _FakeLoop:
    """Just enough of an event loop for ``PerLoop``'s keyed structure: no I/O, no selector.

    Real loops are big and the allocator rarely hands a freed loop's address to the next one
    within a test, so a test with real loops cannot force the collision that breaks an
    ``id(loop)``-keyed registry. Instances of this small class reuse a freed address at once.
    """

    def __init__(self) -> None:
        self.closed = False

    def is_closed(self) -> bool:
        return self.closed

    def is_running(self) -> bool:
        return False

    def close(self) -> None:  # PerLoop wraps this per instance, like a real loop's close()
        self.closed = True

    def run_until_complete(self, coro: Any) -> Any:
        # The disposal coroutines of these tests never suspend: drive them to the end.
        try:
            while True:
                coro.send(None)
        except StopIteration as done:
            return done.value


def _same_address_as(address: int) -> _FakeLoop:
    # Keep the misses alive: every try is then a new allocation, and the freed block of the
    # dead loop is among the first the allocator gives out again.
    misses = []
    for _ in range(10_000):
        loop = _FakeLoop()
        if id(loop) == address:
            return loop
        misses.append(loop)
    pytest.fail("no new object reused the dead loop's address in 10,000 allocations")


def test_recycled_loop_ids_never_get_a_dead_loops_value() -> None:
    # Incident 002's fix keyed engines by id(loop): a loop freed without being closed through
    # the registry (dropped, or closed where no hook runs, e.g. uvloop) leaves its entry, and
    # the next loop allocated at the same address is handed the dead loop's engine. Force that
    # collision on PerLoop's keyed structure: an id-keyed registry fails the first assertion.
    made: list[object] = []
    closed: list[object] = []
    abandoned: list[object] = []

    def create() -> object:
        made.append(object())
        return made[-1]

    async def aclose(value: object) -> None:
        closed.append(value)

    registry: PerLoop[object] = PerLoop(create, aclose, abandoned.append, what="thing")
    dead = _FakeLoop()
    dead_value = registry._lookup(dead)  # what get() does for the running loop
    address = id(dead)
    del dead  # freed without being closed: no hook of the registry ran
    gc.collect()

    reborn = _same_address_as(address)
    assert id(reborn) == address
    value = registry._lookup(reborn)
    assert value is not dead_value, "a new loop at a dead loop's address got its value"
    assert made == [dead_value, value]
    assert abandoned == [dead_value]  # the dead loop's value was dropped (no I/O), and counted
    assert registry.alive == 1
    assert registry.disposed == 1

    reborn.close()  # the registry's hook disposes the value inside the loop, then closes it
    assert reborn.is_closed()
    assert closed == [value]
    assert (registry.alive, registry.disposed) == (0, 2)


@pytest.fixture(scope="module")
def shared_db(pg_url: str) -> tuple[Database, list[int]]:
    # One Database for several pytest-asyncio tests: each test has its own loop. The list
    # counts the tests that used it so far, so each test knows its own baseline and passes
    # alone, in any order, or after the others.
    return _small(pg_url, name="shared"), []


async def _use_shared(shared_db: tuple[Database, list[int]], value: int) -> None:
    db, users = shared_db
    earlier = len(users)  # tests before this one, each with its own (now closed) loop
    users.append(value)
    assert await db.fetchval("SELECT $1::int", value) == value
    stats = db.stats()
    assert stats.engines_alive == 1  # this test's loop only
    assert stats.engines_disposed == earlier  # each earlier loop took its engine with it


async def test_pytest_asyncio_loop_one(shared_db: tuple[Database, list[int]]) -> None:
    await _use_shared(shared_db, 1)


async def test_pytest_asyncio_loop_two(shared_db: tuple[Database, list[int]]) -> None:
    await _use_shared(shared_db, 2)


def _child_uses_inherited_db(db: Database, queue: Any) -> None:
    async def main() -> tuple[int, str, int]:
        pid: int = await db.fetchval("SELECT pg_backend_pid()")
        async with db.session() as s:
            name = (await s.execute(text("SELECT current_setting('application_name')"))).scalar()
        await asyncio.sleep(0.3)  # past the leak threshold: the parent's checkout is not ours
        return pid, str(name), db.stats().leaks

    try:
        queue.put(("ok", *asyncio.run(main()), db.stats().engines_alive))
    except BaseException as exc:
        queue.put(("error", repr(exc), "", 0, 0))


async def test_fork_child_builds_its_own_engine_and_parent_pool_survives(pg_url: str) -> None:
    db = _small(pg_url, leak_threshold=0.1)
    parent_backend = await db.fetchval("SELECT pg_backend_pid()")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_uses_inherited_db, args=(db, queue))
    async with db.session() as held:
        await held.execute(text("SELECT 1"))  # a checkout in flight at fork time
        child.start()  # forks while this loop runs and the pool holds connections
        try:
            status, child_backend, app_name, child_leaks, child_alive = queue.get(timeout=60)
        finally:
            child.join(30)
    assert status == "ok", child_backend
    assert child.exitcode == 0
    assert child_backend != parent_backend
    assert app_name == f"sheetanchor:app:{child.pid}"
    assert child_alive == 0  # disposed when the child's asyncio.run ended
    assert child_leaks == 0  # the parent's in-flight checkout is not reported by the child
    # The child never touched the parent's connection: same backend, still working.
    assert await db.fetchval("SELECT pg_backend_pid()") == parent_backend
    assert os.getpid() != child.pid
    await db.close()


_FORK_CHILD_CLOSES_INHERITED_LOOP = """
import asyncio, os, sys, time
from sheetanchor.postgres import Database, PoolSettings
db = Database(sys.argv[1], pool=PoolSettings(size=1, max_overflow=0), leak_threshold=None)
loop = asyncio.new_event_loop()
before = loop.run_until_complete(db.fetchval("SELECT pg_backend_pid()"))
pid = os.fork()
if pid == 0:
    loop.close()  # the child closes the loop it inherited: must not dispose the parent's engine
    os._exit(0)
_, status = os.waitpid(pid, 0)
assert status == 0, status
async def query() -> int:
    async with asyncio.timeout(10):
        return await db.fetchval("SELECT pg_backend_pid()")
after = loop.run_until_complete(query())
async def wake_from_thread() -> str:  # the parent's self-pipe still wakes its loop
    async with asyncio.timeout(10):
        # The thread sleeps so that the loop is blocked in epoll_wait when it finishes.
        return await asyncio.to_thread(lambda: (time.sleep(0.2), "woke")[1])
woke = loop.run_until_complete(wake_from_thread())
loop.close()
print("same-backend" if after == before else f"other-backend {before} {after}", woke)
"""


def test_fork_child_closing_its_inherited_loop_leaves_the_parents_engine_alone(
    pg_url: str,
) -> None:
    # In a subprocess with a timeout: the regression is a hang of the parent's next query.
    done = subprocess.run(
        [sys.executable, "-c", _FORK_CHILD_CLOSES_INHERITED_LOOP, pg_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "same-backend woke", done.stdout


@pytest.mark.parametrize("how", ["by_hand", "asyncio_run"])
def test_a_failing_disposal_still_closes_the_loop_and_is_counted(
    how: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def aclose(value: object) -> None:
        raise OSError("dispose failed")

    registry: PerLoop[object] = PerLoop(object, aclose, lambda value: None, what="thing")

    async def use() -> None:
        registry.get()

    with caplog.at_level(logging.WARNING, logger="sheetanchor"):
        if how == "by_hand":
            loop = asyncio.new_event_loop()
            loop.run_until_complete(use())
            loop.close()
            assert loop.is_closed()
        else:
            asyncio.run(use())
    assert (registry.alive, registry.dispose_failures) == (0, 1)
    assert any("dispose failed" in r.getMessage() for r in caplog.records), caplog.text


def test_engines_of_open_idle_loops_are_counted_and_warned_about(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The documented limitation: a loop that is open but not running may run again, so its
    # engine stays. It is counted (stats, gauge) and, from 4 such engines on, warned about.
    db = _small(pg_url, role="idle")
    loops = []
    with caplog.at_level(logging.WARNING, logger="sheetanchor.postgres"):
        for _ in range(5):
            loop = asyncio.new_event_loop()
            assert loop.run_until_complete(db.fetchval("SELECT 1")) == 1
            loops.append(loop)  # not closed: like a loop dropped after run_until_complete
    assert db.stats().engines_idle_loops == 5
    warnings = [r for r in caplog.records if "open but not running" in r.getMessage()]
    assert len(warnings) == 1  # at the 5th engine (4 idle ones), not once per engine
    for loop in loops:
        loop.close()  # the close hook disposes each engine inside its loop
    stats = db.stats()
    assert (stats.engines_alive, stats.engines_idle_loops, stats.engines_disposed) == (0, 0, 5)
