"""The registered drills, in incident order. Add one entry per new drill module."""

from __future__ import annotations

from sheetanchor.demo._drill import Drill

__all__ = ["all_drills"]


def all_drills() -> list[Drill]:
    """Every drill, in incident order (imported lazily: drills pull in the clients)."""
    from sheetanchor.demo.drills import (
        d000_cache,
        d001_startup,
        d002_loops,
        d003_leaks,
        d004_ingest,
    )

    return [
        d000_cache.DRILL,
        d001_startup.DRILL,
        d002_loops.DRILL,
        d003_leaks.DRILL,
        d004_ingest.DRILL,
    ]
