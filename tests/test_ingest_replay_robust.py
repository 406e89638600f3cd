"""One malformed dead-letter file never stops replay: the background replayer, the
``replay_files`` API and the CLI move it aside to ``<name>.bad`` and replay the rest."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from _ingest_helpers import create_tick_table, table_name, tick, tick_stream
from sheetanchor.cli import app
from sheetanchor.ingest import DeadLetterStore, Stream, WriteBuffer, replay_files
from sheetanchor.ingest._validate import Validator
from sheetanchor.postgres import Database, PoolSettings

runner = CliRunner()


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[Database]:
    database = Database(pg_url, pool=PoolSettings(size=4, max_overflow=0), name="replay_robust")
    yield database
    await database.close()


def _files(store: DeadLetterStore, stream: Stream, rows: int) -> tuple[Path, Path, Path]:
    """A bad-header file and a bad-record file (listed first), then a good failed file."""
    v = Validator(stream)
    good = store.write(stream.describe(), "failed", [v.validate(tick(i))[0] for i in range(rows)])
    folder = good.parent
    bad_header = folder / "00000000T000000000000Z-1000001.ndjson"
    bad_header.write_bytes(b"this is not json\n")
    header = good.read_bytes().split(b"\n", 1)[0]
    bad_record = folder / "00000000T000000000001Z-1000002.ndjson"
    bad_record.write_bytes(header + b'\n{"record": {"ts": \n')
    store.rescan()
    return bad_header, bad_record, good


async def test_background_replayer_survives_malformed_files(db: Database, tmp_path: Path) -> None:
    table = table_name()
    await create_tick_table(db, table)
    stream = tick_stream(table)
    store = DeadLetterStore(tmp_path / "dl")
    bad_header, bad_record, good = _files(store, stream, 30)
    async with WriteBuffer(db, [stream], deadletter=store, replay_interval=0.05) as buffer:
        async with asyncio.timeout(30):
            while good.exists():
                await asyncio.sleep(0.05)
        assert buffer._replayer is not None
        assert not buffer._replayer.done()  # still alive for the next dead letters
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 30
    for bad in (bad_header, bad_record):
        assert not bad.exists()
        assert bad.with_name(bad.name + ".bad").exists()
    assert store.files() == []


async def test_replay_files_sets_aside_and_continues(db: Database, tmp_path: Path) -> None:
    table = table_name()
    await create_tick_table(db, table)
    stream = tick_stream(table)
    store = DeadLetterStore(tmp_path / "dl")
    bad_header, bad_record, good = _files(store, stream, 10)
    results = await replay_files(db, store)
    assert [r.deleted for r in results] == [False, False, True]
    assert all(r.error is not None and r.error.startswith("malformed") for r in results[:2])
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 10
    assert store.total_bytes == 0
    assert not good.exists()
    for bad in (bad_header, bad_record):
        assert bad.with_name(bad.name + ".bad").exists()


def test_cli_list_and_replay_with_a_malformed_file(pg_url: str, tmp_path: Path) -> None:
    table = table_name()

    async def create() -> None:
        database = Database(pg_url, name="replay_robust_cli")
        try:
            await create_tick_table(database, table)
        finally:
            await database.close()

    asyncio.run(create())
    stream = tick_stream(table)
    store = DeadLetterStore(tmp_path)
    bad_header, _bad_record, good = _files(store, stream, 5)
    d = ["--dir", str(tmp_path)]

    out = runner.invoke(app, ["deadletter", "list", *d, "--json"])
    assert out.exit_code == 0, out.output
    listed = json.loads(out.stdout)["files"]
    assert len(listed) == 3
    assert "unreadable header" in listed[0]["error"]
    out = runner.invoke(app, ["deadletter", "list", *d])
    assert out.exit_code == 0, out.output

    out = runner.invoke(app, ["deadletter", "replay", *d, "--url", pg_url, "--json"])
    assert out.exit_code == 1, out.output  # the malformed files are reported
    summary = json.loads(out.stdout)["summary"]
    assert summary["deleted"] == 1
    assert summary["rows_written"] == 5
    assert len(summary["errors"]) == 2
    assert not good.exists()
    assert bad_header.with_name(bad_header.name + ".bad").exists()


async def test_two_concurrent_replays_quarantine_poison_once(db: Database, tmp_path: Path) -> None:
    table = table_name()
    await create_tick_table(db, table)
    stream = tick_stream(table)
    v = Validator(stream)
    store = DeadLetterStore(tmp_path / "dl")
    rows = [v.validate(tick(i, price=-1.0 if i == 7 else 1.0))[0] for i in range(40)]
    store.write(stream.describe(), "spilled", rows)
    other = DeadLetterStore(tmp_path / "dl")  # e.g. the CLI next to the buffer's replayer
    first, second = await asyncio.gather(replay_files(db, store), replay_files(db, other))
    assert sorted(r.deleted for r in [*first, *second]) == [False, True]
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 39
    poison = store.files("ticks", "poison")
    assert len(poison) == 1
    assert len(store.read(poison[0].path).rows) == 1
    assert store.files("ticks", "spilled") == []


class _ListingFailsOnce(DeadLetterStore):
    """A real store whose next listing fails once ``failed`` is reset (a brief disk error)."""

    failed = True

    def files(self, stream: str | None = None, reason: str | None = None) -> list[Any]:
        if not self.failed:
            self.failed = True
            raise OSError("directory briefly unreadable")
        return super().files(stream, reason)


async def test_a_failed_replay_pass_is_logged_and_the_loop_goes_on(
    db: Database, tmp_path: Path
) -> None:
    table = table_name()
    await create_tick_table(db, table)
    stream = tick_stream(table)
    v = Validator(stream)
    store = _ListingFailsOnce(tmp_path / "dl")
    async with WriteBuffer(db, [stream], deadletter=store, replay_interval=0.05) as buffer:
        good = store.write(stream.describe(), "failed", [v.validate(tick(i))[0] for i in range(5)])
        store.failed = False
        async with asyncio.timeout(30):
            while good.exists():
                await asyncio.sleep(0.05)
        assert store.failed
        assert buffer._replayer is not None
        assert not buffer._replayer.done()
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 5
