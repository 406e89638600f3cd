"""Incident 003: a COMMIT that fails is never a silent success.

A DEFERRABLE INITIALLY DEFERRED constraint is only checked at COMMIT, so the statements all
succeed and only the commit fails: the naive "log it and reply anyway" handler tells the user
the message was saved while nothing was; ``db.session()`` raises ``CommitFailed``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest
import sqlalchemy.event
import sqlalchemy.exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from sheetanchor.errors import CommitFailed
from sheetanchor.postgres import Database, PoolSettings

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (id int PRIMARY KEY);
CREATE TABLE IF NOT EXISTS messages (
    id serial PRIMARY KEY,
    conversation_id int NOT NULL REFERENCES conversations (id) DEFERRABLE INITIALLY DEFERRED,
    body text NOT NULL
);
TRUNCATE messages, conversations;
"""
SAVE = text("INSERT INTO messages (conversation_id, body) VALUES (:c, :b)")


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[Database]:
    database = Database(pg_url, pool=PoolSettings(size=2, max_overflow=0))
    await database.execute(SCHEMA)
    yield database
    await database.close()


async def test_naive_swallow_and_reply_loses_data(db: Database) -> None:
    log = logging.getLogger("naive")

    async def naive_handler(conversation: int, body: str) -> str:
        session = AsyncSession(db.engine())
        try:
            await session.execute(SAVE, {"c": conversation, "b": body})
            await session.commit()  # fails: conversation 404 does not exist
        except Exception as exc:
            log.error("saving failed: %s", exc)  # "don't interrupt the flow"
        finally:
            await session.close()
        return "saved"

    assert await naive_handler(404, "hello") == "saved"  # the user is told it was saved...
    assert await db.fetchval("SELECT count(*) FROM messages") == 0  # ...and it was not


async def test_failed_commit_raises_commit_failed(db: Database) -> None:
    replies: list[str] = []

    async def handler(conversation: int, body: str) -> None:
        async with db.session() as session:
            await session.execute(SAVE, {"c": conversation, "b": body})  # passes: deferred
        replies.append("saved")  # a side effect after commit only

    with pytest.raises(CommitFailed, match="nothing was saved") as info:
        await handler(404, "hello")
    assert isinstance(info.value.__cause__, sqlalchemy.exc.IntegrityError)
    assert replies == []
    stats = db.stats()
    assert (stats.commit_failures, stats.checked_out) == (1, 0)
    assert await db.fetchval("SELECT count(*) FROM messages") == 0
    # The session's connection is clean and reusable.
    await db.execute("INSERT INTO conversations VALUES (1)")
    await handler(1, "hi")
    assert replies == ["saved"]


async def test_failed_commit_in_transaction_raises_commit_failed(db: Database) -> None:
    async def handler() -> None:
        async with db.transaction() as conn:
            await conn.execute(SAVE, {"c": 404, "b": "x"})

    with pytest.raises(CommitFailed) as info:
        await handler()
    assert isinstance(info.value.__cause__, sqlalchemy.exc.IntegrityError)
    assert db.stats().checked_out == 0


def _fail_next_checkin(db: Database) -> list[int]:
    """Make the next connection check-in fail (after COMMIT): a broken pool listener."""
    pool = db.engine().sync_engine.pool
    fired: list[int] = []

    def checkin(dbapi_conn: object, rec: object) -> None:
        if fired:
            return
        fired.append(1)
        dbapi_conn.driver_connection.terminate()  # type: ignore[attr-defined]  # no stray socket
        raise RuntimeError("check-in failed after COMMIT")

    sqlalchemy.event.listen(pool, "checkin", checkin)
    return fired


@pytest.mark.parametrize("block", ["session", "transaction"])
async def test_close_failing_after_a_good_commit_is_success_logged_and_counted(
    db: Database, block: str, caplog: pytest.LogCaptureFixture
) -> None:
    await db.execute("INSERT INTO conversations (id) VALUES (1)")
    fired = _fail_next_checkin(db)
    with caplog.at_level(logging.WARNING, logger="sheetanchor"):
        if block == "session":
            async with db.session() as s:
                await s.execute(SAVE, {"c": 1, "b": "kept"})
        else:
            async with db.transaction() as conn:
                await conn.execute(SAVE, {"c": 1, "b": "kept"})
    assert fired == [1]  # the fault did happen
    assert await db.fetchval("SELECT count(*) FROM messages WHERE body = 'kept'") == 1
    stats = db.stats()
    assert (stats.commit_failures, stats.cleanup_failures) == (0, 1)
    assert any("COMMIT succeeded" in r.getMessage() for r in caplog.records), caplog.text
