"""The one boundary where driver exceptions become sheetanchor exceptions.

Code that talks to asyncpg, SQLAlchemy or redis-py wraps the call in
:func:`translate_errors` (or calls :func:`translate` where it already catches); connection
failures come out as :class:`~sheetanchor.errors.ConnectionLost` and an exhausted SQLAlchemy
pool as :class:`~sheetanchor.errors.PoolTimeout`, naming the (redacted) target and chained
``from`` the driver error; everything else passes through unchanged so callers and the
retry classifier still see SQLSTATEs, constraint names and so on::

    with translate_errors("PostgreSQL at 127.0.0.1:5432"):
        conn = await asyncpg.connect(dsn)

    async with translate_errors("Redis at 127.0.0.1:6379"):
        await client.ping()
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

import sqlalchemy.exc as sa_exc

from sheetanchor._classify import describe_error, is_connection_error
from sheetanchor.config import redact
from sheetanchor.errors import ConnectionLost, PoolTimeout, SheetAnchorError

__all__ = ["translate", "translate_errors"]


def _is_pool_timeout(exc: BaseException) -> bool:
    # SQLAlchemy's "QueuePool limit of size N overflow M reached, connection timed out".
    return isinstance(exc, sa_exc.TimeoutError)


# (predicate, what to raise, how to word it), most specific first: the first match wins.
_RULES: tuple[tuple[Callable[[BaseException], bool], type[SheetAnchorError], str], ...] = (
    (
        _is_pool_timeout,
        PoolTimeout,
        "no pooled connection to {target} became free in time ({error}); release connections "
        "sooner (use `async with db.session()`), or raise PoolSettings(size=, max_overflow=, "
        "timeout=)",
    ),
    (
        is_connection_error,
        ConnectionLost,
        "connection to {target} failed or was lost ({error}); check that the server is "
        "running and reachable, then retry (sheetanchor.retry.DEFAULT_POLICY retries this)",
    ),
)


def translate(exc: BaseException, target: str) -> SheetAnchorError | None:
    """The sheetanchor error that ``exc`` becomes at the boundary, or ``None`` to let it pass.

    The function form of :class:`translate_errors`, for hot paths that already catch: raise
    the result ``from exc``. ``target`` is redacted here.
    """
    if not isinstance(exc, Exception) or isinstance(exc, SheetAnchorError):
        return None
    for matches, error_cls, template in _RULES:
        if matches(exc):
            return error_cls(template.format(target=redact(target), error=describe_error(exc)))
    return None


class translate_errors:
    """Context manager (``with`` and ``async with``) translating driver errors for ``target``.

    Args:
        target: what was being talked to, e.g. ``"PostgreSQL at db:5432"``; redacted
            before it is put into a message, so a URL with a password is fine.

    Raises:
        PoolTimeout: SQLAlchemy's pool had no free connection in time.
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
        if exc is None:
            return
        mapped = translate(exc, self.target)
        if mapped is not None:
            raise mapped from exc

    async def __aenter__(self) -> translate_errors:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)
