"""Rate-limited warnings: the first per key at once, then at most one summary per interval.

With the database down, every batch is dead-lettered; one WARNING line per batch would bury
the log (a million rows in batches of 500 is two thousand lines saying the same thing). A
``LogThrottle`` logs the first event of each key (stream and reason) immediately; events of
that key within ``interval`` seconds are only counted, and the next line of the key (an event
past the interval, or ``flush()`` at close) says how many were folded into it. Counts of rows
stay exact in the stream metrics either way; only the log lines are rate-limited.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["DEFAULT_LOG_INTERVAL", "LogThrottle"]

# Seconds between two warning lines of one stream and reason.
DEFAULT_LOG_INTERVAL = 30.0
# Keys tracked at most (streams x reasons is small); past it, events are logged one by one.
_MAX_KEYS = 1024


class _Pending:
    __slots__ = ("events", "logged_at", "rows")

    def __init__(self, logged_at: float) -> None:
        self.logged_at = logged_at
        self.events = 0
        self.rows = 0


class LogThrottle:
    """Logs the first event per key at once, then one line per ``interval`` with counts.

    Thread-safe (the dead-letter store writes from worker threads). ``clock`` is injectable
    so tests need no real waits.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval: float = DEFAULT_LOG_INTERVAL,
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval < 0:
            raise ValueError(f"log interval must be >= 0, got {interval!r}")
        self._log = logger
        self._interval = interval
        self._level = level
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[tuple[str, str], _Pending] = {}

    def event(self, key: tuple[str, str], rows: int, msg: str, *args: object) -> None:
        """One event of ``key`` (stream, reason) covering ``rows`` rows: log it or count it."""
        now = self._clock()
        with self._lock:
            pending = self._keys.get(key)
            if pending is not None and now - pending.logged_at < self._interval:
                pending.events += 1
                pending.rows += rows
                return
            folded = (0, 0)
            if pending is not None:
                folded = (pending.events, pending.rows)
                pending.logged_at, pending.events, pending.rows = now, 0, 0
            elif len(self._keys) < _MAX_KEYS:
                self._keys[key] = _Pending(now)
        if folded[0]:
            msg += " (and %d earlier event(s), %d row(s), since the last such line)"
            args = (*args, *folded)
        self._log.log(self._level, msg, *args)

    def flush(self) -> None:
        """Log a summary line for every key with events not logged yet (call at close)."""
        with self._lock:
            due = [(key, p.events, p.rows) for key, p in self._keys.items() if p.events]
            self._keys.clear()
        for (stream, reason), events, rows in due:
            self._log.log(
                self._level,
                "stream %s: %d more %s event(s), %d row(s), since the last such line",
                stream,
                events,
                reason,
                rows,
            )
