"""The retry seam of ingest: anything with ``await policy.call(fn, *args)``.

``sheetanchor.retry.RetryPolicy`` fits this protocol. Until every deployment has it, the
default here composes the same parts with tenacity: the transient classifier, exponential
backoff with full jitter, an attempt cap and a deadline.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from sheetanchor.errors import ConfigError
from sheetanchor.ingest._classify import is_transient

__all__ = ["IngestRetry", "RetryLike"]

T = TypeVar("T")


class RetryLike(Protocol):
    """A retry policy: calls ``fn(*args)``, retrying transient errors within a budget."""

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``fn(*args)``; re-raise the last error once the budget is spent."""
        ...


class IngestRetry:
    """Transient-only retries with jittered exponential backoff, capped in attempts and time.

    Arguments:
        max_attempts: attempts in all (1 = no retry).
        initial: first backoff scale in seconds.
        maximum: largest single wait in seconds.
        deadline: give up after this many seconds since the first attempt.
        sleep: the sleep coroutine (inject a fake one in tests).
    """

    def __init__(
        self,
        *,
        max_attempts: int = 5,
        initial: float = 0.1,
        maximum: float = 2.0,
        deadline: float = 15.0,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ConfigError(f"IngestRetry max_attempts must be >= 1, got {max_attempts!r}")
        if initial <= 0 or maximum < initial or deadline <= 0:
            raise ConfigError(
                "IngestRetry needs 0 < initial <= maximum and deadline > 0, got "
                f"initial={initial!r} maximum={maximum!r} deadline={deadline!r}"
            )
        self.max_attempts = max_attempts
        self.initial = initial
        self.maximum = maximum
        self.deadline = deadline
        self._sleep = sleep

    def __repr__(self) -> str:
        return (
            f"IngestRetry(max_attempts={self.max_attempts}, initial={self.initial}, "
            f"maximum={self.maximum}, deadline={self.deadline})"
        )

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``fn(*args)`` retrying transient errors; re-raise the last one past the budget."""
        kwargs: dict[str, Any] = {}
        if self._sleep is not None:
            kwargs["sleep"] = self._sleep
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts) | stop_after_delay(self.deadline),
            wait=wait_random_exponential(multiplier=self.initial, max=self.maximum),
            retry=retry_if_exception(is_transient),
            reraise=True,
            **kwargs,
        )
        result: T = await retrying(fn, *args)
        return result
