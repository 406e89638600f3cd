"""The one boundary where driver exceptions become sheetanchor exceptions.

Code that talks to asyncpg, SQLAlchemy or redis-py wraps the call in
:func:`translate_errors`; connection failures come out as
:class:`~sheetanchor.errors.ConnectionLost` naming the (redacted) target and chained
``from`` the driver error, everything else passes through unchanged so callers and the
retry classifier still see SQLSTATEs, constraint names and so on::

    with translate_errors("PostgreSQL at 127.0.0.1:5432"):
        conn = await asyncpg.connect(dsn)

    async with translate_errors("Redis at 127.0.0.1:6379"):
        await client.ping()
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

from sheetanchor._classify import describe_error, is_connection_error
from sheetanchor.config import redact
from sheetanchor.errors import ConnectionLost, SheetAnchorError

__all__ = ["translate_errors"]

# (predicate, what to raise, how to word it), most specific first: the first match wins.
# Only connection failures are translated today; a future entry (say, pool exhaustion)
# goes above the broader ones it refines.
_RULES: tuple[tuple[Callable[[BaseException], bool], type[SheetAnchorError], str], ...] = (
    (
        is_connection_error,
        ConnectionLost,
        "connection to {target} failed or was lost ({error}); check that the server is "
        "running and reachable, then retry (sheetanchor.retry.DEFAULT_POLICY retries this)",
    ),
)


class translate_errors:
    """Context manager (``with`` and ``async with``) translating driver errors for ``target``.

    Args:
        target: what was being talked to, e.g. ``"PostgreSQL at db:5432"``; redacted
            before it is put into a message, so a URL with a password is fine.

    Raises:
        ConnectionLost: the wrapped code raised a connection-family error (see
            :func:`sheetanchor.retry.is_connection_error`); the original is ``__cause__``.

    sheetanchor's own errors, ``asyncio.CancelledError`` and every other exception pass
    through untouched.
    """

    __slots__ = ("target",)

    def __init__(self, target: str) -> None:
        self.target = redact(target)

    def __enter__(self) -> translate_errors:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None or not isinstance(exc, Exception) or isinstance(exc, SheetAnchorError):
            return
        for matches, error_cls, template in _RULES:
            if matches(exc):
                message = template.format(target=self.target, error=describe_error(exc))
                raise error_cls(message) from exc

    async def __aenter__(self) -> translate_errors:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)
