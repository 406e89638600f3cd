"""Observability: one Prometheus registry, logging to stdout, phase timers."""

from __future__ import annotations

from sheetanchor.observe._log import (
    JsonFormatter,
    PlainFormatter,
    RedactingFilter,
    configure_logging,
    get_logger,
)
from sheetanchor.observe._metrics import REGISTRY, metric_name
from sheetanchor.observe._timer import PHASE_DURATION, PhaseTimer, timed

__all__ = [
    "PHASE_DURATION",
    "REGISTRY",
    "JsonFormatter",
    "PhaseTimer",
    "PlainFormatter",
    "RedactingFilter",
    "configure_logging",
    "get_logger",
    "metric_name",
    "timed",
]
