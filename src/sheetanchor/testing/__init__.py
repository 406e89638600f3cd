"""Test helpers for suites that use sheetanchor: real servers, a fault proxy, leak checks.

Loaded automatically as a pytest plugin (entry point ``sheetanchor``).
"""

from __future__ import annotations
