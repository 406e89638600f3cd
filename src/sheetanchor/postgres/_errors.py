"""The error boundary of the PostgreSQL client, on top of :mod:`sheetanchor._translate`.

Connection failures become :class:`~sheetanchor.errors.ConnectionLost`, an exhausted pool
:class:`~sheetanchor.errors.PoolTimeout`, a failed COMMIT :class:`~sheetanchor.errors.CommitFailed`
(raised by ``Database`` itself); everything else (a unique violation, a syntax error) passes
through unchanged. The original error is always ``__cause__``. Which errors are connection
errors is decided by :func:`sheetanchor.retry.is_connection_error`, the same classifier the
retry policies use.
"""

from __future__ import annotations

from sheetanchor._translate import translate, translate_errors
from sheetanchor.errors import SheetAnchorError
from sheetanchor.retry import is_connection_error

__all__ = ["is_connection_error", "map_error", "translate", "translate_errors"]


def map_error(exc: BaseException, where: str) -> SheetAnchorError | None:
    """The sheetanchor error for driver error ``exc``, or ``None`` to let ``exc`` through.

    Args:
        exc: the error raised by asyncpg or SQLAlchemy.
        where: what was talked to (``"PostgreSQL at 127.0.0.1:5432"``), for the message.
    """
    return translate(exc, where)
