"""Issue 5, item 5: ``sheetanchor deadletter replay`` shows a progress bar and writes once.

Without ``--json`` the replay draws a progress bar over the bytes of the files it replays
(rich; in a non-terminal such as this runner it prints the finished bar once). The records
land exactly once even when two dead-letter files hold the same rows and some were in the
table already, and a second replay changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import asyncpg
from typer.testing import CliRunner

from _ingest_helpers import table_name, tick, tick_stream
from sheetanchor.cli import app
from sheetanchor.config import to_asyncpg_dsn
from sheetanchor.ingest import DeadLetterStore
from sheetanchor.ingest._validate import Validator

runner = CliRunner()
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # in case the environment forces colours


def _sql(pg_url: str, sql: str, records: list[tuple[object, ...]] | None = None) -> object:
    """Run ``sql`` (a query: its value), or COPY ``records`` into the table named ``sql``."""

    async def go() -> object:
        conn = await asyncpg.connect(to_asyncpg_dsn(pg_url))
        try:
            if records is not None:
                return await conn.copy_records_to_table(sql, records=records)
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(go())


def _create(pg_url: str, table: str) -> None:
    _sql(
        pg_url,
        f"CREATE TABLE {table} (ts timestamptz NOT NULL, symbol text NOT NULL, "
        "price float8 NOT NULL, volume bigint NOT NULL, PRIMARY KEY (ts, symbol))",
    )


def test_replay_shows_progress_and_writes_each_record_once(pg_url: str, tmp_path: Path) -> None:
    table = table_name("cliprog")
    _create(pg_url, table)
    stream = tick_stream(table)
    v = Validator(stream)
    store = DeadLetterStore(tmp_path)
    rows = [v.validate(tick(i))[0] for i in range(300)]
    # Three files: the second repeats half of the first, and 50 rows are in the table already.
    store.write(stream.describe(), "failed", rows[:200])
    store.write(stream.describe(), "spilled", rows[100:250])
    store.write(stream.describe(), "failed", rows[250:])
    _sql(pg_url, table, records=list(rows[:50]))
    total = sum(f.size for f in store.files())
    assert total > 0

    out = runner.invoke(app, ["deadletter", "replay", "--dir", str(tmp_path), "--url", pg_url])
    assert out.exit_code == 0, out.output
    text = _ANSI.sub("", out.output)
    bar = [line for line in text.splitlines() if line.startswith("replaying")]
    assert bar, text
    # The finished bar: every byte of the three files counted, the bar drawn in full.
    assert f"{total}/{total}" in bar[-1], text
    assert "━" in bar[-1], text
    assert "replayed 3/3 file(s)" in text
    assert store.files() == []
    assert _sql(pg_url, f"SELECT count(*) FROM {table}") == 300
    assert _sql(pg_url, f"SELECT count(*) FROM (SELECT DISTINCT ts, symbol FROM {table}) d") == 300

    # Replaying again (nothing left) is a no-op; the bar still shows, with nothing to do.
    out = runner.invoke(app, ["deadletter", "replay", "--dir", str(tmp_path), "--url", pg_url])
    assert out.exit_code == 0, out.output
    assert "replayed 0/0 file(s)" in out.output
    assert _sql(pg_url, f"SELECT count(*) FROM {table}") == 300


def test_replay_with_json_draws_no_bar(pg_url: str, tmp_path: Path) -> None:
    table = table_name("clijson")
    _create(pg_url, table)
    stream = tick_stream(table)
    v = Validator(stream)
    DeadLetterStore(tmp_path).write(
        stream.describe(), "failed", [v.validate(tick(i))[0] for i in range(10)]
    )
    out = runner.invoke(
        app, ["deadletter", "replay", "--dir", str(tmp_path), "--url", pg_url, "--json"]
    )
    assert out.exit_code == 0, out.output
    assert "replaying" not in out.output  # the JSON stays parseable: no bar mixed into it
    assert json.loads(out.output)["summary"]["rows_written"] == 10
    assert _sql(pg_url, f"SELECT count(*) FROM {table}") == 10
