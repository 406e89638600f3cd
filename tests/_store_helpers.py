"""Shared helpers for the CachedStore tests: tables with a bigserial version column."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from sheetanchor.config import parse_url
from sheetanchor.postgres import Database
from sheetanchor.retry import RetryPolicy
from sheetanchor.testing import FaultProxy

# A Redis client that gives up at once: outage tests must not wait for redis-py's retries.
FAST_REDIS: dict[str, Any] = dict(
    socket_timeout=0.5, socket_connect_timeout=0.5, retry=RetryPolicy(max_attempts=1)
)


class FakeClock:
    """A monotonic clock the test moves by hand (``clock.now += 1``)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def proxy_for(make: Callable[[str, int], FaultProxy], url: str) -> FaultProxy:
    """A fault proxy in front of the server of ``url`` (from the ``fault_proxy`` fixture)."""
    parsed = parse_url(url)
    return make(parsed.host or "127.0.0.1", parsed.port or 6379)


def table_name(prefix: str = "items") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


async def make_items_table(db: Database, name: str) -> None:
    await db.execute(
        f"""
        CREATE TABLE {name} (
            id bigint PRIMARY KEY,
            version bigserial NOT NULL,
            name text NOT NULL,
            data jsonb NOT NULL DEFAULT '{{}}'
        )
        """
    )
