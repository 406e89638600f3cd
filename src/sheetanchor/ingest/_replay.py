"""Replaying dead letters into PostgreSQL: idempotent, and a file is deleted only after commit.

Used by the write buffer's background recovery and by ``sheetanchor deadletter replay``.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, NamedTuple

from prometheus_client import Counter

from sheetanchor.errors import DeadLetterFull
from sheetanchor.ingest._bisect import BisectAborted, bisect_write
from sheetanchor.ingest._classify import error_info, is_data_error
from sheetanchor.ingest._retry import DEFAULT_INGEST_POLICY, RetryLike
from sheetanchor.ingest._sink import ConnectionSource, CopySink, SinkOutcome
from sheetanchor.ingest.deadletter import DeadLetterStore, MalformedDeadLetter
from sheetanchor.observe import REGISTRY, get_logger, metric_name

__all__ = [
    "REPLAY_ERRORS",
    "FileReplay",
    "replay_file",
    "replay_file_guarded",
    "replay_files",
    "stops_replay",
]

_log = get_logger("ingest.replay")
REPLAY_ERRORS = Counter(
    metric_name("ingest", "replay_errors", "total"),
    "Dead-letter replays that failed unexpectedly (a file, or a whole background pass).",
    registry=REGISTRY,
)
Row = tuple[Any, ...]


class FileReplay(NamedTuple):
    """What replaying one file did.

    Attributes:
        path: the file.
        rows: rows in the file.
        written: rows committed now (new or already present).
        skipped_batch: True when the batch ledger showed the batch had already committed.
        quarantined: rows PostgreSQL still refused (kept or re-quarantined as poison).
        deleted: the file was removed (all its rows are in the table or re-quarantined).
        error: why the file stays, when it does.
    """

    path: Path
    rows: int
    written: int
    skipped_batch: bool
    quarantined: int
    deleted: bool
    error: str | None


CLAIMED: Final = "claimed by another replay"


def _claim(path: Path) -> int | None:
    """Lock ``path`` for this replay (``flock``, released on close or process death).

    Returns the locked descriptor, or None when another replay holds the file or it is gone
    (replayed and deleted meanwhile: the inode behind ``path`` changed or vanished).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except (BlockingIOError, FileNotFoundError):
        same = False
    except BaseException:
        os.close(fd)
        raise
    if not same:
        os.close(fd)
        return None
    return fd


async def replay_file(
    db: ConnectionSource,
    store: DeadLetterStore,
    path: Path,
    *,
    retry: RetryLike | None = None,
    write_timeout: float = 60.0,
) -> FileReplay:
    """Replay one dead-letter file; never raises for database trouble (see ``error``).

    Rows that PostgreSQL still refuses for data reasons are isolated by bisection; from a
    ``failed``/``spilled`` file they move to a new ``poison`` file, a ``poison`` file keeps
    them (the original is rewritten only if some rows now went in). The file is claimed
    (locked) first: a concurrent replay of the same file, in this process or another, skips
    it (``error`` = ``"claimed by another replay"``) instead of quarantining its rows twice.
    """
    fd = await asyncio.to_thread(_claim, path)
    if fd is None:
        _log.info("replay of %s skipped: %s", path, CLAIMED)
        return FileReplay(path, 0, 0, False, 0, False, CLAIMED)
    try:
        return await _replay_claimed(db, store, path, retry=retry, write_timeout=write_timeout)
    finally:
        os.close(fd)


async def _replay_claimed(
    db: ConnectionSource,
    store: DeadLetterStore,
    path: Path,
    *,
    retry: RetryLike | None,
    write_timeout: float,
) -> FileReplay:
    policy: RetryLike = retry if retry is not None else DEFAULT_INGEST_POLICY
    try:
        header = await asyncio.to_thread(store.read_header, path)
        sink = CopySink(header)
        batch_id = header.get("batch_id")
        nrows = int(header.get("rows", 0))
    except (ValueError, KeyError, TypeError) as exc:
        raise MalformedDeadLetter(f"bad header: {type(exc).__name__}: {exc}") from exc

    async def attempt(rows: Sequence[Row], bid: str | None) -> SinkOutcome:
        async with asyncio.timeout(write_timeout), db.connection() as conn:
            return await sink.write(conn, rows, batch_id=bid)

    async def probe(bid: str) -> bool:
        async with asyncio.timeout(write_timeout), db.connection() as conn:
            return await sink.committed(conn, bid)

    try:
        if batch_id and await policy.call(probe, batch_id):
            # The batch committed after all (its COMMIT acknowledgement was lost).
            await asyncio.to_thread(store.delete, path)
            return FileReplay(path, nrows, nrows, True, 0, True, None)
        try:
            batch = await asyncio.to_thread(store.read, path)
        except (ValueError, KeyError, TypeError) as exc:
            raise MalformedDeadLetter(f"bad record line: {type(exc).__name__}: {exc}") from exc
        try:
            await policy.call(attempt, batch.rows, batch_id)
            await asyncio.to_thread(store.delete, path)
            return FileReplay(path, len(batch.rows), len(batch.rows), False, 0, True, None)
        except Exception as exc:
            if not is_data_error(exc):
                raise
            first = exc

        async def write_segment(seg: Sequence[Row]) -> SinkOutcome:
            return await policy.call(attempt, seg, None)

        result = await bisect_write(batch.rows, write_segment, is_data_error, first_error=first)
    except MalformedDeadLetter:
        raise
    except BisectAborted as exc:
        cause = exc.__cause__ or exc
        return FileReplay(path, nrows, 0, False, 0, False, f"{type(cause).__name__}: {cause}")
    except Exception as exc:  # noqa: BLE001  reported in FileReplay.error; the file stays
        # Database down or refusing for a non-data reason: the file stays for a later try.
        _log.info("replay of %s postponed: %s: %s", path, type(exc).__name__, exc)
        return FileReplay(path, nrows, 0, False, 0, False, f"{type(exc).__name__}: {exc}")
    bad_rows = [row for row, _ in result.poison]
    errors = [error_info(err) for _, err in result.poison]
    reason = str(header.get("reason"))
    if reason == "poison" and result.written == 0:
        return FileReplay(path, nrows, 0, False, len(bad_rows), False, "rows still refused")
    describe = {k: header[k] for k in ("stream", "schema", "table", "columns", "natural_key")}
    describe["nullable"] = header.get("nullable", [])
    if bad_rows:
        try:
            await asyncio.to_thread(store.write, describe, "poison", bad_rows, errors=errors)
        except (DeadLetterFull, OSError) as exc:
            # The good rows are in the table; the file stays (a later replay skips them as
            # duplicates) until its poison rows can be quarantined.
            _log.error(
                "replay of %s: cannot quarantine %d poison row(s): %s", path, len(bad_rows), exc
            )
            return FileReplay(
                path,
                nrows,
                result.written,
                False,
                len(bad_rows),
                False,
                f"poison rows not quarantined: {type(exc).__name__}: {exc}",
            )
    await asyncio.to_thread(store.delete, path)
    return FileReplay(path, nrows, result.written, False, len(bad_rows), True, None)


async def replay_file_guarded(
    db: ConnectionSource,
    store: DeadLetterStore,
    path: Path,
    *,
    retry: RetryLike | None = None,
    write_timeout: float = 60.0,
) -> FileReplay:
    """``replay_file`` that never raises for one bad file (only for cancellation).

    A malformed file is moved aside to ``<name>.bad`` (logged and counted); any other
    unexpected error is logged, counted in ``REPLAY_ERRORS`` and reported in ``error``
    (the file stays for a later try).
    """
    try:
        return await replay_file(db, store, path, retry=retry, write_timeout=write_timeout)
    except MalformedDeadLetter as exc:
        REPLAY_ERRORS.inc()
        try:
            bad = await asyncio.to_thread(store.set_aside, path, str(exc))
        except FileNotFoundError:
            return FileReplay(path, 0, 0, False, 0, False, "file vanished (replayed elsewhere)")
        return FileReplay(path, 0, 0, False, 0, False, f"malformed, moved to {bad.name}: {exc}")
    except FileNotFoundError:
        # Another replayer (or a purge) took the file meanwhile.
        return FileReplay(path, 0, 0, False, 0, False, "file vanished (replayed elsewhere)")
    except Exception as exc:  # noqa: BLE001  logged, counted, reported in FileReplay.error
        REPLAY_ERRORS.inc()
        _log.exception("replay of %s failed: %s: %s", path, type(exc).__name__, exc)
        return FileReplay(path, 0, 0, False, 0, False, f"unexpected: {type(exc).__name__}: {exc}")


def stops_replay(result: FileReplay) -> bool:
    """True when the result means the database is not taking rows (stop the pass)."""
    return (
        result.error is not None
        and not result.deleted
        and result.error != "rows still refused"
        and not result.error.startswith(
            ("malformed", "file vanished", "poison rows not", "unexpected", CLAIMED)
        )
    )


async def replay_files(
    db: ConnectionSource,
    store: DeadLetterStore,
    *,
    streams: Sequence[str] | None = None,
    reasons: Sequence[str] = ("failed", "spilled"),
    retry: RetryLike | None = None,
    on_file: Callable[[FileReplay], None] | None = None,
    stop_on_error: bool = True,
) -> list[FileReplay]:
    """Replay every matching file, oldest first; stop at the first database error."""
    done: list[FileReplay] = []
    for f in store.files():
        if f.reason not in reasons or (streams is not None and f.stream not in streams):
            continue
        result = await replay_file_guarded(db, store, f.path, retry=retry)
        done.append(result)
        if on_file is not None:
            on_file(result)
        if stop_on_error and stops_replay(result):
            break
    return done
