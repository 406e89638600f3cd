"""Drills 002 and 003 run against a real server: the naive half fails, ours survives."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from sheetanchor.config import to_asyncpg_dsn
from sheetanchor.demo import DemoContext
from sheetanchor.demo.drills import all_drills


@pytest.fixture
async def ctx(sheetanchor_pg_server_url: str, tmp_path: Path) -> AsyncIterator[DemoContext]:
    admin_dsn = to_asyncpg_dsn(sheetanchor_pg_server_url)
    created: list[str] = []

    async def fresh_database(prefix: str) -> str:
        name = f"sa_{prefix}_{uuid.uuid4().hex[:8]}"
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        created.append(name)
        base = sheetanchor_pg_server_url.split("?")[0].rsplit("/", 1)[0]
        return f"{base}/{name}"

    yield DemoContext(
        pg_url=sheetanchor_pg_server_url,
        redis_url="redis://127.0.0.1:6379/0",
        workdir=tmp_path,
        fresh_database=fresh_database,
    )
    conn = await asyncpg.connect(admin_dsn)
    try:
        for name in created:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.mark.parametrize("drill_id", ["002", "003"])
async def test_drill_reproduces_the_incident_and_survives_it(
    ctx: DemoContext, drill_id: str
) -> None:
    [drill] = [d for d in all_drills() if d.id == drill_id]
    result = await drill.run(ctx)
    assert result.naive_failed, result
    assert result.ours_ok, result
    assert result.passed
    assert result.seconds is not None
