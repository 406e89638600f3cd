"""Incident 001: start-up before the database. The naive half must fail, ours must survive."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from sheetanchor.config import parse_url
from sheetanchor.demo._runner import DemoServers, run_drills
from sheetanchor.demo.drills.d001_startup import StartupDrill, _create_tables
from sheetanchor.testing import FaultProxy


async def test_naive_create_tables_crashes_when_database_is_not_up(pg_url: str) -> None:
    parsed = parse_url(pg_url)
    with FaultProxy(parsed.host or "127.0.0.1", parsed.port or 5432) as proxy:
        proxy.refuse()
        with pytest.raises((OSError, sa.exc.SQLAlchemyError)) as info:
            await _create_tables(proxy.url(pg_url))
    # It failed because the database was unreachable, not for some other reason.
    chain: list[BaseException] = []
    exc: BaseException | None = info.value
    while exc is not None and len(chain) < 10:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    assert any(isinstance(e, ConnectionRefusedError) for e in chain), chain


async def test_drill_001_naive_fails_and_sheetanchor_waits_then_creates_schema(
    sheetanchor_pg_server_url: str, sheetanchor_redis_server_url: str, tmp_path: Path
) -> None:
    servers = DemoServers(sheetanchor_pg_server_url, sheetanchor_redis_server_url, "test")
    (result,) = await run_drills([StartupDrill(outage=0.8)], servers, tmp_path)
    assert result.naive_failed, result.naive
    assert result.ours_ok, result.ours
    assert result.details["failed_attempts"] >= 1
    assert result.passed
