"""The registered drills, in incident order. Add one line per new drill module."""

from __future__ import annotations

from sheetanchor.demo._drill import Drill

__all__ = ["all_drills"]


def all_drills() -> list[Drill]:
    """Every drill, in incident order (imported lazily: drills pull in the clients)."""
    from sheetanchor.demo.drills import d000_cache, d001_startup, d002_loops, d003_leaks

    drills: list[Drill] = [d000_cache.DRILL, d001_startup.DRILL]
    drills.append(d002_loops.DRILL)
    drills.append(d003_leaks.DRILL)
    return drills
