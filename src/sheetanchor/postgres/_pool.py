"""Fast checkout and checkin of a pooled connection without SQLAlchemy's greenlet.

SQLAlchemy's asyncio pool is a synchronous pool driven through a greenlet: every checkout and
checkin normally costs a ``greenlet_spawn`` (10-20 µs here), which is a large share of a
one-round-trip read (~80 µs). Handing out an idle connection, or putting one back into a queue
that has room, does no I/O at all; only opening, recycling, invalidating or pinging does. These
helpers take the synchronous path only when they can tell that no I/O will be needed, and
return ``None``/``False`` otherwise so the caller uses the greenlet path.

They read a few private attributes of SQLAlchemy's ``QueuePool`` and connection records
(stable through 2.0 and 2.1); every access is guarded, and anything unexpected means "use the
greenlet path", which is always correct.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy.pool import PoolProxiedConnection

__all__ = ["IDLE_SINCE", "checkin_is_io_free", "checkout_without_io"]

IDLE_SINCE = "sheetanchor_idle_since"
_RECYCLE_MARGIN = 1.0  # seconds: never race a recycle deadline on the fast path


def _next_idle(pool: Any) -> Any:
    queue = pool._pool.__dict__.get("_queue")  # created lazily by AsyncAdaptedQueue
    if queue is None or not queue._queue:
        return None
    items = queue._queue
    return items[-1] if pool._pool.use_lifo else items[0]


def checkout_without_io(pool: Any, idle_limit: float | None) -> PoolProxiedConnection | None:
    """Check out the next idle connection synchronously if that needs no I/O, else ``None``."""
    try:
        rec = _next_idle(pool)
        if rec is None or rec.dbapi_connection is None:
            return None
        start = rec.starttime
        recycle = pool._recycle
        if recycle > -1 and time.time() - start > recycle - _RECYCLE_MARGIN:
            return None
        if pool._invalidate_time > start or rec._soft_invalidate_time > start:
            return None
        if rec.dbapi_connection.driver_connection.is_closed():
            return None
        if idle_limit is not None:
            idle_since = rec.info.get(IDLE_SINCE)
            if idle_since is None or time.monotonic() - idle_since >= idle_limit * 0.9:
                return None  # due for a ping: that is I/O
    except (AttributeError, IndexError, TypeError):
        return None
    fairy: PoolProxiedConnection = pool.connect()
    return fairy


def checkin_is_io_free(pool: Any) -> bool:
    """True when returning a healthy connection just puts it back in the queue (no close)."""
    try:
        queue = pool._pool
        return bool(queue.qsize() < queue.maxsize)
    except AttributeError:
        return False
