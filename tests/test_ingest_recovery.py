"""Journal recovery against a real server through a fault proxy: commits cover only what
was stored, and a failed open() leaves the journal able to recover everything again."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from _ingest_helpers import create_tick_table, fast_retry, table_name, tick, tick_stream
from sheetanchor.config import parse_url
from sheetanchor.errors import BufferFull, DeadLetterFull, ResourceClosed
from sheetanchor.ingest import DeadLetterStore, WriteBuffer
from sheetanchor.ingest._journal import Journal
from sheetanchor.postgres import Database, PoolSettings
from sheetanchor.testing import FaultProxy

pytestmark = pytest.mark.faults


def _db(url: str) -> Database:
    return Database(
        url, pool=PoolSettings(size=3, max_overflow=0, timeout=2.0), connect_timeout=1.0
    )


class _DownAfterFirstCommit(Journal):
    """A real journal; the database goes away right after the first commit mark."""

    proxy: FaultProxy | None = None
    commits: list[tuple[str, int]]

    def commit(self, stream: str, upto_seq: int) -> None:
        super().commit(stream, upto_seq)
        self.commits.append((stream, upto_seq))
        if self.proxy is not None:
            self.proxy.refuse()
            self.proxy.reset_all()
            self.proxy = None


async def test_recovery_backlog_larger_than_the_buffer_commits_only_what_was_stored(
    pg_url: str, fault_proxy: Callable[[str, int], FaultProxy], tmp_path: Path
) -> None:
    parsed = parse_url(pg_url)
    assert parsed.host is not None
    proxy = fault_proxy(parsed.host, parsed.port or 5432)
    direct = _db(pg_url)
    db = _db(proxy.url(pg_url))
    try:
        table = table_name()
        await create_tick_table(direct, table)
        backlog = 50
        # A producer journaled 50 records and crashed before any reached PostgreSQL.
        journal = Journal(tmp_path / "j")
        await journal.append("ticks", [tick(i) for i in range(backlog)])
        await journal.close()

        # Recovery into a buffer of 20 rows: the first batch lands, then the database goes
        # down and the dead-letter store is full, so open() cannot finish (a second crash).
        # One batch written at a time (max_concurrency=1): with more, the next swaps could
        # commit before the first one's mark takes the database away, and recovery finish.
        hooked = _DownAfterFirstCommit(tmp_path / "j")
        hooked.commits = []
        hooked.proxy = proxy
        stream = tick_stream(
            table, max_rows=20, batch_rows=10, flush_interval=0.02, put_timeout=0.5
        )
        buffer = WriteBuffer(
            db,
            [stream],
            deadletter=DeadLetterStore(tmp_path / "full", max_bytes=1),
            journal=hooked,
            retry=fast_retry(),
            replay_interval=None,
            close_timeout=5.0,
            max_concurrency=1,
        )
        with pytest.raises(BufferFull):
            await buffer.open()
        landed = await direct.fetchval(f"SELECT count(*) FROM {table}")
        assert 0 < landed < backlog
        # Every commit covered records already in PostgreSQL, never records still waiting.
        assert hooked.commits
        assert all(upto <= landed for _, upto in hooked.commits)
        # The failed open() stopped its tasks and closed the journal; close() has nothing
        # left to do (the unsaved rows are still in the journal, not lost).
        assert hooked.closed
        await buffer.close()

        # Reopen with the database up: every record lands exactly once.
        proxy.pass_through()
        async with WriteBuffer(
            direct,
            [stream],
            deadletter_dir=tmp_path / "dl",
            journal_dir=tmp_path / "j",
            replay_interval=None,
        ):
            pass
        assert await direct.fetchval(f"SELECT count(*) FROM {table}") == backlog
        assert await direct.fetchval(f"SELECT count(DISTINCT (ts, symbol)) FROM {table}") == backlog
        reopened = Journal(tmp_path / "j")
        try:
            assert reopened.recover() == []
        finally:
            await reopened.close()
    finally:
        await db.close()
        await direct.close()


class _SlowRecovery(Journal):
    """A real journal whose recovery read stalls (a slow disk) until released, and whose
    database goes away right after a commit mark passes the recovered backlog."""

    backlog = 0
    proxy: FaultProxy | None = None
    commits: list[int]
    reading: threading.Event
    release: threading.Event

    def iter_recover_seq(self) -> Iterator[tuple[int, str, dict[str, Any]]]:
        self.reading.set()
        # Stalls until the hook below releases it, or at most 2 s.
        self.release.wait(timeout=2.0)
        yield from super().iter_recover_seq()

    def commit(self, stream: str, upto_seq: int) -> None:
        super().commit(stream, upto_seq)
        self.commits.append(upto_seq)
        if upto_seq > self.backlog and self.proxy is not None:
            # The mark covers a record put after the backlog: from here on nothing more
            # reaches PostgreSQL or the (full) dead letters, the second crash.
            self.proxy.refuse()
            self.proxy.reset_all()
            self.proxy = None
            self.release.set()


async def test_put_during_recovery_never_commits_records_not_yet_requeued(
    pg_url: str, fault_proxy: Callable[[str, int], FaultProxy], tmp_path: Path
) -> None:
    parsed = parse_url(pg_url)
    assert parsed.host is not None
    proxy = fault_proxy(parsed.host, parsed.port or 5432)
    direct = _db(pg_url)
    db = _db(proxy.url(pg_url))
    try:
        table = table_name()
        await create_tick_table(direct, table)
        backlog = 50
        # A producer journaled 50 records and crashed before any reached PostgreSQL.
        journal = Journal(tmp_path / "j")
        await journal.append("ticks", [tick(i) for i in range(backlog)])
        await journal.close()

        hooked = _SlowRecovery(tmp_path / "j")
        hooked.backlog = backlog
        hooked.proxy = proxy
        hooked.commits = []
        hooked.reading = threading.Event()
        hooked.release = threading.Event()
        stream = tick_stream(table, batch_rows=10, flush_interval=0.02, put_timeout=10.0)
        buffer = WriteBuffer(
            db,
            [stream],
            deadletter=DeadLetterStore(tmp_path / "full", max_bytes=1),
            journal=hooked,
            retry=fast_retry(),
            replay_interval=None,
            close_timeout=1.0,
        )
        opening = asyncio.create_task(buffer.open())
        assert await asyncio.to_thread(hooked.reading.wait, 5.0)
        # A producer puts while open() is still reading the backlog back.
        await buffer.put("ticks", tick(backlog))
        await opening
        await buffer.flush()
        # The database went away after the put's record was committed; what was not
        # written stays unsaved (the dead-letter store is full), as in a crash.
        with contextlib.suppress(DeadLetterFull):
            await buffer.close()
        assert hooked.commits

        # Reopen with the database up: every record, recovered or put, is there exactly once.
        proxy.pass_through()
        async with WriteBuffer(
            direct,
            [stream],
            deadletter_dir=tmp_path / "dl",
            journal_dir=tmp_path / "j",
            replay_interval=None,
        ):
            pass
        total = backlog + 1
        assert await direct.fetchval(f"SELECT count(*) FROM {table}") == total
        assert await direct.fetchval(f"SELECT count(DISTINCT (ts, symbol)) FROM {table}") == total
    finally:
        await db.close()
        await direct.close()


class _Watched(Journal):
    """A real journal that tells when open() starts reading it back."""

    reading: threading.Event

    def iter_recover_seq(self) -> Iterator[tuple[int, str, dict[str, Any]]]:
        self.reading.set()
        yield from super().iter_recover_seq()


async def test_put_waiting_for_recovery_is_refused_when_open_fails(
    pg_url: str, tmp_path: Path
) -> None:
    db = _db(pg_url)
    try:
        table = table_name()
        await create_tick_table(db, table)
        # The journal holds a record that no longer validates, and the dead-letter store
        # cannot take it: open() fails (after its dead-letter attempts, about 3 s).
        journal = Journal(tmp_path / "j")
        await journal.append("ticks", [{**tick(0), "price": "not a number"}])
        await journal.close()
        watched = _Watched(tmp_path / "j")
        watched.reading = threading.Event()
        stream = tick_stream(table, put_timeout=30.0)
        buffer = WriteBuffer(
            db,
            [stream],
            deadletter=DeadLetterStore(tmp_path / "full", max_bytes=1),
            journal=watched,
            replay_interval=None,
        )
        opening = asyncio.create_task(buffer.open())
        assert await asyncio.to_thread(watched.reading.wait, 5.0)
        put = asyncio.create_task(buffer.put("ticks", tick(1)))
        with pytest.raises(DeadLetterFull):
            await opening
        # The put waited for recovery and is told the buffer never opened: not accepted.
        with pytest.raises(ResourceClosed, match="failed to open"):
            await put
        await buffer.close()
        assert await db.fetchval(f"SELECT count(*) FROM {table}") == 0
        reopened = Journal(tmp_path / "j")
        try:
            assert len(reopened.recover()) == 1  # still there for the next open()
        finally:
            await reopened.close()
    finally:
        await db.close()
