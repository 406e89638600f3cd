"""The retry seam of ingest: anything with ``await policy.call(fn, *args)``.

:class:`sheetanchor.retry.RetryPolicy` is the implementation; ``DEFAULT_INGEST_POLICY`` is the
budget one batch gets before it goes to the dead-letter store.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from sheetanchor.retry import RetryPolicy

__all__ = ["DEFAULT_INGEST_POLICY", "RetryLike"]

T = TypeVar("T")


class RetryLike(Protocol):
    """A retry policy: calls ``fn(*args)``, retrying transient errors within a budget."""

    async def call(self, fn: Callable[..., Awaitable[T]], /, *args: Any) -> T:
        """Run ``fn(*args)``; raise once the budget is spent."""
        ...


#: 5 attempts within 15 s (waits capped at 0.1, 0.2, 0.4, 0.8 s, jittered), then dead letters.
DEFAULT_INGEST_POLICY = RetryPolicy(
    max_attempts=5, initial=0.1, maximum=2.0, deadline=15.0, name="ingest batch write"
)
