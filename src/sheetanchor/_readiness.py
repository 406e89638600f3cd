"""Wait until a server answers, with bounded backoff: the one loop every readiness check uses.

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

from sheetanchor.config import check_seconds, redact
from sheetanchor.errors import NotReady
from sheetanchor.observe import get_logger
from sheetanchor.retry import is_transient

__all__ = ["Attempt", "wait_until_ready"]

_log = get_logger("readiness")

#: Longest single pause between two attempts; start-up should notice a ready server quickly.
_MAX_BACKOFF = 2.0
_FIRST_BACKOFF = 0.05
#: Longest time one attempt may take (a blackholed server must not eat the whole budget).
_ATTEMPT_TIMEOUT = 5.0
#: An attempt with less time than this left is not started: the deadline is kept, not overshot.
_MIN_ATTEMPT = 0.05


@dataclass(frozen=True, slots=True)
class Attempt:
    """One failed readiness attempt, passed to the ``on_attempt`` callback (for progress)."""

    target: str
    number: int
    elapsed: float
    error: str


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return redact(f"{type(exc).__name__}: {text}")


async def wait_until_ready(
    kind: str,
    target: str,
    probe: Callable[[float], Awaitable[object]],
    *,
    timeout: float,
    on_attempt: Callable[[Attempt], None] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> float:
    """Call ``probe(attempt_timeout)`` until it succeeds; return the seconds it took.

    Args:
        kind: what is waited for, for messages (``"PostgreSQL"``).
        target: where, already redacted (``"postgresql://app:***@db:5432/app"``).
        probe: one real check (a query, a PING); its argument is the time it may take.
        timeout: the whole budget in seconds.
        on_attempt: called after each failed attempt (progress display).
        sleep, clock: injectable for tests.

    Raises:
        NotReady: not ready within ``timeout``, or failed with an error waiting cannot fix.
        ConfigError: ``timeout`` is not a finite positive number of seconds.
    """
    check_seconds("timeout", timeout)
    start = clock()
    deadline = start + timeout
    number = 0
    last_error: BaseException | None = None

    def remaining() -> float:
        return deadline - clock()

    # Full jitter keeps a fleet of replicas from reconnecting in lock-step; each pause is cut
    # so that the last attempt still starts (and ends) before the deadline.
    backoff = tenacity.wait_random_exponential(multiplier=_FIRST_BACKOFF, max=_MAX_BACKOFF)

    def pause(state: tenacity.RetryCallState) -> float:
        return max(0.0, min(backoff(state), remaining() - _MIN_ATTEMPT))

    def out_of_time(state: tenacity.RetryCallState) -> bool:
        return remaining() < _MIN_ATTEMPT

    retrying = tenacity.AsyncRetrying(
        wait=pause,
        stop=out_of_time,
        retry=tenacity.retry_if_exception(is_transient),
        sleep=sleep,
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                number += 1
                budget = max(_MIN_ATTEMPT, min(_ATTEMPT_TIMEOUT, remaining()))
                try:
                    # asyncio.timeout, not wait_for: on 3.11 wait_for can lose a cancellation.
                    async with asyncio.timeout(budget):
                        await probe(budget)
                except Exception as exc:  # routed: retried if transient, else NotReady below
                    last_error = exc
                    elapsed = clock() - start
                    _log.info("%s at %s not ready (attempt %d): %s", kind, target, number, exc)
                    if on_attempt is not None:
                        on_attempt(Attempt(target, number, elapsed, _describe(exc)))
                    raise
    except Exception as exc:
        elapsed = clock() - start
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
    elapsed = clock() - start
    _log.info("%s at %s ready after %.2f s (%d attempts)", kind, target, elapsed, number)
    return elapsed
