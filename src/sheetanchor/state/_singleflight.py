"""In-process single-flight: concurrent reads of one key share one read.

Flights are kept per event loop (a future belongs to one loop) and the table is bounded:
when ``max_keys`` flights are running, a new key simply runs without sharing (counted).

A load may return its value before its work is over (the store writes the backfill to Redis
in the background): it returns :class:`Landing`; the callers get the value at once and the
flight stays joinable until the background work ends, so a caller of this process that
misses Redis meanwhile takes the value instead of waiting for the lease.

A flight is a small list, ``[future or None]``, then ``[future or None, value]`` once its
value has landed (the background work still runs). The future is made by the first caller
that joins: a flight nobody joins (the common case) costs no future, no result to set.
"""

from __future__ import annotations

import asyncio
import functools
import weakref
from asyncio import get_running_loop as _get_running_loop
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

__all__ = ["Landing", "SingleFlight"]

_T = TypeVar("_T")
# [the future the joiners wait on (None: nobody joined yet)] + [the value, once landed]
_Flight = list[Any]
_Flights = dict[Hashable, _Flight]
_LastLoop = tuple["weakref.ref[asyncio.AbstractEventLoop]", _Flights]


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
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Flights] = (
            weakref.WeakKeyDictionary()
        )
        # The last loop's table, so that a call from the same loop as the previous one (the
        # common case) skips the weak dictionary's lookup; the loop is held weakly.
        self._last: _LastLoop | None = None

    def inflight(self) -> int:
        """Flights running now, over all loops."""
        return sum(len(f) for f in list(self._loops.values()))

    def _flights(self, loop: asyncio.AbstractEventLoop) -> _Flights:
        # The flights of ``loop`` (created on first use).
        last = self._last
        if last is not None and last[0]() is loop:
            return last[1]
        flights = self._loops.setdefault(loop, {})
        self._last = (weakref.ref(loop), flights)
        return flights

    async def run(self, key: Hashable, fn: Callable[..., Awaitable[_T]], *args: Any) -> _T:
        """Return ``await fn(*args)``, or the result of the flight already running for ``key``.

        (The arguments are passed along rather than bound in a closure: a read of the
        store's hot paths then builds no function object.)
        """
        loop = _get_running_loop()
        last = self._last
        flights = last[1] if last is not None and last[0]() is loop else self._flights(loop)
        flight = flights.get(key)
        if flight is not None:
            return await self._join(loop, key, flight, fn, args)
        result: Any
        if len(flights) >= self.max_keys:
            self.overflow += 1
            result = await fn(*args)
            return result.value if type(result) is Landing else result  # type: ignore[no-any-return]
        flight = [None]
        flights[key] = flight
        try:
            result = await fn(*args)
        except asyncio.CancelledError:
            if flight[0] is not None:
                flight[0].cancel()
            _end(flights, key, flight)
            raise
        except BaseException as exc:
            fut = flight[0]
            if fut is not None:
                fut.set_exception(exc)
                # Retrieved here: the joiners get it; nobody else may log "exception was
                # never retrieved".
                fut.exception()
            _end(flights, key, flight)
            raise
        if type(result) is Landing:
            # The value is ready; the flight ends when the background work does. Until
            # then a caller that joins takes the value at once.
            result.task.add_done_callback(functools.partial(_ended, flights, key, flight))
            result = result.value
            flight.append(result)
        elif flights.get(key) is flight:  # (a write may have detached it: forget)
            del flights[key]
        if flight[0] is not None:
            flight[0].set_result(result)
        return result  # type: ignore[no-any-return]

    async def _join(
        self,
        loop: asyncio.AbstractEventLoop,
        key: Hashable,
        flight: _Flight,
        fn: Callable[..., Awaitable[_T]],
        args: tuple[Any, ...],
    ) -> _T:
        # A flight for the key runs: share its result; if its leader was cancelled (not
        # us), start over (join the next flight, or lead one).
        self.shared += 1
        if len(flight) == 2:
            return flight[1]  # type: ignore[no-any-return]  # landed: its value is out
        fut = flight[0]
        if fut is None:
            fut = flight[0] = loop.create_future()
        try:
            result: _T = await asyncio.shield(fut)
            return result
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if fut.cancelled() and task is not None and not task.cancelling():
                return await self.run(key, fn, *args)
            raise

    def running(self, key: Hashable) -> bool:
        """True when a flight for ``key`` runs in the current loop (a caller would join it)."""
        loop = _get_running_loop()
        last = self._last
        if last is not None and last[0]() is loop:
            return key in last[1]
        flights = self._loops.get(loop)
        return flights is not None and key in flights

    def forget(self, key: Hashable) -> None:
        """Detach the running flight of ``key`` (after a write): new callers start afresh.

        Callers already waiting keep the old flight (they were concurrent with the write);
        anyone arriving after the write completed must not get a value read before it.
        """
        for flights in list(self._loops.values()):
            flights.pop(key, None)


def _end(flights: _Flights, key: Hashable, flight: _Flight) -> None:
    # A write may have detached this flight (forget) and a newer one taken its place.
    if flights.get(key) is flight:
        del flights[key]


def _ended(flights: _Flights, key: Hashable, flight: _Flight, _task: asyncio.Task[Any]) -> None:
    _end(flights, key, flight)
