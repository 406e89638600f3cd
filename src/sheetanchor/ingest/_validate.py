"""Validation at ``put``: a record becomes a tuple in COPY order, or a ``RecordError``.

The check is compiled once per stream into a list of small per-type functions, because
``put_nowait`` must sustain hundreds of thousands of records per second in one process.
Each checker returns the value's estimated size in bytes (used for the memory bound).
"""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from sheetanchor.errors import RecordError
from sheetanchor.ingest._fastpath import FastValidate, compile_fast
from sheetanchor.ingest._stream import Stream

__all__ = ["ROW_OVERHEAD", "Row", "Validator"]

Row = tuple[Any, ...]
# A tuple of n values costs about 40 + 8n bytes in CPython plus the values themselves;
# small ints, floats and datetimes are ~24-48 bytes. This estimate is deliberately high.
ROW_OVERHEAD = 56
_VALUE = 32


class _Bad(Exception):
    """Raised by a checker; the validator turns it into a RecordError with context."""


def _text(v: Any) -> int:
    if type(v) is not str and not isinstance(v, str):
        raise _Bad("expected str")
    if "\x00" in v:
        raise _Bad("text contains a NUL byte (PostgreSQL text cannot store \\x00)")
    return 49 + len(v)


def _int_range(bits: int) -> Callable[[Any], int]:
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def check(v: Any) -> int:
        if type(v) is not int and (isinstance(v, bool) or not isinstance(v, int)):
            raise _Bad("expected int")
        if not lo <= v <= hi:
            raise _Bad(f"out of range for a {bits}-bit integer [{lo}, {hi}]")
        return _VALUE

    return check


def _float(v: Any) -> int:
    if type(v) is not float and (isinstance(v, bool) or not isinstance(v, float | int)):
        raise _Bad("expected float")
    return _VALUE


def _numeric(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, decimal.Decimal | int | float):
        raise _Bad("expected Decimal, int or float")
    return 104


def _bool(v: Any) -> int:
    if not isinstance(v, bool):
        raise _Bad("expected bool")
    return 0


def _timestamptz(v: Any) -> int:
    if type(v) is not dt.datetime and not isinstance(v, dt.datetime):
        raise _Bad("expected datetime")
    if v.tzinfo is None:
        raise _Bad("expected a timezone-aware datetime for timestamptz")
    return 48


def _timestamp(v: Any) -> int:
    if not isinstance(v, dt.datetime):
        raise _Bad("expected datetime")
    return 48


def _date(v: Any) -> int:
    if not isinstance(v, dt.date) or isinstance(v, dt.datetime):
        raise _Bad("expected date")
    return _VALUE


def _json(v: Any) -> int:
    # Converted to text by _to_json after the checks (asyncpg's COPY codec takes str).
    if isinstance(v, str):
        if "\x00" in v:
            raise _Bad("JSON text contains a NUL byte")
        return 49 + len(v)
    return 256


def _bytea(v: Any) -> int:
    if not isinstance(v, bytes | bytearray | memoryview):
        raise _Bad("expected bytes")
    return 33 + len(v)


def _uuid(v: Any) -> int:
    if not isinstance(v, uuid.UUID):
        raise _Bad("expected uuid.UUID")
    return 56


_CHECKERS: dict[str, Callable[[Any], int]] = {
    "text": _text,
    "int2": _int_range(16),
    "int4": _int_range(32),
    "int8": _int_range(64),
    "float4": _float,
    "float8": _float,
    "numeric": _numeric,
    "bool": _bool,
    "timestamptz": _timestamptz,
    "timestamp": _timestamp,
    "date": _date,
    "jsonb": _json,
    "json": _json,
    "bytea": _bytea,
    "uuid": _uuid,
}


def _to_json(v: Any) -> str:
    if isinstance(v, str):
        return v
    try:
        return orjson.dumps(v).decode()
    except TypeError as exc:
        raise _Bad(f"not JSON-serialisable ({exc})") from exc


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class Validator:
    """Turns a record mapping into a row tuple for one stream, or raises ``RecordError``.

    ``validate(record)`` returns ``(row, estimated_bytes)``.
    """

    __slots__ = ("_checks", "_fast", "_json_idx", "_n", "_names", "_nullable", "stream")

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self._names = stream.column_names
        self._n = len(self._names)
        self._checks = tuple(_CHECKERS[t] for t in stream.columns.values())
        self._nullable = frozenset(i for i, c in enumerate(self._names) if c in stream.nullable)
        self._json_idx = tuple(
            i for i, t in enumerate(stream.columns.values()) if t in ("json", "jsonb")
        )
        self._fast = compile_fast(stream, row_overhead=ROW_OVERHEAD)

    @property
    def fast(self) -> FastValidate | None:
        """The compiled check (``None`` = "use ``validate``", never "invalid"), if any."""
        return self._fast

    def validate(self, record: Mapping[str, Any]) -> tuple[Row, int]:
        """Check ``record`` and return it as a tuple in COPY order with its size estimate.

        Raises:
            RecordError: a field is missing or unknown, has the wrong type, a NUL byte, or
                is out of range. The error names the stream, the field and the value.
        """
        if self._fast is not None:
            quick = self._fast(record)
            if quick is not None:
                return quick
        return self._validate(record)

    def _validate(self, record: Mapping[str, Any]) -> tuple[Row, int]:
        try:
            values = [record[name] for name in self._names]
        except KeyError as exc:
            raise RecordError(
                f"stream {self.stream.name!r}: record is missing field {exc.args[0]!r}; "
                f"expected fields {list(self._names)}",
                stream=self.stream.name,
                field=str(exc.args[0]),
                value=None,
            ) from None
        except TypeError:
            raise RecordError(
                f"stream {self.stream.name!r}: a record must be a mapping of field -> value, "
                f"got {type(record).__name__}",
                stream=self.stream.name,
                value=record,
            ) from None
        if len(record) != self._n:
            extra = sorted(set(record) - set(self._names))
            raise RecordError(
                f"stream {self.stream.name!r}: unknown field(s) {extra}; "
                f"expected fields {list(self._names)}",
                stream=self.stream.name,
                field=extra[0] if extra else None,
                value=record[extra[0]] if extra else None,
            )
        size = ROW_OVERHEAD + 8 * self._n
        checks = self._checks
        i = 0
        try:
            for i in range(self._n):
                v = values[i]
                if v is None:
                    if i in self._nullable:
                        continue
                    raise _Bad("is None but the column is not nullable")
                size += checks[i](v)
            for i in self._json_idx:
                if values[i] is not None:
                    values[i] = _to_json(values[i])
        except _Bad as exc:
            name = self._names[i]
            raise RecordError(
                f"stream {self.stream.name!r}: field {name!r} "
                f"({self.stream.columns[name]}) value {_short(values[i])}: {exc}",
                stream=self.stream.name,
                field=name,
                value=values[i],
            ) from None
        return tuple(values), size

    def as_dict(self, row: Row) -> dict[str, Any]:
        """The record of ``row`` as a field -> value mapping."""
        return dict(zip(self._names, row, strict=True))
