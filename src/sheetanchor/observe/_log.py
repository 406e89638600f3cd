"""Loggers named ``sheetanchor.<part>``."""

from __future__ import annotations

import logging

__all__ = ["get_logger"]


def get_logger(part: str) -> logging.Logger:
    """Return the logger ``sheetanchor.<part>``."""
    return logging.getLogger(f"sheetanchor.{part}")
