"""Leak watch: every checkout remembers when and where it was taken.

A connection held longer than the threshold, or garbage-collected without being returned
(SQLAlchemy's "The garbage collector is trying to clean up non-checked-in connection", incident
003), is logged once with the stack that took it, counted, and kept in a bounded list of
:class:`LeakReport` for tests and ``sheetanchor doctor``.

Capturing the stack must stay cheap (it runs on every checkout): it walks ``sys._getframe``
and keeps ``(code, instruction offset)`` pairs only; line numbers are looked up, file names
filtered and source lines read when a leak is reported, never on the hot path (``f_lineno``
walks the code's line table: it cost more than the rest of the walk). The walk crosses from
SQLAlchemy's greenlet to the coroutine that awaited it, so the stack shows the caller's code,
not the pool's, and it stops at the event loop's frame that runs the task (``Handle._run``)
once it has caller frames: the loop's machinery above it never took a connection.

Checkouts inside ``db.session()``, ``db.transaction()`` and ``db.connection()`` walk nothing:
the block records its opening line (code and instruction offset) in a context variable, and
the checkout records that and its task. While the block is open, every coroutine frame above
the opener is suspended at the call it made when the connection was taken (each awaits the
chain that holds the block), so the task's stack, read if the checkout is ever reported, gives
the same callers; the opener's own frame has moved on, and its line is replaced by the
``async with`` line it recorded. When the task is gone by then (a task garbage-collected with
the block open), or the opener is not on its stack (the block's context was copied into
another task that took the connection), only the ``async with`` line is known, and the report
says so (:attr:`LeakReport.complete`).
"""

from __future__ import annotations

import asyncio
import asyncio.events
import contextlib
import contextvars
import linecache
import os
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import CodeType, FrameType
from typing import Any

import asyncpg
import greenlet  # type: ignore[import-untyped]
from sqlalchemy import event
from sqlalchemy.pool import Pool

from sheetanchor.observe import get_logger

__all__ = ["OPENER", "LeakReport", "LeakTable", "LeakWatch", "StackFrame", "capture_stack"]

_log = get_logger("postgres")

_MAX_WALK = 64  # frames examined per capture, across the greenlet hop
_KEEP = 10  # caller frames kept per capture (innermost first)

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_SKIP_DIRS = (
    *(
        os.path.dirname(os.path.abspath(mod.__file__ or ""))
        for mod in (sys.modules["sqlalchemy"], greenlet, sys.modules["asyncio"], asyncpg)
    ),
    _PKG_DIR,
)
_SKIP_FILES = ("contextlib.py", "threading.py", "concurrent/futures")
# Where a task's step is run by the event loop: above it, only the loop's own frames (and the
# code that called asyncio.run).
_LOOP_BOUNDARY = asyncio.events.Handle._run.__code__

#: The ``(code, f_lasti)`` of the frame that opened the innermost ``db.session()``,
#: ``db.transaction()`` or ``db.connection()`` block of this context; ``None`` outside one. Set
#: on entering such a block and reset on leaving it.
OPENER: contextvars.ContextVar[tuple[CodeType, int] | None] = contextvars.ContextVar(
    "sheetanchor_opener", default=None
)
_opener = OPENER.get
_current_task = asyncio.current_task
_ref = weakref.ref


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
        complete: ``False`` when only the line that opened the block holding it is known,
            not its callers: the task that took it was gone when it was reported, or it was
            taken by another task than the one that opened the block (which copied its
            context, e.g. ``asyncio.create_task`` inside the block).
    """

    kind: str
    held_for: float
    stack: tuple[StackFrame, ...]
    database: str
    complete: bool = True

    def format(self) -> str:
        """The report as a traceback-like text."""
        what = (
            f"held for {self.held_for:.1f} s"
            if self.kind == "held"
            else f"garbage-collected without being returned after {self.held_for:.1f} s"
        )
        frames = "\n".join(str(f) for f in self.stack) or "  (no caller frames captured)"
        if not self.complete:
            frames += (
                "\n  (callers unknown: the task that took it had ended, or was not the one"
                " that opened the block)"
            )
        return f"PostgreSQL connection of database {self.database!r} {what}; taken at:\n{frames}"


#: A captured stack, flat: ``(code, f_lasti, code, f_lasti, ...)``, innermost frame first (no
#: tuple per frame: the allocations were most of the cost of a capture).
RawStack = tuple[Any, ...]


def capture_stack(skip: int = 1) -> RawStack:
    """The caller's frames as flat ``code, f_lasti`` pairs, innermost first, across greenlets.

    Frames of SQLAlchemy, greenlet, asyncio, asyncpg and this package are skipped as the walk
    goes (a cached flag per code object), and the walk stops after ``_KEEP`` caller frames. Code run
    inside SQLAlchemy's greenlet (``run_sync`` callbacks) is not shown; the coroutine that
    awaited it is.
    """
    glet: Any = greenlet.getcurrent()
    frame: FrameType | None
    if getattr(glet, "__sqlalchemy_greenlet_provider__", False) and glet.parent is not None:
        # Inside SQLAlchemy's greenlet every frame is the pool's or SQLAlchemy's: start at the
        # (suspended) parent greenlet, where the awaiting coroutines are.
        glet = glet.parent
        frame = glet.gr_frame
    else:
        frame = sys._getframe(skip)
    out: list[Any] = []
    append = out.append
    kept = 0
    walked = 0
    internal = _internal_code
    while walked < _MAX_WALK:
        if frame is None:
            # Top of a nested greenlet: continue in its (suspended) parent.
            glet = glet.parent
            if glet is None:
                break
            frame = glet.gr_frame
            continue
        code = frame.f_code
        if code is _LOOP_BOUNDARY and kept:
            break
        flag = internal.get(code)
        if flag is None:
            flag = _classify(code)
        if not flag:
            append(code)
            append(frame.f_lasti)
            kept += 1
            if kept >= _KEEP:
                break
        frame = frame.f_back
        walked += 1
    return tuple(out)


_internal_code: dict[CodeType, bool] = {}


def _classify(code: CodeType) -> bool:
    filename = code.co_filename
    flag = filename.startswith(_SKIP_DIRS) or any(s in filename for s in _SKIP_FILES)
    if len(_internal_code) < 16384:  # bounded: one entry per function ever seen here
        _internal_code[code] = flag
    return flag


def _line_of(code: CodeType, lasti: int) -> int:
    for start, end, line in code.co_lines():
        if start <= lasti < end and line is not None:
            return line
    return code.co_firstlineno


def resolve_stack(raw: RawStack) -> tuple[StackFrame, ...]:
    """The captured caller frames as :class:`StackFrame`, outermost first."""
    pairs = list(zip(raw[0::2], raw[1::2], strict=True))
    return tuple(
        StackFrame(code.co_filename, _line_of(code, lasti), code.co_name)
        for code, lasti in reversed(pairs)
    )


class _Checkout:
    __slots__ = ("fairy", "opener", "reported", "stack", "taken_at", "task")

    def __init__(
        self,
        taken_at: float,
        stack: RawStack | None,
        fairy: weakref.ref[Any] | None,
        task: weakref.ref[asyncio.Task[Any]] | None = None,
        opener: tuple[CodeType, int] | None = None,
    ) -> None:
        # Weak references made by the caller (SQLAlchemy already holds one to the proxy).
        self.taken_at = taken_at
        self.stack = stack
        # The proxy; None for a lease of the one-shot reads (never handed to the caller).
        self.fairy = fairy
        # The task of a lease or of a block, whose stack is read only if it is ever reported.
        self.task = task
        # The block that took it (its task's stack is read only if it is ever reported).
        self.opener = opener
        self.reported = False

    def raw_stack(self) -> tuple[RawStack, bool]:
        """The captured frames (as :func:`capture_stack`), and whether the callers are known."""
        if self.stack is not None:
            return self.stack, True
        task = self.task() if self.task is not None else None
        opener = self.opener
        if opener is None:
            return () if task is None else _task_stack(task), True
        if task is not None:
            found = _block_stack(task, *opener)
            if found is not None:
                return found, True
        return opener, False


def _task_stack(task: asyncio.Task[Any]) -> RawStack:
    """The caller frames of a suspended task, innermost first (as :func:`capture_stack`)."""
    return _keep_callers(reversed(_task_frames(task)), [])


def _keep_callers(frames: Iterable[FrameType], out: list[Any]) -> RawStack:
    """``out`` plus (code, f_lasti) of the non-internal ``frames``, up to ``_KEEP`` in all."""
    for frame in frames:
        code = frame.f_code
        flag = _internal_code.get(code)
        if flag is None:
            flag = _classify(code)
        if not flag:
            out += (code, frame.f_lasti)
            if len(out) >= 2 * _KEEP:
                break
    return tuple(out)


def _task_frames(task: asyncio.Task[Any]) -> list[FrameType]:
    """The frames of a suspended task's coroutines, outermost first.

    Follows what each coroutine awaits (``cr_await``): a suspended coroutine's frame has no
    ``f_back``, so ``Task.get_stack()`` shows only the outermost one. Stops at the first
    awaitable that is not a coroutine or an async generator (a future, a generator-based
    awaitable).
    """
    frames: list[FrameType] = []
    aw: Any = task.get_coro()
    while aw is not None and len(frames) < _MAX_WALK:
        frame = getattr(aw, "cr_frame", None)
        if frame is not None:
            aw = aw.cr_await
        else:
            frame = getattr(aw, "ag_frame", None)
            if frame is None:
                break
            aw = aw.ag_await
        frames.append(frame)
    return frames


def _block_stack(task: asyncio.Task[Any], code: CodeType, lasti: int) -> RawStack | None:
    """The stack that opened a block: ``task``'s, from the opener's frame out, at its opening line.

    ``None`` when no frame of ``task`` runs the opener's code.
    """
    frames = _task_frames(task)
    for at in range(len(frames) - 1, -1, -1):
        if frames[at].f_code is code:
            break
    else:
        return None
    return _keep_callers(reversed(frames[:at]), [code, lasti])


class LeakTable:
    """The checkouts of one pool: at most its capacity entries, keyed by connection record."""

    __slots__ = ("clock", "out", "watch")

    def __init__(self, watch: LeakWatch) -> None:
        self.watch = watch
        self.clock = watch._clock
        self.out: dict[Any, _Checkout] = {}

    def checkout(
        self, rec: Any, proxy: Any, skip: int = 3, proxy_ref: weakref.ref[Any] | None = None
    ) -> None:
        """Record a checkout: when, the caller's stack, and the proxy (to tell GC from detach).

        ``proxy_ref``, if given, is a weak reference to ``proxy`` to keep (SQLAlchemy's
        ``fairy_ref``: one less to make). ``skip`` frames (this one included) are not walked.
        Inside a ``db.session()``, ``db.transaction()`` or ``db.connection()`` block of a task,
        nothing is walked: the block's opening line and the task are recorded (see the
        module's docstring).
        """
        if proxy_ref is None and proxy is not None:
            proxy_ref = _ref(proxy)
        opener = _opener()
        if opener is not None:
            task = _current_task()
            if task is not None:
                self.out[rec] = _Checkout(self.clock(), None, proxy_ref, _ref(task), opener)
                return
        self.out[rec] = _Checkout(self.clock(), capture_stack(skip), proxy_ref)

    def lease(self, rec: Any) -> None:
        """Record a lease of the one-shot reads: when, and by which task (no stack walk).

        Such a connection is given back before the method returns, so it can only ever be
        reported as *held* (a statement running past the threshold), while its task is still
        suspended in the very call that took it: the task's stack, read when reporting, is the
        stack that took it. Outside a task the stack is captured now.
        """
        task = _current_task()
        if task is None:
            self.out[rec] = _Checkout(self.clock(), capture_stack(3), None)
        else:
            self.out[rec] = _Checkout(self.clock(), None, None, _ref(task))

    def checkin(self, rec: Any) -> None:
        """Forget a returned connection."""
        self.out.pop(rec, None)

    def detach(self, dbapi_conn: Any, rec: Any) -> None:
        """Pool ``detach`` event: report it if its proxy was garbage-collected, not closed."""
        entry = self.out.pop(rec, None)
        if entry is not None and entry.fairy is not None and entry.fairy() is None:
            # The proxy that held it is gone: SQLAlchemy is cleaning up after the garbage
            # collector, not after an explicit detach().
            self.watch._report(entry, "unreturned")

    def forget(self) -> None:
        """Drop this pool's entries (its engine was disposed)."""
        self.out.clear()
        with contextlib.suppress(ValueError):
            self.watch._tables.remove(self.out)


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
        _watches.add(self)

    @property
    def leaks(self) -> int:
        """Leaked checkouts reported so far (each counted once)."""
        return self.held + self.unreturned

    @property
    def outstanding(self) -> int:
        """Connections checked out now, across every engine of the database."""
        return sum(len(t) for t in list(self._tables))

    def attach(self, pool: Pool) -> LeakTable:
        """Start watching ``pool``; its owner calls the table's checkout/checkin hooks.

        The detach event (SQLAlchemy's garbage-collector clean-up path) is listened to here.
        The table is dropped with :meth:`LeakTable.forget` when the engine is disposed.
        """
        table = LeakTable(self)
        self._tables.append(table.out)
        event.listen(pool, "detach", table.detach)
        return table

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
        raw, complete = entry.raw_stack()
        report = LeakReport(
            kind=kind,
            held_for=self._clock() - entry.taken_at,
            stack=resolve_stack(raw),
            database=self.name,
            complete=complete,
        )
        self.reports.append(report)
        _log.warning("%s", report.format(), extra={"database": self.name, "leak": kind})
        if self._on_leak is not None:
            self._on_leak(report)


_watches: weakref.WeakSet[LeakWatch] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The parent's checkouts are not this process's to report: forget their tables (the
    # objects themselves stay untouched, see _loops.py).
    for watch in list(_watches):
        watch._tables = []
        watch._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
