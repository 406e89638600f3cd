"""JSON encoding of rows for dead-letter files, driven by the stream's column types.

Values go through JSON and come back as the same Python types, so a replayed row is
byte-for-byte the row that was first offered to COPY.
"""

from __future__ import annotations

import datetime as dt
import decimal
import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["decode_row", "encode_row", "json_default"]


def json_default(value: Any) -> Any:
    """``orjson`` fallback for the types it does not encode natively."""
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    raise TypeError(f"cannot encode {type(value).__name__} in a dead-letter file")


def _float_out(v: Any) -> Any:
    # orjson writes NaN/Infinity as null, which would come back as a missing value.
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    return v


def _float_in(v: Any) -> Any:
    return float(v) if isinstance(v, str) else v


def _ident(v: Any) -> Any:
    return v


_DECODERS: dict[str, Callable[[Any], Any]] = {
    "timestamptz": dt.datetime.fromisoformat,
    "timestamp": dt.datetime.fromisoformat,
    "date": dt.date.fromisoformat,
    "numeric": lambda v: decimal.Decimal(str(v)),
    "bytea": bytes.fromhex,
    "uuid": uuid.UUID,
    "float4": _float_in,
    "float8": _float_in,
}


def encode_row(columns: Mapping[str, str], row: Sequence[Any]) -> dict[str, Any]:
    """Return ``row`` as a JSON-ready field -> value mapping."""
    out: dict[str, Any] = {}
    for (name, typ), value in zip(columns.items(), row, strict=True):
        out[name] = _float_out(value) if typ in ("float4", "float8") else value
    return out


def decode_row(columns: Mapping[str, str], record: Mapping[str, Any]) -> tuple[Any, ...]:
    """Rebuild the COPY row of a record read back from a dead-letter file.

    Raises:
        KeyError: a column is missing from ``record``.
        ValueError: a value cannot be parsed as its column type.
    """
    values = []
    for name, typ in columns.items():
        value = record[name]
        if value is not None:
            value = _DECODERS.get(typ, _ident)(value)
        values.append(value)
    return tuple(values)
