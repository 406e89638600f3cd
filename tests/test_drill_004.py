"""Incident 004 drill, small: the naive list grows and sticks, WriteBuffer lands every row once."""

from __future__ import annotations

from pathlib import Path

import pytest

from sheetanchor.demo._runner import DemoServers, run_drills
from sheetanchor.demo.drills.d004_ingest import IngestDrill


@pytest.mark.faults
async def test_drill_004_naive_grows_and_ours_lands_every_row_once(
    sheetanchor_pg_server_url: str, sheetanchor_redis_server_url: str, tmp_path: Path
) -> None:
    servers = DemoServers(sheetanchor_pg_server_url, sheetanchor_redis_server_url, "test")
    drill = IngestDrill(ticks=30_000, rate=30_000.0, outage=0.6)
    (result,) = await run_drills([drill], servers, tmp_path)
    assert result.naive_failed, result.naive
    assert result.ours_ok, (result.ours, result.details)
    assert result.details["ours_rows"] == result.details["good_rows"]
    assert result.details["ours_peak_rows"] <= 20_000
    assert result.details["naive_peak_rows"] > 0
    assert (tmp_path / "d004_ingest.html").read_text().count("<svg") == 2
