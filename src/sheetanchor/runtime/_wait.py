"""Wait until PostgreSQL answers a real query and Redis answers PING (incident 001).

A container that starts before its database must wait with bounded backoff, not crash-loop.
The loop (what is retried, how long to wait) is `sheetanchor._readiness.wait_until_ready`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from sheetanchor._readiness import Attempt, wait_until_ready
from sheetanchor.config import parse_url, to_asyncpg_dsn
from sheetanchor.errors import SheetAnchorError

__all__ = ["Attempt", "wait_for_postgres", "wait_for_redis", "wait_for_services"]


async def _probe_postgres(url: str, timeout: float) -> None:
    import asyncpg

    conn = await asyncpg.connect(to_asyncpg_dsn(url), timeout=timeout)
    try:
        # A real query, not just TCP: a server in recovery accepts sockets but not queries.
        await conn.fetchval("SELECT 1", timeout=timeout)
    finally:
        await conn.close(timeout=timeout)


async def _probe_redis(url: str, timeout: float) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(
        url, socket_connect_timeout=timeout, socket_timeout=timeout, retry_on_timeout=False
    )
    try:
        await client.ping()
    finally:
        await client.aclose()


async def wait_for_postgres(
    url: str, *, timeout: float = 60.0, on_attempt: Callable[[Attempt], None] | None = None
) -> float:
    """Wait until PostgreSQL at ``url`` answers ``SELECT 1``; return the seconds it took.

    Raises:
        NotReady: not ready within ``timeout`` seconds, or failed with an error that waiting
            cannot fix (wrong password, unknown database). The message has the last error.
        ConfigError: ``timeout`` is not a finite positive number of seconds.
    """
    return await wait_until_ready(
        "PostgreSQL",
        parse_url(url).display,
        lambda budget: _probe_postgres(url, budget),
        timeout=timeout,
        on_attempt=on_attempt,
    )


async def wait_for_redis(
    url: str, *, timeout: float = 60.0, on_attempt: Callable[[Attempt], None] | None = None
) -> float:
    """Wait until Redis at ``url`` answers ``PING``; return the seconds it took.

    Raises:
        NotReady: not ready within ``timeout`` seconds (the message has the last error).
        ConfigError: ``timeout`` is not a finite positive number of seconds.
    """
    return await wait_until_ready(
        "Redis",
        parse_url(url).display,
        lambda budget: _probe_redis(url, budget),
        timeout=timeout,
        on_attempt=on_attempt,
    )


async def wait_for_services(
    *,
    pg: str | None = None,
    redis: str | None = None,
    timeout: float = 60.0,
    on_attempt: Callable[[Attempt], None] | None = None,
) -> dict[str, float]:
    """Wait for PostgreSQL and Redis concurrently, both within one ``timeout``.

    Returns the seconds each took, keyed ``"postgres"`` / ``"redis"``.
    """
    for url in (pg, redis):
        if url:
            parse_url(url)  # a malformed URL is a ConfigError now, not inside a task group
    jobs: dict[str, Callable[[], Coroutine[Any, Any, float]]] = {}
    if pg:
        jobs["postgres"] = lambda: wait_for_postgres(pg, timeout=timeout, on_attempt=on_attempt)
    if redis:
        jobs["redis"] = lambda: wait_for_redis(redis, timeout=timeout, on_attempt=on_attempt)
    if not jobs:
        raise ValueError("nothing to wait for: pass pg= and/or redis= (or set the URL variables)")
    # A TaskGroup, not gather: when one wait fails the other is cancelled, not left running.
    try:
        async with asyncio.TaskGroup() as group:
            tasks = {name: group.create_task(job()) for name, job in jobs.items()}
    except* SheetAnchorError as failed:
        # Re-raise the first error itself (not a group): its __cause__ is the server's error.
        raise failed.exceptions[0]  # noqa: B904
    return {name: task.result() for name, task in tasks.items()}
