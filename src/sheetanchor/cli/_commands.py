"""Registers every command module on the CLI app (one import per command group)."""

from __future__ import annotations

from sheetanchor.cli import _budget, _deadletter, _demo, _reconcile, _wait  # noqa: F401
