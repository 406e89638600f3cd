"""``sheetanchor deadletter list | show | replay | purge`` against real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import asyncpg
from typer.testing import CliRunner

from _ingest_helpers import table_name, tick, tick_stream
from sheetanchor.cli import app
from sheetanchor.config import to_asyncpg_dsn
from sheetanchor.ingest import DeadLetterStore
from sheetanchor.ingest._validate import Validator

runner = CliRunner()


def _sql(pg_url: str, sql: str) -> object:
    async def run() -> object:
        conn = await asyncpg.connect(to_asyncpg_dsn(pg_url))
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(run())


def test_list_show_replay_purge(pg_url: str, tmp_path: Path) -> None:
    table = table_name()
    _sql(
        pg_url,
        f"CREATE TABLE {table} (ts timestamptz, symbol text, price float8 CHECK (price >= 0), "
        "volume bigint, PRIMARY KEY (ts, symbol))",
    )
    stream = tick_stream(table)
    v = Validator(stream)
    store = DeadLetterStore(tmp_path)
    good = store.write(stream.describe(), "failed", [v.validate(tick(i))[0] for i in range(50)])
    mixed = [v.validate(tick(i, price=-1.0 if i == 60 else 1.0))[0] for i in range(50, 70)]
    store.write(stream.describe(), "spilled", mixed)
    base = ["deadletter"]
    d = ["--dir", str(tmp_path)]

    out = runner.invoke(app, [*base, "list", *d, "--json"])
    assert out.exit_code == 0, out.output
    listed = json.loads(out.output)["files"]
    assert [(f["stream"], f["reason"], f["rows"]) for f in listed] == [
        ("ticks", "failed", 50),
        ("ticks", "spilled", 20),
    ]
    out = runner.invoke(app, [*base, "show", good.name, *d, "--json", "--limit", "3"])
    assert out.exit_code == 0, out.output
    shown = json.loads(out.output)
    assert shown["header"]["table"] == table
    assert len(shown["records"]) == 3

    out = runner.invoke(app, [*base, "replay", *d, "--url", pg_url, "--json"])
    assert out.exit_code == 0, out.output
    summary = json.loads(out.output)["summary"]
    assert summary["deleted"] == 2
    assert summary["rows_quarantined"] == 1
    assert _sql(pg_url, f"SELECT count(*) FROM {table}") == 69
    # The poison row moved to a poison file with PostgreSQL's error; replaying again is a no-op.
    poison = store.files(reason="poison")
    assert len(poison) == 1
    assert store.read(poison[0].path).errors[0]["sqlstate"] == "23514"  # type: ignore[index]
    out = runner.invoke(app, [*base, "replay", *d, "--url", pg_url])
    assert out.exit_code == 0, out.output
    assert _sql(pg_url, f"SELECT count(*) FROM {table}") == 69

    out = runner.invoke(app, [*base, "purge", *d, "--reason", "poison", "--yes", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["deleted"] == 1
    assert store.files() == []


def test_bad_reason_is_a_usage_error(tmp_path: Path) -> None:
    out = runner.invoke(app, ["deadletter", "list", "--dir", str(tmp_path), "--reason", "lost"])
    assert out.exit_code == 2
