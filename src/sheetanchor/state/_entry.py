"""The cached entry format: a small versioned header, then the orjson payload.

Every value sheetanchor puts in Redis says which database version it holds, so the fence
script (:mod:`sheetanchor.state._fence`) can refuse to overwrite a newer entry::

    v<version>|<expires_ms>|<delta_ms>|<orjson payload>   a row at <version>
    t<version>|<expires_ms>|0|                          deleted at <version>, or absent (t0)
    i<version>|<expires_ms>|0|                          invalidated: versions < <version> stale

``expires_ms`` (wall clock) and ``delta_ms`` (how long the database read took) feed the
optional probabilistic early refresh. Entries are ordered by ``(version, rank)`` with
rank ``i`` < ``v`` < ``t``: an invalidation at version n admits the row at version n, and a
deletion at n beats the row at n.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["KIND_INVALID", "KIND_TOMBSTONE", "KIND_VALUE", "RANK", "Entry", "build", "parse"]

KIND_VALUE = "v"
KIND_TOMBSTONE = "t"
KIND_INVALID = "i"
RANK = {KIND_INVALID: 0, KIND_VALUE: 1, KIND_TOMBSTONE: 2}
_KINDS = {ord(k): k for k in RANK}
_MAX_HEADER = 64


class Entry(NamedTuple):
    """A parsed cache entry."""

    kind: str
    version: int
    expires_ms: int
    delta_ms: int
    payload: bytes


def build(kind: str, version: int, expires_ms: int, delta_ms: int, payload: bytes = b"") -> bytes:
    """Serialize an entry (see the module docstring for the layout)."""
    return b"%s%d|%d|%d|%s" % (kind.encode(), version, expires_ms, delta_ms, payload)


def parse(data: bytes) -> Entry | None:
    """Parse an entry; ``None`` when the bytes are not one (corrupt or foreign)."""
    if not data:
        return None
    kind = _KINDS.get(data[0])
    if kind is None:
        return None
    try:
        a = data.index(b"|", 1, _MAX_HEADER)
        b = data.index(b"|", a + 1, _MAX_HEADER)
        c = data.index(b"|", b + 1, _MAX_HEADER)
        return Entry(
            kind, int(data[1:a]), int(data[a + 1 : b]), int(data[b + 1 : c]), data[c + 1 :]
        )
    except ValueError:
        return None
