"""Settings of :class:`~sheetanchor.postgres.Database`: pool sizes, timeouts, defaults.

Every value is validated when the object is built, with a :class:`~sheetanchor.errors.ConfigError`
(a ``ValueError``) that names the argument, so a typo fails at import time, not at the first
query under load.
"""

from __future__ import annotations

from dataclasses import dataclass

from sheetanchor.config import check_seconds
from sheetanchor.errors import ConfigError

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT",
    "DEFAULT_LEAK_THRESHOLD",
    "DEFAULT_STATEMENT_TIMEOUT",
    "PoolSettings",
    "check_name",
    "check_seconds",
]

DEFAULT_STATEMENT_TIMEOUT = 30.0
"""Server-side ``statement_timeout`` (seconds) set on every connection."""
DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT = 60.0
"""Server-side ``idle_in_transaction_session_timeout`` (seconds) set on every connection."""
DEFAULT_CONNECT_TIMEOUT = 10.0
"""How long one connection attempt may take (seconds)."""
DEFAULT_LEAK_THRESHOLD = 30.0
"""A connection held longer than this (seconds) is reported with the stack that took it."""


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value!r}")


def check_name(name: str, value: object) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a short label without ``:`` or spaces."""
    if not isinstance(value, str) or not value or len(value) > 32:
        raise ConfigError(
            f"{name} must be a non-empty string of at most 32 characters, got {value!r}"
        )
    if any(ch in value for ch in ": \t\n"):
        raise ConfigError(f"{name} must not contain ':' or whitespace, got {value!r}")


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """Sizes and timings of the connection pool of one engine (one per process and event loop).

    Attributes:
        size: connections kept open in the pool.
        max_overflow: extra connections opened under load and closed when returned.
        timeout: seconds to wait for a free connection before :class:`~sheetanchor.PoolTimeout`.
        recycle: close and replace a connection older than this many seconds (``None``: never).
        pre_ping_idle: ping a connection on checkout only when it sat idle in the pool longer than
            this (seconds); ``0`` pings on every checkout (one extra round trip each), ``None``
            never pings for idleness. A connection the server closed is always detected: for
            free once this loop has read the server's goodbye, else by its socket having input
            (one ``poll`` per checkout), and that one is pinged before use, whatever this is.
        use_lifo: reuse the most recently returned connection first, so idle extras can age out.

    Example::

        PoolSettings(size=5, max_overflow=5, timeout=10.0)
    """

    size: int = 5
    max_overflow: int = 5
    timeout: float = 30.0
    recycle: float | None = 1800.0
    pre_ping_idle: float | None = 10.0
    use_lifo: bool = True

    def __post_init__(self) -> None:
        _check_int("size", self.size, minimum=1)
        _check_int("max_overflow", self.max_overflow, minimum=0)
        check_seconds("timeout", self.timeout)
        check_seconds("recycle", self.recycle, allow_none=True)
        check_seconds("pre_ping_idle", self.pre_ping_idle, allow_none=True, allow_zero=True)
        if not isinstance(self.use_lifo, bool):
            raise ConfigError(f"use_lifo must be True or False, got {self.use_lifo!r}")

    @property
    def capacity(self) -> int:
        """Most connections this pool can hold open at once (``size + max_overflow``)."""
        return self.size + self.max_overflow
