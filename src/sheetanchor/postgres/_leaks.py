"""Leak watch: every checkout remembers when and where it was taken.

A connection held longer than the threshold, or garbage-collected without being returned
(SQLAlchemy's "The garbage collector is trying to clean up non-checked-in connection", incident
003), is logged once with the stack that took it, counted, and kept in a bounded list of
:class:`LeakReport` for tests and ``sheetanchor doctor``.

Capturing the stack must stay cheap (it runs on every checkout): it walks ``sys._getframe``
and keeps ``(code, line)`` pairs only; file names are filtered and source lines read when a
leak is reported, never on the hot path. The walk crosses from SQLAlchemy's greenlet to the
coroutine that awaited it, so the stack shows the caller's code, not the pool's.
"""

from __future__ import annotations

import contextlib
import linecache
import os
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import CodeType, FrameType
from typing import Any

import greenlet  # type: ignore[import-untyped]
from sqlalchemy import event
from sqlalchemy.pool import Pool

from sheetanchor.observe import get_logger

__all__ = ["LeakReport", "LeakWatch", "capture_stack"]

_log = get_logger("postgres")

_MAX_WALK = 80  # frames examined per capture, across the greenlet hop
_KEEP = 40  # raw frames kept per capture (filtered when reported)
_SHOWN = 12  # caller frames shown in a report

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_SKIP_DIRS = (
    *(
        os.path.dirname(os.path.abspath(mod.__file__ or ""))
        for mod in (sys.modules["sqlalchemy"], greenlet, sys.modules["asyncio"])
    ),
    _PKG_DIR,
)
_SKIP_FILES = ("contextlib.py", "threading.py", "concurrent/futures")


@dataclass(frozen=True, slots=True)
class StackFrame:
    """One frame of the stack that took a connection."""

    filename: str
    lineno: int
    function: str

    def __str__(self) -> str:
        line = linecache.getline(self.filename, self.lineno).strip()
        head = f'  File "{self.filename}", line {self.lineno}, in {self.function}'
        return f"{head}\n    {line}" if line else head


@dataclass(frozen=True, slots=True)
class LeakReport:
    """A connection that was held too long or never returned.

    Attributes:
        kind: ``"held"`` (held past the threshold) or ``"unreturned"`` (garbage-collected
            without being returned to the pool).
        held_for: seconds since it was checked out, when reported.
        stack: the caller's frames that took it, innermost last.
        database: the ``name`` of the :class:`~sheetanchor.postgres.Database`.
    """

    kind: str
    held_for: float
    stack: tuple[StackFrame, ...]
    database: str

    def format(self) -> str:
        """The report as a traceback-like text."""
        what = (
            f"held for {self.held_for:.1f} s"
            if self.kind == "held"
            else f"garbage-collected without being returned after {self.held_for:.1f} s"
        )
        frames = "\n".join(str(f) for f in self.stack) or "  (no caller frames captured)"
        return f"PostgreSQL connection of database {self.database!r} {what}; taken at:\n{frames}"


def capture_stack(skip: int = 1) -> tuple[tuple[CodeType, int], ...]:
    """The current stack as ``(code, line)`` pairs, innermost first, crossing greenlet hops."""
    frame: FrameType | None = sys._getframe(skip)
    out: list[tuple[CodeType, int]] = []
    walked = 0
    glet: Any = None
    while walked < _MAX_WALK and len(out) < _KEEP:
        if frame is None:
            # Top of a greenlet started by SQLAlchemy's greenlet_spawn: continue in the
            # (suspended) parent greenlet, where the awaiting coroutines are.
            glet = (glet or greenlet.getcurrent()).parent
            if glet is None:
                break
            frame = glet.gr_frame
            continue
        out.append((frame.f_code, frame.f_lineno))
        frame = frame.f_back
        walked += 1
    return tuple(out)


_internal_cache: dict[str, bool] = {}


def _is_internal(filename: str) -> bool:
    hit = _internal_cache.get(filename)
    if hit is None:
        hit = filename.startswith(_SKIP_DIRS) or any(s in filename for s in _SKIP_FILES)
        if len(_internal_cache) < 4096:  # bounded: one entry per source file
            _internal_cache[filename] = hit
    return hit


def resolve_stack(raw: tuple[tuple[CodeType, int], ...]) -> tuple[StackFrame, ...]:
    """Keep the caller's frames (not SQLAlchemy's, asyncio's or ours), outermost first."""
    frames = [
        StackFrame(code.co_filename, line, code.co_name)
        for code, line in raw
        if not _is_internal(code.co_filename)
    ]
    return tuple(reversed(frames[:_SHOWN]))


class _Checkout:
    __slots__ = ("fairy", "reported", "stack", "taken_at")

    def __init__(
        self, taken_at: float, stack: tuple[tuple[CodeType, int], ...], fairy: Any
    ) -> None:
        self.taken_at = taken_at
        self.stack = stack
        self.fairy: weakref.ref[Any] = weakref.ref(fairy)
        self.reported = False


class LeakWatch:
    """Records each checkout of the pools it is attached to and reports the leaked ones.

    Args:
        name: the database's name, for messages and metrics.
        threshold: seconds a connection may be held before it is reported (``None``: only
            report connections garbage-collected without being returned).
        clock: monotonic clock (injectable for tests).
        on_leak: called with each report (metrics).
    """

    def __init__(
        self,
        name: str,
        threshold: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_leak: Callable[[LeakReport], None] | None = None,
        max_reports: int = 100,
    ) -> None:
        self.name = name
        self.threshold = threshold
        self._clock = clock
        self._on_leak = on_leak
        # One table per attached pool, keyed by the pool's connection record: at most the pool's
        # capacity entries each; an entry leaves on checkin/detach, a table when its engine is
        # disposed.
        self._tables: list[dict[Any, _Checkout]] = []
        self._lock = threading.Lock()  # only for reporting; the hot path uses atomic dict ops
        self.reports: deque[LeakReport] = deque(maxlen=max_reports)
        self.held = 0
        self.unreturned = 0

    @property
    def leaks(self) -> int:
        """Leaked checkouts reported so far (each counted once)."""
        return self.held + self.unreturned

    @property
    def outstanding(self) -> int:
        """Connections checked out now, across every engine of the database."""
        return sum(len(t) for t in list(self._tables))

    def attach(self, pool: Pool) -> Callable[[], None]:
        """Listen to ``pool``'s checkout, checkin and detach events; return a detacher.

        The entries of one pool live in their own dict, dropped by the detacher when the engine
        is disposed (its connections are gone with it).
        """
        out: dict[Any, _Checkout] = {}
        self._tables.append(out)
        clock = self._clock

        def on_checkout(dbapi_conn: Any, rec: Any, proxy: Any) -> None:
            out[rec] = _Checkout(clock(), capture_stack(2), proxy)

        def on_checkin(dbapi_conn: Any, rec: Any) -> None:
            out.pop(rec, None)

        def on_detach(dbapi_conn: Any, rec: Any) -> None:
            entry = out.pop(rec, None)
            if entry is not None and entry.fairy() is None:
                # The proxy that held it is gone: SQLAlchemy is cleaning up after the garbage
                # collector, not after an explicit detach().
                self._report(entry, "unreturned")

        event.listen(pool, "checkout", on_checkout)
        event.listen(pool, "checkin", on_checkin)
        event.listen(pool, "detach", on_detach)

        def forget() -> None:
            out.clear()
            with contextlib.suppress(ValueError):
                self._tables.remove(out)

        return forget

    def sweep(self) -> int:
        """Report connections held past the threshold (each once); return how many were new."""
        if self.threshold is None:
            return 0
        now = self._clock()
        found = 0
        entries = [e for t in list(self._tables) for e in list(t.values())]
        for entry in entries:
            if not entry.reported and now - entry.taken_at > self.threshold:
                self._report(entry, "held")
                found += 1
        return found

    def _report(self, entry: _Checkout, kind: str) -> None:
        with self._lock:
            if entry.reported:
                return
            entry.reported = True
            if kind == "held":
                self.held += 1
            else:
                self.unreturned += 1
        report = LeakReport(
            kind=kind,
            held_for=self._clock() - entry.taken_at,
            stack=resolve_stack(entry.stack),
            database=self.name,
        )
        self.reports.append(report)
        _log.warning("%s", report.format(), extra={"database": self.name, "leak": kind})
        if self._on_leak is not None:
            self._on_leak(report)
