"""Incident 004: a writer killed mid-ingest loses nothing it acknowledged.

A child process puts records into an authoritative stream and prints each id once ``put``
returned. The test SIGKILLs it mid-run, starts a second process on the same journal (open
recovers, close flushes), then checks every acknowledged id is in PostgreSQL exactly once.
The naive half, without a journal, shows acknowledged records die with the process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest

from sheetanchor.config import to_asyncpg_dsn
from sheetanchor.ingest._journal import Journal

WRITER = Path(__file__).with_name("_journal_crash_writer.py")
ACKS_BEFORE_KILL = 3000

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


async def _sql(url: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(to_asyncpg_dsn(url))
    try:
        return await conn.fetch(sql)
    finally:
        await conn.close()


def _kill_and_drain(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """SIGKILL ``proc``; return what it printed that was not read yet (stdout, stderr).

    Not ``communicate()``: it reads the pipes' file descriptors directly, so lines that the
    ``for line in proc.stdout`` loop had already pulled into the stream's read-ahead buffer
    would be lost, and an acknowledgement (or a commit mark) printed before the kill would
    go unseen.
    """
    assert proc.stdout is not None
    assert proc.stderr is not None
    proc.send_signal(signal.SIGKILL)
    rest = proc.stdout.read()
    errors = proc.stderr.read()
    proc.wait()
    return rest, errors


def _write_and_kill(
    url: str, table: str, workdir: Path, *, journal: bool, batch_rows: int
) -> set[int]:
    """Run the writer until it acknowledged ACKS_BEFORE_KILL ids, SIGKILL it, return the ids."""
    args = [sys.executable, str(WRITER), "write", url, table, str(workdir)]
    args += ["1" if journal else "0", str(batch_rows)]
    acked: set[int] = set()
    with subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), text=True
    ) as proc:
        assert proc.stdout is not None
        assert proc.stderr is not None
        for line in proc.stdout:
            if line.endswith("\n"):
                acked.add(int(line))
            if len(acked) >= ACKS_BEFORE_KILL:
                break
        # Ids printed before the kill are acknowledged too; a cut last line is not counted.
        rest, errors = _kill_and_drain(proc)
        acked.update(int(line) for line in rest.splitlines(keepends=True) if line.endswith("\n"))
        assert proc.returncode == -signal.SIGKILL, f"writer died on its own:\n{errors}"
    return acked


def _recover(url: str, table: str, workdir: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(WRITER), "recover", url, table, str(workdir)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def _create_table(url: str) -> str:
    table = f"acked_{uuid.uuid4().hex[:8]}"
    asyncio.run(
        _sql(url, f"CREATE TABLE {table} (id bigint PRIMARY KEY, ts timestamptz, price float8)")
    )
    return table


def _counts(url: str, table: str) -> dict[int, int]:
    rows = asyncio.run(_sql(url, f"SELECT id, count(*) AS n FROM {table} GROUP BY id"))
    return {r["id"]: r["n"] for r in rows}


def test_sigkill_mid_ingest_loses_no_acknowledged_record(pg_url: str, tmp_path: Path) -> None:
    table = _create_table(pg_url)
    # Small batches: at the kill, some records are written and committed, some in flight,
    # some only buffered. All of them were acknowledged.
    acked = _write_and_kill(pg_url, table, tmp_path, journal=True, batch_rows=100)
    assert len(acked) >= ACKS_BEFORE_KILL

    _recover(pg_url, table, tmp_path)

    counts = _counts(pg_url, table)
    missing = acked - counts.keys()
    assert not missing, f"{len(missing)} acknowledged ids lost, e.g. {sorted(missing)[:10]}"
    assert all(counts[i] == 1 for i in acked)
    # Unacknowledged records may have made it too (written before the kill); never twice.
    assert set(counts.values()) == {1}

    # Recovering again adds nothing: the journal is committed up to what PostgreSQL holds.
    _recover(pg_url, table, tmp_path)
    assert _counts(pg_url, table) == counts


def _left_in_journal(directory: Path) -> int:
    async def count() -> int:
        async with Journal(directory) as journal:
            return len(journal.recover())

    return asyncio.run(count())


def test_recovery_commits_what_it_wrote(pg_url: str, tmp_path: Path) -> None:
    table = _create_table(pg_url)
    _write_and_kill(pg_url, table, tmp_path, journal=True, batch_rows=100_000)
    assert _left_in_journal(tmp_path / "journal") > 0
    _recover(pg_url, table, tmp_path)
    assert _left_in_journal(tmp_path / "journal") == 0


def test_naive_buffer_without_journal_loses_acknowledged_records(
    pg_url: str, tmp_path: Path
) -> None:
    table = _create_table(pg_url)
    # Big batches and a long flush interval: every acknowledged record is still in memory.
    acked = _write_and_kill(pg_url, table, tmp_path, journal=False, batch_rows=100_000)
    counts = _counts(pg_url, table)
    assert len(acked - counts.keys()) == len(acked)  # all of them died with the process


def test_journal_alone_recovers_every_acknowledged_append(tmp_path: Path) -> None:
    """The same crash against the journal alone: acknowledged = ``append`` returned."""
    script = (
        "import asyncio, sys\n"
        "from sheetanchor.ingest._journal import Journal\n"
        "async def main():\n"
        "    journal = Journal(sys.argv[1], group_commit_interval=0.001)\n"
        "    async def producer(p):\n"
        "        i = p\n"
        "        while True:\n"
        "            seq = await journal.append('s', [{'id': i}])\n"
        # Report before committing: a kill between the two must not hide a durable mark.
        "            sys.stdout.write(f'{i} {seq}\\n'); sys.stdout.flush()\n"
        "            if i % 3 == 0:\n"
        "                journal.commit('s', seq)  # pretend the sink wrote up to here\n"
        "            i += 8\n"
        "    await asyncio.gather(*(producer(p) for p in range(8)))\n"
        "asyncio.run(main())\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
        text=True,
    ) as proc:
        assert proc.stdout is not None
        acked: dict[int, int] = {}
        for line in proc.stdout:
            if line.endswith("\n"):
                i, seq = map(int, line.split())
                acked[seq] = i
            if len(acked) >= ACKS_BEFORE_KILL:
                break
        rest, errors = _kill_and_drain(proc)
        for line in rest.splitlines(keepends=True):
            if line.endswith("\n"):
                i, seq = map(int, line.split())
                acked[seq] = i
        assert proc.returncode == -signal.SIGKILL, errors

    async def check() -> None:
        async with Journal(tmp_path) as journal:
            recovered = [r["id"] for _, r in journal.recover()]
            assert len(recovered) == len(set(recovered))
            # Commits are high-water marks: everything after the last durable one comes back.
            # Acknowledged records above every commit mark must all be there.
            marks = max((s for s, i in acked.items() if i % 3 == 0), default=0)
            must = {i for s, i in acked.items() if s > marks}
            assert must <= set(recovered)
            assert journal.last_seq >= max(acked)

    asyncio.run(check())


_DISK_FULL_SCRIPT = """
import asyncio, resource, signal, sys
from sheetanchor.errors import JournalError
from sheetanchor.ingest._journal import Journal

async def main():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
    journal = Journal(sys.argv[1], group_commit_interval=0)
    acked = 0
    try:
        while True:
            await journal.append("s", [{"i": acked, "pad": "x" * 50}])
            acked += 1
    except JournalError as exc:
        print("first", type(exc).__name__, exc, file=sys.stderr)
    try:
        await journal.append("s", [{"i": -1}])
    except JournalError as exc:
        print("then", type(exc).__name__, exc, file=sys.stderr)
    await journal.close()
    print(acked)

asyncio.run(main())
"""


def test_a_failed_write_is_routed_and_nothing_acknowledged_is_lost(tmp_path: Path) -> None:
    """A real write failure (file size limit, EFBIG) fails the append, never silently."""
    result = subprocess.run(
        [sys.executable, "-c", _DISK_FULL_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    acked = int(result.stdout)
    assert acked > 10
    assert "first JournalError" in result.stderr
    assert "could not write" in result.stderr
    assert "then JournalError" in result.stderr
    assert "failed earlier" in result.stderr

    async def check() -> None:
        async with Journal(tmp_path) as journal:
            recovered = [r["i"] for _, r in journal.recover()]
            assert recovered[:acked] == list(range(acked))  # every acknowledged record
            assert len(recovered) <= acked + 1  # at most the one whose write failed

    asyncio.run(check())
