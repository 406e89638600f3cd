"""pytest plugin: fixtures for real PostgreSQL/Redis servers and a fault-injecting proxy."""

from __future__ import annotations
