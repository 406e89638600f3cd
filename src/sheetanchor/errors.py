"""The exception hierarchy of sheetanchor.

Every error sheetanchor raises is a :class:`SheetAnchorError`. The families below it are the
ones a caller can act on; each message says what failed, with which value, and what to do.
Where a builtin fits, the class also subclasses it (never shadows it), so ``except
TimeoutError`` keeps working::

    SheetAnchorError
    ├── ConfigError (ValueError)            bad setting or argument: fix the configuration
    │   └── BudgetExceeded                  pool sizes could exceed max_connections
    ├── NotReady (TimeoutError)             a server did not answer in time at start-up
    ├── TransientError                      retryable; retries were exhausted or not allowed
    │   ├── ConnectionLost (ConnectionError) the connection dropped or could not be made
    │   └── OperationTimeout (TimeoutError)  no answer in time; the work may have taken effect
    ├── OutcomeUnknown                      a non-idempotent command's reply was lost: not retried
    ├── PoolTimeout (TimeoutError)          no pooled connection became free in time
    ├── CommitFailed                        the transaction did NOT commit; nothing was saved
    ├── WrongEventLoop (RuntimeError)       a resource was used from a loop it does not belong to
    ├── ResourceClosed (RuntimeError)       the resource was closed before this call
    ├── RecordError (ValueError)            a record is invalid or rejected by the database
    │   └── PoisonRecord                    a record PostgreSQL itself refused (quarantined)
    ├── BufferFull                          an authoritative stream is full: slow down or wait
    ├── DeadLetterFull                      the dead-letter store reached its byte limit
    ├── JournalError                        the disk journal cannot be used (write failed, locked)
    │   └── JournalFull                     the journal reached its byte limit: commit or raise it
    ├── VersionConflict                     optimistic concurrency lost too many times
    └── EmbeddedServerError (RuntimeError)  an embedded PostgreSQL/Redis could not start

Driver exceptions (asyncpg, SQLAlchemy, redis-py) are translated at one boundary and chained
with ``raise ... from exc``, so the original error is always in ``__cause__``.
"""

from __future__ import annotations

__all__ = [
    "BudgetExceeded",
    "BufferFull",
    "CommitFailed",
    "ConfigError",
    "ConnectionLost",
    "DeadLetterFull",
    "EmbeddedServerError",
    "JournalError",
    "JournalFull",
    "NotReady",
    "OperationTimeout",
    "OutcomeUnknown",
    "PoisonRecord",
    "PoolTimeout",
    "RecordError",
    "ResourceClosed",
    "SheetAnchorError",
    "TransientError",
    "VersionConflict",
    "WrongEventLoop",
]


class SheetAnchorError(Exception):
    """Root of every error raised by sheetanchor."""


class ConfigError(SheetAnchorError, ValueError):
    """A setting or argument is invalid. The message names it and the accepted values."""


class BudgetExceeded(ConfigError):
    """The configured pools could open more connections than the server allows."""


class NotReady(SheetAnchorError, TimeoutError):
    """A server did not become ready within the allowed time.

    Attributes:
        target: the redacted address that was waited for.
        last_error: the last error seen while waiting, if any.
    """

    def __init__(self, message: str, *, target: str = "", last_error: str | None = None) -> None:
        super().__init__(message)
        self.target = target
        self.last_error = last_error


class TransientError(SheetAnchorError):
    """A failure that may succeed if retried (connection loss, serialization failure, ...)."""


class ConnectionLost(TransientError, ConnectionError):
    """The connection to a server was lost or could not be established."""


class OperationTimeout(TransientError, TimeoutError):
    """A connect, query or command got no answer in time (a client-side timeout).

    Transient, but unlike :class:`ConnectionLost` the outcome is unknown: a write that
    timed out may still have been applied (even committed) by the server. Retry only work
    that is idempotent. The driver's timeout error is ``__cause__``.
    """


class OutcomeUnknown(SheetAnchorError):
    """A command that is not idempotent was sent, but its reply was lost; it was not retried.

    The server may or may not have applied it (a read timeout, or the connection dropped
    while the reply was awaited). Retrying automatically could apply it twice (an ``INCR``
    counted twice, an ``XADD`` duplicated), so the caller decides: check the data, then
    repeat it or not. The driver error is ``__cause__``. Redis raises it as
    :class:`sheetanchor.redis.CommandOutcomeUnknown`, which is also a redis-py
    ``ConnectionError`` and ``TimeoutError``. Not a :class:`TransientError`: retry policies
    (:func:`sheetanchor.retry.is_transient`) do not repeat it either.
    """


class PoolTimeout(SheetAnchorError, TimeoutError):
    """No connection became free in the pool in time: raise the pool size or release sooner."""


class CommitFailed(SheetAnchorError):
    """COMMIT failed: the transaction was rolled back and nothing of it was saved.

    Never report success to a user after this error. The cause is in ``__cause__``.
    """


class WrongEventLoop(SheetAnchorError, RuntimeError):
    """A loop-bound resource was used from a different event loop."""


class ResourceClosed(SheetAnchorError, RuntimeError):
    """The resource was closed; open a new one."""


class RecordError(SheetAnchorError, ValueError):
    """A record is invalid. ``field`` and ``value`` name what was wrong."""

    def __init__(
        self, message: str, *, stream: str = "", field: str | None = None, value: object = None
    ) -> None:
        super().__init__(message)
        self.stream = stream
        self.field = field
        self.value = value


class PoisonRecord(RecordError):
    """PostgreSQL refused a record for a data reason; it was quarantined with that error."""


class BufferFull(SheetAnchorError):
    """An authoritative stream is at its limit; wait (``await put``) or slow the producer."""


class DeadLetterFull(SheetAnchorError):
    """The dead-letter store reached its byte limit: replay or purge it, or raise the limit."""


class JournalError(SheetAnchorError):
    """The ingest journal cannot be used: a write or fsync failed, or another process holds it.

    After a failed write the journal refuses further appends (the state of a file after a
    failed fsync is unknown); close it and open a new ``Journal`` on the same directory, which
    recovers everything that was durably written.
    """


class JournalFull(JournalError):
    """The journal reached its byte limit: commit written records (is the sink down?) or
    raise ``max_bytes``."""


class VersionConflict(SheetAnchorError):
    """An optimistic update lost to concurrent writers more times than allowed."""


class EmbeddedServerError(SheetAnchorError, RuntimeError):
    """An embedded PostgreSQL or Redis server could not be started or reached."""
