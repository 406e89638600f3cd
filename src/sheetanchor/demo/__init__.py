"""``sheetanchor demo``: drills that replay each incident, naive pattern against sheetanchor."""

from __future__ import annotations

from sheetanchor.demo._drill import DemoContext, Drill, DrillResult

__all__ = ["DemoContext", "Drill", "DrillResult"]
