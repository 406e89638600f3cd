"""Incident 000 drill: the naive half must fail, ours must survive."""

from __future__ import annotations

from pathlib import Path

from sheetanchor.demo._runner import DemoServers, run_drills
from sheetanchor.demo.drills.d000_cache import CacheDrill


async def test_drill_000_naive_fails_and_sheetanchor_survives(
    sheetanchor_pg_server_url: str, sheetanchor_redis_server_url: str, tmp_path: Path
) -> None:
    servers = DemoServers(sheetanchor_pg_server_url, sheetanchor_redis_server_url, "test")
    (result,) = await run_drills([CacheDrill()], servers, tmp_path)
    assert result.naive_failed, result.naive
    assert result.ours_ok, (result.ours, result.details)
    assert result.details["naive_attach_count"] > 1
    assert result.details["ours_attach_count"] == 1
    assert result.details["naive_read_after_race"] == "v1"
    assert result.details["ours_read_after_race"] == "v2"
    assert result.details["naive_failed_reads"] > 0
    assert result.passed
