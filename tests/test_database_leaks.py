"""Incident 003: sessions never returned exhaust the pool; ``db.session()`` cannot leak, and the
leak watch names the code that took a connection it did not give back."""

from __future__ import annotations

import asyncio
import gc
import linecache
import logging
import sys
from collections.abc import Callable
from typing import cast

import pytest
import sqlalchemy.exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from sheetanchor.config import to_sqlalchemy_url
from sheetanchor.errors import PoolTimeout
from sheetanchor.postgres import Database, PoolSettings
from sheetanchor.postgres._leaks import StackFrame, capture_stack, resolve_stack

POOL = PoolSettings(size=2, max_overflow=0, timeout=0.5)


async def _until(predicate: Callable[[], bool], what: str) -> None:
    """Poll ``predicate`` (no timing assumption beyond a generous limit)."""
    try:
        async with asyncio.timeout(10):
            while not predicate():
                await asyncio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"gave up after 10 s waiting until {what}")


async def test_naive_leaky_handler_exhausts_the_pool(pg_url: str) -> None:
    engine = create_async_engine(
        to_sqlalchemy_url(pg_url), pool_size=2, max_overflow=0, pool_timeout=0.5
    )
    held: list[AsyncSession] = []  # what a WebSocket handler's dict of sessions amounts to

    async def leaky_handler() -> None:
        session = AsyncSession(engine)
        held.append(session)
        await session.execute(text("SELECT 1"))  # never closed, never committed

    await leaky_handler()
    await leaky_handler()
    with pytest.raises(sqlalchemy.exc.TimeoutError):
        await leaky_handler()
    for session in held:
        await session.close()
    await engine.dispose()


async def test_database_session_cannot_leak(pg_url: str) -> None:
    db = Database(pg_url, pool=POOL)

    async def handler(i: int) -> int:
        async with db.session() as session:
            value: int = (
                await session.execute(text("SELECT CAST(:i AS int)"), {"i": i})
            ).scalar_one()
        return value

    assert await asyncio.gather(*(handler(i) for i in range(50))) == list(range(50))
    stats = db.stats()
    assert (stats.checked_out, stats.leaks, stats.waiting) == (0, 0, 0)
    await db.close()


async def test_pool_exhaustion_surfaces_as_pool_timeout(pg_url: str) -> None:
    db = Database(pg_url, pool=POOL, leak_threshold=None)
    held = [AsyncSession(db.engine()) for _ in range(2)]
    for session in held:
        await session.execute(text("SELECT 1"))
    with pytest.raises(PoolTimeout, match="release connections sooner") as info:
        await db.fetchval("SELECT 1")
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value.__cause__, sqlalchemy.exc.TimeoutError)
    for session in held:
        await session.close()
    await db.close()


async def leaky_ws_handler(db: Database, held: list[AsyncSession]) -> None:
    # The incident's pattern, on our engine: a session opened and never closed.
    session = AsyncSession(db.engine())
    held.append(session)
    await session.execute(text("SELECT 1"))


async def test_leak_watch_reports_a_connection_held_too_long_with_its_stack(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    db = Database(pg_url, pool=POOL, leak_threshold=0.1)
    held: list[AsyncSession] = []
    with caplog.at_level(logging.WARNING, logger="sheetanchor.postgres"):
        await leaky_ws_handler(db, held)
        await _until(lambda: bool(db.leak_reports()), "the leak is reported")
    [report] = db.leak_reports()
    assert report.kind == "held"
    assert report.held_for >= 0.1
    functions = [frame.function for frame in report.stack]
    assert "leaky_ws_handler" in functions
    assert "test_leak_watch_reports_a_connection_held_too_long_with_its_stack" in functions
    # Line numbers are resolved when reporting (the capture keeps instruction offsets).
    [taker] = [frame for frame in report.stack if frame.function == "leaky_ws_handler"]
    assert "session.execute" in linecache.getline(taker.filename, taker.lineno)
    assert "leaky_ws_handler" in caplog.text  # logged with the stack, once
    assert db.stats().leaks == 1
    await asyncio.sleep(0.3)
    assert db.stats().leaks == 1  # reported once, not on every sweep
    await held[0].close()
    assert db.stats().checked_out == 0
    await db.close()


@pytest.mark.filterwarnings("ignore:The garbage collector is trying to clean up")
async def test_leak_watch_reports_a_connection_garbage_collected_without_return(
    pg_url: str,
) -> None:
    db = Database(pg_url, pool=POOL, leak_threshold=None)
    held: list[AsyncSession] = []
    await leaky_ws_handler(db, held)
    held.clear()  # dropped without close(): SQLAlchemy's "non-checked-in connection" case
    gc.collect()
    [report] = db.leak_reports()
    assert report.kind == "unreturned"
    assert "leaky_ws_handler" in [frame.function for frame in report.stack]
    stats = db.stats()
    assert (stats.leaks, stats.leaks_unreturned, stats.checked_out) == (1, 1, 0)
    assert await db.fetchval("SELECT 1") == 1  # the pool recovered the slot
    await db.close()


async def test_cancelled_session_returns_its_connection(pg_url: str) -> None:
    db = Database(pg_url, pool=POOL)
    started = asyncio.Event()

    async def slow() -> None:
        async with db.session() as session:
            started.set()
            await session.execute(text("SELECT pg_sleep(10)"))

    task = asyncio.create_task(slow())
    await started.wait()
    await _until(lambda: db.stats().checked_out == 1, "the statement holds a connection")
    await asyncio.sleep(0.05)  # let it reach the server: cancel mid-statement
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert db.stats().checked_out == 0
    assert await db.fetchval("SELECT 1") == 1
    await db.close()


async def test_cancelled_raw_reads_return_their_connection(pg_url: str) -> None:
    db = Database(pg_url, pool=POOL)

    async def in_connection() -> None:
        async with db.connection() as conn:
            await conn.execute("SELECT pg_sleep(10)")

    for coro in (db.fetchval("SELECT pg_sleep(10)"), in_connection()):
        task = asyncio.create_task(coro)
        await _until(lambda: db.stats().checked_out == 1, "the statement holds a connection")
        await asyncio.sleep(0.05)  # let it reach the server: cancel mid-statement
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert db.stats().checked_out == 0
    assert await db.fetchval("SELECT 1") == 1
    await db.close()


async def slow_report_query(db: Database) -> None:
    await db.fetchval("SELECT pg_sleep(0.5)")


async def report_page(db: Database) -> None:
    await slow_report_query(db)


async def test_a_one_shot_read_held_too_long_is_reported_with_its_callers_stack(
    pg_url: str,
) -> None:
    # db.fetchval leases its connection without a per-checkout stack walk; the stack of the
    # task holding it is read when the lease is reported, and it is the caller's.
    db = Database(pg_url, pool=POOL, leak_threshold=0.1)
    await db.fetchval("SELECT 1")  # an idle connection: the lease path, not the fairy path
    task = asyncio.create_task(report_page(db))
    await _until(lambda: bool(db.leak_reports()), "the slow read is reported")
    [report] = db.leak_reports()
    assert report.kind == "held"
    # Every suspended coroutine of the task, not only the outermost (Task.get_stack's view).
    assert [frame.function for frame in report.stack] == ["report_page", "slow_report_query"]
    await task
    stats = db.stats()
    assert (stats.leaks, stats.checked_out) == (1, 0)
    await db.close()


async def hold_in_block(
    db: Database, opener: str, took: asyncio.Event, lines: dict[str, object]
) -> None:
    # Holds a connection of a db.session() / db.transaction() / db.connection() block until
    # cancelled; records the eager capture's view of the stack at the statement.
    blocks = {"session": db.session, "transaction": db.transaction, "connection": db.connection}
    lines["opener"] = sys._getframe().f_lineno + 1
    async with blocks[opener]() as handle:
        if opener == "session":
            await handle.execute(text("SELECT 1"))
        lines["eager"] = resolve_stack(capture_stack(1))
        took.set()
        await asyncio.sleep(0)  # the opener's frame moves on after the checkout
        await asyncio.Event().wait()


async def caller_of_the_block(
    db: Database, opener: str, took: asyncio.Event, lines: dict[str, object]
) -> None:
    await hold_in_block(db, opener, took, lines)


@pytest.mark.parametrize("opener", ["session", "transaction", "connection"])
async def test_a_block_held_too_long_is_reported_at_its_opening_line_with_its_callers(
    pg_url: str, opener: str
) -> None:
    # Checkouts of these blocks walk no stack: the block's line and the task are recorded, and
    # the task's stack is read when reporting. It names the same callers, at the same lines, as
    # a stack walked at the checkout; the opener's frame is reported at the `async with` line.
    db = Database(pg_url, pool=POOL, leak_threshold=0.1)
    took = asyncio.Event()
    lines: dict[str, object] = {}
    task = asyncio.create_task(caller_of_the_block(db, opener, took, lines))
    await took.wait()
    await _until(lambda: bool(db.leak_reports()), "the held block is reported")
    [report] = db.leak_reports()
    assert (report.kind, report.complete) == ("held", True)
    eager = cast("tuple[StackFrame, ...]", lines["eager"])
    assert [f.function for f in eager] == ["caller_of_the_block", "hold_in_block"]
    assert report.stack[:-1] == eager[:-1]  # the callers: same frames, same lines
    taker = report.stack[-1]
    assert (taker.function, taker.filename) == ("hold_in_block", eager[-1].filename)
    assert taker.lineno == lines["opener"]
    assert "async with blocks[opener]()" in linecache.getline(taker.filename, taker.lineno)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert db.stats().checked_out == 0
    await db.close()


async def test_a_connection_taken_by_another_task_in_a_block_names_the_block_only(
    pg_url: str,
) -> None:
    # A task created inside the block copies its context, so its checkout is recorded as the
    # block's; its stack does not hold the opener, so only the `async with` line is known, and
    # the report says the callers are unknown rather than naming the wrong ones.
    db = Database(pg_url, pool=POOL, leak_threshold=0.1)
    async with db.session() as session:
        opener_line = sys._getframe().f_lineno - 1
        await asyncio.create_task(session.execute(text("SELECT pg_sleep(0.5)")))
    [report] = db.leak_reports()
    assert (report.kind, report.complete) == ("held", False)
    [frame] = report.stack
    assert (frame.function, frame.lineno) == (
        "test_a_connection_taken_by_another_task_in_a_block_names_the_block_only",
        opener_line,
    )
    assert "callers unknown" in report.format()
    await db.close()
