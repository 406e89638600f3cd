"""Per-stream state of a write buffer: the buffer list, accounting, counters and stats."""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from sheetanchor.ingest._fastpath import FastAdmit, compile_fast_admit
from sheetanchor.ingest._metrics import BUFFERED_BYTES, BUFFERED_ROWS, FILL, ROWS
from sheetanchor.ingest._sink import CopySink
from sheetanchor.ingest._stream import Stream
from sheetanchor.ingest._tail import Tail
from sheetanchor.ingest._validate import ROW_OVERHEAD, Row, Validator
from sheetanchor.ingest.quality import QualityGate

__all__ = ["StreamState", "StreamStats", "WriteBufferStats"]

_COUNTERS = (
    "in",
    "written",
    "duplicate",
    "failed",
    "quarantined",
    "spilled",
    "rejected",
    "replayed",
)


class StreamStats(NamedTuple):
    """One stream's figures (``WriteBuffer.stream_stats(name)``).

    ``held_*`` count what is in memory: buffered plus being written plus awaiting spill;
    they never pass ``max_rows`` / ``max_bytes``.
    """

    stream: str
    kind: str
    buffered_rows: int
    inflight_rows: int
    spill_rows: int
    held_rows: int
    held_bytes: int
    fill: float
    max_rows: int
    max_bytes: int
    rows_in: int
    rows_written: int
    rows_duplicate: int
    rows_failed: int
    rows_quarantined: int
    rows_spilled: int
    rows_rejected: int
    rows_replayed: int
    batches: int
    waits: int
    last_error: str | None


class WriteBufferStats(NamedTuple):
    """Totals over all streams of a buffer (``WriteBuffer.stats()``)."""

    streams: int
    held_rows: int
    held_bytes: int
    rows_in: int
    rows_written: int
    rows_duplicate: int
    rows_failed: int
    rows_quarantined: int
    rows_spilled: int
    rows_rejected: int
    rows_replayed: int
    batches: int
    deadletter_bytes: int


class StreamState:
    """Mutable state of one stream. Only touched from the buffer's event loop.

    Every mutation happens in synchronous code between two awaits, so the event loop itself
    is the lock: a swap of ``rows`` is one assignment, O(1), and nothing interleaves with it.
    """

    __slots__ = (
        "_reported",
        "accepting",
        "batch_rows",
        "batches",
        "best_effort",
        "bytes",
        "commits",
        "counts",
        "describe",
        "emergency_bytes",
        "emergency_rows",
        "fast",
        "fast_admit",
        "fast_bytes_granted",
        "fast_bytes_left",
        "fast_granted",
        "fast_rows_left",
        "gate",
        "high_bytes",
        "high_rows",
        "inflight_bytes",
        "inflight_rows",
        "journaled",
        "last_error",
        "last_seq",
        "max_bytes",
        "max_rows",
        "name",
        "reserved_bytes",
        "reserved_rows",
        "room",
        "rows",
        "sem",
        "sink",
        "spill",
        "spill_bytes",
        "spill_wake",
        "stranded",
        "stranded_retry_at",
        "stream",
        "tail",
        "validator",
        "waits",
        "wake",
    )

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.name = stream.name
        self.best_effort = stream.kind == "best_effort"
        self.validator = Validator(stream)
        self.gate = QualityGate(stream.name, stream.checks) if stream.checks else None
        # put_nowait's fast path: the compiled validator, unless quality checks must see
        # every record (they run in the full path).
        self.fast = self.validator.fast if self.gate is None else None
        # put_nowait's fastest path: validate and append in one generated function, within
        # an admission budget (see refresh_budget). Not with quality checks or a tail, which
        # must see every record.
        self.fast_admit: FastAdmit | None = None
        if self.gate is None and not stream.tail_rows:
            self.fast_admit = compile_fast_admit(stream, row_overhead=ROW_OVERHEAD, state=self)
        self.fast_rows_left = 0
        self.fast_bytes_left = 0
        self.fast_bytes_granted = 0
        self.fast_granted = 0
        # True only while the buffer is open and not closing: put_nowait's fast path checks
        # nothing else, so no budget is granted outside that window (see refresh_budget).
        self.accepting = False
        # Set by WriteBuffer.open: authoritative records go through the disk journal.
        self.journaled = False
        self.sink = CopySink(stream.describe())
        self.describe: dict[str, Any] = stream.describe()
        self.tail: Tail[Mapping[str, Any]] | None = (
            Tail(stream.tail_rows) if stream.tail_rows else None
        )
        self.max_rows = stream.max_rows
        self.max_bytes = stream.max_bytes
        self.batch_rows = stream.batch_rows
        # Thresholds precomputed as absolute numbers: put_nowait compares ints only.
        self.high_rows = max(1, math.ceil(stream.high_watermark * stream.max_rows))
        self.high_bytes = max(1, math.ceil(stream.high_watermark * stream.max_bytes))
        self.emergency_rows = max(1, math.ceil(stream.emergency_watermark * stream.max_rows))
        self.emergency_bytes = max(1, math.ceil(stream.emergency_watermark * stream.max_bytes))
        self.rows: list[Row] = []
        self.bytes = 0
        self.inflight_rows = 0
        self.inflight_bytes = 0
        self.spill: list[Row] = []
        self.spill_bytes = 0
        self.counts = dict.fromkeys(_COUNTERS, 0)
        self._reported = dict.fromkeys(_COUNTERS, 0)
        self.batches = 0
        self.waits = 0
        self.last_error: str | None = None
        self.wake = asyncio.Event()
        self.spill_wake = asyncio.Event()
        self.room = asyncio.Event()
        self.sem = asyncio.Semaphore(stream.concurrency)
        # Room taken by puts waiting for the journal to make their records durable.
        self.reserved_rows = 0
        self.reserved_bytes = 0
        self.last_seq = 0
        # Batches in swap order as [max journal seq, done]; see WriteBuffer._journal_done.
        self.commits: collections.deque[list[int]] = collections.deque()
        # Rows that could be saved neither in PostgreSQL nor in the dead letters (store full,
        # disk refusing): kept in memory and still counted in flight, retried by the flusher
        # (see BatchWriter.retry_stranded). Items are writer-owned ``Stranded`` objects.
        self.stranded: list[Any] = []
        self.stranded_retry_at = 0.0

    def refresh_budget(self) -> None:
        """Grant ``fast_admit`` the records it may append before anything needs a decision.

        Called by the full admission path after each record. The budget is the number of
        rows (and bytes) that can be appended before the stream would be full, past its
        emergency watermark (best-effort) or, while no flush is requested yet, at
        ``batch_rows`` or the high watermark. Anything that can only shrink what is held
        (a swap, a finished write) leaves a budget conservative; whatever else changes
        the inputs (a flusher clearing ``wake``, room reserved for the journal, the buffer
        closing) calls ``reset_budget``. Nothing is granted to a journaled stream or while
        the buffer is not ``accepting``. Records admitted on the budget are counted in
        ``counts["in"]`` and their bytes in ``bytes`` lazily, by ``fold_budget`` (``held_bytes``
        includes them at any time).
        """
        self.fold_budget()
        if self.fast_admit is None or self.journaled or not self.accepting:
            self.fast_rows_left = self.fast_granted = 0
            self.fast_bytes_left = self.fast_bytes_granted = 0
            return
        held_rows = self.held_rows
        held_bytes = self.held_bytes
        rows = self.max_rows - held_rows
        nbytes = self.max_bytes - held_bytes
        if self.best_effort:
            rows = min(rows, self.emergency_rows - held_rows)
            nbytes = min(nbytes, self.emergency_bytes - held_bytes)
        if not self.wake.is_set():
            rows = min(rows, self.batch_rows - 1 - len(self.rows), self.high_rows - held_rows)
            nbytes = min(nbytes, self.high_bytes - 1 - held_bytes)
        self.fast_rows_left = self.fast_granted = max(0, rows)
        self.fast_bytes_left = self.fast_bytes_granted = nbytes

    def reset_budget(self) -> None:
        """Withdraw the fast-admission budget (the next record takes the full path)."""
        self.fold_budget()
        self.fast_rows_left = self.fast_granted = 0
        self.fast_bytes_left = self.fast_bytes_granted = 0

    def fold_budget(self) -> None:
        """Count the records admitted on the budget so far in ``counts["in"]`` and ``bytes``.

        Call before reading ``bytes`` directly (a swap, the full admission path).
        """
        used = self.fast_granted - self.fast_rows_left
        if used:
            self.counts["in"] += used
            self.fast_granted = self.fast_rows_left
            self.bytes += self.fast_bytes_granted - self.fast_bytes_left
            self.fast_bytes_granted = self.fast_bytes_left

    @property
    def held_rows(self) -> int:
        """Rows in memory: buffered, being written, awaiting spill or the journal."""
        return len(self.rows) + self.inflight_rows + len(self.spill) + self.reserved_rows

    @property
    def held_bytes(self) -> int:
        """Estimated bytes in memory: buffered, being written, awaiting spill or the journal."""
        return (
            self.bytes
            + (self.fast_bytes_granted - self.fast_bytes_left)
            + self.inflight_bytes
            + self.spill_bytes
            + self.reserved_bytes
        )

    def has_room(self, size: int, rows: int = 1) -> bool:
        """True when ``rows`` more records of ``size`` bytes in all fit under both limits."""
        return self.held_rows + rows <= self.max_rows and self.held_bytes + size <= self.max_bytes

    @property
    def fill(self) -> float:
        """Held rows or bytes over their limit, whichever is larger."""
        return max(self.held_rows / self.max_rows, self.held_bytes / self.max_bytes)

    def publish(self) -> None:
        """Fold counters and gauges into Prometheus (batched: put_nowait stays cheap)."""
        self.fold_budget()
        for key, value in self.counts.items():
            delta = value - self._reported[key]
            if delta:
                ROWS[key].labels(self.name).inc(delta)
                self._reported[key] = value
        FILL.labels(self.name).set(self.fill)
        BUFFERED_ROWS.labels(self.name).set(self.held_rows)
        BUFFERED_BYTES.labels(self.name).set(self.held_bytes)

    def stats(self) -> StreamStats:
        """A snapshot of this stream's figures."""
        self.fold_budget()
        c = self.counts
        return StreamStats(
            stream=self.name,
            kind=self.stream.kind,
            buffered_rows=len(self.rows),
            inflight_rows=self.inflight_rows,
            spill_rows=len(self.spill),
            held_rows=self.held_rows,
            held_bytes=self.held_bytes,
            fill=self.fill,
            max_rows=self.max_rows,
            max_bytes=self.max_bytes,
            rows_in=c["in"],
            rows_written=c["written"],
            rows_duplicate=c["duplicate"],
            rows_failed=c["failed"],
            rows_quarantined=c["quarantined"],
            rows_spilled=c["spilled"],
            rows_rejected=c["rejected"],
            rows_replayed=c["replayed"],
            batches=self.batches,
            waits=self.waits,
            last_error=self.last_error,
        )
