"""In-process single-flight: concurrent reads of one key share one read.

Flights are kept per event loop (a future belongs to one loop) and the table is bounded:
when ``max_keys`` flights are running, a new key simply runs without sharing (counted).

A load may return its value before its work is over (the store writes the backfill to Redis
in the background): it returns :class:`Landing`; the callers get the value at once and the
flight stays joinable until the background work ends, so a caller of this process that
misses Redis meanwhile takes the value instead of waiting for the lease.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

__all__ = ["Landing", "SingleFlight"]

_T = TypeVar("_T")
_LastLoop = tuple["weakref.ref[asyncio.AbstractEventLoop]", dict[Hashable, "asyncio.Future[Any]"]]


class Landing:
    """A load's value, and the background work that must end before its flight does."""

    __slots__ = ("task", "value")

    def __init__(self, value: Any, task: asyncio.Task[Any]) -> None:
        self.value = value
        self.task = task


class SingleFlight:
    """Share one in-flight load per key among concurrent callers of the same loop.

    Args:
        max_keys: flights tracked at once per loop; beyond it calls run unshared.
    """

    def __init__(self, max_keys: int = 10_000) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self.max_keys = max_keys
        self.shared = 0
        self.overflow = 0
        self._loops: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[Hashable, asyncio.Future[Any]]
        ] = weakref.WeakKeyDictionary()
        # The last loop's table, so that a call from the same loop as the previous one (the
        # common case) skips the weak dictionary's lookup; the loop is held weakly.
        self._last: _LastLoop | None = None

    def inflight(self) -> int:
        """Flights running now, over all loops."""
        return sum(len(f) for f in list(self._loops.values()))

    async def run(self, key: Hashable, fn: Callable[[], Awaitable[_T]]) -> _T:
        """Return ``await fn()``, or the result of the flight already running for ``key``."""
        loop = asyncio.get_running_loop()
        last = self._last
        flights: dict[Hashable, asyncio.Future[Any]]
        if last is not None and last[0]() is loop:
            flights = last[1]
        else:
            flights = self._loops.setdefault(loop, {})
            self._last = (weakref.ref(loop), flights)
        while True:
            fut = flights.get(key)
            if fut is None:
                break
            self.shared += 1
            try:
                result: _T = await asyncio.shield(fut)
                return result
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if fut.cancelled() and task is not None and not task.cancelling():
                    continue  # the leader was cancelled, not us: lead a new flight
                raise
        if len(flights) >= self.max_keys:
            self.overflow += 1
            result = await fn()
            return result.value if isinstance(result, Landing) else result
        fut = loop.create_future()
        flights[key] = fut
        lingering = False
        try:
            result = await fn()
            if isinstance(result, Landing):
                # The value is ready; the flight ends when the background work does.
                lingering = True
                result.task.add_done_callback(lambda _t: _end(flights, key, fut))
                result = result.value
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except BaseException as exc:
            fut.set_exception(exc)
            # Retrieved here: a flight nobody joined must not log "exception was never
            # retrieved" (the followers, if any, still get it). No done-callback for that:
            # it would cost a loop callback on every flight, failed or not.
            fut.exception()
            raise
        else:
            fut.set_result(result)
            return result
        finally:
            if not lingering:
                _end(flights, key, fut)

    def running(self, key: Hashable) -> bool:
        """True when a flight for ``key`` runs in the current loop (a caller would join it)."""
        flights = self._loops.get(asyncio.get_running_loop())
        return flights is not None and key in flights

    def forget(self, key: Hashable) -> None:
        """Detach the running flight of ``key`` (after a write): new callers start afresh.

        Callers already waiting keep the old flight (they were concurrent with the write);
        anyone arriving after the write completed must not get a value read before it.
        """
        for flights in list(self._loops.values()):
            flights.pop(key, None)


def _end(
    flights: dict[Hashable, asyncio.Future[Any]], key: Hashable, fut: asyncio.Future[Any]
) -> None:
    # A write may have detached this flight (forget) and a newer one taken its place.
    if flights.get(key) is fut:
        del flights[key]
