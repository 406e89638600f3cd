"""Observability: one Prometheus registry, logging to stdout, phase timers."""

from __future__ import annotations

from sheetanchor.observe._log import get_logger
from sheetanchor.observe._metrics import REGISTRY, metric_name

__all__ = ["REGISTRY", "get_logger", "metric_name"]
