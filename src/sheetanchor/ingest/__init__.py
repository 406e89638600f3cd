"""Ingest: bounded write buffers into PostgreSQL that lose nothing.

``WriteBuffer`` takes records per ``Stream``, validates them at ``put``, holds at most
``max_rows``/``max_bytes`` per stream in memory, writes batches with binary COPY idempotently on
the stream's natural key, isolates poison records by bisection, and routes whatever cannot be
written to the ``DeadLetterStore`` (replayed automatically once the database is healthy).

Also in this package: the durable ``Journal`` (``_journal``), data-quality checks
(``quality``), the bounded ``Tail`` of recent records (``_tail``) and time-partitioned tables
(``partitions``).
"""

from __future__ import annotations

from sheetanchor.ingest._bisect import BisectAborted, BisectResult, bisect_write
from sheetanchor.ingest._buffer import WriteBuffer
from sheetanchor.ingest._replay import FileReplay, replay_file, replay_files
from sheetanchor.ingest._retry import DEFAULT_INGEST_POLICY, RetryLike
from sheetanchor.ingest._sink import LEDGER_TABLE, ConnectionSource, CopySink, SinkOutcome
from sheetanchor.ingest._state import StreamStats, WriteBufferStats
from sheetanchor.ingest._stream import COLUMN_TYPES, Stream, StreamKind
from sheetanchor.ingest._tail import Tail
from sheetanchor.ingest.deadletter import DeadLetterFile, DeadLetterStore
from sheetanchor.ingest.quality import QualityCheck, QualityGate

__all__ = [
    "COLUMN_TYPES",
    "DEFAULT_INGEST_POLICY",
    "LEDGER_TABLE",
    "BisectAborted",
    "BisectResult",
    "ConnectionSource",
    "CopySink",
    "DeadLetterFile",
    "DeadLetterStore",
    "FileReplay",
    "QualityCheck",
    "QualityGate",
    "RetryLike",
    "SinkOutcome",
    "Stream",
    "StreamKind",
    "StreamStats",
    "Tail",
    "WriteBuffer",
    "WriteBufferStats",
    "bisect_write",
    "replay_file",
    "replay_files",
]
