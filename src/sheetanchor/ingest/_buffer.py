"""``WriteBuffer``: bounded, per-stream ingest into PostgreSQL that loses nothing.

Flow of one record: ``put`` -> validation (``RecordError``) -> quality checks -> the stream's
list (bounded by ``max_rows``/``max_bytes`` counting everything in memory, including batches
being written) -> the stream's flusher swaps the whole list out in O(1) -> a writer task,
limited per stream and globally, COPYs it idempotently -> on a data error the batch is
bisected and poison rows are quarantined -> past the retry budget the batch goes to the
dead-letter store, never back into memory -> a background task replays dead letters once the
database answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
import warnings
from asyncio import _get_running_loop
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import asyncpg

from sheetanchor.errors import (
    BufferFull,
    ConfigError,
    DeadLetterFull,
    RecordError,
    ResourceClosed,
    WrongEventLoop,
)
from sheetanchor.ingest._classify import error_info
from sheetanchor.ingest._fastpath import FastAdmit
from sheetanchor.ingest._journal_group import GroupAppender, append_rows, enqueue_journaled
from sheetanchor.ingest._journal_seam import JournalLike, open_journal
from sheetanchor.ingest._replay import REPLAY_ERRORS, FileReplay, replay_files
from sheetanchor.ingest._retry import DEFAULT_INGEST_POLICY, RetryLike
from sheetanchor.ingest._sink import ConnectionSource
from sheetanchor.ingest._state import StreamState, StreamStats, WriteBufferStats
from sheetanchor.ingest._stream import Stream
from sheetanchor.ingest._validate import Row
from sheetanchor.ingest._writer import STRANDED_RETRY_SECONDS, Batch, BatchWriter, maybe_await
from sheetanchor.ingest.deadletter import DEFAULT_DEADLETTER_MAX_BYTES, DeadLetterStore
from sheetanchor.observe import get_logger

__all__ = ["WriteBuffer"]

_log = get_logger("ingest")
# Recovered journal records read per worker-thread call.
_RECOVER_CHUNK = 1000


class WriteBuffer:
    """Bounded ingest of records into PostgreSQL tables, one ``Stream`` per table.

    Arguments:
        db: lends raw asyncpg connections (``sheetanchor.postgres.Database``).
        streams: the streams; names must be unique.
        deadletter_dir: where rows that cannot be written go (default
            ``<sheetanchor home>/deadletter``); or pass ``deadletter=DeadLetterStore(...)``.
        deadletter_max_bytes: bound of the dead-letter store.
        journal_dir: when set, authoritative ``put`` appends to a disk journal before
            returning, and ``open()`` re-enqueues what was never committed.
        journal_fsync: ``"batch"``, ``"always"`` or ``"never"``.
        journal: an already built journal (``append``/``commit``/``recover``/``close``,
            ``last_seq``) instead of ``journal_dir``; the buffer closes it on ``close()``.
        max_concurrency: batches written at once over all streams.
        retry: retry policy for transient errors (``await policy.call(fn, *args)``).
        write_timeout: seconds one write attempt may take (then it counts as transient).
        replay_interval: seconds between automatic replays of dead letters; ``None`` = off.
        ledger: record committed batch ids (fast idempotent replay), see ``_sink``.
        ledger_retention: seconds a ledger row is kept (pruned at open and hourly), so the
            ledger stays bounded; a replay older than this falls back to the natural key.
        close_timeout: seconds ``close()`` waits for in-flight writes before dead-lettering
            them.

    Example::

        async with WriteBuffer(db, streams=[ticks]) as buffer:
            await buffer.put("ticks", {"ts": now, "symbol": "X", "price": 1.5, "volume": 3})
    """

    def __init__(
        self,
        db: ConnectionSource,
        streams: Sequence[Stream],
        *,
        deadletter_dir: str | os.PathLike[str] | None = None,
        deadletter: DeadLetterStore | None = None,
        deadletter_max_bytes: int = DEFAULT_DEADLETTER_MAX_BYTES,
        journal_dir: str | os.PathLike[str] | None = None,
        journal_fsync: str = "batch",
        journal: JournalLike | None = None,
        max_concurrency: int = 4,
        retry: RetryLike | None = None,
        write_timeout: float = 60.0,
        replay_interval: float | None = 30.0,
        ledger: bool = True,
        ledger_retention: float = 7 * 86400.0,
        close_timeout: float = 60.0,
    ) -> None:
        if not streams:
            raise ConfigError("WriteBuffer needs at least one Stream in streams=[...]")
        self._states: dict[str, StreamState] = {}
        for stream in streams:
            if not isinstance(stream, Stream):
                raise ConfigError(f"WriteBuffer streams must be Stream objects, got {stream!r}")
            if stream.name in self._states:
                raise ConfigError(f"WriteBuffer: stream name {stream.name!r} is used twice")
            self._states[stream.name] = StreamState(stream)
        # put_nowait's fast path: the generated validate-and-append of each stream that has
        # one (bound to its state), by stream name.
        self._admitters: dict[str, FastAdmit] = {
            name: st.fast_admit for name, st in self._states.items() if st.fast_admit is not None
        }
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int):
            raise ConfigError(
                f"WriteBuffer max_concurrency must be an int, got {max_concurrency!r}"
            )
        if max_concurrency < 1:
            raise ConfigError(f"WriteBuffer max_concurrency must be >= 1, got {max_concurrency}")
        if len(streams) > 1:
            for stream in streams:
                # Leave a slot free for the others, so one slow stream cannot take them all.
                if stream.concurrency >= max_concurrency:
                    raise ConfigError(
                        f"Stream {stream.name!r}: concurrency={stream.concurrency} must be < "
                        f"WriteBuffer max_concurrency={max_concurrency} with several streams, "
                        "so one slow stream can never block the others"
                    )
        for name, value in (("write_timeout", write_timeout), ("close_timeout", close_timeout)):
            if value <= 0:
                raise ConfigError(f"WriteBuffer {name} must be > 0, got {value!r}")
        if ledger_retention <= 0:
            raise ConfigError(f"WriteBuffer ledger_retention must be > 0, got {ledger_retention!r}")
        if replay_interval is not None and replay_interval <= 0:
            raise ConfigError(
                f"WriteBuffer replay_interval must be > 0 or None, got {replay_interval!r}"
            )
        if journal_fsync not in ("batch", "always", "never"):
            raise ConfigError(
                "WriteBuffer journal_fsync must be 'batch', 'always' or 'never', "
                f"got {journal_fsync!r}"
            )
        if deadletter is not None and deadletter_dir is not None:
            raise ConfigError("WriteBuffer: pass deadletter_dir or deadletter, not both")
        for st in self._states.values():
            st.sink.ledger = ledger
        self._db = db
        self._store = deadletter or DeadLetterStore(deadletter_dir, max_bytes=deadletter_max_bytes)
        self._journal_dir = Path(journal_dir) if journal_dir is not None else None
        self._journal_fsync = journal_fsync
        self._journal: JournalLike | None = journal
        self._global_sem: asyncio.Semaphore | None = None
        self._max_concurrency = max_concurrency
        self._retry: RetryLike = retry if retry is not None else DEFAULT_INGEST_POLICY
        self._write_timeout = write_timeout
        self._replay_interval = replay_interval
        self._ledger = ledger
        self._ledger_retention = ledger_retention
        self._pruned_at = 0.0
        self._close_timeout = close_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flushers: list[asyncio.Task[None]] = []
        self._writers: set[asyncio.Task[None]] = set()
        self._replayer: asyncio.Task[None] | None = None
        # Set once open() has re-queued the whole journal: until then a journaled put waits,
        # because its (higher) sequence number would let the next commit mark cover
        # recovered records not yet back in the buffer (lost if the process died then).
        self._recovered: asyncio.Event | None = None
        # Journaled streams: concurrent puts share one journal append (see _journal_group).
        self._groups: dict[str, GroupAppender] = {}
        self._opened = False
        self._closing = False
        self._closed = False
        self._writer = BatchWriter(db, self._store, self._retry, write_timeout)

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True once ``close()`` began."""
        return self._closing or self._closed

    @property
    def deadletter(self) -> DeadLetterStore:
        """The dead-letter store of this buffer."""
        return self._store

    async def open(self) -> None:
        """Check the tables, recover the journal, start the flushers and the replayer.

        Raises:
            ConfigError: a table is missing or has no unique index on its natural key.
        """
        if self._opened:
            return
        if self._closed:
            raise ResourceClosed("this WriteBuffer was closed; create a new one")
        self._loop = asyncio.get_running_loop()
        self._global_sem = asyncio.Semaphore(self._max_concurrency)
        self._recovered = asyncio.Event()

        async def prepare() -> None:
            async with asyncio.timeout(self._write_timeout), self._db.connection() as conn:
                for st in self._states.values():
                    await st.sink.prepare(conn)
                await self._prune_ledger(conn)

        await self._retry.call(prepare)
        if self._journal is None and self._journal_dir is not None:
            self._journal = open_journal(self._journal_dir, fsync=self._journal_fsync)
        self._writer.start(self._global_sem, self._journal)
        if self._journal is not None:
            self._groups = {
                st.name: GroupAppender(st, self._journal)
                for st in self._states.values()
                if not st.best_effort
            }
            for st in self._states.values():
                st.journaled = not st.best_effort
        self._opened = True
        for st in self._states.values():
            st.accepting = True
        try:
            await self._start_tasks()
        except BaseException as exc:
            await self._abort_open(exc)
            raise

    async def _start_tasks(self) -> None:
        for st in self._states.values():
            self._flushers.append(asyncio.create_task(self._flusher(st), name=f"flush:{st.name}"))
            if st.best_effort:
                # Spilling has its own task: it must not wait behind the write semaphore,
                # which is exactly what is stuck when a stream needs to spill.
                self._flushers.append(
                    asyncio.create_task(self._spiller(st), name=f"spill:{st.name}")
                )
        if self._replay_interval is not None:
            self._replayer = asyncio.create_task(self._replay_loop(), name="ingest:replay")
        if self._journal is not None:
            await self._recover()
        assert self._recovered is not None
        self._recovered.set()

    async def _abort_open(self, exc: BaseException) -> None:
        """open() failed part-way: stop what it started and leave the journal uncommitted.

        Records recovered or buffered so far are dropped from memory: the journal still holds
        every one of them (nothing past what reached PostgreSQL or the dead letters was
        committed), so the next open() recovers them again.
        """
        _log.error("WriteBuffer.open failed (%s: %s); stopping its tasks", type(exc).__name__, exc)
        self._writer.closing = True
        tasks = [*self._flushers, *self._writers, *self._group_tasks()]
        if self._replayer is not None:
            tasks.append(self._replayer)
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for task, result in zip(tasks, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                _log.error(
                    "task %s failed while open() was aborted: %s: %s",
                    task.get_name(),
                    type(result).__name__,
                    result,
                )
        self._flushers.clear()
        self._writers.clear()
        self._replayer = None
        for st in self._states.values():
            st.accepting = False
            st.reset_budget()
            st.rows, st.bytes, st.spill, st.spill_bytes = [], 0, [], 0
            st.commits.clear()
            st.stranded.clear()
            st.inflight_rows = st.inflight_bytes = 0
            st.last_seq = 0
        journal, self._journal = self._journal, None
        if journal is not None:
            # Only commit marks already made (for records stored in PostgreSQL or the dead
            # letters) are written; nothing new is committed here.
            await maybe_await(journal.close())
        if self._journal_dir is None:
            self._journal = journal  # a journal passed in stays this buffer's (now closed)
        if self._writer.unsaved:
            _log.warning(
                "%d row(s) of the aborted open() were saved neither in PostgreSQL nor in the "
                "dead letters; the journal still holds them for the next open()",
                self._writer.unsaved,
            )
            self._writer.unsaved = 0
        self._writer.closing = False
        self._opened = False
        if self._recovered is not None:
            self._recovered.set()  # puts waiting for recovery wake up and see it failed

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop taking records, flush everything, wait for writes, close the journal.

        In-flight batches get ``close_timeout`` seconds; what is still unwritten then goes to
        the dead-letter store. Idempotent.

        Raises:
            DeadLetterFull: some rows could be saved neither in PostgreSQL nor on disk.
        """
        if self._closed or self._closing:
            return
        self._closing = True
        self._writer.closing = True
        for st in self._states.values():
            st.accepting = False  # put_nowait's fast path admits nothing from now on
            st.reset_budget()
        try:
            if not self._opened:
                return
            for st in self._states.values():
                st.wake.set()
                st.spill_wake.set()
                st.room.set()  # waiting producers wake up and see the buffer is closing
            groups = self._group_tasks()
            if groups:
                # Puts already in a journal group are accepted first, so the flushers that
                # are about to drain and stop see their rows.
                _done, pending = await asyncio.wait(groups, timeout=self._close_timeout)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                self._log_task_errors(groups)
            _done, pending = await asyncio.wait(
                [*self._flushers, *self._writers], timeout=self._close_timeout
            )
            for task in pending:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*pending, return_exceptions=True)
            self._log_task_errors([*_done, *pending])
            # Flushers may have started writers after the first wait began.
            if self._writers:
                await asyncio.wait(list(self._writers), timeout=self._close_timeout)
            writers = list(self._writers)
            for task in writers:
                task.cancel()
            await asyncio.gather(*writers, return_exceptions=True)
            self._log_task_errors(writers)
            for st in self._states.values():
                # Rows the dead-letter store could not take so far: one last (blocking) try.
                self._writer.release_stranded(st)
                # Flushers cancelled at the deadline may leave rows behind: to disk, not lost.
                rows, spill = st.rows, st.spill
                st.rows, st.bytes, st.spill, st.spill_bytes = [], 0, [], 0
                if rows:
                    self._writer.dead_letter_now(st, "failed", rows)
                if spill:
                    self._writer.dead_letter_now(st, "spilled", spill)
            if self._replayer is not None:
                self._replayer.cancel()
                await asyncio.gather(self._replayer, return_exceptions=True)
                self._log_task_errors([self._replayer])
            for st in self._states.values():
                st.publish()
            # Warnings held back by the rate limit: their counts, now.
            self._writer.notes.flush()
            self._store.flush_log()
            if self._journal is not None:
                await maybe_await(self._journal.close())
        finally:
            self._closed = True
        if self._writer.unsaved:
            raise DeadLetterFull(
                f"{self._writer.unsaved} row(s) could be written neither to PostgreSQL nor to the "
                f"dead-letter store {self._store.directory}; see the log for their errors"
            )

    def _group_tasks(self) -> list[asyncio.Task[None]]:
        return [g.task for g in self._groups.values() if g.task is not None]

    @staticmethod
    def _log_task_errors(tasks: Sequence[asyncio.Task[None]]) -> None:
        """Log (never hide) what finished tasks raised, other than cancellation."""
        for task in tasks:
            if not task.done() or task.cancelled():
                continue
            exc = task.exception()
            if exc is not None:
                _log.error(
                    "WriteBuffer task %s failed: %s: %s",
                    task.get_name(),
                    type(exc).__name__,
                    exc,
                    exc_info=exc,
                )

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if getattr(self, "_opened", False) and not getattr(self, "_closed", True):
            _warn(
                f"WriteBuffer {self!r} was opened and never closed; "
                "use `async with` or await close()",
                ResourceWarning,
                stacklevel=2,
            )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._opened else "new"
        return f"<WriteBuffer streams={list(self._states)} {state}>"

    # -- put ---------------------------------------------------------------------------------
    def _state(self, stream: str) -> StreamState:
        try:
            st = self._states[stream]
        except KeyError:
            raise ConfigError(
                f"unknown stream {stream!r}; this buffer has {sorted(self._states)}"
            ) from None
        if self._closing or not self._opened:
            raise ResourceClosed(
                f"WriteBuffer is {'closed' if self._closing else 'not open'}; "
                "use `async with WriteBuffer(...)` or await open() first"
            )
        return st

    def _check_loop(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not self._loop:
            raise WrongEventLoop(
                "WriteBuffer used outside the event loop it was opened in; create one buffer "
                "per event loop (and per process)"
            )

    def _validate(self, st: StreamState, record: Mapping[str, Any]) -> tuple[Row, int]:
        try:
            row, size = st.validator.validate(record)
        except RecordError:
            st.counts["rejected"] += 1
            raise
        if size > st.max_bytes:
            st.counts["rejected"] += 1
            raise RecordError(
                f"stream {st.name!r}: record of ~{size} bytes is larger than the stream's "
                f"max_bytes={st.max_bytes}; raise max_bytes",
                stream=st.name,
                value=None,
            )
        if st.gate is not None:
            try:
                st.gate.inspect(record)  # counts and logs findings; raises only for reject=True
            except RecordError:
                st.counts["rejected"] += 1
                raise
        return row, size

    def _admit(self, st: StreamState, row: Row, size: int, record: Mapping[str, Any]) -> None:
        st.fold_budget()  # st.bytes then counts what the fast path appended
        rows = st.rows
        buffered = len(rows)
        held_rows = buffered + st.inflight_rows + len(st.spill) + st.reserved_rows
        held_bytes = st.bytes + st.inflight_bytes + st.spill_bytes + st.reserved_bytes + size
        if held_rows >= st.max_rows or held_bytes > st.max_bytes:
            raise BufferFull(
                f"stream {st.name!r} ({st.stream.kind}) holds {held_rows} rows / "
                f"{held_bytes - size} bytes (limits {st.max_rows} / {st.max_bytes}): "
                "PostgreSQL is not keeping up; wait (await put) or slow the producer"
                + (f" (last error: {st.last_error})" if st.last_error else "")
            )
        if st.best_effort and (held_rows >= st.emergency_rows or held_bytes > st.emergency_bytes):
            # Past the emergency watermark a best-effort record goes to disk, not to memory.
            st.spill.append(row)
            st.spill_bytes += size
            if not st.spill_wake.is_set():
                st.spill_wake.set()
        else:
            rows.append(row)
            st.bytes += size
            if (
                buffered >= st.batch_rows - 1
                or held_rows >= st.high_rows
                or held_bytes >= st.high_bytes
            ) and not st.wake.is_set():
                st.wake.set()
        st.counts["in"] += 1
        if st.tail is not None:
            st.tail.append(record)
        st.refresh_budget()

    def put_nowait(self, stream: str, record: Mapping[str, Any]) -> None:
        """Validate ``record`` and buffer it now, or raise.

        Raises:
            RecordError: the record is invalid (names stream, field and value).
            BufferFull: the stream is at its limit (authoritative streams never drop).
            ConfigError: unknown stream, or a journaled stream (use ``await put``).
            ResourceClosed: the buffer is not open.
        """
        # The hot path of ingest: one dict lookup, the loop check and the stream's generated
        # validate-and-append, which admits only within the budget the full path granted (no
        # budget while the buffer is not open, closing, or the stream journaled). Anything
        # else takes the full path, which raises precisely.
        admit = self._admitters.get(stream)
        if admit is not None and _get_running_loop() is self._loop and admit(record):
            return
        self._put_nowait(stream, record)

    def _put_nowait(self, stream: str, record: Mapping[str, Any]) -> None:
        st = self._states.get(stream)
        if st is None or self._closing or not self._opened:
            st = self._state(stream)
        if _get_running_loop() is not self._loop:
            self._check_loop()
        if st.journaled:
            raise ConfigError(
                f"stream {stream!r} is journaled: put_nowait cannot wait for the journal to "
                "be durable; use `await buffer.put(...)`"
            )
        # put_nowait tried the stream's budget already: this record needs a decision.
        fast = st.fast
        quick = fast(record) if fast is not None else None
        if quick is None or quick[1] > st.max_bytes:
            row, size = self._validate(st, record)
        else:
            row, size = quick
        self._admit(st, row, size, record)

    async def put(self, stream: str, record: Mapping[str, Any]) -> None:
        """Validate and buffer ``record``, waiting (up to ``put_timeout``) for room.

        Best-effort streams never wait: past the emergency watermark they spill to disk.
        With a journal, an authoritative record is durable on disk when this returns; while
        ``open()`` is still re-queueing the journal's records, the put waits for it.

        Raises:
            RecordError: the record is invalid.
            BufferFull: no room (or journal recovery not finished) within the stream's
                ``put_timeout``.
            ResourceClosed: the buffer is not open (or its ``open()`` failed meanwhile).
        """
        st = self._state(stream)
        self._check_loop()
        row, size = self._validate(st, record)
        if st.best_effort:
            self._admit(st, row, size, record)
            return
        if self._journal is not None:
            recovered = self._recovered
            if recovered is None or not recovered.is_set():
                # Only while open() re-queues the journal: the common case costs no
                # coroutine (_state() has just checked the buffer is open, no await since).
                await self._wait_recovered(st)
        if not st.has_room(size):
            await self._wait_room(st, size)
        if self._journal is None:
            self._admit(st, row, size, record)
        else:
            # Joins the stream's journal group: one append for all concurrent puts.
            await self._groups[st.name].add(row, size, record)

    async def put_many(self, stream: str, records: Sequence[Mapping[str, Any]]) -> None:
        """Validate all ``records`` first, then buffer them like ``put`` (waiting for room).

        With a journal, the records are made durable with one append per ``batch_rows``:
        the fast way to ingest with ``journal_dir`` set.

        Raises:
            RecordError: a record is invalid; none of ``records`` was buffered.
            BufferFull: no room within the stream's ``put_timeout``.
        """
        st = self._state(stream)
        self._check_loop()
        checked = [self._validate(st, record) for record in records]
        if self._journal is not None and not st.best_effort:
            await self._wait_recovered(st)
        step = max(1, min(st.batch_rows, st.max_rows))
        for start in range(0, len(checked), step):
            part = checked[start : start + step]
            originals = records[start : start + step]
            if st.best_effort:
                for (row, size), record in zip(part, originals, strict=True):
                    self._admit(st, row, size, record)
                continue
            nbytes = sum(size for _, size in part)
            if not st.has_room(nbytes, len(part)):
                await self._wait_room(st, nbytes, len(part))
            if self._journal is None:
                for (row, size), record in zip(part, originals, strict=True):
                    self._admit(st, row, size, record)
            else:
                await self._journaled(st, [row for row, _ in part], nbytes, originals)

    async def _journaled(
        self, st: StreamState, rows: list[Row], nbytes: int, records: Sequence[Mapping[str, Any]]
    ) -> None:
        # Room is reserved while the journal makes the records durable, so concurrent puts
        # cannot overshoot the bound. The journal hands out sequence numbers when append is
        # called and completes appends in that order, so records enter the buffer in sequence
        # order and a batch's last_seq covers exactly the records swapped out with it.
        assert self._journal is not None
        st.reserved_rows += len(rows)
        st.reserved_bytes += nbytes
        st.reset_budget()
        try:
            seq = await append_rows(self._journal, st, rows)
        finally:
            st.reserved_rows -= len(rows)
            st.reserved_bytes -= nbytes
        st.last_seq = max(st.last_seq, seq)
        enqueue_journaled(st, rows, records, nbytes)

    async def _wait_recovered(self, st: StreamState) -> None:
        """Wait (up to ``put_timeout``) until open() has re-queued the whole journal."""
        recovered = self._recovered
        assert recovered is not None
        if not recovered.is_set():
            try:
                async with asyncio.timeout(st.stream.put_timeout):
                    await recovered.wait()
            except TimeoutError:
                raise BufferFull(
                    f"stream {st.name!r}: open() was still re-queueing records recovered from "
                    f"the journal after put_timeout={st.stream.put_timeout} s; a put waits "
                    "for that (its records must not be committed ahead of recovered ones). "
                    "Retry the put, or raise put_timeout"
                ) from None
        if self._closing or not self._opened:
            raise ResourceClosed(
                f"WriteBuffer {'closed' if self._closing else 'failed to open'} while a put on "
                f"{st.name!r} waited for journal recovery; open a new buffer (the journal "
                "keeps every record that was not stored)"
            )

    async def _wait_room(self, st: StreamState, size: int, rows: int = 1) -> None:
        assert self._loop is not None
        deadline = self._loop.time() + st.stream.put_timeout
        st.waits += 1
        while not st.has_room(size, rows):
            if self._closing:
                raise ResourceClosed(f"WriteBuffer closed while a put on {st.name!r} waited")
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                break
            st.room.clear()
            st.wake.set()  # make sure a flush is on its way
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await st.room.wait()
        if not st.has_room(size, rows):
            raise BufferFull(
                f"stream {st.name!r} stayed full for put_timeout={st.stream.put_timeout} s "
                f"({st.held_rows} rows / {st.held_bytes} bytes held, limits {st.max_rows} / "
                f"{st.max_bytes}); PostgreSQL is not keeping up"
                + (f" (last error: {st.last_error})" if st.last_error else "")
            )

    def tail(self, stream: str, n: int) -> list[Mapping[str, Any]]:
        """The newest ``n`` accepted records of ``stream``, oldest first (O(n)).

        Raises:
            ConfigError: unknown stream, or the stream was made without ``tail_rows``.
        """
        st = self._states.get(stream)
        if st is None:
            raise ConfigError(f"unknown stream {stream!r}; have {sorted(self._states)}")
        if st.tail is None:
            raise ConfigError(
                f"stream {stream!r} keeps no tail; create it with Stream(..., tail_rows=N)"
            )
        return st.tail.last(n)

    # -- stats -------------------------------------------------------------------------------
    def stream_stats(self, stream: str) -> StreamStats:
        """Figures of one stream."""
        try:
            st = self._states[stream]
        except KeyError:
            raise ConfigError(f"unknown stream {stream!r}; have {sorted(self._states)}") from None
        st.publish()
        return st.stats()

    def stats(self) -> WriteBufferStats:
        """Totals over all streams (and publishes the Prometheus metrics)."""
        per = [self.stream_stats(name) for name in self._states]
        return WriteBufferStats(
            streams=len(per),
            held_rows=sum(s.held_rows for s in per),
            held_bytes=sum(s.held_bytes for s in per),
            rows_in=sum(s.rows_in for s in per),
            rows_written=sum(s.rows_written for s in per),
            rows_duplicate=sum(s.rows_duplicate for s in per),
            rows_failed=sum(s.rows_failed for s in per),
            rows_quarantined=sum(s.rows_quarantined for s in per),
            rows_spilled=sum(s.rows_spilled for s in per),
            rows_rejected=sum(s.rows_rejected for s in per),
            rows_replayed=sum(s.rows_replayed for s in per),
            batches=sum(s.batches for s in per),
            deadletter_bytes=self._store.total_bytes,
        )

    async def flush(self) -> None:
        """Write everything buffered now and wait until it is written or dead-lettered."""
        for st in self._states.values():
            await self._drain(st)
        while self._writers:
            await asyncio.wait(list(self._writers))

    # -- flushing ------------------------------------------------------------------------------
    async def _flusher(self, st: StreamState) -> None:
        interval = st.stream.flush_interval
        while True:
            woken = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    woken = await st.wake.wait()
            st.wake.clear()
            st.reset_budget()  # the next batch_rows / high watermark must wake us again
            await self._drain(st, whole_batches=woken)
            if st.stranded and asyncio.get_running_loop().time() >= st.stranded_retry_at:
                st.stranded_retry_at = asyncio.get_running_loop().time() + STRANDED_RETRY_SECONDS
                await self._writer.retry_stranded(st)
            if self._closing and not st.rows:
                return

    async def _spiller(self, st: StreamState) -> None:
        while True:
            await st.spill_wake.wait()
            st.spill_wake.clear()
            if st.spill:
                await self._spill(st)
            if self._closing and not st.spill:
                return

    async def _drain(self, st: StreamState, *, whole_batches: bool = False) -> None:
        """Swap out what is buffered and start writing it.

        With ``whole_batches`` (a wake-up, not the interval), a stream that is not journaled
        swaps out whole batches only: the few rows that arrived after the wake-up and before
        the flusher ran stay for the next batch instead of costing a COPY transaction of
        their own. Below the high watermark fewer than ``batch_rows`` rows are not swapped
        at all; past it they are (the stream needs room now), but once it holds at least one
        whole batch only the remainder stays, so a swap past the watermark no longer ends in
        a chunk of 1 or ``batch_rows - 1`` rows, each costing a transaction. A put waiting
        for room still gets it: at least one whole batch leaves, and what stays (fewer than
        ``batch_rows``) plus a ``put_many`` part (at most ``batch_rows``) fit within the
        limits that held them all; with less than a batch buffered everything leaves.
        The journal's commit mark covers the whole list, so a journaled stream swaps it all.
        """
        while st.rows:
            await st.sem.acquire()
            st.fold_budget()  # the bytes appended on the fast path leave with their rows
            # The swap: one assignment between awaits, so no put can interleave (O(1)).
            rows, nbytes = st.rows, st.bytes
            keep = 0
            if (
                whole_batches
                and not self._closing
                and not st.journaled
                and (
                    len(rows) >= st.batch_rows
                    or (st.held_rows < st.high_rows and st.held_bytes < st.high_bytes)
                )
            ):
                keep = len(rows) % st.batch_rows
            if keep == len(rows):
                st.sem.release()
                return
            if keep:
                # Only the tail is copied (fewer than batch_rows references), never the batch.
                rest = rows[-keep:]
                del rows[-keep:]
                rest_bytes = nbytes * keep // (len(rows) + keep)
                st.rows, st.bytes = rest, rest_bytes
                nbytes -= rest_bytes
                st.reset_budget()
            else:
                st.rows, st.bytes = [], 0
            if not rows:
                st.sem.release()
                return
            st.inflight_rows += len(rows)
            st.inflight_bytes += nbytes
            entry = [st.last_seq, 0]
            st.commits.append(entry)
            task = asyncio.create_task(self._writer.write_batch(st, rows, nbytes, entry))
            self._writers.add(task)
            task.add_done_callback(self._writers.discard)
            st.publish()
            if keep:
                return

    async def _spill(self, st: StreamState) -> None:
        rows, nbytes = st.spill, st.spill_bytes
        st.spill, st.spill_bytes = [], 0
        # Spilled rows stay counted in memory (as in flight) until their file is on disk.
        st.inflight_rows += len(rows)
        st.inflight_bytes += nbytes
        batch = Batch(None)
        kept_bytes = 0
        try:
            await self._writer.dead_letter(st, "spilled", rows, batch=batch)
            # Saved nowhere (store full): kept in memory, still counted, retried later.
            for item in batch.new:
                item.nbytes = nbytes * len(item.rows) // len(rows)
                kept_bytes += item.nbytes
                st.stranded.append(item)
        finally:
            kept_rows = sum(len(item.rows) for item in batch.new)
            st.inflight_rows -= len(rows) - kept_rows
            st.inflight_bytes -= nbytes - kept_bytes
            st.room.set()

    # -- recovery ------------------------------------------------------------------------------
    async def _recover(self) -> None:
        assert self._journal is not None
        # A stream's last_seq advances only as each recovered record is admitted (or saved as
        # poison): a batch swapped out while recovery is still going on commits exactly the
        # records it carries, never ones still waiting to be re-queued (a crash then would lose
        # them). Records are read one segment at a time, in a worker thread (blocking reads).
        iter_seq = getattr(self._journal, "iter_recover_seq", None)
        if iter_seq is not None:
            source: Iterator[tuple[int, str, dict[str, Any]]] = iter(iter_seq())
        else:
            # A journal without sequence numbers per record: commit nothing until the last
            # recovered record is admitted (batches swapped meanwhile carry seq 0).
            records = await maybe_await(self._journal.recover())
            final = self._journal.last_seq
            source = ((0, stream, record) for stream, record in records)
        count = 0
        touched: set[str] = set()
        while True:
            chunk = await asyncio.to_thread(list, itertools.islice(source, _RECOVER_CHUNK))
            if not chunk:
                break
            for seq, stream, record in chunk:
                st = self._states.get(stream)
                if st is None:
                    _log.error(
                        "journal holds records of unknown stream %r; left in the journal", stream
                    )
                    continue
                touched.add(stream)
                try:
                    row, size = st.validator.validate(record)
                except RecordError as exc:
                    bad = tuple(record.get(c) for c in st.stream.column_names)
                    saved = await self._writer.dead_letter(
                        st, "poison", [bad], errors=[error_info(exc)]
                    )
                    if not saved:
                        raise DeadLetterFull(
                            f"stream {stream!r}: a recovered journal record failed validation "
                            f"({exc}) and the dead-letter store {self._store.directory} cannot "
                            "take it; it stays in the journal. Free the store and open again"
                        ) from exc
                    st.last_seq = max(st.last_seq, seq)
                    continue
                if not st.has_room(size):
                    await self._wait_room(st, size)
                self._admit(st, row, size, record)
                # Set right after the record joined st.rows (no await in between): the next
                # swap carries this record and its sequence number together.
                st.last_seq = max(st.last_seq, seq)
                count += 1
        if iter_seq is None:
            for name in touched:
                st = self._states[name]
                st.last_seq = max(st.last_seq, final)
        if count:
            _log.warning("re-enqueued %d record(s) recovered from the journal", count)

    async def replay(self) -> list[FileReplay]:
        """Replay this buffer's ``failed`` and ``spilled`` dead letters now."""
        assert self._global_sem is not None
        async with self._global_sem:
            results = await replay_files(
                self._db, self._store, streams=list(self._states), retry=self._retry
            )
        for r in results:
            st = self._states.get(r.path.parent.parent.name)
            if st is not None and r.deleted:
                st.counts["replayed"] += r.written
                st.counts["quarantined"] += r.quarantined
        return results

    async def _prune_ledger(self, conn: asyncpg.Connection) -> None:
        # One ledger per schema; prune each once.
        self._pruned_at = time.monotonic()
        if not self._ledger:
            return
        done: set[str] = set()
        for st in self._states.values():
            if st.sink.schema not in done:
                done.add(st.sink.schema)
                pruned = await st.sink.prune_ledger(conn, self._ledger_retention)
                if pruned:
                    _log.info("pruned %d ledger row(s) in schema %s", pruned, st.sink.schema)

    async def _replay_loop(self) -> None:
        assert self._replay_interval is not None
        while True:
            await asyncio.sleep(self._replay_interval)
            try:
                await self._replay_pass()
            except Exception as exc:  # noqa: BLE001  logged and counted; the next pass retries
                REPLAY_ERRORS.inc()
                _log.exception(
                    "dead-letter replay pass failed (%s: %s); retrying in %s s",
                    type(exc).__name__,
                    exc,
                    self._replay_interval,
                )

    async def _replay_pass(self) -> None:
        if time.monotonic() - self._pruned_at > 3600.0:
            try:
                async with asyncio.timeout(30.0), self._db.connection() as conn:
                    await self._prune_ledger(conn)
            except Exception as exc:  # noqa: BLE001  retried next hour; logged
                _log.warning("ledger pruning postponed: %s: %s", type(exc).__name__, exc)
        if not any(
            f.reason in ("failed", "spilled")
            for f in self._store.files()
            if f.stream in self._states
        ):
            self._store.rescan()
            return
        try:
            async with asyncio.timeout(5.0), self._db.connection() as conn:
                await conn.fetchval("SELECT 1")
        except Exception as exc:  # noqa: BLE001  health probe: any failure = not healthy
            _log.debug("dead-letter replay waits: database not healthy (%s)", exc)
            return
        results = await self.replay()
        if results:
            _log.info("replayed %d dead-letter file(s)", sum(r.deleted for r in results))
