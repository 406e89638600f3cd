"""Test helpers for suites that use sheetanchor: real servers, a fault proxy, leak checks.

Loaded automatically as a pytest plugin (entry point ``sheetanchor``); the fixtures are
listed in :mod:`sheetanchor.testing.plugin`.
"""

from __future__ import annotations

from sheetanchor.testing._proxy import FaultProxy, ProxyMode, ProxyStats

__all__ = ["FaultProxy", "ProxyMode", "ProxyStats"]
