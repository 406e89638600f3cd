"""Which failures of a batch write mean what: transient, data (poison), or neither.

``is_transient`` is the project's classifier (``sheetanchor.retry.is_transient``);
``is_data_error`` is ingest's own: SQLSTATE classes 22 (data exception)
and 23 (integrity constraint violation) say a *record* is bad, so the batch is bisected.
"""

from __future__ import annotations

from typing import Any

from sheetanchor.retry import is_transient

__all__ = ["error_info", "is_data_error", "is_transient", "sqlstate_of"]


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE of a PostgreSQL error (also through ``__cause__``), or ``None``."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 5:
        code = getattr(cur, "sqlstate", None)
        if isinstance(code, str):
            return code
        cur = cur.__cause__
        seen += 1
    return None


def is_data_error(exc: BaseException) -> bool:
    """True when PostgreSQL refused the data itself (SQLSTATE 22xxx or 23xxx)."""
    code = sqlstate_of(exc)
    return code is not None and code[:2] in ("22", "23")


def error_info(exc: BaseException) -> dict[str, Any]:
    """``{"sqlstate", "message", "detail", "type"}`` of an exception, for dead-letter files."""
    info: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    code = sqlstate_of(exc)
    if code is not None:
        info["sqlstate"] = code
    detail = getattr(exc, "detail", None)
    if detail:
        info["detail"] = str(detail)
    return info
