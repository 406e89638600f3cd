"""Should this be retried? A pure classifier of driver exceptions by SQLSTATE and type.

Covers asyncpg, SQLAlchemy (asyncpg dialect), psycopg 3 and redis-py (sync and asyncio).

Public through :mod:`sheetanchor.retry`; kept apart from the policies ("how long to wait?")
on purpose, and so that each module stays small.
"""

from __future__ import annotations

import errno
import re
import socket
import sys
from collections.abc import Iterator
from enum import Enum

import asyncpg
import redis.exceptions as redis_exc
import sqlalchemy.exc as sa_exc

from sheetanchor.config import redact
from sheetanchor.errors import ConnectionLost, SheetAnchorError, TransientError

__all__ = [
    "LOCK_NOT_AVAILABLE",
    "TRANSIENT_SQLSTATES",
    "describe_error",
    "is_connection_error",
    "is_transient",
]

#: SQLSTATEs (besides the whole class 08) after which the same work may succeed if retried.
TRANSIENT_SQLSTATES: frozenset[str] = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "57P01",  # admin_shutdown (pg_terminate_backend, fast shutdown)
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now (starting up, recovery)
        "53300",  # too_many_connections
    }
)
#: lock_not_available: transient only with ``lock_timeout_is_transient=True``, because a
#: ``NOWAIT`` or ``lock_timeout`` is usually asked for precisely to fail fast.
LOCK_NOT_AVAILABLE = "55P03"

# SQLSTATEs that mean the connection itself is gone or could not be made (-> ConnectionLost).
# 57P05 (idle_session_timeout) is the server closing an idle session: a new one will do.
_CONNECTION_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "57P05", "53300"})

# errno values of a socket that could not connect or was cut.
_CONNECTION_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNREFUSED",
        "ECONNRESET",
        "ECONNABORTED",
        "EPIPE",
        "ETIMEDOUT",
        "EHOSTUNREACH",
        "EHOSTDOWN",
        "ENETUNREACH",
        "ENETDOWN",
        "ENETRESET",
        "ENOTCONN",
        "ESHUTDOWN",
    )
    if hasattr(errno, name)
)

# Messages of misuse that retrying cannot fix (incident 002): a resource shared between
# concurrent tasks or used from another event loop.
_PERMANENT_MESSAGES = (
    "another operation is in progress",
    "attached to a different loop",
    "event loop is closed",
)
# asyncpg's (and SQLAlchemy's adapted) InterfaceError for a connection that was closed under us.
_CLOSED_MESSAGES = ("connection is closed", "connection was closed")
# asyncpg race: the server's FATAL (pg_terminate_backend, shutdown, idle timeout) reached an
# idle connection and moved its protocol to ERROR_CONSUME (state 2) just before our next
# query; asyncpg then raises InternalClientError "cannot switch to state 11; another
# operation (2) is in progress" and marks the connection closed. Concurrent use of one
# connection is stopped earlier by an InterfaceError, so state 2 here means a dead connection.
_ASYNCPG_DEAD_PROTOCOL = re.compile(r"cannot switch to state \d+; another operation \(2\) is in")

_REDIS_AUTH: tuple[type[BaseException], ...] = tuple(
    cls
    for cls in (
        getattr(redis_exc, "AuthenticationError", None),
        getattr(redis_exc, "AuthorizationError", None),
        getattr(redis_exc, "ExternalAuthProviderError", None),
    )
    if isinstance(cls, type)
)
_REDIS_TRANSIENT: tuple[type[BaseException], ...] = (
    redis_exc.ReadOnlyError,  # READONLY: talking to a replica during a failover
    redis_exc.TryAgainError,  # TRYAGAIN: cluster slot migration in progress
    redis_exc.ClusterDownError,  # CLUSTERDOWN / MASTERDOWN
)

# Exception trees are walked this deep at most; deeper links are ignored.
_MAX_DEPTH = 32


class _Verdict(Enum):
    UNKNOWN = 0
    PERMANENT = 1
    TRANSIENT = 2
    CONNECTION = 3  # transient, and the connection itself failed


def is_transient(exc: BaseException, *, lock_timeout_is_transient: bool = False) -> bool:
    """Return True when ``exc`` may succeed if the same work is tried again.

    Pure and total: it never raises, never does I/O, and answers False when unsure.

    The exception is examined first, then what it wraps: SQLAlchemy's ``DBAPIError.orig``
    and the explicit ``__cause__`` chain (``raise ... from``). The first link with a definite
    answer decides. ``__context__`` (an error raised *while handling* another) is not
    followed, because it is not caused by it. An exception group is transient when every
    member is.

    Transient:
        * SQLSTATE class 08 (connection exceptions), 40001 (serialization failure),
          40P01 (deadlock), 57P01/57P02/57P03 (admin shutdown, crash shutdown, cannot
          connect now), 57P05 (idle session timeout), 53300 (too many connections);
          55P03 (lock not available) only when ``lock_timeout_is_transient`` is True.
          SQLSTATE is read from ``sqlstate`` (asyncpg, psycopg 3, SQLAlchemy's adapted
          asyncpg errors) or ``pgcode``.
        * connection refused / reset / aborted, other ``OSError`` of the connection
          family, ``TimeoutError`` (``asyncio.TimeoutError``): taken to be a connect or
          read timeout.
        * asyncpg ``InterfaceError`` "connection is closed", and its
          ``InternalClientError`` "another operation (2) is in progress" (a FATAL from
          the server reached an idle connection just before the next query; asyncpg
          closes it); a SQLAlchemy ``DBAPIError`` whose ``connection_invalidated`` is
          True; SQLAlchemy ``DisconnectionError``; a psycopg ``OperationalError``
          without SQLSTATE (the client could not reach the server).
        * redis-py ``ConnectionError`` (including ``BusyLoadingError``, but not
          authentication errors), ``TimeoutError``, ``ReadOnlyError``, ``TryAgainError``,
          ``ClusterDownError``.
        * sheetanchor's own :class:`~sheetanchor.errors.TransientError`.

    Never transient: any other SQLSTATE (syntax 42xxx, constraints 23xxx, data 22xxx, ...),
    "another operation is in progress", "attached to a different loop", "Event loop is
    closed", other asyncpg ``InterfaceError`` (misuse), other redis errors
    (``WRONGTYPE`` ...), other sheetanchor errors, ``asyncio.CancelledError`` and every
    ``BaseException`` that is not an ``Exception``.

    Args:
        exc: the exception to classify.
        lock_timeout_is_transient: also retry 55P03 (``lock_timeout``, ``NOWAIT``).

    Example::

        retry_if = functools.partial(is_transient, lock_timeout_is_transient=True)
    """
    verdict = _classify(exc, lock_timeout_is_transient, set(), 0)
    return verdict in (_Verdict.TRANSIENT, _Verdict.CONNECTION)


def is_connection_error(exc: BaseException) -> bool:
    """Return True when ``exc`` means the connection was lost or could not be made.

    A subset of :func:`is_transient`: SQLSTATE class 08, 57P01/57P02/57P03, 53300, socket
    connection errors and timeouts, closed or invalidated driver connections, redis
    ``ConnectionError`` / ``TimeoutError``. Serialization failures and deadlocks are
    transient but not connection errors. Used to pick
    :class:`~sheetanchor.errors.ConnectionLost` over
    :class:`~sheetanchor.errors.TransientError`.
    """
    return _classify(exc, False, set(), 0) is _Verdict.CONNECTION


def _classify(exc: BaseException, lock_ok: bool, seen: set[int], depth: int) -> _Verdict:
    """Walk ``exc`` and what it wraps; the first definite verdict wins."""
    current: BaseException | None = exc
    while current is not None and depth < _MAX_DEPTH and id(current) not in seen:
        seen.add(id(current))
        depth += 1
        if isinstance(current, BaseExceptionGroup):
            return _classify_group(current, lock_ok, seen, depth)
        verdict = _classify_one(current, lock_ok)
        if verdict is not _Verdict.UNKNOWN:
            return verdict
        current = _wrapped(current)
    return _Verdict.UNKNOWN


def _classify_group(
    group: BaseExceptionGroup[BaseException], lock_ok: bool, seen: set[int], depth: int
) -> _Verdict:
    verdicts = {_classify(member, lock_ok, seen, depth) for member in group.exceptions}
    if verdicts == {_Verdict.CONNECTION}:
        return _Verdict.CONNECTION
    if verdicts and verdicts <= {_Verdict.TRANSIENT, _Verdict.CONNECTION}:
        return _Verdict.TRANSIENT
    return _Verdict.PERMANENT


# Exceptions run arbitrary code in ``__str__`` and properties. The classifier must answer
# for any exception, so a failure there counts as "no message" / "no such attribute" (and
# the verdict then falls back to not transient): it is an answer, not a swallowed error.
def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # noqa: BLE001 - see above
        return ""


def _attr(exc: BaseException, name: str) -> object:
    try:
        return getattr(exc, name, None)
    except Exception:  # noqa: BLE001 - see above
        return None


def _wrapped(exc: BaseException) -> BaseException | None:
    """The next link: SQLAlchemy's ``orig`` first, else the explicit ``__cause__``."""
    if isinstance(exc, sa_exc.DBAPIError):
        orig = _attr(exc, "orig")
        if isinstance(orig, BaseException) and orig is not exc:
            # The adapted asyncpg error carries the SQLSTATE; its own __cause__ (the asyncpg
            # error) is the next link after it.
            return orig
    return exc.__cause__


def _sqlstate(exc: BaseException) -> str | None:
    for attr in ("sqlstate", "pgcode"):
        value = _attr(exc, attr)
        if isinstance(value, str) and len(value) == 5:
            return value.upper()
    return None


def _classify_sqlstate(state: str, lock_ok: bool) -> _Verdict:
    if state.startswith("08") or state in _CONNECTION_SQLSTATES:
        return _Verdict.CONNECTION
    if state in TRANSIENT_SQLSTATES or (lock_ok and state == LOCK_NOT_AVAILABLE):
        return _Verdict.TRANSIENT
    return _Verdict.PERMANENT


def _is_interface_error(exc: BaseException) -> bool:
    # asyncpg's InterfaceError, SQLAlchemy's adapted one and psycopg's share the DB-API name.
    return any(cls.__name__ == "InterfaceError" for cls in type(exc).__mro__)


def _classify_one(exc: BaseException, lock_ok: bool) -> _Verdict:
    """Verdict for one exception, ignoring what it wraps."""
    if not isinstance(exc, Exception):
        # CancelledError, KeyboardInterrupt, SystemExit, GeneratorExit: never retried.
        return _Verdict.PERMANENT
    if isinstance(exc, SheetAnchorError):
        if isinstance(exc, ConnectionLost):
            return _Verdict.CONNECTION
        return _Verdict.TRANSIENT if isinstance(exc, TransientError) else _Verdict.PERMANENT
    if isinstance(exc, sa_exc.DBAPIError):
        # SQLAlchemy found the connection closed: whatever the message says, it is gone.
        invalidated = _attr(exc, "connection_invalidated") is True
        return _Verdict.CONNECTION if invalidated else _Verdict.UNKNOWN
    if isinstance(exc, sa_exc.DisconnectionError):
        return _Verdict.CONNECTION

    state = _sqlstate(exc)
    if state is not None:
        return _classify_sqlstate(state, lock_ok)

    message = _text(exc).lower()
    if any(marker in message for marker in _PERMANENT_MESSAGES):
        return _Verdict.PERMANENT
    if _is_interface_error(exc) and any(marker in message for marker in _CLOSED_MESSAGES):
        return _Verdict.CONNECTION

    if isinstance(exc, asyncpg.InternalClientError) and _ASYNCPG_DEAD_PROTOCOL.search(message):
        return _Verdict.CONNECTION
    if isinstance(exc, redis_exc.RedisError):
        return _classify_redis(exc)
    if isinstance(exc, asyncpg.InterfaceError):
        # Misuse of the client (bad argument, wrong state): retrying repeats it.
        return _Verdict.PERMANENT
    if _is_psycopg_connection_failure(exc):
        return _Verdict.CONNECTION
    if isinstance(exc, OSError):
        return _classify_os_error(exc)
    return _Verdict.UNKNOWN


def _classify_redis(exc: redis_exc.RedisError) -> _Verdict:
    if isinstance(exc, _REDIS_AUTH):
        return _Verdict.PERMANENT  # a wrong password does not get better with time
    if isinstance(exc, redis_exc.ConnectionError | redis_exc.TimeoutError):
        return _Verdict.CONNECTION
    if isinstance(exc, _REDIS_TRANSIENT):
        return _Verdict.TRANSIENT
    return _Verdict.PERMANENT


def _is_psycopg_connection_failure(exc: BaseException) -> bool:
    # psycopg is optional: if it was never imported, no psycopg error can exist.
    psycopg = sys.modules.get("psycopg")
    operational = getattr(psycopg, "OperationalError", None) if psycopg else None
    # A psycopg OperationalError without SQLSTATE was raised by the client itself: the
    # connection failed, was closed, or timed out. Ones with a SQLSTATE were handled above.
    return isinstance(operational, type) and isinstance(exc, operational)


def _classify_os_error(exc: OSError) -> _Verdict:
    if isinstance(exc, ConnectionError | TimeoutError):
        return _Verdict.CONNECTION
    if isinstance(exc, socket.gaierror):
        # "Temporary failure in name resolution": DNS of a container not up yet.
        return _Verdict.CONNECTION if exc.errno == socket.EAI_AGAIN else _Verdict.UNKNOWN
    if exc.errno in _CONNECTION_ERRNOS:
        return _Verdict.CONNECTION
    return _Verdict.UNKNOWN


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < _MAX_DEPTH:
        seen.add(id(current))
        yield current
        current = _wrapped(current)


def describe_error(exc: BaseException) -> str:
    """A one-line, redacted ``Type (SQLSTATE): message`` for ``exc``, for logs and errors.

    Picks the most specific link of the chain (``orig`` / ``__cause__``): the deepest one
    that carries a SQLSTATE, because that is the server's own word (asyncpg's
    ``AdminShutdownError`` behind ``ConnectionDoesNotExistError`` behind SQLAlchemy's
    wrapper); without one, the first link that is not a SQLAlchemy wrapper. SQLAlchemy's
    "Background on this error" trailer and SQL text are dropped, passwords masked.
    """
    links = list(_chain(exc))
    with_state = [link for link in links if _sqlstate(link) is not None]
    if with_state:
        best = with_state[-1]
    else:
        best = next((link for link in links if not isinstance(link, sa_exc.StatementError)), exc)
    lines = _text(best).strip().splitlines()
    first_line = lines[0] if lines else ""
    state = _sqlstate(best)
    label = f"{type(best).__name__} ({state})" if state else type(best).__name__
    return redact(f"{label}: {first_line}" if first_line else label)
