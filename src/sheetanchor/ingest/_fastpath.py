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
import operator
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from sheetanchor.ingest._stream import Stream

__all__ = ["FastAdmit", "FastValidate", "compile_fast", "compile_fast_admit"]

FastValidate = Callable[[Mapping[str, Any]], "tuple[tuple[Any, ...], int] | None"]
# ``admit(record) -> bool``, bound to one stream's state; see compile_fast_admit.
FastAdmit = Callable[[Mapping[str, Any]], bool]

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
    # A chained comparison: ``v not in range(lo, hi + 1)`` allocates in its arithmetic.
    _lo, _hi = -(2 ** (_bits - 1)), 2 ** (_bits - 1) - 1
    _CHECKS[_name] = (f"type({{v}}) is not int or not {_lo} <= {{v}} <= {_hi}", "32")


def _check_lines(stream: Stream, row_overhead: int) -> list[str]:
    """Body lines that bind ``row`` (the tuple in COPY order) and ``size``, or ``return {fail}``.

    The values are fetched by one ``operator.itemgetter`` call, whose tuple is the row itself;
    every check is one condition, and the constant part of the size is folded into one number
    (fewer bytecodes per record: the interpreter's dispatch is most of put_nowait's cost).
    """
    names = stream.column_names
    n = len(names)
    fetch = "_get(record)" if n > 1 else f"(record[{names[0]!r}],)"
    lines = [
        "    try:",
        f"        row = {fetch}",
        "    except (KeyError, TypeError, IndexError):",
        "        return {fail}",
        f"    {', '.join(f'v{i}' for i in range(n))}, = row",
    ]
    checks = [f"len(record) != {n}"]
    constant = row_overhead + 8 * n
    variable: list[str] = []
    optional: list[str] = []
    for i, (name, typ) in enumerate(stream.columns.items()):
        check, size = (part.format(v=f"v{i}") for part in _CHECKS[typ])
        if name in stream.nullable:
            checks.append(f"(v{i} is not None and ({check}))")
            optional += [f"    if v{i} is not None:", f"        size += {size}"]
            continue
        checks.append(check)
        if size.isdigit():
            constant += int(size)
        else:
            prefix, _, rest = size.partition(" + ")
            constant += int(prefix)
            variable.append(rest)
    lines += [
        "    if (",
        *(f"        {'or ' if k else ''}{c}" for k, c in enumerate(checks)),
        "    ):",
        "        return {fail}",
        f"    size = {' + '.join([str(constant), *variable])}",
        *optional,
    ]
    return lines


def _build(stream: Stream, source: list[str], what: str, state: Any = None) -> Any:
    namespace: dict[str, Any] = {
        "st": state,
        "_datetime": dt.datetime,
        "_date": dt.date,
        "_UUID": uuid.UUID,
        "_get": operator.itemgetter(*stream.column_names),
    }
    code = compile("\n".join(source), f"<sheetanchor {what} {stream.name}>", "exec")
    exec(code, namespace)
    return namespace["fast"]


def _simple(stream: Stream) -> bool:
    return all(t in _CHECKS for t in stream.columns.values())


def compile_fast(stream: Stream, *, row_overhead: int) -> FastValidate | None:
    """The fast validator of ``stream``, or ``None`` when a column type has no fast check."""
    if not _simple(stream):
        return None
    body = [line.replace("{fail}", "None") for line in _check_lines(stream, row_overhead)]
    fast: FastValidate = _build(
        stream, ["def fast(record):", *body, "    return row, size"], "fast validator"
    )
    return fast


def compile_fast_admit(stream: Stream, *, row_overhead: int, state: Any) -> FastAdmit | None:
    """Validate-and-admit in one generated function, for ``put_nowait``'s common case.

    ``admit(record)`` checks ``record`` like ``compile_fast`` and, when it passes and the
    admission budget of ``state`` covers it (the stream's ``StreamState``, a global of the
    generated function; ``fast_rows_left`` / ``fast_bytes_left``, see
    ``StreamState.refresh_budget``), appends the row and returns True. Its bytes are added
    to ``StreamState.bytes`` later, by ``fold_budget``, with the rows' count.
    Otherwise it returns False having changed nothing, and the caller takes the full path
    (which validates precisely, raises, spills, wakes the flusher and refreshes the budget).
    """
    if not _simple(stream):
        return None
    body = [line.replace("{fail}", "False") for line in _check_lines(stream, row_overhead)]
    body += [
        "    left = st.fast_rows_left",
        "    if left <= 0 or size > st.fast_bytes_left:",
        "        return False",
        "    st.fast_rows_left = left - 1",
        "    st.fast_bytes_left -= size",
        "    st.rows.append(row)",
        "    return True",
    ]
    fast: FastAdmit = _build(stream, ["def fast(record):", *body], "fast admit", state)
    return fast
