"""Associations (incident 000's "attach a script to an entity") owned by the database.

The incident kept bindings in an in-memory registry plus a table: two concurrent attaches
both passed the "not attached yet?" check and counted twice, and the registry and the
table drifted. Here an attach is one ``INSERT ... ON CONFLICT DO NOTHING`` against a unique
constraint: the database decides, once, whether the pair is new; counts are read from the
table, never kept beside it.
"""

from __future__ import annotations

from typing import Any

from sheetanchor.state._sql import quote_ident
from sheetanchor.state._store import PgExecutor

__all__ = ["Links"]


class Links:
    """Pairs ``(left, right)`` in a table with a unique constraint on both columns.

    Args:
        db: the database.
        table: the association table; it needs ``UNIQUE (left, right)`` (or that primary key).
        left: the owning side's column (e.g. ``entity_id``).
        right: the attached side's column (e.g. ``script_id``).

    Example::

        links = Links(db, table="entity_scripts", left="entity_id", right="script_id")
        if await links.attach(entity_id, script_id):
            ...  # newly attached (exactly one concurrent caller sees True)
    """

    def __init__(self, db: PgExecutor, *, table: str, left: str, right: str) -> None:
        t, lc, rc = quote_ident(table), quote_ident(left), quote_ident(right)
        self.db = db
        self.table = table
        self._attach = (
            f"INSERT INTO {t} ({lc}, {rc}) VALUES ($1, $2) ON CONFLICT ({lc}, {rc}) DO NOTHING "
            "RETURNING true"
        )
        self._detach = f"DELETE FROM {t} WHERE {lc} = $1 AND {rc} = $2 RETURNING true"
        self._count = f"SELECT count(*) FROM {t} WHERE {lc} = $1"
        self._members = f"SELECT {rc} FROM {t} WHERE {lc} = $1 ORDER BY {rc}"
        self._detach_all = f"DELETE FROM {t} WHERE {lc} = $1"

    async def attach(self, left: Any, right: Any) -> bool:
        """Attach; True when the pair is new, False when it was already attached."""
        return bool(await self.db.fetchval(self._attach, left, right))

    async def detach(self, left: Any, right: Any) -> bool:
        """Detach; True when the pair existed."""
        return bool(await self.db.fetchval(self._detach, left, right))

    async def count(self, left: Any) -> int:
        """How many are attached to ``left`` (read from the table, never cached beside it)."""
        return int(await self.db.fetchval(self._count, left))

    async def members(self, left: Any) -> list[Any]:
        """The right-hand values attached to ``left``, sorted."""
        return [r[0] for r in await self.db.fetch(self._members, left)]

    async def reset(self, left: Any) -> int:
        """Detach everything from ``left`` in one statement; returns how many were detached."""
        status = await self.db.fetchval(
            f"WITH d AS ({self._detach_all} RETURNING 1) SELECT count(*) FROM d", left
        )
        return int(status)
