"""The seam between the write buffer and the disk journal (``sheetanchor.ingest._journal``).

The buffer only needs this protocol: ``append`` (durable on return, returns the sequence
number of the last record), ``commit`` (everything up to a sequence number reached the
database), ``recover`` (records appended and never committed) and ``close``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, Protocol, cast

from sheetanchor.errors import ConfigError

__all__ = ["JournalLike", "open_journal"]


class JournalLike(Protocol):
    """What the write buffer needs from a journal."""

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
    """Open ``sheetanchor.ingest._journal.Journal(directory, fsync=...)``.

    Raises:
        ConfigError: the journal module is not available in this installation.
    """
    try:
        module = importlib.import_module("sheetanchor.ingest._journal")
    except ImportError as exc:
        raise ConfigError(
            f"journal_dir={os.fspath(directory)!r} needs sheetanchor.ingest._journal, which is "
            "not installed in this build; leave journal_dir unset or upgrade sheetanchor"
        ) from exc
    return cast(JournalLike, module.Journal(directory, fsync=fsync))
