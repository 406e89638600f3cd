"""Wait until PostgreSQL answers a real query and Redis answers PING (incident 001).

A container that starts before its database must wait with bounded backoff, not crash-loop.
Only errors that waiting can cure are retried (connection refused, "the database system is
starting up", Redis LOADING, ...): a wrong password or a missing database fails at once, with
the server's own message, because no amount of waiting fixes it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import tenacity

from sheetanchor.config import parse_url, redact, to_asyncpg_dsn
from sheetanchor.errors import NotReady
from sheetanchor.observe import get_logger
from sheetanchor.retry import is_transient

__all__ = ["Attempt", "wait_for_postgres", "wait_for_redis", "wait_for_services"]

_log = get_logger("runtime")

#: Longest single pause between two attempts; start-up should notice a ready server quickly.
_MAX_BACKOFF = 2.0
_FIRST_BACKOFF = 0.05
#: Longest time one connection attempt may take (a blackholed server must not eat the budget).
_ATTEMPT_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Attempt:
    """One failed readiness attempt, passed to the ``on_attempt`` callback (for progress)."""

    target: str
    number: int
    elapsed: float
    error: str


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


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return redact(f"{type(exc).__name__}: {text}")


async def _wait(
    kind: str,
    url: str,
    probe: Callable[[str, float], Awaitable[None]],
    *,
    timeout: float,
    on_attempt: Callable[[Attempt], None] | None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> float:
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    target = parse_url(url).display
    start = time.monotonic()
    deadline = start + timeout
    number = 0
    last_error: BaseException | None = None

    def remaining() -> float:
        return deadline - time.monotonic()

    retrying = tenacity.AsyncRetrying(
        # Full jitter keeps a fleet of replicas from reconnecting in lock-step.
        wait=tenacity.wait_random_exponential(multiplier=_FIRST_BACKOFF, max=_MAX_BACKOFF),
        stop=tenacity.stop_after_delay(timeout),
        retry=tenacity.retry_if_exception(is_transient),
        sleep=sleep,
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                number += 1
                budget = max(0.05, min(_ATTEMPT_TIMEOUT, remaining()))
                try:
                    await asyncio.wait_for(probe(url, budget), timeout=budget + 0.5)
                except Exception as exc:  # routed: retried if transient, else NotReady below
                    last_error = exc
                    elapsed = time.monotonic() - start
                    _log.info("%s at %s not ready (attempt %d): %s", kind, target, number, exc)
                    if on_attempt is not None:
                        on_attempt(Attempt(target, number, elapsed, _describe(exc)))
                    raise
    except Exception as exc:
        elapsed = time.monotonic() - start
        last = _describe(last_error if last_error is not None else exc)
        if is_transient(exc):
            raise NotReady(
                f"{kind} at {target} not ready after {elapsed:.1f} s and {number} attempts "
                f"(last error: {last}); is it running and reachable? check the URL, "
                f"or raise the timeout",
                target=target,
                last_error=last,
            ) from exc
        raise NotReady(
            f"{kind} at {target} refused the connection with an error that waiting will not "
            f"fix ({last}); check the user, password and database name in the URL",
            target=target,
            last_error=last,
        ) from exc
    elapsed = time.monotonic() - start
    _log.info("%s at %s ready after %.2f s (%d attempts)", kind, target, elapsed, number + 1)
    return elapsed


async def wait_for_postgres(
    url: str, *, timeout: float = 60.0, on_attempt: Callable[[Attempt], None] | None = None
) -> float:
    """Wait until PostgreSQL at ``url`` answers ``SELECT 1``; return the seconds it took.

    Raises:
        NotReady: not ready within ``timeout`` seconds, or failed with an error that waiting
            cannot fix (wrong password, unknown database). The message has the last error.
        ValueError: ``timeout`` is not positive.
    """
    return await _wait("PostgreSQL", url, _probe_postgres, timeout=timeout, on_attempt=on_attempt)


async def wait_for_redis(
    url: str, *, timeout: float = 60.0, on_attempt: Callable[[Attempt], None] | None = None
) -> float:
    """Wait until Redis at ``url`` answers ``PING``; return the seconds it took.

    Raises:
        NotReady: not ready within ``timeout`` seconds (the message has the last error).
        ValueError: ``timeout`` is not positive.
    """
    return await _wait("Redis", url, _probe_redis, timeout=timeout, on_attempt=on_attempt)


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
    jobs: dict[str, Awaitable[float]] = {}
    if pg:
        jobs["postgres"] = wait_for_postgres(pg, timeout=timeout, on_attempt=on_attempt)
    if redis:
        jobs["redis"] = wait_for_redis(redis, timeout=timeout, on_attempt=on_attempt)
    if not jobs:
        raise ValueError("nothing to wait for: pass pg= and/or redis= (or set the URL variables)")
    results = await asyncio.gather(*jobs.values())
    return dict(zip(jobs.keys(), results, strict=True))
