"""The write path of a buffer: one batch from swap to commit, bisection or dead letters.

Every outcome of a batch is routed here and nowhere else: committed (counted written or
duplicate), bisected (good rows committed, poison quarantined with PostgreSQL's error), or
dead-lettered after the retry budget. Rows never go back into the buffer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import time
import uuid
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from sheetanchor.errors import DeadLetterFull
from sheetanchor.ingest._bisect import BisectAborted, BisectResult, bisect_write
from sheetanchor.ingest._classify import error_info, is_data_error
from sheetanchor.ingest._journal_seam import JournalLike
from sheetanchor.ingest._metrics import FLUSH_SECONDS, UNSAVED_ROWS
from sheetanchor.ingest._retry import RetryLike
from sheetanchor.ingest._sink import ConnectionSource, SinkOutcome
from sheetanchor.ingest._state import StreamState
from sheetanchor.ingest._throttle import LogThrottle
from sheetanchor.ingest._validate import Row
from sheetanchor.ingest.deadletter import DeadLetterStore
from sheetanchor.observe import get_logger, timed

__all__ = ["BatchWriter", "maybe_await"]

_log = get_logger("ingest")
T = TypeVar("T")


async def maybe_await(value: Awaitable[T] | T) -> T:
    """Await ``value`` if it is awaitable (journal methods may be sync or async)."""
    if inspect.isawaitable(value):
        return await value
    return value


# Attempts to write one dead-letter file before its rows are kept in memory as "stranded".
DEADLETTER_ATTEMPTS = 5
# Seconds between the flusher's retries of stranded rows.
STRANDED_RETRY_SECONDS = 2.0


# Sink classes already inspected for the ``sent`` keyword: a handful in any program (bounded).
_TAKES_SENT: dict[type[Any], bool] = {}
_TAKES_SENT_MAX = 64


def _write_takes_sent(sink: object) -> bool:
    """True when ``sink.write`` accepts the ``sent`` keyword (or ``**kwargs``)."""
    kind = type(sink)
    known = _TAKES_SENT.get(kind)
    if known is None:
        try:
            params = inspect.signature(kind.write).parameters  # type: ignore[attr-defined]
        except (AttributeError, TypeError, ValueError):
            known = False
        else:
            known = "sent" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
        if len(_TAKES_SENT) < _TAKES_SENT_MAX:
            _TAKES_SENT[kind] = known
    return known


class Batch:
    """One swap being written: its journal entry and the rows saved nowhere yet."""

    __slots__ = ("entry", "new", "pending")

    def __init__(self, entry: list[int] | None) -> None:
        self.entry = entry
        # Rows of the current chunk that could not be saved (adopted after the chunk).
        self.new: list[Stranded] = []
        # Stranded items of this batch not yet saved; the journal entry waits for them.
        self.pending = 0


class Stranded:
    """Rows saved neither in PostgreSQL nor in the dead letters; kept, counted, retried."""

    __slots__ = ("batch", "batch_id", "errors", "nbytes", "reason", "rows")

    def __init__(
        self,
        batch: Batch | None,
        reason: str,
        rows: list[Row],
        errors: list[dict[str, Any]] | None,
        batch_id: str | None,
    ) -> None:
        self.batch = batch
        self.reason = reason
        self.rows = rows
        self.errors = errors
        self.batch_id = batch_id
        self.nbytes = 0


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
        # One WARNING per stream at once, then one per interval with counts (an outage
        # would otherwise log every batch); the rows are counted in the metrics either way.
        self.notes = LogThrottle(_log, interval=store.log_interval)

    def start(self, global_sem: asyncio.Semaphore, journal: JournalLike | None) -> None:
        """Bind the loop-owned parts (called by ``WriteBuffer.open``)."""
        self._global_sem = global_sem
        self._journal = journal

    async def write_batch(
        self, st: StreamState, rows: list[Row], nbytes: int, entry: list[int]
    ) -> None:
        """Write one swap (see ``_write_swap``), timed as the ``ingest/write_batch`` phase.

        ``sheetanchor_phase_duration_seconds{part="ingest",phase="write_batch"}`` is the
        latency of a whole swap, dead-lettering included; ``ingest_flush_seconds`` has the
        per-chunk database writes of each stream.
        """
        with timed("write_batch", part="ingest"):
            await self._write_swap(st, rows, nbytes, entry)

    async def _write_swap(
        self, st: StreamState, rows: list[Row], nbytes: int, entry: list[int]
    ) -> None:
        """Write one swap in chunks of ``batch_rows``, two of them overlapping at most.

        Every row ends in PostgreSQL, in a dead-letter file, or stranded (store full: kept in
        memory, still counted in flight, retried by ``retry_stranded``). The global semaphore
        is held only while PostgreSQL is written, never while waiting for the dead-letter
        store, so a full store cannot block the other streams. The journal entry of the swap
        is resolved in ``finally``: done once every row of this swap is saved somewhere.

        Overlap: once a chunk's COPY has handed over its last row, the next chunk starts on
        another connection while the server still ingests the first (its ``COMMIT`` follows),
        so the client encodes while the server works instead of taking turns. Only while the
        writes are healthy and two global slots are free (one stays for the other streams).
        Likewise the stream's slot (``st.sem``) goes back once the last chunk has sent its
        rows, so the stream's next swap starts while this one's last ``COMMIT`` is pending
        and the server is not left idle between swaps. Outcomes are accounted in chunk
        order; the journal is committed in swap order (``journal_done``).
        """
        batch = Batch(entry)
        total = len(rows)
        # Chunks are handed out one at a time and dropped once written, so rows of a large
        # swap are freed as they are saved instead of living until the whole swap is done.
        chunks = collections.deque(
            rows[i : i + st.batch_rows] for i in range(0, total, st.batch_rows)
        )
        rows.clear()
        done_rows = 0
        done_bytes = 0
        running: collections.deque[tuple[asyncio.Task[bool], list[Row], asyncio.Event]] = (
            collections.deque()
        )
        # The stream's slot (st.sem) goes back once the last chunk has sent its rows, so the
        # next swap's first chunk is encoded while the server ingests and commits this one.
        released = False
        try:
            healthy = True
            while chunks or running:
                if (
                    not released
                    and not chunks
                    and running
                    and healthy
                    and running[-1][2].is_set()
                    and self._spare_slots() >= 2
                ):
                    released = True
                    st.sem.release()
                if chunks and (
                    not running
                    or (
                        len(running) == 1
                        and healthy
                        and running[0][2].is_set()
                        and self._spare_slots() >= 2
                    )
                ):
                    current = chunks.popleft()
                    sent = asyncio.Event()
                    task = asyncio.create_task(
                        self.write_chunk(st, current, give_up=not healthy, batch=batch, sent=sent)
                    )
                    running.append((task, current, sent))
                    continue
                head, current, _ = running[0]
                # Wake when the head finishes, or when the chunk whose sending decides what
                # happens next has handed over its data: the head while chunks remain (the
                # next one may start), the last one otherwise (the stream's slot may go back).
                watched = running[0][2] if chunks else running[-1][2]
                if (
                    healthy
                    and not watched.is_set()
                    and ((chunks and len(running) == 1) or (not chunks and not released))
                ):
                    waiter = asyncio.ensure_future(watched.wait())
                    try:
                        await asyncio.wait([head, waiter], return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        waiter.cancel()
                    if not head.done():
                        continue
                else:
                    await asyncio.wait([head])
                ok = head.result()  # raises: the except below saves this chunk's rows too
                running.popleft()
                healthy = ok and healthy
                chunk_bytes = nbytes * (done_rows + len(current)) // total - done_bytes
                kept_rows = kept_bytes = 0
                for item in batch.new:
                    item.nbytes = nbytes * len(item.rows) // total
                    kept_rows += len(item.rows)
                    kept_bytes += item.nbytes
                    batch.pending += 1
                    st.stranded.append(item)
                batch.new = []
                # Stranded rows stay counted in flight until retry_stranded saves them.
                st.inflight_rows -= len(current) - kept_rows
                st.inflight_bytes -= chunk_bytes - kept_bytes
                done_rows += len(current)
                done_bytes += chunk_bytes
                st.room.set()
        except BaseException as exc:
            # Cancelled by close() past its deadline, or an unexpected error: what is not
            # saved yet goes to disk now (blocking), never lost silently.
            rest: list[Row] = []
            for task, _chunk, _ in running:
                task.cancel()
            for task, chunk, _ in running:
                with contextlib.suppress(BaseException):
                    await asyncio.wait([task])
                if task.cancelled() or task.exception() is not None:
                    rest += chunk
                else:
                    # Written (or routed) before the cancellation reached it: accounted.
                    chunk_bytes = nbytes * (done_rows + len(chunk)) // total - done_bytes
                    st.inflight_rows -= len(chunk)
                    st.inflight_bytes -= chunk_bytes
                    done_rows += len(chunk)
                    done_bytes += chunk_bytes
            running.clear()
            for item in batch.new:
                rest += item.rows  # routed nowhere yet: saved with the rest now
            batch.new = []
            rest += [row for chunk in chunks for row in chunk]
            chunks.clear()
            saved = not rest
            try:
                if rest:
                    saved = self.dead_letter_now(st, "failed", rest)
            finally:
                if not saved:
                    batch.pending += 1  # saved nowhere: the journal keeps this swap
            if not isinstance(exc, Exception):
                raise  # cancellation (close() past its deadline) and interpreter exits
            st.last_error = f"{type(exc).__name__}: {exc}"
            _log.error(
                "stream %s: writing a batch of %d rows failed unexpectedly (%s); "
                "rows not written were dead-lettered now (or stay in the journal)",
                st.name,
                total,
                st.last_error,
                exc_info=exc,
            )
        finally:
            st.inflight_rows -= total - done_rows
            st.inflight_bytes -= nbytes - done_bytes
            if not released:
                st.sem.release()
            st.room.set()
            self._publish_unsaved(st)
            if batch.pending == 0 and batch.entry is not None:
                # Only rows that are in PostgreSQL or in a dead-letter file may leave the
                # journal; rows saved nowhere stay in it and are recovered at the next open.
                batch.entry[1] = 1
            st.publish()
        await self.journal_done(st)

    def _spare_slots(self) -> int:
        """Global write slots free right now (asyncio.Semaphore keeps the count private)."""
        assert self._global_sem is not None
        sem = self._global_sem
        return 0 if sem.locked() else sem._value

    def _publish_unsaved(self, st: StreamState) -> None:
        UNSAVED_ROWS.labels(st.name).set(sum(len(item.rows) for item in st.stranded))

    async def retry_stranded(self, st: StreamState) -> None:
        """One more try to save the stranded rows of ``st`` (dead letters, or PostgreSQL)."""
        for item in list(st.stranded):
            saved = await self.dead_letter(
                st, item.reason, item.rows, errors=item.errors, batch_id=item.batch_id, attempts=1
            )
            if not saved:
                return  # the store is still full: try again later
            st.stranded.remove(item)
            st.inflight_rows -= len(item.rows)
            st.inflight_bytes -= item.nbytes
            st.room.set()
            if item.batch is not None:
                item.batch.pending -= 1
                if item.batch.pending == 0 and item.batch.entry is not None:
                    item.batch.entry[1] = 1
        self._publish_unsaved(st)
        await self.journal_done(st)

    def release_stranded(self, st: StreamState) -> None:
        """close(): write stranded rows to the dead letters now (blocking) or count them."""
        for item in st.stranded:
            st.inflight_rows -= len(item.rows)
            st.inflight_bytes -= item.nbytes
            self.dead_letter_now(st, item.reason, item.rows, errors=item.errors)
        st.stranded.clear()
        self._publish_unsaved(st)

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
        self,
        st: StreamState,
        rows: Sequence[Row],
        batch_id: str | None,
        sent: asyncio.Event | None = None,
    ) -> SinkOutcome:
        async with asyncio.timeout(self._write_timeout), self._db.connection() as conn:
            if sent is None or not _write_takes_sent(st.sink):
                # A sink written before ``sent`` existed is called as before; its chunks are
                # then written one after the other (nothing sets ``sent``).
                return await st.sink.write(conn, rows, batch_id=batch_id)
            return await st.sink.write(conn, rows, batch_id=batch_id, sent=sent)

    async def write_chunk(
        self,
        st: StreamState,
        chunk: list[Row],
        *,
        give_up: bool = False,
        batch: Batch | None = None,
        sent: asyncio.Event | None = None,
    ) -> bool:
        """Write one chunk; every outcome is routed (written, quarantined, dead-lettered).

        Returns False when the chunk was dead-lettered because the database could not take it;
        with ``give_up`` it goes to the dead letters at once (an earlier chunk of the same swap
        already spent the retry budget: each chunk waiting out its own budget would keep the
        stream full for budget x chunks while the database is down).
        """
        assert self._global_sem is not None
        batch_id = str(uuid.uuid4())
        st.batches += 1
        if give_up:
            await self.dead_letter(st, "failed", chunk, batch_id=batch_id, batch=batch)
            return False
        started = time.perf_counter()
        failure: Exception | None = None
        bisected: tuple[BisectResult[Row], list[Row], int] | None = None
        try:
            async with self._global_sem:
                try:
                    outcome = await self._retry.call(self.attempt, st, chunk, batch_id, sent)
                except Exception as exc:  # noqa: BLE001  routed below: bisect or dead-letter
                    failure = exc
                    if is_data_error(exc):
                        bisected = await self._bisect_rows(st, chunk, exc)
        finally:
            FLUSH_SECONDS.labels(st.name).observe(time.perf_counter() - started)
        # Dead-lettering happens outside the global semaphore (a full store must not hold it).
        if bisected is not None:
            return await self._route_bisected(st, bisected, batch)
        if failure is not None:
            st.last_error = f"{type(failure).__name__}: {failure}"
            self.notes.event(
                (st.name, "not written"),
                len(chunk),
                "stream %s: batch of %d rows not written (%s); dead-lettering it",
                st.name,
                len(chunk),
                st.last_error,
            )
            await self.dead_letter(st, "failed", chunk, batch_id=batch_id, batch=batch)
            return False
        st.last_error = None
        if outcome.path == "ledger":
            st.counts["duplicate"] += len(chunk)
        else:
            st.counts["written"] += outcome.inserted
            st.counts["duplicate"] += len(chunk) - outcome.inserted
        return True

    async def _bisect_rows(
        self, st: StreamState, chunk: list[Row], first: Exception
    ) -> tuple[BisectResult[Row], list[Row], int]:
        """Isolate poison rows of ``chunk`` (database work only; the caller routes them)."""
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
        return result, remaining, inserted

    async def _route_bisected(
        self,
        st: StreamState,
        bisected: tuple[BisectResult[Row], list[Row], int],
        batch: Batch | None,
    ) -> bool:
        result, remaining, inserted = bisected
        st.counts["written"] += inserted
        st.counts["duplicate"] += result.written - inserted
        if result.poison:
            rows = [row for row, _ in result.poison]
            errors = [error_info(err) for _, err in result.poison]
            for row, err in result.poison[:5]:
                _log.warning("stream %s: poison record quarantined: %s (%s)", st.name, err, row)
            await self.dead_letter(st, "poison", rows, errors=errors, batch=batch)
        if remaining:
            await self.dead_letter(st, "failed", remaining, batch=batch)
        return not remaining

    async def bisect(self, st: StreamState, chunk: list[Row], first: Exception) -> bool:
        """Isolate poison rows of ``chunk``; False when the database failed meanwhile."""
        assert self._global_sem is not None
        async with self._global_sem:
            bisected = await self._bisect_rows(st, chunk, first)
        return await self._route_bisected(st, bisected, None)

    async def dead_letter(
        self,
        st: StreamState,
        reason: str,
        rows: list[Row],
        *,
        errors: list[dict[str, Any]] | None = None,
        batch_id: str | None = None,
        batch: Batch | None = None,
        attempts: int = DEADLETTER_ATTEMPTS,
    ) -> bool:
        """Save ``rows`` to the dead letters (a failed batch may also still reach PostgreSQL).

        Tries ``attempts`` times, never holding the global semaphore while waiting. Returns
        False when the rows were saved nowhere: with ``batch`` they are then stranded (kept
        in memory, still counted in flight, retried by ``retry_stranded``), logged with
        ``last_error`` and the ``ingest_unsaved_rows`` gauge.
        """
        delay = 0.2
        for attempt in range(1, attempts + 1):
            try:
                await asyncio.to_thread(
                    self._store.write, st.describe, reason, rows, errors=errors, batch_id=batch_id
                )
            except (DeadLetterFull, OSError) as exc:
                st.last_error = f"{type(exc).__name__}: {exc}"
                _log.error(
                    "stream %s: cannot dead-letter %d %s rows (attempt %d of %d): %s",
                    st.name,
                    len(rows),
                    reason,
                    attempt,
                    attempts,
                    exc,
                )
            else:
                key = {"failed": "failed", "spilled": "spilled", "poison": "quarantined"}[reason]
                st.counts[key] += len(rows)
                return True
            if self.closing or attempt == attempts:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            if reason == "failed" and await self._write_directly(st, rows, batch_id):
                return True
        if batch is not None:
            batch.new.append(Stranded(batch, reason, rows, errors, batch_id))
            _log.error(
                "stream %s: %d %s row(s) saved neither in PostgreSQL nor in the dead letters; "
                "kept in memory (counted against the stream's limit) and retried",
                st.name,
                len(rows),
                reason,
            )
        return False

    async def _write_directly(self, st: StreamState, rows: list[Row], batch_id: str | None) -> bool:
        assert self._global_sem is not None
        try:
            async with self._global_sem:
                outcome = await self.attempt(st, rows, batch_id)
        except Exception as db_exc:  # noqa: BLE001  logged; the rows stay routed by the caller
            _log.info("stream %s: database still refuses: %s", st.name, db_exc)
            return False
        st.counts["written"] += outcome.inserted
        st.counts["duplicate"] += len(rows) - outcome.inserted
        return True

    def dead_letter_now(
        self,
        st: StreamState,
        reason: str,
        rows: list[Row],
        *,
        errors: list[dict[str, Any]] | None = None,
    ) -> bool:
        """Blocking dead-letter write, for close() past its deadline (no loop time left)."""
        try:
            self._store.write(st.describe, reason, rows, errors=errors)
        except (DeadLetterFull, OSError) as exc:
            _log.error("stream %s: %d rows saved nowhere at close: %s", st.name, len(rows), exc)
            self.unsaved += len(rows)
            return False
        key = {"failed": "failed", "spilled": "spilled", "poison": "quarantined"}[reason]
        st.counts[key] += len(rows)
        return True
