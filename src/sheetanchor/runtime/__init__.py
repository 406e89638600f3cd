"""Start and stop: readiness waits (and, later, ordered lifespan, jobs, task registry)."""

from __future__ import annotations

from sheetanchor.runtime._wait import (
    Attempt,
    wait_for_postgres,
    wait_for_redis,
    wait_for_services,
)

__all__ = ["Attempt", "wait_for_postgres", "wait_for_redis", "wait_for_services"]
