"""The Database's pool serves waiting checkouts in arrival order (``HandoffQueue``), with real
PostgreSQL: a task that gives a connection back and asks again at once queues behind the
tasks already waiting, a wait still ends with ``PoolTimeout`` at its deadline, and a waiter
cancelled just as a connection was handed to it passes the connection on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from sqlalchemy import text

from sheetanchor.errors import PoolTimeout
from sheetanchor.postgres import Database, PoolSettings


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[Database]:
    database = Database(pg_url, pool=PoolSettings(size=1, max_overflow=0, timeout=30.0))
    await database.fetchval("SELECT 1")  # the one connection, open and idle
    yield database
    await database.close()


def _one(db: Database, how: str) -> Callable[[], Awaitable[object]]:
    async def session() -> object:
        async with db.session() as s:
            return (await s.execute(text("SELECT 1"))).scalar()

    async def transaction() -> object:
        async with db.transaction() as conn:
            return (await conn.execute(text("SELECT 1"))).scalar()

    async def connection() -> object:
        async with db.connection() as conn:
            return await conn.fetchval("SELECT 1")

    async def fetchval() -> object:
        return await db.fetchval("SELECT 1")

    ops: dict[str, Callable[[], Awaitable[object]]] = {
        "session": session,
        "transaction": transaction,
        "connection": connection,
        "fetchval": fetchval,
    }
    return ops[how]


@pytest.mark.parametrize("how", ["session", "transaction", "connection", "fetchval"])
async def test_a_waiting_task_gets_the_connection_before_a_looping_holder_takes_it_back(
    db: Database, how: str
) -> None:
    # A task that loops over short blocks never awaits between giving the connection back and
    # asking for it again. It used to take it back every time, ahead of the task already
    # waiting, which then waited for the whole loop (or until the pool timeout).
    one = _one(db, how)
    served = asyncio.Event()
    loops = 0
    seen: list[int] = []

    async def hog() -> None:
        nonlocal loops
        while not served.is_set() and loops < 200:
            await one()
            loops += 1

    async def other() -> None:
        assert await one() == 1
        seen.append(loops)
        served.set()

    holder = asyncio.create_task(hog())
    while db.stats().checked_out < 1:  # the holder has the connection
        await asyncio.sleep(0)
    await other()
    await holder
    # The holder finishes the block it had started, and at most one more before it queues up.
    assert seen[0] <= 2, f"the waiting task was served after {seen[0]} of the holder's blocks"
    stats = db.stats()
    assert (stats.checked_out, stats.waiting, stats.idle) == (0, 0, 1)


async def test_waiting_tasks_are_served_in_arrival_order(db: Database) -> None:
    order: list[int] = []
    release = asyncio.Event()

    async def holder() -> None:
        async with db.connection():
            await release.wait()

    async def waiter(n: int) -> None:
        async with db.connection():
            order.append(n)

    first = asyncio.create_task(holder())
    while db.stats().checked_out < 1:
        await asyncio.sleep(0)
    waiters = []
    for n in range(5):
        waiters.append(asyncio.create_task(waiter(n)))
        while db.stats().waiting < n + 1:  # queued before the next one starts
            await asyncio.sleep(0)
    release.set()
    await asyncio.gather(first, *waiters)
    assert order == [0, 1, 2, 3, 4]


async def test_a_wait_past_the_pool_timeout_raises_pool_timeout(pg_url: str) -> None:
    db = Database(pg_url, pool=PoolSettings(size=1, max_overflow=0, timeout=0.2))
    try:
        async with db.connection():
            with pytest.raises(PoolTimeout):
                await db.fetchval("SELECT 1")
            with pytest.raises(PoolTimeout):  # the queue's timer is set again for a later wait
                async with db.session() as s:
                    await s.execute(text("SELECT 1"))
            assert db.stats().waiting == 0
        assert await db.fetchval("SELECT 1") == 1  # the slot was never lost
        assert db.stats().idle == 1
    finally:
        await db.close()


async def test_a_waiter_cancelled_as_the_connection_reaches_it_passes_it_on(
    db: Database,
) -> None:
    release = asyncio.Event()
    got: list[str] = []

    async def waiter(name: str) -> None:
        async with db.connection() as conn:
            got.append(name)
            await conn.fetchval("SELECT 1")

    async def holder() -> None:
        async with db.connection():
            await release.wait()
        # The connection was handed to the first waiter just now; it has not run yet.
        first.cancel()

    hold = asyncio.create_task(holder())
    while db.stats().checked_out < 1:
        await asyncio.sleep(0)
    first = asyncio.create_task(waiter("first"))
    while db.stats().waiting < 1:
        await asyncio.sleep(0)
    second = asyncio.create_task(waiter("second"))
    while db.stats().waiting < 2:
        await asyncio.sleep(0)
    release.set()
    await hold
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 10)
    assert got == ["second"]
    stats = db.stats()
    assert (stats.checked_out, stats.waiting, stats.idle) == (0, 0, 1)
