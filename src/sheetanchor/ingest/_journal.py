"""A durable, bounded, append-only journal for ingest records, with group commit.

Records are written to segment files (format in ``_journal_format``) before the producer is
told they are accepted; once PostgreSQL holds them, :meth:`Journal.commit` marks them and
segments whose records are all committed are deleted. After a crash, :meth:`Journal.recover`
returns what was accepted but never committed.

Group commit: appends on the event loop only queue their frames and wait; one flusher task
hands everything queued to a worker thread, which does one ``write`` and one ``fdatasync``
for all of them. Under load, many appenders share each fsync; the event loop never waits
for an fsync. (With ``fsync="never"`` the group's single ``write`` into the page cache is made
on the loop: a worker-thread round trip costs more than that write.)
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import threading
import warnings
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NamedTuple

from prometheus_client import Counter, Gauge

from sheetanchor.errors import (
    ConfigError,
    JournalError,
    JournalFull,
    RecordError,
    ResourceClosed,
    WrongEventLoop,
)
from sheetanchor.ingest._journal_format import (
    RECORD_KINDS,
    checkpoint_frame,
    commit_frame,
    encode_group,
    encode_record,
    encode_rows,
    entry_last_seq,
    entry_records,
    iter_entries,
    read_segment,
)
from sheetanchor.observe import REGISTRY, get_logger, metric_name

__all__ = ["DEFAULT_JOURNAL_MAX_BYTES", "DEFAULT_SEGMENT_BYTES", "Journal", "JournalStats"]

FsyncPolicy = Literal["batch", "always", "never"]
_POLICIES: tuple[str, ...] = ("batch", "always", "never")

# Small enough that recovery reads one segment at a time in modest memory, large enough that
# rotation (a file create and a directory fsync) is rare.
DEFAULT_SEGMENT_BYTES = 16 * 1024 * 1024
DEFAULT_JOURNAL_MAX_BYTES = 1024 * 1024 * 1024
_SEGMENT_SUFFIX = ".seg"
_LOCK_NAME = "LOCK"

_log = get_logger("ingest.journal")

_RECORDS = Counter(
    metric_name("ingest", "journal_records"),
    "Records durably appended to the ingest journal.",
    registry=REGISTRY,
)
_FSYNCS = Counter(
    metric_name("ingest", "journal_fsyncs"),
    "fdatasync calls made by the ingest journal (one per group commit).",
    registry=REGISTRY,
)
_BYTES = Gauge(
    metric_name("ingest", "journal", "bytes"),
    "Bytes held in ingest journal segment files by open journals.",
    registry=REGISTRY,
)
_DAMAGED = Counter(
    metric_name("ingest", "journal_damaged_frames"),
    "Damaged journal frames found and skipped on open (torn tail or bad crc32).",
    ["kind"],
    registry=REGISTRY,
)
_FULL = Counter(
    metric_name("ingest", "journal_full"),
    "Appends refused because the journal reached max_bytes.",
    registry=REGISTRY,
)


class JournalStats(NamedTuple):
    """A snapshot of a journal, from :meth:`Journal.stats`."""

    segments: int
    bytes: int
    max_bytes: int
    last_seq: int
    pending_appends: int
    records_appended: int
    group_writes: int
    fsyncs: int
    segments_deleted: int
    torn_tails: int
    corrupt_frames: int


@dataclass
class _Segment:
    index: int
    path: Path
    size: int
    # Highest sequence per stream in this segment: it can go once every one is committed.
    stream_max: dict[str, int] = field(default_factory=dict)


@dataclass
class _Append:
    frames: list[bytes]
    records: int
    nbytes: int
    stream: str
    last_seq: int
    future: asyncio.Future[int]


class Journal:
    """A durable append-only journal of ingest records, one directory per journal.

    Args:
        directory: where segment files live; created (mode 0700) if missing. One process at a
            time: a second ``Journal`` on the same directory raises :class:`JournalError`.
        fsync: ``"batch"`` (default): group commit, concurrent appends share one
            write+fdatasync; ``"always"``: one write+fdatasync per :meth:`append` call;
            ``"never"``: written to the OS only (survives a process crash, not a power loss).
        group_commit_interval: at most this many seconds the flusher waits for as many
            appends as joined the previous group (``"batch"`` only). Appends queued while a
            write runs always share the next one; a lone sequential appender never waits.
            0 never waits.
        segment_bytes: a segment is closed and a new one started past this size.
        max_bytes: limit on bytes held on disk plus queued; :meth:`append` raises
            :class:`JournalFull` beyond it. At least twice ``segment_bytes``.

    Sequence numbers are global to the journal, start at 1 and only grow, across restarts.

    Example::

        journal = Journal(path)
        for stream, record in journal.recover():   # before the first append
            ...                                      # re-ingest; see recover()
        seq = await journal.append("prices", [{"symbol": "X", "price": 1.0}])
        ...                                          # write to PostgreSQL
        journal.commit("prices", seq)
        await journal.close()
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        fsync: FsyncPolicy = "batch",
        group_commit_interval: float = 0.002,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        max_bytes: int = DEFAULT_JOURNAL_MAX_BYTES,
    ) -> None:
        if fsync not in _POLICIES:
            raise ConfigError(f"fsync={fsync!r} is not one of {', '.join(_POLICIES)}")
        if group_commit_interval < 0:
            raise ConfigError(f"group_commit_interval={group_commit_interval!r} must be >= 0")
        if segment_bytes < 1:
            raise ConfigError(f"segment_bytes={segment_bytes!r} must be >= 1")
        if max_bytes < 2 * segment_bytes:
            raise ConfigError(
                f"max_bytes={max_bytes!r} must be at least twice segment_bytes={segment_bytes!r}"
            )
        self._dir = Path(directory)
        self._fsync: FsyncPolicy = fsync
        self._interval = float(group_commit_interval)
        self._segment_bytes = segment_bytes
        self._max_bytes = max_bytes

        # Loop-side state (only touched on the event loop thread).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: deque[_Append] = deque()
        self._pending_bytes = 0
        self._inflight_bytes = 0
        self._marks: dict[str, int] = {}
        self._marks_pending: dict[str, int] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._last_group = 0
        self._group_target = 0
        self._group_ready = asyncio.Event()
        self._failed: JournalError | None = None
        self._closing = False
        self._closed = True  # until fully open, so __del__ of a failed __init__ stays quiet

        # Writer-side state: touched by the worker thread while a flush runs, and by the loop
        # only when no flush can run (open, close). ``_meta`` guards what stats() reads.
        self._meta = threading.Lock()
        self._segments: list[_Segment] = []
        self._fd: int | None = None
        self._durable_marks: dict[str, int] = {}
        self._written_floor = 1
        self._disk_bytes = 0
        self._records_appended = 0
        self._group_writes = 0
        self._fsyncs = 0
        self._segments_deleted = 0
        self._torn_tails = 0
        self._corrupt_frames = 0

        self._lock_fd = self._open_directory()
        try:
            self._scan()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._next_seq = self._written_floor
        self._marks = dict(self._durable_marks)
        _BYTES.inc(self._disk_bytes)
        self._closed = False

    # -- public API ------------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        """The journal's directory."""
        return self._dir

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has finished."""
        return self._closed

    @property
    def last_seq(self) -> int:
        """The highest sequence number handed out so far (0 if none)."""
        return self._next_seq - 1

    async def append(self, stream: str, records: Sequence[Mapping[str, Any]]) -> int:
        """Append ``records`` of ``stream``; return once they are durable per the fsync policy.

        The records get consecutive sequence numbers; the last one is returned (the first is
        ``seq - len(records) + 1``). An empty list returns :attr:`last_seq` without writing.

        Ordering: the numbers are assigned when ``append`` is called, before it first waits,
        and concurrent appends are resolved in sequence order (tasks awaiting ``append``
        directly resume in that order). So a caller does not need a lock around ``append``
        to keep its records in journal order.

        Raises:
            RecordError: a value cannot be encoded (orjson types, plus Decimal and bytes).
            JournalFull: the journal would exceed ``max_bytes``.
            JournalError: an earlier write failed; close and reopen the journal.
            ResourceClosed: the journal is closed or closing.
            WrongEventLoop: called from another event loop than the first append.
        """
        loop = self._check_usable()
        if not records:
            return self._next_seq - 1
        first = self._next_seq
        # Several records: one frame for all of them (one encode, one checksum).
        try:
            if len(records) == 1:
                frames = [encode_record(first, stream, records[0])]
            else:
                frames = [encode_group(first, stream, records)]
        except (TypeError, ValueError) as exc:
            raise _encode_error(stream, records, exc) from exc
        return await self._enqueue(loop, stream, frames, len(records))

    async def append_rows(
        self, stream: str, fields: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> int:
        """Like :meth:`append`, for records given as rows of values in ``fields`` order.

        Cheaper than :meth:`append` for many records of one shape: the field names are
        written once per call, not once per record. :meth:`recover` gives the records back
        as mappings, the same as for :meth:`append`.

        Raises:
            RecordError: a value cannot be encoded (orjson types, plus Decimal and bytes).
            JournalFull, JournalError, ResourceClosed, WrongEventLoop: as :meth:`append`.
        """
        loop = self._check_usable()
        if not rows:
            return self._next_seq - 1
        try:
            frames = [encode_rows(self._next_seq, stream, fields, rows)]
        except (TypeError, ValueError) as exc:
            records = [dict(zip(fields, row, strict=True)) for row in rows]
            raise _encode_error(stream, records, exc) from exc
        return await self._enqueue(loop, stream, frames, len(rows))

    def _enqueue(
        self, loop: asyncio.AbstractEventLoop, stream: str, frames: list[bytes], count: int
    ) -> asyncio.Future[int]:
        # Sequence numbers are taken here, before the caller first waits (see append's
        # ordering); the future resolves with the last one once the frames are durable.
        first = self._next_seq
        nbytes = sum(len(f) for f in frames)
        held = self._disk_bytes + self._pending_bytes + self._inflight_bytes
        if held + nbytes > self._max_bytes:
            _FULL.inc()
            raise JournalFull(
                f"journal {self._dir} holds {held} bytes; {count} more records of "
                f"stream {stream!r} ({nbytes} bytes) would pass max_bytes={self._max_bytes}. "
                "Commit written records (is PostgreSQL down?) or raise max_bytes"
            )
        self._next_seq += count
        last = first + count - 1
        future: asyncio.Future[int] = loop.create_future()
        self._pending.append(_Append(frames, count, nbytes, stream, last, future))
        self._pending_bytes += nbytes
        if self._group_target and len(self._pending) >= self._group_target:
            self._group_ready.set()
        self._wake(loop)
        return future

    def commit(self, stream: str, upto_seq: int) -> None:
        """Mark every record of ``stream`` with a sequence up to ``upto_seq`` as committed.

        A high-water mark: only commit ``upto_seq`` once every earlier record of the stream is
        safely in PostgreSQL. The mark is written with the next group (the caller does not wait
        for it; losing it in a crash only replays records, which the idempotent sink absorbs),
        then segments holding only committed records are deleted. Lower marks are ignored.

        Raises:
            ValueError: ``upto_seq`` was never handed out.
        """
        if upto_seq > self._next_seq - 1:
            raise ValueError(
                f"commit({stream!r}, {upto_seq}) is past the last sequence handed out "
                f"({self._next_seq - 1}); commit only sequences returned by append()"
            )
        if upto_seq <= self._marks.get(stream, 0):
            return
        self._marks[stream] = upto_seq
        self._marks_pending[stream] = upto_seq
        if self._failed is not None or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            # No loop here: the mark is written with the next append or by close().
            return
        if self._loop is None:
            self._loop = loop
        if loop is self._loop:
            self._wake(loop)

    def recover(self) -> list[tuple[str, dict[str, Any]]]:
        """Return ``(stream, record)`` for every record appended but not committed, in order.

        Call it once after opening, before the first :meth:`append`. The records stay in the
        journal until a later commit covers them: re-ingest them (their new appends get higher
        sequences, so committing those covers these too), or write them and then call
        ``commit(stream, journal.last_seq)`` before appending anything new. A crash before that
        returns them again; the idempotent sink absorbs the duplicates. Damaged frames are
        skipped (counted when the journal was opened); this never raises for bad data.

        This holds every uncommitted record in memory at once; :meth:`iter_recover` yields
        them one by one instead (memory: one segment's bytes).
        """
        return list(self.iter_recover())

    def iter_recover(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield what :meth:`recover` returns, one record at a time, reading one segment at a time.

        Blocking file reads: at start-up that is fine; on a busy event loop, iterate in a
        worker thread or between awaits.
        """
        for _seq, stream, record in self.iter_recover_seq():
            yield stream, record

    def iter_recover_seq(self) -> Iterator[tuple[int, str, dict[str, Any]]]:
        """Like :meth:`iter_recover`, with each record's sequence number: ``(seq, stream, record)``.

        A consumer that re-ingests the records may ``commit(stream, seq)`` once every record
        of ``stream`` up to ``seq`` is safely stored, even before the rest is re-ingested.
        """
        # Every mark on disk was read when the journal was opened; add the ones made since.
        marks = dict(self._durable_marks)
        for stream, upto in self._marks.items():
            marks[stream] = max(marks.get(stream, 0), upto)
        for segment in list(self._segments):
            for entry in iter_entries(_read_bytes(segment.path)):
                if entry["k"] not in RECORD_KINDS:
                    continue
                stream = str(entry["t"])
                mark = marks.get(stream, 0)
                if entry_last_seq(entry) <= mark:
                    continue
                for seq, record in entry_records(entry):
                    if seq > mark:
                        yield seq, stream, record

    def stats(self) -> JournalStats:
        """Return counts and sizes of this journal."""
        with self._meta:
            return JournalStats(
                segments=len(self._segments),
                bytes=self._disk_bytes,
                max_bytes=self._max_bytes,
                last_seq=self._next_seq - 1,
                pending_appends=len(self._pending),
                records_appended=self._records_appended,
                group_writes=self._group_writes,
                fsyncs=self._fsyncs,
                segments_deleted=self._segments_deleted,
                torn_tails=self._torn_tails,
                corrupt_frames=self._corrupt_frames,
            )

    async def close(self) -> None:
        """Write what is queued (records and commit marks), then close the files.

        Idempotent. Appends after close raise :class:`ResourceClosed`.
        """
        if self._closed:
            return
        self._closing = True
        if self._loop is not None and self._failed is None and self._marks_pending:
            self._wake(self._loop)
        if self._flusher is not None and not self._flusher.done():
            await self._flusher
        if self._failed is None and self._marks_pending:
            # commit() was called outside a loop and nothing flushed since: write it here.
            await asyncio.to_thread(self._write_group, [], self._take_marks(), {}, 0, 0)
        await asyncio.to_thread(self._close_files)
        self._closed = True

    async def __aenter__(self) -> Journal:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __del__(self) -> None:
        if getattr(self, "_closed", True):
            return
        warnings.warn(
            f"Journal({str(self._dir)!r}) was never closed; call 'await journal.close()'",
            ResourceWarning,
            stacklevel=2,
        )
        self._close_files()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Journal {str(self._dir)!r} fsync={self._fsync} {state}>"

    # -- event loop side -------------------------------------------------------------------

    def _check_usable(self) -> asyncio.AbstractEventLoop:
        if self._closed or self._closing:
            raise ResourceClosed(f"journal {self._dir} is closed; open a new Journal")
        if self._failed is not None:
            raise JournalError(
                f"journal {self._dir} failed earlier ({self._failed}); "
                "close it and open a new Journal on the directory to recover"
            ) from self._failed.__cause__
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise WrongEventLoop(
                f"journal {self._dir} is used from another event loop than the one it "
                "started on; open one Journal per event loop (and per directory)"
            )
        return loop

    def _wake(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush_loop(), name=f"journal-flush {self._dir}")

    def _take_marks(self) -> dict[str, int]:
        marks, self._marks_pending = self._marks_pending, {}
        return marks

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending or self._marks_pending:
            if self._fsync == "batch" and self._interval > 0:
                await self._gather_group()
            if self._fsync == "always" and self._pending:
                group = [self._pending.popleft()]
            else:
                group = list(self._pending)
                self._pending.clear()
            self._last_group = len(group)
            nbytes = sum(a.nbytes for a in group)
            self._pending_bytes -= nbytes
            self._inflight_bytes += nbytes
            frames = [f for a in group for f in a.frames]
            count = sum(a.records for a in group)
            stream_max: dict[str, int] = {}
            for append in group:
                stream_max[append.stream] = max(stream_max.get(append.stream, 0), append.last_seq)
            marks = self._take_marks()
            try:
                if self._fsync == "never":
                    # No fsync: one write() into the page cache, done on the loop (a worker
                    # thread round trip would cost more than the write itself).
                    self._write_group(frames, marks, stream_max, len(group), count)
                else:
                    # run_in_executor, not to_thread: the worker needs no copy of the
                    # loop's context, and this runs once per group.
                    await loop.run_in_executor(
                        None, self._write_group, frames, marks, stream_max, len(group), count
                    )
            except asyncio.CancelledError:
                # The loop is shutting down under us: the thread may still finish the write,
                # but nobody will be told. Refuse further use; reopening recovers the truth.
                self._fail(JournalError(f"journal {self._dir} flush was cancelled"), group)
                raise
            except OSError as exc:
                error = JournalError(
                    f"journal {self._dir} could not write {len(frames)} entries: {exc}; "
                    "check the disk, then close and reopen the journal"
                )
                error.__cause__ = exc
                _log.error("%s", error)
                self._fail(error, group)
                return
            except Exception as exc:  # noqa: BLE001  routed: logged, every waiter gets it
                # Not a disk error, so a bug: still, no appender may wait forever on it.
                error = JournalError(
                    f"journal {self._dir} failed unexpectedly while writing: {exc!r}; "
                    "close and reopen the journal"
                )
                error.__cause__ = exc
                _log.exception("%s", error)
                self._fail(error, group)
                return
            finally:
                self._inflight_bytes -= nbytes
            for append in group:
                if not append.future.done():
                    append.future.set_result(append.last_seq)

    async def _gather_group(self) -> None:
        # Wait (at most the interval) only while fewer appends are queued than joined the
        # previous group: under steady concurrency the group is already complete when the
        # flusher runs, and a lone appender (groups of one) never waits at all.
        if not 0 < len(self._pending) < self._last_group:
            return
        self._group_target = self._last_group
        self._group_ready.clear()
        try:
            # When the interval is up, the group is written as it is.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._group_ready.wait()
        finally:
            self._group_target = 0

    def _fail(self, error: JournalError, group: list[_Append]) -> None:
        self._failed = error
        waiting = [*group, *self._pending]
        self._pending.clear()
        self._pending_bytes = 0
        for append in waiting:
            if not append.future.done():
                append.future.set_exception(error)

    # -- worker thread side ----------------------------------------------------------------

    def _open_directory(self) -> int:
        created = not self._dir.exists()
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if created:
            _fsync_dir(self._dir.parent)
        fd = os.open(self._dir / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalError(
                f"journal {self._dir} is in use by another Journal (this or another process); "
                "one writer per directory: close the other one or use another directory"
            ) from None
        return fd

    def _scan(self) -> None:
        paths = sorted(p for p in self._dir.iterdir() if p.name.endswith(_SEGMENT_SUFFIX))
        for path in paths:
            try:
                index = int(path.name.removesuffix(_SEGMENT_SUFFIX))
            except ValueError:
                _log.warning("ignoring unexpected file %s in journal %s", path.name, self._dir)
                continue
            entries: list[dict[str, Any]] = []
            data = _read_bytes(path)
            result = read_segment(data, entries)
            segment = _Segment(index, path, len(data))
            for entry in entries:
                if entry["k"] in RECORD_KINDS:
                    seq = entry_last_seq(entry)
                    stream = str(entry["t"])
                    segment.stream_max[stream] = max(segment.stream_max.get(stream, 0), seq)
                    self._written_floor = max(self._written_floor, seq + 1)
                else:
                    _merge_marks(self._durable_marks, entry)
                    if entry["k"] == "p":
                        self._written_floor = max(self._written_floor, int(entry["n"]))
            if result.torn_tail:
                self._torn_tails += 1
                _DAMAGED.labels(kind="torn").inc()
                _log.warning(
                    "journal segment %s ends in a torn frame after %d of %d bytes "
                    "(crash during a write); the unacknowledged tail is skipped",
                    path,
                    result.valid_bytes,
                    len(data),
                )
            if result.corrupt_frames:
                self._corrupt_frames += result.corrupt_frames
                _DAMAGED.labels(kind="crc").inc(result.corrupt_frames)
                _log.error(
                    "journal segment %s has %d frame(s) with a bad crc32; they are skipped",
                    path,
                    result.corrupt_frames,
                )
            self._segments.append(segment)
            self._disk_bytes += len(data)
        for marks_seq in self._durable_marks.values():
            self._written_floor = max(self._written_floor, marks_seq + 1)

    def _write_group(
        self,
        frames: list[bytes],
        marks: dict[str, int],
        stream_max: dict[str, int],
        appends: int,
        records: int,
    ) -> None:
        sync = self._fsync != "never"
        if self._fd is None or self._segments[-1].size >= self._segment_bytes:
            self._rotate(sync)
        active = self._segments[-1]
        assert self._fd is not None
        commits = [commit_frame(stream, upto) for stream, upto in marks.items()]
        data = b"".join([*frames, *commits])
        _write_all(self._fd, data)
        if sync:
            os.fdatasync(self._fd)
            _FSYNCS.inc()
        with self._meta:
            active.size += len(data)
            self._disk_bytes += len(data)
            self._records_appended += records
            self._group_writes += 1 if appends else 0
            self._fsyncs += 1 if sync else 0
            for stream, seq in stream_max.items():
                active.stream_max[stream] = max(active.stream_max.get(stream, 0), seq)
                self._written_floor = max(self._written_floor, seq + 1)
            for stream, upto in marks.items():
                self._durable_marks[stream] = max(self._durable_marks.get(stream, 0), upto)
        _BYTES.inc(len(data))
        _RECORDS.inc(records)
        self._delete_committed(sync)

    def _rotate(self, sync: bool) -> None:
        index = self._segments[-1].index + 1 if self._segments else 1
        path = self._dir / f"{index:012d}{_SEGMENT_SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        live = {s for seg in self._segments for s in seg.stream_max}
        marks = {s: m for s, m in self._durable_marks.items() if s in live}
        head = checkpoint_frame(self._written_floor, marks)
        try:
            _write_all(fd, head)
            if sync:
                os.fdatasync(fd)
                _fsync_dir(self._dir)
        except BaseException:
            os.close(fd)
            raise
        old, self._fd = self._fd, fd
        with self._meta:
            self._segments.append(_Segment(index, path, len(head)))
            self._disk_bytes += len(head)
            self._fsyncs += 1 if sync else 0
        if sync:
            _FSYNCS.inc()
        _BYTES.inc(len(head))
        if old is not None:
            os.close(old)

    def _delete_committed(self, sync: bool) -> None:
        doomed = [
            seg
            for seg in self._segments[:-1]
            if all(self._durable_marks.get(s, 0) >= m for s, m in seg.stream_max.items())
        ]
        if not doomed:
            return
        for seg in doomed:
            seg.path.unlink()
        if sync:
            _fsync_dir(self._dir)
        freed = sum(seg.size for seg in doomed)
        with self._meta:
            self._segments = [s for s in self._segments if s not in doomed]
            self._disk_bytes -= freed
            self._segments_deleted += len(doomed)
        _BYTES.dec(freed)

    def _close_files(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
            _BYTES.dec(self._disk_bytes)


def _merge_marks(marks: dict[str, int], entry: Mapping[str, Any]) -> None:
    if entry["k"] == "c":
        stream, upto = str(entry["t"]), int(entry["s"])
        marks[stream] = max(marks.get(stream, 0), upto)
    elif entry["k"] == "p":
        for stream, upto in entry["c"].items():
            marks[stream] = max(marks.get(stream, 0), int(upto))


def _read_bytes(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode_error(stream: str, records: Sequence[Mapping[str, Any]], exc: Exception) -> RecordError:
    """The error of a group that cannot be encoded, naming its first bad record."""
    for offset, record in enumerate(records):
        try:
            encode_record(0, stream, record)
        except (TypeError, ValueError) as bad:
            return RecordError(
                f"record {offset} of stream {stream!r} cannot be journaled: {bad}",
                stream=stream,
                value=record,
            )
    return RecordError(
        f"{len(records)} records of stream {stream!r} cannot be journaled: {exc}", stream=stream
    )
