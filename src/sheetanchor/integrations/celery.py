"""Celery: run sheetanchor's async code from sync tasks, one event loop per worker thread.

A Celery task is a sync function. ``asyncio.run(coro)`` in every task works with sheetanchor's
loop-aware clients (each new loop gets its own engine and Redis pool, closed when that loop
ends), but opens fresh connections for every task. :func:`run_async` instead keeps one event
loop per worker thread (so per process with ``--pool=prefork`` or ``--pool=solo``) and reuses
it, with its pools, across tasks.

It is fork-safe: a child process never reuses a loop inherited from its parent (the parent's
sockets are left untouched); it starts its own on first use. :func:`install` connects Celery's
signals so the loops close cleanly, in their own thread, when a worker process shuts down.

Example::

    from sheetanchor.integrations.celery import install, run_async
    from sheetanchor.postgres import Database

    install()
    db = Database()                      # module global: one engine per (process, loop)

    @app.task
    def count_orders() -> int:
        return run_async(db.fetchval("SELECT count(*) FROM orders"))
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from sheetanchor.observe import get_logger

__all__ = ["close_loops", "install", "run_async"]

_log = get_logger("celery")
_T = TypeVar("_T")


class _Loops:
    """One ``asyncio.Runner`` per thread of this process; forgotten (not closed) after fork."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runners: dict[int, asyncio.Runner] = {}
        self._pid = os.getpid()
        self.close_failures = 0  # loops whose close() raised (logged at WARNING)
        self.skipped = 0  # loops not closed because they were running in another thread

    def runner(self) -> asyncio.Runner:
        if self._pid != os.getpid():
            self.forget_inherited()
        key = threading.get_ident()
        runner = self._runners.get(key)
        if runner is None:
            # Keyed by thread: a thread id is only reused after its thread ended, and then the
            # new thread may take over the idle loop. At most one entry per live worker thread.
            with self._lock:
                runner = self._runners.setdefault(key, asyncio.Runner())
        return runner

    def forget_inherited(self) -> None:
        """Drop the parent's loops in a forked child without closing them.

        Closing would run their shutdown code, and the clients living in them would talk on
        sockets the parent still uses.
        """
        with self._lock:
            if self._runners:
                _log.debug("forgetting %d event loop(s) inherited across fork", len(self._runners))
            self._runners = {}
            self._pid = os.getpid()

    def close(self) -> int:
        """Close every loop of this process; their per-loop clients close inside them."""
        if self._pid != os.getpid():
            self.forget_inherited()
            return 0
        with self._lock:
            runners, self._runners = list(self._runners.items()), {}
        closed = 0
        for key, runner in runners:
            loop = getattr(runner, "_loop", None)  # None: never used, nothing to run
            if loop is not None and loop.is_running():
                # A task is running in it, in its worker thread: closing it from here would
                # raise. Keep it for a later close_loops() (or its thread's exit).
                self.skipped += 1
                with self._lock:
                    self._runners.setdefault(key, runner)
                _log.warning("not closing an event loop that is still running in thread %d", key)
                continue
            try:
                # Runner.close cancels the loop's remaining tasks (sheetanchor's per-loop
                # closers among them), so engines and Redis pools close in their own loop.
                runner.close()
            except Exception as exc:  # noqa: BLE001 - recorded: counted, logged; next loop
                self.close_failures += 1
                _log.warning(
                    "closing the event loop of thread %d failed (%s: %s)",
                    key,
                    type(exc).__name__,
                    exc,
                    exc_info=exc,
                )
                continue
            closed += 1
        return closed


_LOOPS = _Loops()
os.register_at_fork(after_in_child=_LOOPS.forget_inherited)


def run_async(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` to completion on this worker thread's event loop and return its result.

    The loop is created on first use and reused by later tasks in the same thread, so
    sheetanchor's per-loop pools survive between tasks. Exceptions propagate unchanged.

    Raises:
        RuntimeError: called from a running event loop (use ``await`` there instead).
    """
    return _LOOPS.runner().run(coro)


def close_loops() -> int:
    """Close this process's :func:`run_async` loops (and the clients in them); return how many.

    :func:`install` calls it when a worker process shuts down. Safe to call more than once.
    A loop whose close fails is logged at WARNING and counted, and the others are still
    closed; a loop running a task in another thread is left open (closed by a later call).
    """
    return _LOOPS.close()


def _on_process_init(**_: object) -> None:
    _LOOPS.forget_inherited()


def _on_shutdown(**_: object) -> None:
    closed = close_loops()
    _log.debug("closed %d event loop(s) at worker shutdown", closed)


def install() -> None:
    """Connect Celery's worker signals: forget inherited loops after fork, close at shutdown.

    Idempotent. Needs Celery (``pip install 'sheetanchor[celery]'``).
    """
    from celery import signals

    signals.worker_process_init.connect(
        _on_process_init, weak=False, dispatch_uid="sheetanchor.process_init"
    )
    # Prefork children get worker_process_shutdown; the solo and threads pools run tasks in
    # the main process, which gets worker_shutdown.
    signals.worker_process_shutdown.connect(
        _on_shutdown, weak=False, dispatch_uid="sheetanchor.process_shutdown"
    )
    signals.worker_shutdown.connect(_on_shutdown, weak=False, dispatch_uid="sheetanchor.shutdown")
