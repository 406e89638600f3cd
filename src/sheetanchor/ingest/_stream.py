"""``Stream``: one named flow of records into one PostgreSQL table, validated eagerly."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sheetanchor.errors import ConfigError
from sheetanchor.ingest.quality import QualityCheck

__all__ = ["COLUMN_TYPES", "Stream", "StreamKind"]

StreamKind = Literal["authoritative", "best_effort"]

# Canonical PostgreSQL type names accepted in ``Stream.columns``, with their aliases.
COLUMN_TYPES: dict[str, str] = {
    "text": "text",
    "varchar": "text",
    "character varying": "text",
    "smallint": "int2",
    "int2": "int2",
    "integer": "int4",
    "int": "int4",
    "int4": "int4",
    "bigint": "int8",
    "int8": "int8",
    "real": "float4",
    "float4": "float4",
    "double precision": "float8",
    "float8": "float8",
    "numeric": "numeric",
    "decimal": "numeric",
    "boolean": "bool",
    "bool": "bool",
    "timestamptz": "timestamptz",
    "timestamp with time zone": "timestamptz",
    "timestamp": "timestamp",
    "timestamp without time zone": "timestamp",
    "date": "date",
    "jsonb": "jsonb",
    "json": "json",
    "bytea": "bytea",
    "uuid": "uuid",
}

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")
# Stream names become directory names and metric labels: keep them plain.
_STREAM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"Stream {name} must be a number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"Stream {name} must be > 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class Stream:
    """One flow of records into one table, written idempotently on ``natural_key``.

    Arguments:
        name: stream name (metric label and dead-letter directory): letters, digits, ``_.-``.
        table: target table; it must have a unique index on exactly ``natural_key``.
        columns: column name -> PostgreSQL type (``text``, ``bigint``, ``float8``,
            ``numeric``, ``timestamptz``, ``jsonb``, ... see ``COLUMN_TYPES``), in COPY order.
        natural_key: columns that identify a record; a batch written twice never duplicates.
        kind: ``"authoritative"`` (never dropped: producers wait, then ``BufferFull``) or
            ``"best_effort"`` (past ``emergency_watermark`` records spill to the dead-letter
            store, counted).
        max_rows: rows held in memory at most, buffered plus being written.
        max_bytes: estimated bytes held in memory at most, buffered plus being written.
        high_watermark: fill fraction (rows or bytes) at which a flush starts at once.
        emergency_watermark: fill fraction past which a best-effort stream spills.
        flush_interval: seconds between flushes of a stream that is not full.
        batch_rows: rows per COPY; a flush starts when this many are buffered. It writes
            whole batches: rows that arrived after the wake-up wait for the next batch, or
            for ``flush_interval`` (a journaled stream, ``flush()``/``close()``, or a stream
            past its high watermark holding less than one batch write everything).
        concurrency: batches of this stream written at the same time, at most (1: on a small
            machine two concurrent COPYs of one stream compete with the encoder for CPU;
            while one batch is written the next one accumulates, so batches grow under load).
            Within a batch, the next ``batch_rows`` chunk starts once the previous one's
            COPY has sent its last row, while the server still ingests and commits it
            (only when two global write slots are free); the same holds between batches:
            the next one starts once the last chunk of the previous one has been sent.
        put_timeout: seconds ``await put`` waits for room before raising ``BufferFull``.
        nullable: columns that accept ``None`` (never a natural-key column).
        schema: PostgreSQL schema of ``table``.
        checks: data-quality checks (``sheetanchor.ingest.quality``), run at ``put`` through a
            ``QualityGate``: findings are counted and logged and the record flows on, unless
            a check has ``reject=True`` (then ``put`` raises ``RecordError``).
        tail_rows: keep the last ``tail_rows`` accepted records for ``buffer.tail(stream, n)``
            (0 = no tail); recent-window features read it instead of scanning history.

    Example::

        ticks = Stream("ticks", table="tick",
                       columns={"ts": "timestamptz", "symbol": "text",
                                "price": "float8", "volume": "bigint"},
                       natural_key=("ts", "symbol"))
    """

    name: str
    table: str
    columns: Mapping[str, str]
    natural_key: Sequence[str]
    kind: StreamKind = "authoritative"
    max_rows: int = 100_000
    max_bytes: int = 64 * 1024 * 1024
    high_watermark: float = 0.5
    emergency_watermark: float = 0.9
    flush_interval: float = 1.0
    batch_rows: int = 10_000
    concurrency: int = 1
    put_timeout: float = 30.0
    nullable: Iterable[str] = ()
    schema: str = "public"
    checks: Sequence[QualityCheck] = field(default_factory=tuple)
    tail_rows: int = 0

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalise once, here.
        if not isinstance(self.name, str) or not _STREAM_NAME.match(self.name):
            raise ConfigError(
                f"Stream name {self.name!r} is invalid: use 1-63 letters, digits, '_', '.', '-'"
            )
        for what, ident in (("table", self.table), ("schema", self.schema)):
            if not isinstance(ident, str) or not _IDENT.match(ident):
                raise ConfigError(
                    f"Stream {self.name!r}: {what} {ident!r} is not a plain SQL identifier"
                )
        if not isinstance(self.columns, Mapping) or not self.columns:
            raise ConfigError(f"Stream {self.name!r}: columns must be a non-empty mapping")
        cols: dict[str, str] = {}
        for col, typ in self.columns.items():
            if not isinstance(col, str) or not _IDENT.match(col):
                raise ConfigError(f"Stream {self.name!r}: column name {col!r} is invalid")
            canon = COLUMN_TYPES.get(str(typ).strip().lower())
            if canon is None:
                raise ConfigError(
                    f"Stream {self.name!r}: column {col!r} has unsupported type {typ!r}; "
                    f"use one of {sorted(set(COLUMN_TYPES))}"
                )
            cols[col] = canon
        set_(self, "columns", cols)
        if isinstance(self.natural_key, str):
            set_(self, "natural_key", (self.natural_key,))
        key = tuple(self.natural_key)
        if not key:
            raise ConfigError(f"Stream {self.name!r}: natural_key must name at least one column")
        for col in key:
            if col not in cols:
                raise ConfigError(
                    f"Stream {self.name!r}: natural_key column {col!r} is not in columns"
                )
        if len(set(key)) != len(key):
            raise ConfigError(f"Stream {self.name!r}: natural_key {key!r} repeats a column")
        set_(self, "natural_key", key)
        nullable = frozenset(self.nullable)
        for col in nullable:
            if col not in cols:
                raise ConfigError(f"Stream {self.name!r}: nullable column {col!r} is unknown")
            if col in key:
                raise ConfigError(
                    f"Stream {self.name!r}: natural-key column {col!r} cannot be nullable"
                )
        set_(self, "nullable", nullable)
        if self.kind not in ("authoritative", "best_effort"):
            raise ConfigError(
                f"Stream {self.name!r}: kind must be 'authoritative' or 'best_effort', "
                f"got {self.kind!r}"
            )
        for attr in ("max_rows", "max_bytes", "batch_rows", "concurrency"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"Stream {self.name!r}: {attr} must be an int > 0, got {value!r}")
        if self.batch_rows > self.max_rows:
            raise ConfigError(
                f"Stream {self.name!r}: batch_rows ({self.batch_rows}) must be <= max_rows "
                f"({self.max_rows})"
            )
        _positive("flush_interval", self.flush_interval)
        _positive("put_timeout", self.put_timeout, allow_zero=True)
        for attr in ("high_watermark", "emergency_watermark"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
                raise ConfigError(
                    f"Stream {self.name!r}: {attr} is a fill fraction in (0, 1], got {value!r}"
                )
        if self.high_watermark > self.emergency_watermark:
            raise ConfigError(
                f"Stream {self.name!r}: high_watermark ({self.high_watermark}) must be <= "
                f"emergency_watermark ({self.emergency_watermark})"
            )
        checks = tuple(self.checks)
        for check in checks:
            if not callable(getattr(check, "observe", None)):
                raise ConfigError(
                    f"Stream {self.name!r}: check {check!r} has no observe(record) method"
                )
        set_(self, "checks", checks)
        if isinstance(self.tail_rows, bool) or not isinstance(self.tail_rows, int):
            raise ConfigError(
                f"Stream {self.name!r}: tail_rows must be an int, got {self.tail_rows!r}"
            )
        if self.tail_rows < 0:
            raise ConfigError(f"Stream {self.name!r}: tail_rows must be >= 0, got {self.tail_rows}")

    @property
    def column_names(self) -> tuple[str, ...]:
        """Column names in COPY order."""
        return tuple(self.columns)

    @property
    def qualified_table(self) -> str:
        """``"schema"."table"``, quoted for SQL."""
        return f'"{self.schema}"."{self.table}"'

    def describe(self) -> dict[str, Any]:
        """The parts a dead-letter file needs to replay records without this object."""
        return {
            "stream": self.name,
            "schema": self.schema,
            "table": self.table,
            "columns": dict(self.columns),
            "natural_key": list(self.natural_key),
            "nullable": sorted(self.nullable),
        }
