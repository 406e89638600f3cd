"""A binary COPY encoder generated once per stream, cheaper per row than asyncpg's codecs.

``copy_records_to_table`` encodes every value through asyncpg's per-type codec; for an aware
``datetime`` that codec compares it twice with a naive sentinel (two ``utcoffset`` calls by
name) and converts it with ``astimezone`` first: measured with callgrind, ~7,000 of asyncpg's
~8,300 instructions per row of the ingest benchmark's (ts, symbol, price, volume) row. This
module generates, per stream, straight-line code that packs each row with one precompiled
``struct`` call (cached per text length), computing a timestamp's microseconds from one
subtraction. The bytes are the same as asyncpg's (tested against it on a real server): the
same infinity sentinels, the same epoch arithmetic, UTF-8 text.

Used only when the table's columns have exactly the stream's declared types (checked by
``CopySink.prepare``) and the connection's client encoding is UTF-8. ``encode`` raises on a
value it cannot pack (e.g. a ``memoryview``, a str subclass with a lone surrogate); the sink
then writes that chunk with asyncpg's own encoder, so behaviour on odd values is unchanged.
"""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["COPY_HEADER", "COPY_TRAILER", "RowEncoder", "compile_encoder"]

# PGCOPY signature, flags (0), header extension length (0); the trailer is a -1 field count.
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
COPY_TRAILER = struct.pack(">h", -1)

RowEncoder = Callable[[Sequence[tuple[Any, ...]]], bytes]

# asyncpg's sentinels (pgproto codecs/datetime.pyx): microseconds since 2000-01-01 of
# 9999-12-31 23:59:59.999999 and 0001-01-01 are sent as PostgreSQL's +/- infinity.
_TS_MAX = 252455615999999999
_TS_MIN = -63082281600000000
_TS_INF = 0x7FFFFFFFFFFFFFFF
_TS_NEG_INF = -0x8000000000000000
_DATE_EPOCH = dt.date(2000, 1, 1).toordinal()
_DATE_MAX = dt.date.max.toordinal()
_DATE_MIN = dt.date.min.toordinal()

# Fixed-width types: (struct code, width, conversion of value ``{v}`` or None).
_FIXED: dict[str, tuple[str, int]] = {
    "int2": ("h", 2),
    "int4": ("i", 4),
    "int8": ("q", 8),
    "float8": ("d", 8),
    "bool": ("?", 1),
    "timestamptz": ("q", 8),
    "timestamp": ("q", 8),
    "date": ("i", 4),
    "uuid": ("16s", 16),
}
_VARIABLE = ("text", "bytea")
SUPPORTED = frozenset((*_FIXED, *_VARIABLE))


def _ts_inf(us: int) -> int:
    """The sentinels as infinities; past them asyncpg's ``astimezone`` overflows (so do we)."""
    if us == _TS_MAX:
        return _TS_INF
    if us == _TS_MIN:
        return _TS_NEG_INF
    # An aware datetime whose UTC instant is outside years 1-9999: asyncpg raises
    # OverflowError there; the sink falls back to it, so the outcome stays the same.
    raise _Unsupported


def _date(v: dt.date) -> int:
    o = v.toordinal()
    if o == _DATE_MAX:
        return 0x7FFFFFFF
    if o == _DATE_MIN:
        return -0x80000000
    return o - _DATE_EPOCH


def _convert(typ: str, v: str, out: str) -> list[str]:
    """Lines binding ``out`` to the value packed for a non-null ``v`` of ``typ``."""
    if typ in ("timestamptz", "timestamp"):
        epoch = "_EPOCH_UTC" if typ == "timestamptz" else "_EPOCH"
        # An aware datetime minus the UTC epoch is its UTC instant minus the epoch (no
        # astimezone needed); a naive one fails here, as it does in asyncpg.
        return [
            f"d = {v} - {epoch}",
            f"{out} = (d.days * 86400 + d.seconds) * 1000000 + d.microseconds",
            f"if not {_TS_MIN} < {out} < {_TS_MAX}:",
            f"    {out} = _ts_inf({out})",
        ]
    if typ == "date":
        return [f"{out} = _date({v})"]
    if typ == "uuid":
        return [f"{out} = {v}.bytes"]
    if typ == "text":
        return [f"{out} = _utf8({v})"]
    if typ == "bytea":
        return [f"if type({v}) is not bytes:", "    raise _Unsupported", f"{out} = {v}"]
    return [f"{out} = {v}"]


class _Unsupported(Exception):
    """A value the generated encoder leaves to asyncpg's codecs."""


def compile_encoder(columns: Mapping[str, str], nullable: frozenset[str]) -> RowEncoder | None:
    """``encode(rows) -> bytes``: the binary COPY tuples of ``rows`` (no header/trailer).

    ``None`` when a column type is not supported here (asyncpg's encoder is used then).
    Each row is one ``struct`` call; its format depends on the lengths of the variable
    fields and on which nullable fields are NULL, so the ``Struct`` is looked up by that key
    (a handful per stream in practice; the cache is bounded).
    """
    if not columns or any(t not in SUPPORTED for t in columns.values()):
        return None
    n = len(columns)
    body: list[str] = []
    args: list[str] = []
    key: list[str] = []
    # Per key component: how to render it into the format (see _fmt below).
    parts: list[tuple[str, str | int]] = []
    for i, (name, typ) in enumerate(columns.items()):
        v, a, ln = f"v{i}", f"a{i}", f"n{i}"
        conv = _convert(typ, v, a)
        variable = typ in _VARIABLE
        if name in nullable:
            body += [f"if {v} is None:", f"    {ln} = -1", f"    {a} = b''", "else:"]
            body += [f"    {line}" for line in conv]
            width = f"len({a})" if variable else str(_FIXED[typ][1])
            body.append(f"    {ln} = {width}")
            key.append(ln)
            parts.append(("var" if variable else "nullfixed", typ))
        elif variable:
            body += conv
            body.append(f"{ln} = len({a})")
            key.append(ln)
            parts.append(("var", typ))
        else:
            body += conv
            ln = str(_FIXED[typ][1])
            parts.append(("fixed", typ))
        args += [ln, a]

    def fmt(k: tuple[int, ...]) -> str:
        out = [">h"]
        it = iter(k)
        for kind, typ in parts:
            if kind == "fixed":
                out.append("i" + _FIXED[str(typ)][0])
                continue
            length = next(it)
            if length < 0:
                out.append("i0s")  # NULL: length -1 and no bytes (b'' consumes the arg)
            elif kind == "var":
                out.append(f"i{length}s")
            else:
                out.append("i" + _FIXED[str(typ)][0])
        return "".join(out)

    cache: dict[Any, Callable[..., bytes]] = {}

    def make(k: Any) -> Callable[..., bytes]:
        packer = struct.Struct(fmt(k if isinstance(k, tuple) else (k,))).pack
        if len(cache) < 4096:
            cache[k] = packer
        return packer

    keyexpr = "0" if not key else key[0] if len(key) == 1 else "(" + ", ".join(key) + ",)"
    unpack = ", ".join(f"v{i}" for i in range(n)) + ","
    source = [
        "def encode(rows):",
        "    out = []",
        "    put = out.append",
        "    get = _cache.get",
        f"    for {unpack} in rows:",
        *(f"        {line}" for line in body),
        f"        k = {keyexpr}",
        f"        put((get(k) or _make(k))({n}, {', '.join(args)}))",
        "    return b''.join(out)",
    ]
    namespace: dict[str, Any] = {
        "_cache": cache,
        "_make": make,
        "_EPOCH": dt.datetime(2000, 1, 1),
        "_EPOCH_UTC": dt.datetime(2000, 1, 1, tzinfo=dt.UTC),
        "_ts_inf": _ts_inf,
        "_date": _date,
        "_utf8": str.encode,
        "_Unsupported": _Unsupported,
    }
    exec(compile("\n".join(source), "<sheetanchor copy encoder>", "exec"), namespace)
    encode: RowEncoder = namespace["encode"]
    return encode
