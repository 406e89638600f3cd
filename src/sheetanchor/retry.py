"""Should this be retried, and how long to wait: a pure classifier plus tenacity policies.

Two things are kept apart on purpose:

* :func:`is_transient` answers "may this succeed if tried again?" for errors from asyncpg,
  SQLAlchemy (asyncpg dialect), psycopg 3 and redis-py (sync and asyncio). It never raises
  and never looks at anything but the exception tree.
* :class:`RetryPolicy` answers "how often and how long?": exponential backoff with full
  jitter, a maximum number of attempts and a total deadline, on top of tenacity.

Example::

    from sheetanchor.retry import DEFAULT_POLICY

    rows = await DEFAULT_POLICY.named("load orders").call(conn.fetch, "SELECT ...")

When the attempts or the deadline run out on a transient error, the policy raises
:class:`~sheetanchor.errors.TransientError` (:class:`~sheetanchor.errors.ConnectionLost` when
the connection itself failed), chained ``from`` the last error. Any other error propagates at
once, untouched.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, ParamSpec, TypeVar

import tenacity
from prometheus_client import Counter

# The classifier lives in its own module; it is public from here.
from sheetanchor._classify import (
    LOCK_NOT_AVAILABLE,
    TRANSIENT_SQLSTATES,
    describe_error,
    is_connection_error,
    is_transient,
)
from sheetanchor.config import redact
from sheetanchor.errors import ConfigError, ConnectionLost, TransientError
from sheetanchor.observe import REGISTRY, get_logger, metric_name

__all__ = [
    "DEFAULT_POLICY",
    "LOCK_NOT_AVAILABLE",
    "STARTUP_POLICY",
    "TRANSIENT_SQLSTATES",
    "RetryPolicy",
    "describe_error",
    "is_connection_error",
    "is_transient",
]

P = ParamSpec("P")
R = TypeVar("R")

_log = get_logger("retry")

RETRY_ATTEMPTS = Counter(
    metric_name("retry", "attempts", "total"),
    "Retry decisions taken by sheetanchor retry policies: 'retried' (a transient error, "
    "another attempt follows) or 'exhausted' (attempts or deadline used up).",
    ["outcome"],
    registry=REGISTRY,
)

# --------------------------------------------------------------------------------------------
# The policies
# --------------------------------------------------------------------------------------------


class _Lazy:
    """Render ``describe_error(exc)`` only if a log record is actually formatted."""

    __slots__ = ("_exc",)

    def __init__(self, exc: BaseException) -> None:
        self._exc = exc

    def __str__(self) -> str:
        return describe_error(self._exc)


class _Run:
    """Clock state of one retried call; the start is reset when attempt 1 begins."""

    __slots__ = ("clock", "start")

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.start = clock()

    def elapsed(self) -> float:
        return max(0.0, self.clock() - self.start)


def _check_number(name: str, value: object, *, minimum: float, allow_equal: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    number = float(value)
    too_small = number < minimum if allow_equal else number <= minimum
    if math.isnan(number) or math.isinf(number) or too_small:
        bound = f">= {minimum}" if allow_equal else f"> {minimum}"
        raise ConfigError(f"{name} must be a finite number {bound}, got {value!r}")
    return number


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How to retry: exponential backoff with full jitter, max attempts and a total deadline.

    Built on tenacity: the wait before retry *n* (1-based) is uniform in
    ``[0, min(maximum, initial * multiplier ** (n - 1))]`` (tenacity's
    ``wait_random_exponential``, "full jitter"), cut so that the total time never passes
    ``deadline``. Only errors for which ``retry_if`` is True are retried; the others
    propagate at once, untouched.

    Args:
        max_attempts: attempts in total, the first one included (>= 1).
        initial: cap of the first wait, in seconds (>= 0).
        maximum: cap of any single wait, in seconds (>= initial).
        deadline: total seconds from the first attempt after which no new attempt starts;
            ``None`` for no deadline.
        multiplier: growth of the cap per attempt (>= 1).
        retry_if: the classifier; :func:`is_transient` by default.
        name: what is being retried, for log lines and error messages (``"connect to
            PostgreSQL at 127.0.0.1:5432"``); see :meth:`named`.
        sleep: ``async def sleep(seconds)``; ``asyncio.sleep`` by default. Tests inject a
            fake one.
        clock: a monotonic clock in seconds; ``time.monotonic`` by default.

    Raises:
        ConfigError: (a ``ValueError``) an argument is out of range; the message names it.

    Example::

        policy = RetryPolicy(max_attempts=3, deadline=10.0).named("write batch")
        await policy.call(sink.write, rows)

        @policy.wrap
        async def refresh() -> None: ...

        async for attempt in policy.retrying():
            with attempt:
                await conn.execute("...")
    """

    max_attempts: int = 5
    initial: float = 0.1
    maximum: float = 5.0
    deadline: float | None = 30.0
    multiplier: float = 2.0
    retry_if: Callable[[BaseException], bool] = field(default=is_transient, repr=False)
    name: str = "operation"
    sleep: Callable[[float], Awaitable[None]] = field(default=asyncio.sleep, repr=False)
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ConfigError(f"name must be a string, got {self.name!r}")
        # The name ends up in logs and messages; it may well contain a URL.
        object.__setattr__(self, "name", redact(self.name))
        if (
            isinstance(self.max_attempts, bool)
            or not isinstance(self.max_attempts, int)
            or self.max_attempts < 1
        ):
            raise ConfigError(f"max_attempts must be an integer >= 1, got {self.max_attempts!r}")
        _check_number("initial", self.initial, minimum=0.0, allow_equal=True)
        _check_number("maximum", self.maximum, minimum=0.0, allow_equal=True)
        if self.maximum < self.initial:
            raise ConfigError(
                f"maximum must be >= initial ({self.initial!r}), got {self.maximum!r}"
            )
        if self.deadline is not None:
            _check_number("deadline", self.deadline, minimum=0.0, allow_equal=False)
        _check_number("multiplier", self.multiplier, minimum=1.0, allow_equal=True)
        for name in ("retry_if", "sleep", "clock"):
            if not callable(getattr(self, name)):
                raise ConfigError(f"{name} must be callable, got {getattr(self, name)!r}")

    def named(self, name: str) -> RetryPolicy:
        """A copy of this policy that calls what it retries ``name`` in logs and errors."""
        return replace(self, name=name)

    def backoff_cap(self, retry_number: int) -> float:
        """Upper bound of the wait before retry ``retry_number`` (1 = first retry)."""
        exponent = max(0, retry_number - 1)
        try:
            raw = self.initial * self.multiplier**exponent
        except OverflowError:
            return self.maximum
        return min(self.maximum, raw)

    def retrying(self) -> tenacity.AsyncRetrying:
        """A fresh tenacity ``AsyncRetrying`` configured by this policy.

        Use it as ``async for attempt in policy.retrying(): with attempt: ...``. On
        exhaustion it raises :class:`TransientError` / :class:`ConnectionLost` rather than
        tenacity's ``RetryError``.
        """
        run = _Run(self.clock)
        jitter = tenacity.wait_random_exponential(
            multiplier=self.initial, max=self.maximum, exp_base=self.multiplier
        )

        def before(state: tenacity.RetryCallState) -> None:
            if state.attempt_number == 1:
                run.start = run.clock()

        def wait(state: tenacity.RetryCallState) -> float:
            seconds = jitter(state) if self.initial > 0 else 0.0
            if self.deadline is not None:
                # Never sleep past the deadline: the last wait is cut to what is left.
                seconds = min(seconds, max(0.0, self.deadline - run.elapsed()))
            return max(0.0, seconds)

        def stop(state: tenacity.RetryCallState) -> bool:
            if state.attempt_number >= self.max_attempts:
                return True
            return self.deadline is not None and run.elapsed() >= self.deadline

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = _outcome_exception(state)
            RETRY_ATTEMPTS.labels(outcome="retried").inc()
            _log.warning(
                "%s failed (attempt %s of %s, %.1f s elapsed): %s; retrying in %.2f s",
                self.name,
                state.attempt_number,
                self.max_attempts,
                run.elapsed(),
                _Lazy(exc) if exc is not None else "no error",
                state.upcoming_sleep,
                extra={
                    "retry_name": self.name,
                    "attempt": state.attempt_number,
                    "max_attempts": self.max_attempts,
                    "sleep_seconds": round(state.upcoming_sleep, 3),
                },
            )

        def give_up(state: tenacity.RetryCallState) -> object:
            exc = _outcome_exception(state)
            RETRY_ATTEMPTS.labels(outcome="exhausted").inc()
            if exc is None:  # tenacity only gives up after a failed attempt
                raise TransientError(f"{self.name} gave up without an error")
            raise self._exhausted(exc, state.attempt_number, run.elapsed()) from exc

        return tenacity.AsyncRetrying(
            sleep=self.sleep,
            stop=stop,
            wait=wait,
            retry=tenacity.retry_if_exception(self.retry_if),
            before=before,
            before_sleep=before_sleep,
            retry_error_callback=give_up,
            name=self.name,
        )

    def _exhausted(self, exc: BaseException, attempts: int, elapsed: float) -> TransientError:
        why = (
            f"deadline of {self.deadline:.1f} s reached"
            if self.deadline is not None and elapsed >= self.deadline
            else f"max_attempts={self.max_attempts} reached"
        )
        cls = ConnectionLost if is_connection_error(exc) else TransientError
        what_to_do = (
            "check that the server is running and reachable"
            if cls is ConnectionLost
            else "the conflict may clear on its own; reduce contention"
        )
        return cls(
            f"{self.name} failed after {attempts} attempt(s) over {elapsed:.1f} s ({why}; "
            f"last error: {describe_error(exc)}); {what_to_do}, or raise max_attempts/deadline "
            "of the RetryPolicy"
        )

    async def call(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Await ``fn(*args, **kwargs)``, retrying transient errors under this policy.

        Raises:
            TransientError: attempts or deadline exhausted (``ConnectionLost`` when the
                connection failed); the last error is ``__cause__``.
            Exception: any error ``retry_if`` rejects, unchanged and at once.
        """
        async for attempt in self.retrying():
            with attempt:
                return await fn(*args, **kwargs)
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover

    def wrap(self, fn: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
        """Decorate an async function so every call goes through :meth:`call`."""

        @functools.wraps(fn)
        async def retried(*args: P.args, **kwargs: P.kwargs) -> R:
            return await self.call(fn, *args, **kwargs)

        return retried


def _outcome_exception(state: tenacity.RetryCallState) -> BaseException | None:
    outcome = state.outcome
    if outcome is None or not outcome.failed:
        return None
    return outcome.exception()


#: Everyday policy: 5 attempts within 30 s, waits capped at 0.1, 0.2, 0.4, 0.8 s (jittered).
DEFAULT_POLICY = RetryPolicy()

#: Waiting for servers at start-up (incident 001): up to 60 s, waits growing to 5 s.
STARTUP_POLICY = RetryPolicy(
    max_attempts=1_000, initial=0.25, maximum=5.0, deadline=60.0, name="start-up"
)
