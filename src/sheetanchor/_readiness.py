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

from sheetanchor.config import redact
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
) -> float:
    """Call ``probe(attempt_timeout)`` until it succeeds; return the seconds it took.

    Args:
        kind: what is waited for, for messages (``"PostgreSQL"``).
        target: where, already redacted (``"postgresql://app:***@db:5432/app"``).
        probe: one real check (a query, a PING); its argument is the time it may take.
        timeout: the whole budget in seconds.
        on_attempt: called after each failed attempt (progress display).
        sleep: injectable for tests.

    Raises:
        NotReady: not ready within ``timeout``, or failed with an error waiting cannot fix.
        ValueError: ``timeout`` is not positive.
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
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
                    await asyncio.wait_for(probe(budget), timeout=budget + 0.5)
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
