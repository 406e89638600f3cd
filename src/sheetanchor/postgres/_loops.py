"""One value per (process, running event loop): the registry behind ``Database``'s engines.

Why not ``dict[id(loop), engine]`` (incident 002's fix): ``id()`` is an address, reused as soon
as a loop is freed, so a new loop could be handed a dead loop's engine. Here the key is a weak
reference to the loop object itself: two live references are equal only for the same loop, and
a dead reference equals nothing but itself.

Lifecycle of one value:

* created on first use from a running loop (:meth:`PerLoop.get`);
* disposed *inside* its loop, while the loop can still do I/O, when the loop shuts down:
  ``asyncio.run()``/``asyncio.Runner`` (and so pytest-asyncio) close every async generator
  before closing the loop, and one small sentinel generator per value does the disposal; a
  loop closed by hand (``loop.close()`` after ``run_until_complete``, the usual Celery helper)
  is caught by wrapping that loop's ``close`` method, which runs the disposal first;
* a loop that was closed or freed without either (e.g. uvloop closed by hand) is found on the
  next lookup from another loop or ``stats()``, and its value is *abandoned* (no I/O: the loop
  that owned the sockets is gone);
* after ``os.fork()`` the child forgets every inherited value without touching it: closing, or
  even garbage-collecting, an inherited asyncpg connection would unregister the parent's socket
  from the epoll set the two processes share. The child keeps them referenced (a fixed set:
  what it inherited) and builds its own on first use.

The hot path (same loop as last time) is one ``get_running_loop()`` call, one attribute read and
one weak-reference call: no lock, no syscall.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, TypeVar

from sheetanchor.errors import WrongEventLoop
from sheetanchor.observe import get_logger

__all__ = ["PerLoop", "close_inherited_loop"]

_T = TypeVar("_T")
_log = get_logger("postgres")

# What a fork child inherited: kept referenced, never used (see the module docstring).
_inherited: list[Any] = []
_registries: weakref.WeakSet[PerLoop[Any]] = weakref.WeakSet()


class _Slot(Generic[_T]):
    __slots__ = ("__weakref__", "closing", "key", "pid", "sentinel", "value")

    def __init__(self, key: weakref.ref[asyncio.AbstractEventLoop], value: _T) -> None:
        self.key = key
        self.value = value
        self.closing = False
        self.pid = os.getpid()  # a fork child must never dispose what its parent created
        self.sentinel: AsyncIterator[None] | None = None


class PerLoop(Generic[_T]):
    """A value per running event loop, disposed with its loop, forgotten across ``fork()``.

    Args:
        create: builds the value for the running loop (called in that loop, synchronously).
        aclose: disposes a value inside its loop (may do I/O).
        abandon: drops a value whose loop is closed or gone (must not do I/O).
        what: what the values are, for messages.
        on_disposed: called once per value disposed or abandoned (process-wide counters).
        on_failure: called once per failed disposal.
    """

    def __init__(
        self,
        create: Callable[[], _T],
        aclose: Callable[[_T], Awaitable[None]],
        abandon: Callable[[_T], None],
        *,
        what: str = "engine",
        on_disposed: Callable[[], None] | None = None,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self._create = create
        self._on_disposed = on_disposed
        self._on_failure = on_failure
        self._aclose = aclose
        self._abandon = abandon
        self._what = what
        self._slots: dict[weakref.ref[asyncio.AbstractEventLoop], _Slot[_T]] = {}
        self._last: _Slot[_T] | None = None
        self._lock = threading.RLock()  # creation and removal only; never on the hot path
        self._disposed = 0
        self._dispose_failures = 0
        # Slots whose loop was freed, appended by a GC callback and emptied by every reap.
        self._orphans: list[_Slot[_T]] = []
        _registries.add(self)

    # -- lookup -------------------------------------------------------------------------------

    def get(self) -> _T:
        """The value of the running loop, created on first use.

        Raises:
            WrongEventLoop: no event loop is running in this thread.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise WrongEventLoop(
                f"no running event loop: the {self._what} is per event loop; "
                "call this from async code (inside asyncio.run() or a running loop)"
            ) from None
        last = self._last
        if last is not None and last.key() is loop:
            return last.value
        return self._lookup(loop)

    def _lookup(self, loop: asyncio.AbstractEventLoop) -> _T:
        slot = self._slots.get(weakref.ref(loop))
        if slot is None:
            with self._lock:
                slot = self._slots.get(weakref.ref(loop))
                if slot is None:
                    self._reap_locked()
                    slot = self._new_locked(loop)
        self._last = slot
        return slot.value

    def peek(self) -> list[_T]:
        """The values alive now, after reaping those of closed or freed loops."""
        self.reap()
        return self.values()

    def values(self) -> list[_T]:
        """The values registered now, without reaping (read-only: safe from any thread)."""
        return [slot.value for slot in list(self._slots.values())]

    def idle_loops(self) -> int:
        """How many values belong to a loop that is open but not running now (read-only).

        Such a loop may run again (a worker's loop between jobs), or may have been dropped
        without ``close()``: nothing tells the two apart, so its value is kept (see
        ``Database``'s "Event loops dropped without close()").
        """
        count = 0
        for slot in list(self._slots.values()):
            loop = slot.key()
            if loop is not None and not loop.is_closed() and not loop.is_running():
                count += 1
        return count

    @property
    def alive(self) -> int:
        """How many values are alive (one per loop that used them and is still open)."""
        return len(self._slots)

    @property
    def dispose_failures(self) -> int:
        """How many disposals inside a closing loop failed (logged at WARNING)."""
        return self._dispose_failures

    @property
    def disposed(self) -> int:
        """How many values were disposed or abandoned so far in this process."""
        return self._disposed

    # -- creation -----------------------------------------------------------------------------

    def _new_locked(self, loop: asyncio.AbstractEventLoop) -> _Slot[_T]:
        registry = weakref.ref(self)

        def loop_freed(key: weakref.ref[asyncio.AbstractEventLoop]) -> None:
            # Runs in the garbage collector: only detach here; the value is abandoned on the
            # next reap (no SQLAlchemy calls from inside a GC callback).
            reg = registry()
            if reg is not None:
                slot = reg._slots.pop(key, None)
                if slot is not None:
                    reg._orphans.append(slot)

        value = self._create()
        slot = _Slot(weakref.ref(loop, loop_freed), value)
        self._slots[slot.key] = slot
        self._install_shutdown_hooks(loop, slot)
        return slot

    def _install_shutdown_hooks(self, loop: asyncio.AbstractEventLoop, slot: _Slot[_T]) -> None:
        # 1. asyncio.run()/Runner.close() call loop.shutdown_asyncgens() before loop.close():
        #    a started async generator registered with the loop gets aclose()d there, in the
        #    loop, so its `finally` can await the disposal.
        sentinel = self._sentinel(slot)
        step: Any = sentinel.__anext__()  # firstiter hook: the loop now tracks this generator
        with contextlib.suppress(StopIteration):
            step.send(None)
        slot.sentinel = sentinel
        # 2. A loop closed by hand (new_event_loop/run_until_complete/close) skips step 1:
        #    run the disposal from its close() while it can still run.
        original_close = loop.close
        slot_ref = weakref.ref(slot)
        registry = weakref.ref(self)

        def close() -> None:
            reg, live = registry(), slot_ref()
            if live is not None and live.pid != os.getpid():
                # A fork child closing the loop it inherited: the value's sockets are the
                # parent's. Close the loop object only, off the epoll set it shares with the
                # parent.
                close_inherited_loop(loop, original_close)
                return
            try:
                if (
                    reg is not None
                    and live is not None
                    and not live.closing
                    and not loop.is_closed()
                    and not loop.is_running()  # close() raises below; nothing to dispose yet
                ):
                    reg._dispose_while_closing(loop, live)
            finally:
                original_close()  # whatever the disposal did, the loop gets closed

        with contextlib.suppress(AttributeError):  # uvloop loops have no instance __dict__
            loop.close = close  # type: ignore[method-assign]

    def _dispose_while_closing(self, loop: asyncio.AbstractEventLoop, slot: _Slot[_T]) -> None:
        try:
            loop.run_until_complete(self._retire(slot))
        except Exception as exc:  # noqa: BLE001 - recorded: counted and logged with the reason
            # RuntimeError: another loop runs in this thread. The loop is closed right after
            # this either way; a value not detached yet is abandoned by the next reap.
            self._failed(exc, "while closing its event loop by hand")

    def _failed(self, exc: BaseException, when: str) -> None:
        self._dispose_failures += 1
        if self._on_failure is not None:
            self._on_failure()
        _log.warning(
            "disposing the %s of an event loop failed %s (%s: %s)",
            self._what,
            when,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )

    async def _sentinel(self, slot: _Slot[_T]) -> AsyncIterator[None]:
        try:
            yield
        finally:
            # Never in a fork child: the value belongs to the parent (see _forget_after_fork).
            if not slot.closing and slot.pid == os.getpid():
                try:
                    await self._retire(slot)
                except Exception as exc:  # noqa: BLE001 - recorded: counted and logged
                    self._failed(exc, "at the end of asyncio.run()")

    # -- disposal -----------------------------------------------------------------------------

    def _detach(self, slot: _Slot[_T]) -> bool:
        with self._lock:
            if slot.closing:
                return False
            slot.closing = True
            if self._slots.get(slot.key) is slot:
                del self._slots[slot.key]
            if self._last is slot:
                self._last = None
            self._disposed += 1
        if self._on_disposed is not None:
            self._on_disposed()
        return True

    async def _retire(self, slot: _Slot[_T]) -> None:
        """Dispose ``slot``'s value inside its (still open) loop."""
        if self._detach(slot):
            await self._aclose(slot.value)

    async def retire_current(self) -> bool:
        """Dispose the running loop's value now (a later :meth:`get` makes a new one)."""
        loop = asyncio.get_running_loop()
        slot = self._slots.get(weakref.ref(loop))
        if slot is None:
            return False
        await self._retire(slot)
        if slot.sentinel is not None:
            # Stop the loop from closing it later: it has nothing left to do.
            await slot.sentinel.aclose()  # type: ignore[attr-defined]
        return True

    def reap(self) -> int:
        """Abandon the values of loops that are closed or freed; return how many."""
        with self._lock:
            return self._reap_locked()

    def _reap_locked(self) -> int:
        # list() first: a GC callback may pop from _slots while we look at the loops.
        dead = [s for s in list(self._slots.values()) if _loop_gone(s)]
        while self._orphans:
            dead.append(self._orphans.pop())
        count = 0
        for slot in dead:
            if slot.closing:
                continue
            slot.closing = True
            if self._slots.get(slot.key) is slot:
                del self._slots[slot.key]
            if self._last is slot:
                self._last = None
            self._disposed += 1
            if self._on_disposed is not None:
                self._on_disposed()
            count += 1
            _log.info(
                "abandoning the %s of an event loop that was closed without disposing it",
                self._what,
            )
            self._abandon(slot.value)
        return count

    def _forget_after_fork(self) -> None:
        # In the child: keep the parent's values referenced and never touch them. Marked
        # closing, so no hook (loop.close() wrapper, sentinel, reap) disposes of them here.
        inherited = [*self._slots.values(), *self._orphans]
        for slot in inherited:
            slot.closing = True
        _inherited.extend(inherited)
        self._slots = {}
        self._orphans = []
        self._last = None
        self._lock = threading.RLock()  # the parent's lock may have been held by another thread


def close_inherited_loop(loop: asyncio.AbstractEventLoop, close: Callable[[], None]) -> None:
    """Close, in a fork child, a selector loop inherited from the parent, leaving the parent be.

    The child's epoll descriptor refers to the parent's epoll instance: the unregistering that
    ``close()`` does (its self-pipe) would remove the *parent's* registration, and the parent's
    loop would never again wake up for ``call_soon_threadsafe`` (``asyncio.to_thread``...).
    So the loop gets a fresh, empty selector first, and the inherited descriptor is only
    closed (which does not touch the shared interest list). Private attributes of asyncio's
    selector loops, guarded: other loops are closed as they are.
    """
    any_loop: Any = loop
    old = getattr(any_loop, "_selector", None)
    shared = getattr(old, "_selector", None)
    if old is not None and shared is not None and hasattr(shared, "close"):
        any_loop._selector = type(old)()
        shared.close()  # this process's descriptor only
    close()


def _loop_gone(slot: _Slot[Any]) -> bool:
    loop = slot.key()
    return loop is None or loop.is_closed()


def _after_fork_in_child() -> None:
    for registry in list(_registries):
        registry._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
