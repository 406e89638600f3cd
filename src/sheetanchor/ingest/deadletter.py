"""The dead-letter store: rows that could not be written, on disk, never back in memory.

Layout: ``<directory>/<stream>/<reason>/<timestamp>-<seq>.ndjson``. The first line of each
file is a header describing the stream (table, columns, natural key, batch id), so a file can
be replayed without the code that wrote it; each further line is one record, with the error
PostgreSQL gave for it when there was one::

    {"sheetanchor_deadletter": 1, "stream": "ticks", "reason": "poison", "table": "tick", ...}
    {"record": {"ts": "...", "symbol": "X", ...}, "error": {"sqlstate": "22P05", "message": "..."}}

Reasons: ``failed`` (the batch could not be written within the retry budget), ``spilled``
(a best-effort stream passed its emergency watermark) and ``poison`` (PostgreSQL refused the
record for a data reason).

Files are written atomically (temporary file, fsync, link into place, directory fsync) with
mode 0600, and the store is bounded in total bytes: past ``max_bytes`` a write raises
:class:`~sheetanchor.errors.DeadLetterFull`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple

import orjson
from prometheus_client import Counter, Gauge

from sheetanchor.config import home_dir
from sheetanchor.errors import ConfigError, DeadLetterFull
from sheetanchor.ingest._codec import decode_row, encode_row, json_default
from sheetanchor.ingest._throttle import DEFAULT_LOG_INTERVAL, LogThrottle
from sheetanchor.observe import REGISTRY, get_logger, metric_name

__all__ = [
    "DEFAULT_DEADLETTER_MAX_BYTES",
    "REASONS",
    "DeadLetterFile",
    "DeadLetterStore",
    "MalformedDeadLetter",
    "default_deadletter_dir",
]

REASONS: Final = ("failed", "spilled", "poison")
DEFAULT_DEADLETTER_MAX_BYTES: Final = 1024 * 1024 * 1024
_FORMAT_VERSION: Final = 1
_SUFFIX: Final = ".ndjson"
_log = get_logger("ingest.deadletter")

_BYTES = Gauge(
    metric_name("ingest", "deadletter", "bytes"),
    "Bytes held in the dead-letter store, per stream.",
    ["stream"],
    registry=REGISTRY,
)
_FULL = Counter(
    metric_name("ingest", "deadletter_full", "total"),
    "Dead-letter writes refused because the store reached max_bytes, per stream.",
    ["stream"],
    registry=REGISTRY,
)
_BAD = Counter(
    metric_name("ingest", "deadletter_bad_files", "total"),
    "Malformed dead-letter files moved aside to <name>.bad, per stream.",
    ["stream"],
    registry=REGISTRY,
)


class MalformedDeadLetter(ValueError):
    """A dead-letter file cannot be decoded (bad header or record line)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def default_deadletter_dir() -> Path:
    """``<sheetanchor home>/deadletter`` (see ``sheetanchor.config.home_dir``)."""
    return home_dir() / "deadletter"


class DeadLetterFile(NamedTuple):
    """One dead-letter file as listed by :meth:`DeadLetterStore.files`."""

    path: Path
    stream: str
    reason: str
    size: int
    created: float


@dataclass(frozen=True, slots=True)
class DeadLetterBatch:
    """The decoded content of one dead-letter file."""

    header: dict[str, Any]
    rows: list[tuple[Any, ...]]
    errors: list[dict[str, Any] | None]

    @property
    def columns(self) -> dict[str, str]:
        """Column name -> canonical type, from the header."""
        return dict(self.header["columns"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DeadLetterStore:
    """NDJSON files per stream and reason, written atomically, bounded in total bytes.

    Arguments:
        directory: root directory (default ``<sheetanchor home>/deadletter``).
        max_bytes: total size limit; a write that would pass it raises ``DeadLetterFull``.
        log_interval: seconds between two WARNING lines about files written for one stream
            and reason: the first is logged at once, later ones are counted and summed up in
            the next line (or by ``flush_log()``), so an outage does not log every batch.

    Thread-safe: the write buffer writes from worker threads so fsync never blocks its loop.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        max_bytes: int = DEFAULT_DEADLETTER_MAX_BYTES,
        log_interval: float = DEFAULT_LOG_INTERVAL,
    ) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ConfigError(f"DeadLetterStore max_bytes must be an int > 0, got {max_bytes!r}")
        if log_interval < 0:
            raise ConfigError(f"DeadLetterStore log_interval must be >= 0, got {log_interval!r}")
        self.log_interval = float(log_interval)
        self._notes = LogThrottle(_log, interval=self.log_interval)
        self.directory = Path(directory) if directory is not None else default_deadletter_dir()
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        # Bytes on disk per stream, and bytes reserved by writes not linked into place yet
        # (kept apart so a rescan, which recounts the disk, never forgets a reservation).
        self._bytes: dict[str, int] = {}
        self._reserved: dict[str, int] = {}
        self.rescan()

    # -- accounting -------------------------------------------------------------------------
    def rescan(self) -> int:
        """Recount the bytes on disk (other processes may replay or purge) and return them.

        Bytes reserved by writes in progress still count against ``max_bytes``. Temporary
        files left behind by a process that died mid-write are removed.
        """
        self._remove_stale_tmp()
        sizes: dict[str, int] = {}
        for f in self.files():
            sizes[f.stream] = sizes.get(f.stream, 0) + f.size
        with self._lock:
            for stream in set(self._bytes) | set(sizes) | set(self._reserved):
                _BYTES.labels(stream).set(sizes.get(stream, 0) + self._reserved.get(stream, 0))
            self._bytes = sizes
        return sum(sizes.values())

    def _remove_stale_tmp(self) -> None:
        if not self.directory.is_dir():
            return
        for tmp in self.directory.glob("*/*/.tmp-*"):
            try:
                pid = int(tmp.name.split("-")[1])
            except (IndexError, ValueError):
                pid = 0
            if pid == os.getpid() or (pid > 0 and _alive(pid)):
                continue  # a write in progress
            try:
                tmp.unlink()
            except FileNotFoundError:
                continue
            _log.warning("removed %s, left by a dead-letter write that never finished", tmp)

    @property
    def total_bytes(self) -> int:
        """Bytes currently held (as last counted by this process), reservations included."""
        with self._lock:
            return sum(self._bytes.values()) + sum(self._reserved.values())

    def _account(self, stream: str, delta: int) -> None:
        # Called with self._lock held.
        value = max(0, self._bytes.get(stream, 0) + delta)
        self._bytes[stream] = value
        _BYTES.labels(stream).set(value + self._reserved.get(stream, 0))

    def _reserve(self, stream: str, delta: int) -> None:
        # Called with self._lock held.
        value = max(0, self._reserved.get(stream, 0) + delta)
        self._reserved[stream] = value
        _BYTES.labels(stream).set(self._bytes.get(stream, 0) + value)

    # -- writing ----------------------------------------------------------------------------
    def write(
        self,
        describe: Mapping[str, Any],
        reason: str,
        rows: Sequence[Sequence[Any]],
        *,
        errors: Sequence[Mapping[str, Any] | None] | None = None,
        batch_id: str | None = None,
    ) -> Path:
        """Write ``rows`` of a stream to a new file atomically and return its path.

        Arguments:
            describe: ``Stream.describe()`` (stream, schema, table, columns, natural_key).
            reason: one of ``REASONS``.
            rows: row tuples in column order.
            errors: per-row error (``{"sqlstate": ..., "message": ...}``) or ``None``.
            batch_id: id of the batch, so a replay can skip a batch that did commit.

        Raises:
            DeadLetterFull: the store would pass ``max_bytes``; nothing was written.
            OSError: the disk refused the write; nothing was left behind.
        """
        if reason not in REASONS:
            raise ConfigError(f"dead-letter reason must be one of {REASONS}, got {reason!r}")
        stream = str(describe["stream"])
        columns: Mapping[str, str] = describe["columns"]
        header = {
            "sheetanchor_deadletter": _FORMAT_VERSION,
            **describe,
            "reason": reason,
            "rows": len(rows),
            "batch_id": batch_id,
            "created": dt.datetime.now(dt.UTC).isoformat(),
        }
        parts = [orjson.dumps(header)]
        for i, row in enumerate(rows):
            entry: dict[str, Any] = {"record": encode_row(columns, row)}
            err = errors[i] if errors is not None else None
            if err is not None:
                entry["error"] = dict(err)
            parts.append(orjson.dumps(entry, default=json_default))
        data = b"\n".join(parts) + b"\n"
        with self._lock:
            total = sum(self._bytes.values()) + sum(self._reserved.values())
            if total + len(data) > self.max_bytes:
                _FULL.labels(stream).inc()
                raise DeadLetterFull(
                    f"dead-letter store {self.directory} holds {total} bytes; writing "
                    f"{len(rows)} {reason} row(s) of stream {stream!r} ({len(data)} bytes) "
                    f"would pass max_bytes={self.max_bytes}. Replay or purge it "
                    "(`sheetanchor deadletter replay` / `purge`) or raise max_bytes"
                )
            self._reserve(stream, len(data))  # reserve before writing outside the lock
        try:
            path = self._write_file(stream, reason, data, len(rows))
        except BaseException:
            with self._lock:
                self._reserve(stream, -len(data))
            raise
        with self._lock:
            # Linked into place: the reservation becomes bytes on disk, in one step.
            self._reserve(stream, -len(data))
            self._account(stream, len(data))
        return path

    def _write_file(self, stream: str, reason: str, data: bytes, nrows: int) -> Path:
        folder = self.directory / stream / reason
        if not folder.is_dir():
            # Every level we create is private (0700): dead letters hold business data.
            self.directory.parent.mkdir(parents=True, exist_ok=True)
            for level in (self.directory, self.directory / stream, folder):
                level.mkdir(mode=0o700, exist_ok=True)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        tmp = folder / f".tmp-{os.getpid()}-{threading.get_ident()}-{next(self._seq)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            while True:
                final = folder / f"{stamp}-{os.getpid()}{next(self._seq):06d}{_SUFFIX}"
                try:
                    os.link(tmp, final)  # unlike rename, never replaces an existing file
                    break
                except FileExistsError:
                    continue
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        _fsync_dir(folder)
        self._notes.event(
            (stream, reason),
            nrows,
            "dead-lettered %d row(s) of stream %s: %s (%s)",
            nrows,
            stream,
            reason,
            final,
        )
        return final

    def flush_log(self) -> None:
        """Log the dead-letter writes counted but not logged yet (``WriteBuffer.close`` does)."""
        self._notes.flush()

    # -- reading ----------------------------------------------------------------------------
    def files(self, stream: str | None = None, reason: str | None = None) -> list[DeadLetterFile]:
        """Dead-letter files, oldest first, optionally of one stream and/or reason."""
        out: list[DeadLetterFile] = []
        if not self.directory.is_dir():
            return out
        for sdir in sorted(self.directory.iterdir()):
            if not sdir.is_dir() or (stream is not None and sdir.name != stream):
                continue
            for rdir in sorted(sdir.iterdir()):
                if not rdir.is_dir() or rdir.name not in REASONS:
                    continue
                if reason is not None and rdir.name != reason:
                    continue
                for path in rdir.iterdir():
                    if path.suffix != _SUFFIX or path.name.startswith("."):
                        continue
                    try:
                        st = path.stat()
                    except FileNotFoundError:  # replayed or purged meanwhile
                        continue
                    out.append(DeadLetterFile(path, sdir.name, rdir.name, st.st_size, st.st_mtime))
        out.sort(key=lambda f: (f.path.name, f.stream, f.reason))
        return out

    @staticmethod
    def read_header(path: Path) -> dict[str, Any]:
        """The header line of a dead-letter file."""
        with open(path, "rb") as fh:
            header = orjson.loads(fh.readline())
        if not isinstance(header, dict) or "sheetanchor_deadletter" not in header:
            raise ValueError(f"{path} is not a sheetanchor dead-letter file (bad header)")
        return header

    @staticmethod
    def iter_entries(path: Path) -> Iterator[dict[str, Any]]:
        """The record lines of a file, as raw JSON objects (``record``, ``error``)."""
        with open(path, "rb") as fh:
            fh.readline()
            for line in fh:
                if line.strip():
                    yield orjson.loads(line)

    def read(self, path: Path) -> DeadLetterBatch:
        """Decode a file into row tuples ready for COPY, with their recorded errors."""
        header = self.read_header(path)
        columns = header["columns"]
        rows: list[tuple[Any, ...]] = []
        errors: list[dict[str, Any] | None] = []
        for entry in self.iter_entries(path):
            rows.append(decode_row(columns, entry["record"]))
            errors.append(entry.get("error"))
        return DeadLetterBatch(header, rows, errors)

    def delete(self, path: Path) -> None:
        """Remove a file (after its rows committed, or on purge) and fsync its directory."""
        try:
            size = path.stat().st_size
            stream = path.parent.parent.name
            path.unlink()
        except FileNotFoundError:
            return
        _fsync_dir(path.parent)
        with self._lock:
            self._account(stream, -size)

    def set_aside(self, path: Path, reason: str) -> Path:
        """Move a malformed file out of the way, to ``<name>.bad`` (no longer listed).

        The file is kept for inspection; ``reason`` is logged and counted in
        ``sheetanchor_ingest_deadletter_bad_files_total``.
        """
        stream = path.parent.parent.name
        bad = path.with_name(path.name + ".bad")
        size = path.stat().st_size
        os.replace(path, bad)
        _fsync_dir(path.parent)
        with self._lock:
            self._account(stream, -size)
        _BAD.labels(stream).inc()
        _log.error("dead-letter file %s is malformed (%s); moved aside to %s", path, reason, bad)
        return bad

    def purge(self, stream: str | None = None, reason: str | None = None) -> int:
        """Delete files (optionally of one stream/reason); return how many were deleted."""
        files = self.files(stream, reason)
        for f in files:
            self.delete(f.path)
        return len(files)
