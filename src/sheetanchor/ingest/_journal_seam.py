"""The seam between the write buffer and the disk journal (``sheetanchor.ingest._journal``).

The buffer only needs this protocol: ``append`` (durable on return, returns the sequence
number of the last record), ``commit`` (everything up to a sequence number reached the
database), ``recover`` (records appended and never committed) and ``close``.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, Protocol

from sheetanchor.errors import ConfigError

__all__ = ["JournalLike", "open_journal"]


class JournalLike(Protocol):
    """What the write buffer needs from a journal."""

    @property
    def last_seq(self) -> int:
        """The sequence number of the last record appended (0 when none)."""
        ...

    async def append(self, stream: str, records: Sequence[Mapping[str, Any]]) -> int:
        """Append records durably; return the sequence number of the last one."""
        ...

    def commit(self, stream: str, upto_seq: int) -> Awaitable[None] | None:
        """Records of ``stream`` up to ``upto_seq`` are in the database: forget them."""
        ...

    def recover(self) -> list[tuple[str, dict[str, Any]]]:
        """Records appended and never committed, in order, as ``(stream, record)``."""
        ...

    def close(self) -> Awaitable[None] | None:
        """Flush and close the journal."""
        ...


def open_journal(directory: str | os.PathLike[str], *, fsync: str = "batch") -> JournalLike:
    """Open the disk journal ``sheetanchor.ingest._journal.Journal(directory, fsync=...)``."""
    from sheetanchor.ingest._journal import Journal

    if fsync not in ("batch", "always", "never"):
        raise ConfigError(f"journal fsync must be 'batch', 'always' or 'never', got {fsync!r}")
    return Journal(directory, fsync=fsync)  # type: ignore[arg-type]
