"""The registered drills, in incident order. Add one line per new drill module."""

from __future__ import annotations

from sheetanchor.demo._drill import Drill

__all__ = ["all_drills"]


def all_drills() -> list[Drill]:
    """Every drill, in incident order (imported lazily: drills pull in the clients)."""
    from sheetanchor.demo.drills import d001_startup, d002_loops, d003_leaks, d004_ingest

    drills: list[Drill] = [d001_startup.DRILL]
    drills.append(d002_loops.DRILL)
    drills.append(d003_leaks.DRILL)
    drills.append(d004_ingest.DRILL)
    return drills
