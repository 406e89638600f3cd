"""Incident 000: a ``dict`` for a ``jsonb`` parameter binds natively (plain asyncpg refuses it)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest
from sqlalchemy import JSON, Column, Integer, MetaData, Table, insert, select, text
from sqlalchemy.dialects.postgresql import JSONB

from sheetanchor.config import to_asyncpg_dsn
from sheetanchor.postgres import Database, PoolSettings

DOC: dict[str, Any] = {"name": "probe", "tags": ["a", "b"], "pos": {"x": 1.5, "y": -2}, "n": None}


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[Database]:
    database = Database(pg_url, pool=PoolSettings(size=1, max_overflow=0))
    await database.execute(
        "CREATE TABLE IF NOT EXISTS docs (id int PRIMARY KEY, doc jsonb, raw json);TRUNCATE docs"
    )
    yield database
    await database.close()


async def test_plain_asyncpg_refuses_a_dict_for_jsonb(db: Database, pg_url: str) -> None:
    conn = await asyncpg.connect(to_asyncpg_dsn(pg_url))
    try:
        with pytest.raises(asyncpg.DataError, match="expected str, got dict"):
            await conn.execute("INSERT INTO docs (id, doc) VALUES (1, $1)", DOC)
    finally:
        await conn.close()


async def test_raw_reads_and_writes_bind_python_objects(db: Database) -> None:
    await db.execute("INSERT INTO docs (id, doc, raw) VALUES (1, $1, $2)", DOC, [1, 2, 3])
    row = await db.fetchrow("SELECT doc, raw FROM docs WHERE id = 1")
    assert row is not None
    assert (row["doc"], row["raw"]) == (DOC, [1, 2, 3])
    assert await db.fetchval("SELECT $1::jsonb -> 'pos' ->> 'x'", DOC) == "1.5"
    # Already-encoded JSON text keeps working (what SQLAlchemy's JSON type passes).
    assert await db.fetchval("SELECT $1::jsonb", '{"a": 1}') == {"a": 1}
    assert await db.fetchval("SELECT $1::jsonb", orjson.dumps("text")) == "text"
    async with db.connection() as conn:
        assert await conn.fetchval("SELECT $1::json", {"k": True}) == {"k": True}


async def test_sqlalchemy_text_bindparams_take_a_dict(db: Database) -> None:
    async with db.session() as s:
        await s.execute(text("INSERT INTO docs (id, doc) VALUES (2, :doc)"), {"doc": DOC})
        value = (await s.execute(text("SELECT doc FROM docs WHERE id = 2"))).scalar_one()
    assert value == DOC


async def test_sqlalchemy_json_types_round_trip(db: Database) -> None:
    docs = Table(
        "docs",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("doc", JSONB),
        Column("raw", JSON),
    )
    async with db.transaction() as conn:
        await conn.execute(insert(docs).values(id=3, doc=DOC, raw=["x"]))
        row = (await conn.execute(select(docs.c.doc, docs.c.raw).where(docs.c.id == 3))).one()
    assert tuple(row) == (DOC, ["x"])
