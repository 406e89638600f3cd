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
import inspect
import os
import time
import uuid
import warnings
from collections.abc import Awaitable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from sheetanchor.errors import (
    BufferFull,
    ConfigError,
    DeadLetterFull,
    RecordError,
    ResourceClosed,
    WrongEventLoop,
)
from sheetanchor.ingest._bisect import BisectAborted, BisectResult, bisect_write
from sheetanchor.ingest._classify import error_info, is_data_error
from sheetanchor.ingest._journal_seam import JournalLike, open_journal
from sheetanchor.ingest._metrics import FLUSH_SECONDS
from sheetanchor.ingest._replay import FileReplay, replay_files
from sheetanchor.ingest._retry import DEFAULT_INGEST_POLICY, RetryLike
from sheetanchor.ingest._sink import ConnectionSource, SinkOutcome
from sheetanchor.ingest._state import StreamState, StreamStats, WriteBufferStats
from sheetanchor.ingest._stream import Stream
from sheetanchor.ingest._validate import Row
from sheetanchor.ingest.deadletter import DEFAULT_DEADLETTER_MAX_BYTES, DeadLetterStore
from sheetanchor.observe import get_logger

__all__ = ["WriteBuffer"]

_log = get_logger("ingest")
T = TypeVar("T")


async def _maybe_await(value: Awaitable[T] | T) -> T:
    if inspect.isawaitable(value):
        return await value
    return value


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
        max_concurrency: batches written at once over all streams.
        retry: retry policy for transient errors (``await policy.call(fn, *args)``).
        write_timeout: seconds one write attempt may take (then it counts as transient).
        replay_interval: seconds between automatic replays of dead letters; ``None`` = off.
        ledger: record committed batch ids (fast idempotent replay), see ``_sink``.
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
        self._close_timeout = close_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flushers: list[asyncio.Task[None]] = []
        self._writers: set[asyncio.Task[None]] = set()
        self._replayer: asyncio.Task[None] | None = None
        self._opened = False
        self._closing = False
        self._closed = False
        self._unsaved = 0

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

        async def prepare() -> None:
            async with asyncio.timeout(self._write_timeout), self._db.connection() as conn:
                for st in self._states.values():
                    await st.sink.prepare(conn)

        await self._retry.call(prepare)
        if self._journal is None and self._journal_dir is not None:
            self._journal = open_journal(self._journal_dir, fsync=self._journal_fsync)
        self._opened = True
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
        try:
            if not self._opened:
                return
            for st in self._states.values():
                st.wake.set()
                st.spill_wake.set()
                st.room.set()  # waiting producers wake up and see the buffer is closing
            _done, pending = await asyncio.wait(
                [*self._flushers, *self._writers], timeout=self._close_timeout
            )
            for task in pending:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*pending, return_exceptions=True)
            # Flushers may have started writers after the first wait began.
            if self._writers:
                await asyncio.wait(list(self._writers), timeout=self._close_timeout)
            for task in list(self._writers):
                task.cancel()
            await asyncio.gather(*self._writers, return_exceptions=True)
            if self._replayer is not None:
                self._replayer.cancel()
                await asyncio.gather(self._replayer, return_exceptions=True)
            for st in self._states.values():
                st.publish()
            if self._journal is not None:
                await _maybe_await(self._journal.close())
        finally:
            self._closed = True
        if self._unsaved:
            raise DeadLetterFull(
                f"{self._unsaved} row(s) could be written neither to PostgreSQL nor to the "
                f"dead-letter store {self._store.directory}; see the log for their errors"
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
        held_rows = len(st.rows) + st.inflight_rows + len(st.spill)
        held_bytes = st.bytes + st.inflight_bytes + st.spill_bytes + size
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
            st.rows.append(row)
            st.bytes += size
            if (
                len(st.rows) >= st.batch_rows
                or held_rows >= st.high_rows
                or held_bytes >= st.high_bytes
            ) and not st.wake.is_set():
                st.wake.set()
        st.counts["in"] += 1
        if st.tail is not None:
            st.tail.append(record)

    def put_nowait(self, stream: str, record: Mapping[str, Any]) -> None:
        """Validate ``record`` and buffer it now, or raise.

        Raises:
            RecordError: the record is invalid (names stream, field and value).
            BufferFull: the stream is at its limit (authoritative streams never drop).
            ConfigError: unknown stream, or a journaled stream (use ``await put``).
            ResourceClosed: the buffer is not open.
        """
        st = self._state(stream)
        self._check_loop()
        if self._journal is not None and not st.best_effort:
            raise ConfigError(
                f"stream {stream!r} is journaled: put_nowait cannot wait for the journal to "
                "be durable; use `await buffer.put(...)`"
            )
        row, size = self._validate(st, record)
        self._admit(st, row, size, record)

    async def put(self, stream: str, record: Mapping[str, Any]) -> None:
        """Validate and buffer ``record``, waiting (up to ``put_timeout``) for room.

        Best-effort streams never wait: past the emergency watermark they spill to disk.
        With a journal, an authoritative record is durable on disk when this returns.

        Raises:
            RecordError: the record is invalid.
            BufferFull: no room within the stream's ``put_timeout``.
        """
        st = self._state(stream)
        self._check_loop()
        row, size = self._validate(st, record)
        if st.best_effort:
            self._admit(st, row, size, record)
            return
        if self._journal is None:
            if not st.has_room(size):
                await self._wait_room(st, size)
            self._admit(st, row, size, record)
            return
        # Journaled puts are serialised per stream so records enter the buffer in journal
        # order: a batch's max sequence number then covers exactly what was written.
        async with st.journal_lock:
            if not st.has_room(size):
                await self._wait_room(st, size)
            seq = await self._journal.append(stream, [st.validator.as_dict(row)])
            st.last_seq = max(st.last_seq, seq)
            self._admit(st, row, size, record)

    async def _wait_room(self, st: StreamState, size: int) -> None:
        assert self._loop is not None
        deadline = self._loop.time() + st.stream.put_timeout
        st.waits += 1
        while not st.has_room(size):
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
        if not st.has_room(size):
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
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await st.wake.wait()
            st.wake.clear()
            await self._drain(st)
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

    async def _drain(self, st: StreamState) -> None:
        while st.rows:
            await st.sem.acquire()
            # The swap: one assignment between awaits, so no put can interleave (O(1)).
            rows, nbytes = st.rows, st.bytes
            st.rows, st.bytes = [], 0
            if not rows:
                st.sem.release()
                return
            st.inflight_rows += len(rows)
            st.inflight_bytes += nbytes
            entry = [st.last_seq, 0]
            st.commits.append(entry)
            task = asyncio.create_task(self._write_batch(st, rows, nbytes, entry))
            self._writers.add(task)
            task.add_done_callback(self._writers.discard)
            st.publish()

    async def _spill(self, st: StreamState) -> None:
        rows, nbytes = st.spill, st.spill_bytes
        st.spill, st.spill_bytes = [], 0
        # Spilled rows stay counted in memory (as in flight) until their file is on disk.
        st.inflight_rows += len(rows)
        st.inflight_bytes += nbytes
        try:
            await self._dead_letter(st, "spilled", rows)
        finally:
            st.inflight_rows -= len(rows)
            st.inflight_bytes -= nbytes
            st.room.set()

    async def _write_batch(
        self, st: StreamState, rows: list[Row], nbytes: int, entry: list[int]
    ) -> None:
        assert self._global_sem is not None
        released_rows = 0
        released_bytes = 0
        try:
            async with self._global_sem:
                for start in range(0, len(rows), st.batch_rows):
                    chunk = rows[start : start + st.batch_rows]
                    await self._write_chunk(st, chunk)
                    chunk_bytes = nbytes * (start + len(chunk)) // len(rows) - released_bytes
                    st.inflight_rows -= len(chunk)
                    st.inflight_bytes -= chunk_bytes
                    released_rows += len(chunk)
                    released_bytes += chunk_bytes
                    st.room.set()
            entry[1] = 1
            await self._journal_done(st)
        except asyncio.CancelledError:
            # close() ran out of time: what is not written goes to disk, never lost silently.
            rest = rows[released_rows:]
            if rest:
                self._dead_letter_now(st, "failed", rest)
            raise
        finally:
            st.inflight_rows -= len(rows) - released_rows
            st.inflight_bytes -= nbytes - released_bytes
            st.sem.release()
            st.room.set()
            st.publish()

    async def _journal_done(self, st: StreamState) -> None:
        # Commit the journal only up to the oldest batch still in flight: a later batch that
        # finished first must not truncate records of an earlier one that may still fail.
        if self._journal is None:
            st.commits.clear()
            return
        upto = 0
        while st.commits and st.commits[0][1]:
            upto = max(upto, st.commits.popleft()[0])
        if upto:
            await _maybe_await(self._journal.commit(st.name, upto))

    async def _attempt(
        self, st: StreamState, rows: Sequence[Row], batch_id: str | None
    ) -> SinkOutcome:
        async with asyncio.timeout(self._write_timeout), self._db.connection() as conn:
            return await st.sink.write(conn, rows, batch_id=batch_id)

    async def _write_chunk(self, st: StreamState, chunk: list[Row]) -> None:
        """Write one chunk; every outcome is routed (written, quarantined, dead-lettered)."""
        batch_id = str(uuid.uuid4())
        started = time.perf_counter()
        st.batches += 1
        try:
            outcome = await self._retry.call(self._attempt, st, chunk, batch_id)
        except Exception as exc:  # noqa: BLE001  routed below: bisect or dead-letter
            if is_data_error(exc):
                await self._bisect(st, chunk, exc)
                return
            st.last_error = f"{type(exc).__name__}: {exc}"
            _log.warning(
                "stream %s: batch of %d rows not written (%s); dead-lettering it",
                st.name,
                len(chunk),
                st.last_error,
            )
            await self._dead_letter(st, "failed", chunk, batch_id=batch_id)
            return
        finally:
            FLUSH_SECONDS.labels(st.name).observe(time.perf_counter() - started)
        st.last_error = None
        if outcome.path == "ledger":
            st.counts["duplicate"] += len(chunk)
        else:
            st.counts["written"] += outcome.inserted
            st.counts["duplicate"] += len(chunk) - outcome.inserted

    async def _bisect(self, st: StreamState, chunk: list[Row], first: Exception) -> None:
        inserted = 0

        async def write_segment(segment: Sequence[Row]) -> SinkOutcome:
            nonlocal inserted
            outcome = await self._retry.call(self._attempt, st, segment, None)
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
            await self._dead_letter(st, "poison", rows, errors=errors)
        if remaining:
            await self._dead_letter(st, "failed", remaining)

    async def _dead_letter(
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
                if self._closing:
                    self._unsaved += len(rows)
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                if reason == "failed":
                    try:
                        outcome = await self._attempt(st, rows, batch_id)
                    except Exception as db_exc:  # noqa: BLE001  logged; retried next round
                        _log.info("stream %s: database still refuses: %s", st.name, db_exc)
                        continue
                    st.counts["written"] += outcome.inserted
                    st.counts["duplicate"] += len(rows) - outcome.inserted
                    return
        key = {"failed": "failed", "spilled": "spilled", "poison": "quarantined"}[reason]
        st.counts[key] += len(rows)

    def _dead_letter_now(self, st: StreamState, reason: str, rows: list[Row]) -> None:
        try:
            self._store.write(st.describe, reason, rows)
        except (DeadLetterFull, OSError) as exc:
            _log.error("stream %s: %d rows lost at close: %s", st.name, len(rows), exc)
            self._unsaved += len(rows)
            return
        st.counts["failed"] += len(rows)

    # -- recovery ------------------------------------------------------------------------------
    async def _recover(self) -> None:
        assert self._journal is not None
        records = await _maybe_await(self._journal.recover())
        # Every recovered record has a sequence number <= last_seq, and no new append can
        # happen before open() returns: the batches holding them may commit up to last_seq.
        for state in self._states.values():
            state.last_seq = max(state.last_seq, self._journal.last_seq)
        count = 0
        for stream, record in records:
            st = self._states.get(stream)
            if st is None:
                _log.error(
                    "journal holds records of unknown stream %r; left in the journal", stream
                )
                continue
            try:
                row, size = st.validator.validate(record)
            except RecordError as exc:
                bad = tuple(record.get(c) for c in st.stream.column_names)
                await self._dead_letter(st, "poison", [bad], errors=[error_info(exc)])
                continue
            if not st.has_room(size):
                await self._wait_room(st, size)
            self._admit(st, row, size, record)
            count += 1
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

    async def _replay_loop(self) -> None:
        assert self._replay_interval is not None
        while True:
            await asyncio.sleep(self._replay_interval)
            if not any(
                f.reason in ("failed", "spilled")
                for f in self._store.files()
                if f.stream in self._states
            ):
                self._store.rescan()
                continue
            try:
                async with asyncio.timeout(5.0), self._db.connection() as conn:
                    await conn.fetchval("SELECT 1")
            except Exception as exc:  # noqa: BLE001  health probe: any failure = not healthy
                _log.debug("dead-letter replay waits: database not healthy (%s)", exc)
                continue
            results = await self.replay()
            if results:
                _log.info("replayed %d dead-letter file(s)", sum(r.deleted for r in results))
