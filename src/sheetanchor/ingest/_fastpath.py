"""A per-stream validator compiled to straight-line code, for the common case only.

``put_nowait`` has to sustain hundreds of thousands of records per second in one Python
thread, and a generic loop over per-column checker functions spends most of its time in
calls. For streams whose columns are all of simple types, this module generates one function
(the same technique as ``collections.namedtuple``) that checks every column inline and returns
``(row, size)``, or ``None`` as soon as anything is unusual. ``None`` never means "invalid":
the caller then runs the full validator, which accepts the record or raises the precise
``RecordError``. So the fast path can only be conservative, never wrong, as long as it accepts
a subset of what the full validator accepts and computes the same size (tested).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from sheetanchor.ingest._stream import Stream

__all__ = ["FastAdmit", "FastValidate", "compile_fast", "compile_fast_admit"]

FastValidate = Callable[[Mapping[str, Any]], "tuple[tuple[Any, ...], int] | None"]
# ``admit(record, stream_state) -> bool``; see compile_fast_admit.
FastAdmit = Callable[[Mapping[str, Any], Any], bool]

_INT_BOUNDS = {"int2": 16, "int4": 32, "int8": 64}
# Per-type inline check (``{v}`` is the value) and its size, as in _validate's checkers.
_CHECKS: dict[str, tuple[str, str]] = {
    "text": ("type({v}) is not str or '\\x00' in {v}", "49 + len({v})"),
    "float4": ("type({v}) is not float", "32"),
    "float8": ("type({v}) is not float", "32"),
    "bool": ("type({v}) is not bool", "0"),
    "timestamptz": ("type({v}) is not _datetime or {v}.tzinfo is None", "48"),
    "timestamp": ("type({v}) is not _datetime", "48"),
    "date": ("type({v}) is not _date", "32"),
    "uuid": ("type({v}) is not _UUID", "56"),
    "bytea": ("type({v}) is not bytes", "33 + len({v})"),
}
for _name, _bits in _INT_BOUNDS.items():
    _lo, _hi = -(2 ** (_bits - 1)), 2 ** (_bits - 1) - 1
    _CHECKS[_name] = (f"type({{v}}) is not int or not {_lo} <= {{v}} <= {_hi}", "32")


def _check_lines(stream: Stream, row_overhead: int) -> list[str]:
    """Body lines that bind ``v0..vn`` and ``size``, or ``return {fail}`` when unusual."""
    names = stream.column_names
    lines = ["    try:"]
    lines += [f"        v{i} = record[{name!r}]" for i, name in enumerate(names)]
    lines += [
        "    except (KeyError, TypeError, IndexError):",
        "        return {fail}",
        f"    if len(record) != {len(names)}:",
        "        return {fail}",
        f"    size = {row_overhead + 8 * len(names)}",
    ]
    for i, (name, typ) in enumerate(stream.columns.items()):
        check, size = (part.format(v=f"v{i}") for part in _CHECKS[typ])
        if name in stream.nullable:
            lines += [
                f"    if v{i} is not None:",
                f"        if {check}:",
                "            return {fail}",
                f"        size += {size}",
            ]
        else:
            lines += [f"    if {check}:", "        return {fail}", f"    size += {size}"]
    return lines


def _build(stream: Stream, source: list[str], what: str) -> Any:
    namespace: dict[str, Any] = {"_datetime": dt.datetime, "_date": dt.date, "_UUID": uuid.UUID}
    code = compile("\n".join(source), f"<sheetanchor {what} {stream.name}>", "exec")
    exec(code, namespace)
    return namespace["fast"]


def _simple(stream: Stream) -> bool:
    return all(t in _CHECKS for t in stream.columns.values())


def compile_fast(stream: Stream, *, row_overhead: int) -> FastValidate | None:
    """The fast validator of ``stream``, or ``None`` when a column type has no fast check."""
    if not _simple(stream):
        return None
    row = ", ".join(f"v{i}" for i in range(len(stream.column_names)))
    body = [line.replace("{fail}", "None") for line in _check_lines(stream, row_overhead)]
    fast: FastValidate = _build(
        stream, ["def fast(record):", *body, f"    return ({row},), size"], "fast validator"
    )
    return fast


def compile_fast_admit(stream: Stream, *, row_overhead: int) -> FastAdmit | None:
    """Validate-and-admit in one generated function, for ``put_nowait``'s common case.

    ``admit(record, st)`` checks ``record`` like ``compile_fast`` and, when it passes and
    the stream's admission budget (``StreamState.fast_rows_left`` / ``fast_bytes_left``,
    see ``StreamState.refresh_budget``) covers it, appends the row and returns True.
    Otherwise it returns False having changed nothing, and the caller takes the full path
    (which validates precisely, raises, spills, wakes the flusher and refreshes the budget).
    """
    if not _simple(stream):
        return None
    row = ", ".join(f"v{i}" for i in range(len(stream.column_names)))
    body = [line.replace("{fail}", "False") for line in _check_lines(stream, row_overhead)]
    body += [
        "    left = st.fast_rows_left",
        "    if left <= 0 or size > st.fast_bytes_left:",
        "        return False",
        "    st.fast_rows_left = left - 1",
        "    st.fast_bytes_left -= size",
        f"    st.rows.append(({row},))",
        "    st.bytes += size",
        "    return True",
    ]
    fast: FastAdmit = _build(stream, ["def fast(record, st):", *body], "fast admit")
    return fast
