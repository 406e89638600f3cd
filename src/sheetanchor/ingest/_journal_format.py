"""On-disk format of the ingest journal: framed, checksummed orjson entries in segment files.

A segment is a sequence of frames::

    +----------------+----------------+------------------+
    | length (u32le) | crc32 (u32le)  | payload (length) |
    +----------------+----------------+------------------+

``crc32`` (zlib) covers the length bytes and the payload, so a flipped bit in either is
detected. A crash can leave a torn tail (a partial last frame); :func:`read_segment` stops
there and counts it instead of raising. A frame whose checksum does not match is skipped
(its length is used to find the next one) and counted.

Payloads are orjson objects with a kind ``k``:

- ``{"k": "r", "s": seq, "t": stream, "r": record, "x": {field: tag}}``: a record. ``x`` is
  present only when some top-level values are not plain JSON (datetime, date, time, UUID,
  Decimal, bytes); it lets :func:`decode_record` give them back with their Python type.
- ``{"k": "g", "s": first_seq, "t": stream, "r": [record, ...], "x": [{field: tag}, ...]}``:
  consecutive records of one stream appended together (sequences ``first_seq`` onwards), in
  one frame: one encode and one checksum for the group. ``x`` as above, one per record.
- ``{"k": "G", "s": first_seq, "t": stream, "f": [field, ...], "r": [[value, ...], ...],
  "x": {field: tag}}``: like ``"g"``, with each record as a row of values in the order of
  ``f``. The field names are written once per frame and ``x`` once per column (every non-null
  value of a tagged column has that tag's type), so a group of validated rows costs a fraction
  of the ``"g"`` encoding. Readers older than this kind skip it: don't reopen a journal that
  holds uncommitted ``"G"`` entries with an older sheetanchor.
- ``{"k": "c", "t": stream, "s": upto}``: every record of ``stream`` up to ``upto`` is committed.
- ``{"k": "p", "n": next_seq, "c": {stream: upto}}``: a checkpoint at the start of each segment
  carrying the commit marks and the sequence floor, so older segments can be deleted freely.
"""

from __future__ import annotations

import base64
import datetime as dt
import struct
import uuid
import zlib
from collections.abc import Iterator, Mapping, Sequence
from decimal import Decimal
from typing import Any, NamedTuple

import orjson

__all__ = [
    "HEADER",
    "MAX_FRAME_BYTES",
    "RECORD_KINDS",
    "ScanResult",
    "checkpoint_frame",
    "commit_frame",
    "decode_record",
    "encode_group",
    "encode_record",
    "encode_rows",
    "entry_last_seq",
    "entry_records",
    "frame",
    "iter_entries",
    "read_segment",
]

HEADER = struct.Struct("<II")
# A length above this is treated as garbage (a torn or corrupt header), never allocated.
MAX_FRAME_BYTES = 256 * 1024 * 1024

# Tags for top-level values orjson writes as strings; restored on recovery.
_TAG_DATETIME = "dt"
_TAG_DATE = "d"
_TAG_TIME = "tm"
_TAG_UUID = "u"
_TAG_DECIMAL = "dec"
_TAG_BYTES = "b"
_TAGS: dict[type, str] = {
    dt.datetime: _TAG_DATETIME,
    dt.date: _TAG_DATE,
    dt.time: _TAG_TIME,
    uuid.UUID: _TAG_UUID,
    Decimal: _TAG_DECIMAL,
    bytes: _TAG_BYTES,
}


def _default(value: object) -> object:
    # orjson calls this only for types it cannot write itself.
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    raise TypeError(f"cannot journal a value of type {type(value).__name__}: {value!r}")


def frame(payload: bytes) -> bytes:
    """Wrap ``payload`` in a length + crc32 header."""
    length = len(payload)
    if length > MAX_FRAME_BYTES:
        raise ValueError(
            f"journal entry of {length} bytes exceeds the {MAX_FRAME_BYTES}-byte frame limit; "
            "split the record"
        )
    head = struct.pack("<I", length)
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload


def encode_record(seq: int, stream: str, record: Mapping[str, Any]) -> bytes:
    """Encode one record as a frame. Raises ``TypeError`` for values orjson cannot write."""
    tags = {k: _TAGS[type(v)] for k, v in record.items() if type(v) in _TAGS}
    entry: dict[str, object] = {"k": "r", "s": seq, "t": stream, "r": record}
    if tags:
        entry["x"] = tags
    return frame(orjson.dumps(entry, default=_default))


def encode_group(first_seq: int, stream: str, records: Sequence[Mapping[str, Any]]) -> bytes:
    """Encode consecutive records of ``stream`` as one frame (see ``"g"`` in the module doc).

    Raises ``TypeError`` for values orjson cannot write.
    """
    tags = [{k: _TAGS[type(v)] for k, v in r.items() if type(v) in _TAGS} for r in records]
    entry: dict[str, object] = {"k": "g", "s": first_seq, "t": stream, "r": list(records)}
    if any(tags):
        entry["x"] = tags
    return frame(orjson.dumps(entry, default=_default))


def encode_rows(
    first_seq: int, stream: str, fields: Sequence[str], rows: Sequence[Sequence[Any]]
) -> bytes:
    """Encode consecutive rows of ``stream`` (values in ``fields`` order) as one ``"G"`` frame.

    A column whose non-null values are of more than one tagged type (say ``date`` and
    ``datetime``) can't carry one tag; the rows are then written as a ``"g"`` frame instead.
    Raises ``TypeError`` for values orjson cannot write.
    """
    tags: dict[str, str] = {}
    for i, name in enumerate(fields):
        kinds = {type(row[i]) for row in rows}
        kinds.discard(type(None))
        tagged = [k for k in kinds if k in _TAGS]
        if not tagged:
            continue
        if len(kinds) > 1:
            records = [dict(zip(fields, row, strict=True)) for row in rows]
            return encode_group(first_seq, stream, records)
        tags[name] = _TAGS[tagged[0]]
    entry: dict[str, object] = {"k": "G", "s": first_seq, "t": stream, "f": fields, "r": rows}
    if tags:
        entry["x"] = tags
    return frame(orjson.dumps(entry, default=_default))


def commit_frame(stream: str, upto: int) -> bytes:
    """A frame saying every record of ``stream`` up to ``upto`` is committed."""
    return frame(orjson.dumps({"k": "c", "t": stream, "s": upto}))


def checkpoint_frame(next_seq: int, marks: Mapping[str, int]) -> bytes:
    """A frame carrying the sequence floor and the commit marks, written first in a segment."""
    return frame(orjson.dumps({"k": "p", "n": next_seq, "c": dict(marks)}))


def _restore(tag: str, value: Any) -> object:
    if tag == _TAG_DATETIME:
        return dt.datetime.fromisoformat(value)
    if tag == _TAG_DATE:
        return dt.date.fromisoformat(value)
    if tag == _TAG_TIME:
        return dt.time.fromisoformat(value)
    if tag == _TAG_UUID:
        return uuid.UUID(value)
    if tag == _TAG_DECIMAL:
        return Decimal(value)
    if tag == _TAG_BYTES:
        return base64.b64decode(value)
    raise ValueError(f"unknown journal value tag {tag!r}")


def decode_record(entry: Mapping[str, Any]) -> dict[str, Any]:
    """Return the record of a ``"r"`` entry with its tagged values restored."""
    record: dict[str, Any] = dict(entry["r"])
    for field, tag in entry.get("x", {}).items():
        record[field] = _restore(tag, record[field])
    return record


def entry_records(entry: Mapping[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """``(seq, record)`` of every record in a record entry (empty for other kinds)."""
    kind = entry["k"]
    if kind == "r":
        return [(int(entry["s"]), decode_record(entry))]
    if kind == "G":
        return _row_records(entry)
    if kind != "g":
        return []
    first = int(entry["s"])
    tags = entry.get("x")
    out: list[tuple[int, dict[str, Any]]] = []
    for i, raw in enumerate(entry["r"]):
        record: dict[str, Any] = dict(raw)
        if tags:
            for field, tag in tags[i].items():
                record[field] = _restore(tag, record[field])
        out.append((first + i, record))
    return out


def _row_records(entry: Mapping[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    first = int(entry["s"])
    fields = [str(f) for f in entry["f"]]
    tags = [(field, tag) for field, tag in entry.get("x", {}).items()]
    out: list[tuple[int, dict[str, Any]]] = []
    for i, row in enumerate(entry["r"]):
        record = dict(zip(fields, row, strict=True))
        for field, tag in tags:
            if record[field] is not None:
                record[field] = _restore(tag, record[field])
        out.append((first + i, record))
    return out


RECORD_KINDS = frozenset(("r", "g", "G"))


def entry_last_seq(entry: Mapping[str, Any]) -> int:
    """The highest sequence of a record entry (kind in :data:`RECORD_KINDS`)."""
    if entry["k"] in ("g", "G"):
        return int(entry["s"]) + len(entry["r"]) - 1
    return int(entry["s"])


class ScanResult(NamedTuple):
    """What :func:`read_segment` found besides the entries."""

    valid_bytes: int
    torn_tail: bool
    corrupt_frames: int


def read_segment(data: bytes, out: list[dict[str, Any]]) -> ScanResult:
    """Decode every valid entry of a segment's bytes into ``out``; never raises on bad data.

    A frame with a bad checksum (or a payload that is not an orjson object) is skipped and
    counted; a header that is cut off or claims more bytes than remain ends the scan as a
    torn tail.
    """
    offset = 0
    corrupt = 0
    for entry_or_none, next_offset, status in _frames(data):
        if status == "torn":
            return ScanResult(offset, True, corrupt)
        if status == "corrupt":
            corrupt += 1
        elif entry_or_none is not None:
            out.append(entry_or_none)
        offset = next_offset
    return ScanResult(offset, False, corrupt)


def iter_entries(data: bytes) -> Iterator[dict[str, Any]]:
    """Yield the valid entries of a segment's bytes one by one, skipping damaged frames."""
    for entry, _, status in _frames(data):
        if status == "torn":
            return
        if entry is not None:
            yield entry


def _frames(data: bytes) -> Iterator[tuple[dict[str, Any] | None, int, str]]:
    offset = 0
    size = len(data)
    while offset < size:
        if size - offset < HEADER.size:
            yield None, offset, "torn"
            return
        length, crc = HEADER.unpack_from(data, offset)
        start = offset + HEADER.size
        end = start + length
        if length > MAX_FRAME_BYTES or end > size:
            yield None, offset, "torn"
            return
        payload = data[start:end]
        head = data[offset : offset + 4]
        if zlib.crc32(payload, zlib.crc32(head)) != crc:
            yield None, end, "corrupt"
        else:
            entry = _parse(payload)
            yield entry, end, "ok" if entry is not None else "corrupt"
        offset = end


def _parse(payload: bytes) -> dict[str, Any] | None:
    try:
        entry = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return entry if isinstance(entry, dict) and "k" in entry else None
