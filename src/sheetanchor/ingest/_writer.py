"""The write path of a buffer: one batch from swap to commit, bisection or dead letters.

Every outcome of a batch is routed here and nowhere else: committed (counted written or
duplicate), bisected (good rows committed, poison quarantined with PostgreSQL's error), or
dead-lettered after the retry budget. Rows never go back into the buffer.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from sheetanchor.errors import DeadLetterFull
from sheetanchor.ingest._bisect import BisectAborted, BisectResult, bisect_write
from sheetanchor.ingest._classify import error_info, is_data_error
from sheetanchor.ingest._journal_seam import JournalLike
from sheetanchor.ingest._metrics import FLUSH_SECONDS
from sheetanchor.ingest._retry import RetryLike
from sheetanchor.ingest._sink import ConnectionSource, SinkOutcome
from sheetanchor.ingest._state import StreamState
from sheetanchor.ingest._validate import Row
from sheetanchor.ingest.deadletter import DeadLetterStore
from sheetanchor.observe import get_logger

__all__ = ["BatchWriter", "maybe_await"]

_log = get_logger("ingest")
T = TypeVar("T")


async def maybe_await(value: Awaitable[T] | T) -> T:
    """Await ``value`` if it is awaitable (journal methods may be sync or async)."""
    if inspect.isawaitable(value):
        return await value
    return value


class BatchWriter:
    """Writes swapped-out batches of a buffer's streams; shared by all its streams."""

    def __init__(
        self,
        db: ConnectionSource,
        store: DeadLetterStore,
        retry: RetryLike,
        write_timeout: float,
    ) -> None:
        self._db = db
        self._store = store
        self._retry = retry
        self._write_timeout = write_timeout
        self._global_sem: asyncio.Semaphore | None = None
        self._journal: JournalLike | None = None
        self.closing = False
        self.unsaved = 0

    def start(self, global_sem: asyncio.Semaphore, journal: JournalLike | None) -> None:
        """Bind the loop-owned parts (called by ``WriteBuffer.open``)."""
        self._global_sem = global_sem
        self._journal = journal

    async def write_batch(
        self, st: StreamState, rows: list[Row], nbytes: int, entry: list[int]
    ) -> None:
        assert self._global_sem is not None
        released_rows = 0
        released_bytes = 0
        unsaved_before = self.unsaved
        try:
            async with self._global_sem:
                healthy = True
                for start in range(0, len(rows), st.batch_rows):
                    chunk = rows[start : start + st.batch_rows]
                    healthy = await self.write_chunk(st, chunk, give_up=not healthy)
                    chunk_bytes = nbytes * (start + len(chunk)) // len(rows) - released_bytes
                    st.inflight_rows -= len(chunk)
                    st.inflight_bytes -= chunk_bytes
                    released_rows += len(chunk)
                    released_bytes += chunk_bytes
                    st.room.set()
            if self.unsaved == unsaved_before:
                # Only rows that are in PostgreSQL or in a dead-letter file may leave the
                # journal; rows saved nowhere stay in it and are recovered at the next open.
                entry[1] = 1
            await self.journal_done(st)
        except asyncio.CancelledError:
            # close() ran out of time: what is not written goes to disk, never lost silently.
            rest = rows[released_rows:]
            if rest:
                self.dead_letter_now(st, "failed", rest)
            raise
        finally:
            st.inflight_rows -= len(rows) - released_rows
            st.inflight_bytes -= nbytes - released_bytes
            st.sem.release()
            st.room.set()
            st.publish()

    async def journal_done(self, st: StreamState) -> None:
        # Commit the journal only up to the oldest batch still in flight: a later batch that
        # finished first must not truncate records of an earlier one that may still fail.
        if self._journal is None:
            st.commits.clear()
            return
        upto = 0
        while st.commits and st.commits[0][1]:
            upto = max(upto, st.commits.popleft()[0])
        if upto:
            await maybe_await(self._journal.commit(st.name, upto))

    async def attempt(
        self, st: StreamState, rows: Sequence[Row], batch_id: str | None
    ) -> SinkOutcome:
        async with asyncio.timeout(self._write_timeout), self._db.connection() as conn:
            return await st.sink.write(conn, rows, batch_id=batch_id)

    async def write_chunk(
        self, st: StreamState, chunk: list[Row], *, give_up: bool = False
    ) -> bool:
        """Write one chunk; every outcome is routed (written, quarantined, dead-lettered).

        Returns False when the chunk was dead-lettered because the database could not take it;
        with ``give_up`` it goes to the dead letters at once (an earlier chunk of the same swap
        already spent the retry budget: each chunk waiting out its own budget would keep the
        stream full for budget x chunks while the database is down).
        """
        batch_id = str(uuid.uuid4())
        st.batches += 1
        if give_up:
            await self.dead_letter(st, "failed", chunk, batch_id=batch_id)
            return False
        started = time.perf_counter()
        try:
            outcome = await self._retry.call(self.attempt, st, chunk, batch_id)
        except Exception as exc:  # noqa: BLE001  routed below: bisect or dead-letter
            if is_data_error(exc):
                return await self.bisect(st, chunk, exc)
            st.last_error = f"{type(exc).__name__}: {exc}"
            _log.warning(
                "stream %s: batch of %d rows not written (%s); dead-lettering it",
                st.name,
                len(chunk),
                st.last_error,
            )
            await self.dead_letter(st, "failed", chunk, batch_id=batch_id)
            return False
        finally:
            FLUSH_SECONDS.labels(st.name).observe(time.perf_counter() - started)
        st.last_error = None
        if outcome.path == "ledger":
            st.counts["duplicate"] += len(chunk)
        else:
            st.counts["written"] += outcome.inserted
            st.counts["duplicate"] += len(chunk) - outcome.inserted
        return True

    async def bisect(self, st: StreamState, chunk: list[Row], first: Exception) -> bool:
        """Isolate poison rows of ``chunk``; False when the database failed meanwhile."""
        inserted = 0

        async def write_segment(segment: Sequence[Row]) -> SinkOutcome:
            nonlocal inserted
            outcome = await self._retry.call(self.attempt, st, segment, None)
            inserted += outcome.inserted
            return outcome

        remaining: list[Row] = []
        try:
            result: BisectResult[Row] = await bisect_write(
                chunk, write_segment, is_data_error, first_error=first
            )
        except BisectAborted as exc:
            result = exc.result
            remaining = exc.remaining
            cause = exc.__cause__
            st.last_error = f"{type(cause).__name__}: {cause}"
        st.counts["written"] += inserted
        st.counts["duplicate"] += result.written - inserted
        if result.poison:
            rows = [row for row, _ in result.poison]
            errors = [error_info(err) for _, err in result.poison]
            for row, err in result.poison[:5]:
                _log.warning("stream %s: poison record quarantined: %s (%s)", st.name, err, row)
            await self.dead_letter(st, "poison", rows, errors=errors)
        if remaining:
            await self.dead_letter(st, "failed", remaining)
        return not remaining

    async def dead_letter(
        self,
        st: StreamState,
        reason: str,
        rows: list[Row],
        *,
        errors: list[dict[str, Any]] | None = None,
        batch_id: str | None = None,
    ) -> None:
        delay = 0.2
        while True:
            try:
                await asyncio.to_thread(
                    self._store.write, st.describe, reason, rows, errors=errors, batch_id=batch_id
                )
                break
            except (DeadLetterFull, OSError) as exc:
                # Nowhere to put them: the rows stay in flight, still counted against the
                # stream's limit (memory stays bounded; producers wait) and we retry both
                # the disk and, for a failed batch, the database.
                st.last_error = f"{type(exc).__name__}: {exc}"
                _log.error("stream %s: cannot dead-letter %d rows: %s", st.name, len(rows), exc)
                if self.closing:
                    self.unsaved += len(rows)
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                if reason == "failed":
                    try:
                        outcome = await self.attempt(st, rows, batch_id)
                    except Exception as db_exc:  # noqa: BLE001  logged; retried next round
                        _log.info("stream %s: database still refuses: %s", st.name, db_exc)
                        continue
                    st.counts["written"] += outcome.inserted
                    st.counts["duplicate"] += len(rows) - outcome.inserted
                    return
        key = {"failed": "failed", "spilled": "spilled", "poison": "quarantined"}[reason]
        st.counts[key] += len(rows)

    def dead_letter_now(self, st: StreamState, reason: str, rows: list[Row]) -> None:
        """Blocking dead-letter write, for close() past its deadline (no loop time left)."""
        try:
            self._store.write(st.describe, reason, rows)
        except (DeadLetterFull, OSError) as exc:
            _log.error("stream %s: %d rows saved nowhere at close: %s", st.name, len(rows), exc)
            self.unsaved += len(rows)
            return
        st.counts["spilled" if reason == "spilled" else "failed"] += len(rows)
