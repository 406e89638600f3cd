"""Drill 003: sessions never returned, and a failed commit reported as success.

Naive: a handler keeps sessions it never closes, and the pool runs dry; another logs a failed
COMMIT and replies "saved" anyway. sheetanchor: ``db.session()`` always returns the connection,
the leak watch names the code that took one and kept it, and a failed COMMIT raises
``CommitFailed``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import sqlalchemy.exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from sheetanchor.config import to_sqlalchemy_url
from sheetanchor.demo._drill import DemoContext, DrillResult
from sheetanchor.errors import CommitFailed
from sheetanchor.postgres import Database, PoolSettings

__all__ = ["DRILL", "LeaksDrill"]

_log = logging.getLogger("sheetanchor.demo.d003")
REQUESTS = 20
SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (id int PRIMARY KEY);
CREATE TABLE IF NOT EXISTS messages (
    id serial PRIMARY KEY,
    conversation_id int NOT NULL REFERENCES conversations (id) DEFERRABLE INITIALLY DEFERRED,
    body text NOT NULL
);
"""
SAVE = text("INSERT INTO messages (conversation_id, body) VALUES (:c, :b)")


async def _naive(url: str) -> dict[str, Any]:
    engine = create_async_engine(
        to_sqlalchemy_url(url), pool_size=2, max_overflow=0, pool_timeout=0.5
    )
    held: list[AsyncSession] = []

    async def leaky_handler() -> None:
        session = AsyncSession(engine)
        held.append(session)  # kept in a per-connection dict, never closed
        await session.execute(text("SELECT 1"))

    served = 0
    exhausted = False
    for _ in range(REQUESTS):
        try:
            await leaky_handler()
            served += 1
        except sqlalchemy.exc.TimeoutError:
            exhausted = True
            break
    for session in held:
        await session.close()

    async def swallow_and_reply(conversation: int, body: str) -> str:
        session = AsyncSession(engine)
        try:
            await session.execute(SAVE, {"c": conversation, "b": body})
            await session.commit()
        except Exception as exc:  # noqa: BLE001 - the incident's "don't interrupt the flow"
            _log.debug("naive handler swallowed: %s", exc)
        finally:
            await session.close()
        return "saved"

    reply = await swallow_and_reply(404, "hello")
    async with engine.connect() as conn:
        stored = (await conn.execute(text("SELECT count(*) FROM messages"))).scalar_one()
    await engine.dispose()
    return {"served": served, "exhausted": exhausted, "reply": reply, "stored": stored}


async def leaky_ws_handler(db: Database, held: list[AsyncSession]) -> None:
    """The incident's handler on our engine: opens a session and never closes it."""
    session = AsyncSession(db.engine())
    held.append(session)
    await session.execute(text("SELECT 1"))


async def _ours(url: str) -> dict[str, Any]:
    db = Database(
        url,
        name="drill003",
        role="drill",
        pool=PoolSettings(size=2, max_overflow=0, timeout=0.5),
        leak_threshold=0.2,
    )

    async def handler(i: int) -> None:
        async with db.session() as session:
            await session.execute(text("SELECT CAST(:i AS int)"), {"i": i})

    await asyncio.gather(*(handler(i) for i in range(REQUESTS)))
    served = REQUESTS

    held: list[AsyncSession] = []
    await leaky_ws_handler(db, held)
    for _ in range(100):  # the leak watch sweeps every threshold/4; give it up to 5 s
        if db.leak_reports():
            break
        await asyncio.sleep(0.05)
    reports = db.leak_reports()
    named = bool(reports) and any(f.function == "leaky_ws_handler" for f in reports[0].stack)
    for session in held:
        await session.close()

    commit_failed = False
    try:
        async with db.session() as session:
            await session.execute(SAVE, {"c": 404, "b": "hello"})
    except CommitFailed:
        commit_failed = True
    stats = db.stats()
    await db.close()
    return {
        "served": served,
        "leak_reported": bool(reports),
        "leak_names_handler": named,
        "leak_report": reports[0].format() if reports else "",
        "commit_failed_raised": commit_failed,
        "checked_out_after": stats.checked_out,
        "commit_failures": stats.commit_failures,
    }


class LeaksDrill:
    """Incident 003: pool exhaustion from unreturned sessions, and a swallowed commit."""

    id = "003"
    title = "unreturned sessions exhaust the pool; a failed commit is reported as saved"

    async def run(self, ctx: DemoContext) -> DrillResult:
        """Run both halves against a fresh database."""
        url = await ctx.fresh_database("d003")
        db = Database(url, name="drill003setup", pool=PoolSettings(size=1, max_overflow=0))
        await db.execute(SCHEMA)
        await db.close()
        naive = await _naive(url)
        start = time.monotonic()
        ours = await _ours(url)
        elapsed = time.monotonic() - start
        naive_failed = naive["exhausted"] and naive["reply"] == "saved" and naive["stored"] == 0
        ours_ok = (
            ours["served"] == REQUESTS
            and ours["leak_names_handler"]
            and ours["commit_failed_raised"]
            and ours["checked_out_after"] == 0
        )
        return DrillResult(
            drill=self.id,
            title=self.title,
            naive=(
                f"pool exhausted after {naive['served']} requests; user told "
                f"{naive['reply']!r} with {naive['stored']} rows stored"
            ),
            naive_failed=naive_failed,
            ours=(
                f"{ours['served']} requests, 0 exhausted; leak reported naming "
                f"leaky_ws_handler; CommitFailed raised, nothing claimed as saved"
            ),
            ours_ok=ours_ok,
            seconds=elapsed,
            details={"naive": naive, "ours": ours},
        )


DRILL = LeaksDrill()
