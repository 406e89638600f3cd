"""The one boundary where driver errors become sheetanchor errors.

asyncpg and SQLAlchemy errors that mean "the connection is gone" become
:class:`~sheetanchor.errors.ConnectionLost`, a pool that had no free connection in time becomes
:class:`~sheetanchor.errors.PoolTimeout`. Everything else (a unique violation, a syntax error)
passes through unchanged: the caller knows those types already. The original error is always
chained as ``__cause__``.

Seam: once ``sheetanchor.retry`` lands, :func:`is_connection_error` should defer to its
``is_transient`` classifier for the connection class of errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg
import sqlalchemy.exc as sa_exc

from sheetanchor.config import redact
from sheetanchor.errors import ConnectionLost, PoolTimeout, SheetAnchorError

__all__ = ["is_connection_error", "translate_errors"]

# SQLSTATE classes/codes that mean the session is gone: 08 (connection exception),
# 57P01-57P03 (admin/crash shutdown, cannot connect now).
_CONNECTION_SQLSTATES = frozenset({"57P01", "57P02", "57P03"})

_CONNECTION_TYPES: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.ConnectionFailureError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    ConnectionError,
    OSError,
)


def _sqlstate(exc: BaseException) -> str | None:
    code = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
    return code if isinstance(code, str) else None


def is_connection_error(exc: BaseException) -> bool:
    """True when ``exc`` (or the driver error it wraps) means the connection was lost or refused."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, sa_exc.DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, _CONNECTION_TYPES):
            return True
        if isinstance(current, asyncpg.exceptions.InterfaceError) and "connection is closed" in (
            str(current)
        ):
            return True
        code = _sqlstate(current)
        if code is not None and (code.startswith("08") or code in _CONNECTION_SQLSTATES):
            return True
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__
    return False


@contextmanager
def translate_errors(where: str) -> Iterator[None]:
    """Re-raise connection and pool errors as sheetanchor errors, chained ``from`` the original.

    Args:
        where: the redacted server address, used in the messages.
    """
    try:
        yield
    except SheetAnchorError:
        raise
    except sa_exc.TimeoutError as exc:
        detail = redact(str(exc))
        raise PoolTimeout(
            f"no pooled connection to {where} became free in time ({detail}); release "
            "connections sooner (use `async with db.session()`), or raise "
            "PoolSettings(size=, max_overflow=, timeout=)"
        ) from exc
    except Exception as exc:
        if is_connection_error(exc):
            detail = redact(f"{type(exc).__name__}: {exc}")
            raise ConnectionLost(f"connection to PostgreSQL at {where} lost: {detail}") from exc
        raise
