"""The drill contract: each incident drill is one small module in ``demo/drills/``.

A drill runs the naive pattern from the incident and the sheetanchor way against real
servers and reports both. The naive half must really fail (``naive_failed``), or the drill
proves nothing; the sheetanchor half must succeed (``ours_ok``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

__all__ = ["DemoContext", "Drill", "DrillResult"]


@dataclass(frozen=True, slots=True)
class DrillResult:
    """What one drill found.

    Attributes:
        drill: incident id, e.g. ``"001"``.
        title: one line naming the failure.
        naive: what happened to the naive pattern, in a few words.
        naive_failed: True when the naive pattern showed the incident's failure.
        ours: what happened with sheetanchor.
        ours_ok: True when sheetanchor survived.
        seconds: time to ready / elapsed for the sheetanchor half, if meaningful.
        details: extra figures for ``--json``.
    """

    drill: str
    title: str
    naive: str
    naive_failed: bool
    ours: str
    ours_ok: bool
    seconds: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """The drill reproduced the failure and sheetanchor survived it."""
        return self.naive_failed and self.ours_ok


@dataclass(slots=True)
class DemoContext:
    """What a drill gets: real servers and a scratch directory.

    Attributes:
        pg_url: URL of a PostgreSQL server (a database the drill may use for admin work).
        redis_url: URL of a Redis server.
        workdir: a scratch directory for files (dead letters, charts, journals).
        fresh_database: ``await ctx.fresh_database("d001")`` creates an empty database and
            returns its URL; it is dropped when the demo ends.
    """

    pg_url: str
    redis_url: str
    workdir: Path
    fresh_database: Callable[[str], Awaitable[str]]


class Drill(Protocol):
    """One incident drill."""

    id: str
    title: str

    async def run(self, ctx: DemoContext) -> DrillResult:
        """Run both halves and report."""
        ...
