"""Pool mechanics: the Database's pool class, and checkout/checkin without SQLAlchemy's greenlet.

The Database's work on every checkout and checkin (health check, leak watch, idle stamp) is
done by its pool class, :class:`WatchedPool`, not by event listeners: SQLAlchemy's event
dispatch cost about 2 % of a point query. (A pool class chosen through ``engine_options`` gets
the same work as listeners: :func:`checkout_hook`, :func:`checkin_hook`.)

SQLAlchemy's asyncio pool is a synchronous pool driven through a greenlet: every checkout and
checkin normally costs a ``greenlet_spawn`` (10-20 µs here), which is a large share of a
one-round-trip read (~80 µs). Handing out an idle connection, or putting one back into a queue
that has room, does no I/O at all; only opening, recycling, invalidating or pinging does. These
helpers take the synchronous path only when they can tell that no I/O will be needed, and
return ``None``/``False`` otherwise so the caller uses the greenlet path.

The one-shot reads (``db.fetchval`` and friends) go one step further: the connection never
leaves the method, so they *lease* the connection record straight from the pool's queue
(:func:`lease_without_io`, :func:`release_lease`) instead of wrapping it in a
``_ConnectionFairy`` (an object and a ``weakref.finalize`` per checkout, and SQLAlchemy's
checkout/checkin machinery around it). They do everything the fairy path does for such a
connection: health checks, the leak watch's checkout record, the idle stamp, invalidation on
error, the queue's accounting (``checkedout()``). They only lease from a :class:`WatchedPool`
that nothing listens to: when anything listens to the pool's checkout, checkin or reset
events, they step aside and the fairy path runs, so the listener sees every checkout.

They read a few private attributes of SQLAlchemy's ``QueuePool`` and connection records
(stable through 2.0 and 2.1); every access is guarded, and anything unexpected means "use the
greenlet path", which is always correct.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import select
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

import asyncpg
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.pool import AsyncAdaptedQueuePool, PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn
from sqlalchemy.util.concurrency import in_greenlet
from sqlalchemy.util.queue import AsyncAdaptedQueue, Empty, Full

from sheetanchor.postgres._errors import is_connection_error
from sheetanchor.postgres._json import install_json_codecs
from sheetanchor.postgres._leaks import LeakTable

try:  # SQLAlchemy 2.1 renamed await_only to await_
    from sqlalchemy.util import await_ as _await
except ImportError:  # pragma: no cover - SQLAlchemy 2.0
    from sqlalchemy.util import await_only as _await

__all__ = [
    "IDLE_SINCE",
    "HandoffQueue",
    "WatchedPool",
    "checkin_hook",
    "checkin_is_io_free",
    "checkout_hook",
    "checkout_without_io",
    "close_dead_loop_sockets",
    "driver_of",
    "lease_without_io",
    "on_connect_json",
    "on_connect_mark",
    "pool_waiters",
    "release",
    "release_lease",
]

IDLE_SINCE = "sheetanchor_idle_since"
# rec.info key: a select.poll() watching the connection's socket for input (see _poller).
_POLLER = "sheetanchor_poller"
_RECYCLE_MARGIN = 1.0  # seconds: never race a recycle deadline on the fast path


def _idle_records(pool: Any) -> Sequence[Any]:
    """The records idle in ``pool``'s queue (a :class:`HandoffQueue`, or SQLAlchemy's own)."""
    queue = pool._pool
    if isinstance(queue, HandoffQueue):
        return queue.idle
    inner = queue.__dict__.get("_queue")  # created lazily by AsyncAdaptedQueue
    return () if inner is None else inner._queue


def _next_idle(pool: Any) -> Any:
    items = _idle_records(pool)
    if not items:
        return None
    return items[-1] if pool._pool.use_lifo else items[0]


def _idle_without_io(pool: Any, idle_limit: float | None) -> Any:
    """The record the pool would hand out next, if handing it out needs no I/O; else ``None``.

    No I/O means: no pre-ping, no recycle due, not invalidated, not closed by the server
    (neither seen by the loop nor waiting unread on its socket), and not idle long enough to
    be due for our own ping.
    """
    if pool._pre_ping:  # SQLAlchemy's own ping on every checkout: that is I/O
        return None
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
    info = rec.info
    poller = info.get(_POLLER)
    if poller is not None and poller.poll(0):
        return None  # input on an idle connection (the server closed it, likely): ping it
    if idle_limit is not None:
        idle_since = info.get(IDLE_SINCE)
        if idle_since is None or time.monotonic() - idle_since >= idle_limit * 0.9:
            return None  # due for a ping: that is I/O
    return rec


def checkout_without_io(pool: Any, idle_limit: float | None) -> PoolProxiedConnection | None:
    """Check out the next idle connection synchronously if that needs no I/O, else ``None``."""
    try:
        if _idle_without_io(pool, idle_limit) is None:
            return None
    except (AttributeError, IndexError, TypeError):
        return None
    fairy: PoolProxiedConnection = pool.connect()
    return fairy


def lease_without_io(pool: Any, idle_limit: float | None) -> Any:
    """Take the next idle connection record out of the pool's queue, if that needs no I/O.

    Returns the ``_ConnectionRecord`` (give it back with :func:`release_lease`), or ``None``
    when the fairy path must run: no idle connection, one due for a ping or recycle, a
    connection the server closed, a pool that is not a watched :class:`WatchedPool`, or any
    ``checkout``, ``checkin`` or ``reset`` listener on the pool.
    """
    try:
        # Only a pool that does the Database's checkout work itself, which this path replaces,
        # and that nothing else listens to: a listener expects to see every checkout.
        if pool._sheetanchor_leaks is None:
            return None
        dispatch = pool.dispatch
        if dispatch.checkout or dispatch.checkin or dispatch.reset:
            return None
        rec = _idle_without_io(pool, idle_limit)
        if rec is None:
            return None
        queue = pool._pool
        taken = queue.get_nowait()
    except (AttributeError, IndexError, KeyError, TypeError, Empty):
        return None
    if taken is not rec:  # cannot happen within one loop; be safe rather than sorry
        queue.put_nowait(taken)
        return None
    return rec


async def _settle(
    driver: Any, owner: Any, failure: BaseException | None, *, discard: bool = False
) -> bool:
    """Make a connection that is coming back fit for reuse, or invalidate it.

    ``owner`` is what the pool tracks it by (a checkout or a connection record; both have
    ``invalidate``). Returns True when it can be reused, False when it was invalidated.
    """
    if discard or (
        failure is not None and (not isinstance(failure, Exception) or is_connection_error(failure))
    ):
        # Cancelled mid-statement, or the connection is gone: it cannot be trusted. Close the
        # socket now (no I/O to wait for) and let the pool replace it.
        driver.terminate()
        owner.invalidate(failure if isinstance(failure, Exception) else None)
        return False
    if driver.is_closed():
        owner.invalidate()
        return False
    if driver.is_in_transaction():
        # A transaction opened on the raw connection and left open: end it before reuse.
        try:
            await driver.execute("ROLLBACK")
        except BaseException as exc:
            driver.terminate()
            owner.invalidate(exc if isinstance(exc, Exception) else None)
            raise
    return True


async def release_lease(
    rec: Any, pool: Any, leaks: LeakTable, failure: BaseException | None, *, disposed: bool = False
) -> None:
    """Give back a record taken with :func:`lease_without_io` (see :func:`release`).

    ``disposed``: the engine swapped in a new pool while the record was out (``dispose()``);
    its connection is closed now instead of idling, uncounted, in the old pool.
    """
    try:
        # A record whose pool was disposed is closed now, like a broken one; a live pool opens
        # a new connection for it later.
        await _settle(rec.dbapi_connection.driver_connection, rec, failure, discard=disposed)
    finally:
        # What the checkin hook does, then back into the queue (an overflow connection that
        # finds the queue full is closed: I/O, through the greenlet).
        rec.info[IDLE_SINCE] = time.monotonic()
        leaks.checkin(rec)
        try:
            pool._pool.put_nowait(rec)  # to the longest-waiting checkout, if any
        except Full:
            await greenlet_spawn(pool._do_return_conn, rec)


def checkin_is_io_free(pool: Any) -> bool:
    """True when returning a healthy connection just puts it back in the queue (no close)."""
    try:
        queue = pool._pool
        return bool(queue.qsize() < queue.maxsize)
    except AttributeError:
        return False


# -- the Database's pool work (a pool class, or event hooks) and pool introspection ----------


def driver_of(fairy: PoolProxiedConnection) -> asyncpg.Connection[Any]:
    return cast("asyncpg.Connection[Any]", fairy.driver_connection)


def on_connect_json(dbapi_conn: Any, rec: Any) -> None:
    _await(install_json_codecs(dbapi_conn.driver_connection))


def on_connect_mark(dbapi_conn: Any, rec: Any) -> None:
    info = rec.info
    info[IDLE_SINCE] = time.monotonic()
    info[_POLLER] = _poller(dbapi_conn.driver_connection)


def _poller(driver: Any) -> Any:
    """A ``select.poll()`` watching ``driver``'s socket for input, or ``None`` if it has none.

    An idle pooled connection has nothing to read. Input on one means the server sent
    something the loop has not processed yet: nearly always its goodbye (``FATAL`` and EOF
    after ``pg_terminate_backend``, a restart), which the loop reads only when it next runs,
    so ``is_closed()`` does not know yet. One ``poll(0)`` per checkout (~0.3 µs, no
    allocation when there is no input) tells, and the connection is pinged before use.
    Made once per connection, at connect (a new connection gets a new one).
    """
    try:
        fd = driver._transport.get_extra_info("socket").fileno()
    except (AttributeError, OSError, ValueError):
        return None  # no socket we can see (an unusual transport): the free check only
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)  # hang-up and errors always show
    return poller


def _has_input(rec: Any) -> bool:
    """True when the idle connection of ``rec`` has unread input (see :func:`_poller`)."""
    poller = rec.info.get(_POLLER)
    return poller is not None and bool(poller.poll(0))


def checkout_hook(leaks: LeakTable, idle_limit: float | None) -> Any:
    record = leaks.checkout
    monotonic = time.monotonic

    def on_checkout(dbapi_conn: Any, rec: Any, proxy: Any) -> None:
        driver = dbapi_conn.driver_connection
        # Free check: the server closed it (pg_terminate_backend, restart) while it sat in the
        # pool and the loop already read the EOF. The pool replaces it and tries again.
        if driver.is_closed():
            raise DisconnectionError("connection closed by the server while idle in the pool")
        if _has_input(rec):
            # The server closed it, most likely, and the loop has not read that yet: ping it
            # (no I/O possible outside a greenlet: replace it).
            if not in_greenlet():
                raise DisconnectionError("input on a connection idle in the pool")
            try:
                _await(driver.execute("SELECT 1"))
            except Exception as exc:
                raise DisconnectionError(f"ping failed: {exc}") from exc
        elif idle_limit is not None:
            idle_since = rec.info.get(IDLE_SINCE)
            # Ping only a connection idle long enough for a silent drop (NAT, failover) to be
            # likely. Outside a greenlet (the fast path, which checked the idle time) no I/O is
            # possible, so none is attempted.
            if idle_since is not None and monotonic() - idle_since >= idle_limit and in_greenlet():
                try:
                    _await(driver.execute("SELECT 1"))  # simple query: one round trip
                except Exception as exc:
                    raise DisconnectionError(f"ping failed: {exc}") from exc
        record(rec, proxy)  # after the health check: only good checkouts are recorded

    return on_checkout


def checkin_hook(leaks: LeakTable) -> Any:
    forget = leaks.checkin
    monotonic = time.monotonic

    def on_checkin(dbapi_conn: Any, rec: Any) -> None:
        rec.info[IDLE_SINCE] = monotonic()
        forget(rec)

    return on_checkin


# A waiter's future gets this instead of a record when its deadline passes.
_TIMED_OUT: Any = object()


class HandoffQueue(AsyncAdaptedQueue[Any]):
    """The idle connection records of a :class:`WatchedPool`, served first come, first served.

    SQLAlchemy's ``AsyncAdaptedQueue`` wraps an ``asyncio.Queue``: a connection coming back
    wakes the longest waiter, but stays in the queue until that waiter runs. A task that gives
    a connection back and asks for one again without awaiting in between (a loop of
    ``db.session()`` blocks, of ``db.fetchval`` calls) takes it again first, so the woken
    waiter finds nothing, queues up again, and can wait until the pool timeout while others
    loop. (A plain ``AsyncSession`` is spared this only because its close runs in a task of its
    own.) Here a record coming back goes straight to the longest waiter, and a checkout takes
    an idle record only when nobody waits (an idle record and a waiter never coexist), so
    waits are served in arrival order. No wake-up is wasted either.

    Deadlines: one loop timer per queue, not one per wait: it fires at the earliest deadline,
    ends the waits that are due (``Empty``, which the pool turns into its ``TimeoutError``)
    and is set again for the next one.

    Blocking ``get`` runs in SQLAlchemy's greenlet (the pool's checkout), like the queue it
    replaces; everything else is synchronous and does no I/O.
    """

    def __init__(self, maxsize: int = 0, use_lifo: bool = False) -> None:
        super().__init__(maxsize, use_lifo)
        self.idle: deque[Any] = deque()
        # (deadline on the loop's clock, future) of each waiting checkout, oldest first.
        self.waiters: deque[tuple[float, asyncio.Future[Any]]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def empty(self) -> bool:
        return not self.idle

    def full(self) -> bool:
        return 0 < self.maxsize <= len(self.idle)

    def qsize(self) -> int:
        return len(self.idle)

    def put_nowait(self, item: Any) -> None:
        """Hand ``item`` to the longest waiter, else keep it idle; ``Full`` if there is no room."""
        waiters = self.waiters
        while waiters:
            _, fut = waiters.popleft()
            if not fut.done():  # not timed out or cancelled (those leave, but be sure)
                fut.set_result(item)
                return
        if 0 < self.maxsize <= len(self.idle):
            raise Full()
        self.idle.append(item)

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        # The pool only ever puts without blocking (a connection that finds no room is closed).
        self.put_nowait(item)

    def get_nowait(self) -> Any:
        idle = self.idle
        if not idle:
            raise Empty()
        return idle.pop() if self.use_lifo else idle.popleft()

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        idle = self.idle
        if idle:  # nobody waits (they would have been handed it): take it
            return idle.pop() if self.use_lifo else idle.popleft()
        if not block:
            raise Empty()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        deadline = math.inf if timeout is None else loop.time() + timeout
        entry = (deadline, fut)
        self.waiters.append(entry)
        if deadline < self._timer_at:
            self._arm(loop, deadline)
        try:
            item = _await(fut)
        except BaseException:
            self._give_up(entry)
            raise
        if item is _TIMED_OUT:
            raise Empty()
        return item

    def _give_up(self, entry: tuple[float, asyncio.Future[Any]]) -> None:
        # The waiting checkout was cancelled (or failed). A record handed to it just before
        # that must not be lost: it goes to the next waiter, or back to the idle ones.
        fut = entry[1]
        if fut.done() and not fut.cancelled():
            item = fut.result()
            if item is not _TIMED_OUT:
                self._pass_on(item)
            return
        fut.cancel()
        with contextlib.suppress(ValueError):
            self.waiters.remove(entry)

    def _pass_on(self, item: Any) -> None:
        try:
            self.put_nowait(item)
        except Full:
            # Cannot happen while the record was out (it took no room), unless overflow
            # connections came back meanwhile. It stays idle, one over: closing it here
            # would be I/O in a cancelled checkout. It is still counted in the pool's
            # overflow, so the pool's total never grows past its capacity.
            self.idle.append(item)

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = loop.call_at(when, self._expire, loop)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        self._timer_at = math.inf
        now = loop.time()
        keep: deque[tuple[float, asyncio.Future[Any]]] = deque()
        earliest = math.inf
        for entry in self.waiters:
            deadline, fut = entry
            if fut.done():
                continue
            if deadline <= now:
                fut.set_result(_TIMED_OUT)
            else:
                keep.append(entry)
                earliest = min(earliest, deadline)
        self.waiters = keep
        if earliest < math.inf:
            self._arm(loop, earliest)


class WatchedPool(AsyncAdaptedQueuePool):
    """SQLAlchemy's asyncio pool doing the Database's checkout and checkin work itself.

    The same work as :func:`checkout_hook` and :func:`checkin_hook`, without an event
    listener: SQLAlchemy's event dispatch, and the retry loop it runs around the ``checkout``
    listeners, cost about 2 % of a point query. ``pool.dispatch`` is left to the application:
    a listener it adds runs as usual (and makes the one-shot reads take the fairy path).

    * Health, on taking a record from the queue (:meth:`_do_get`), before SQLAlchemy readies
      its connection: a connection the server closed, or one whose ping fails (pinged when
      its socket has unread input, or when idle past ``pre_ping_idle``), is invalidated (its
      socket closed, no I/O), and SQLAlchemy opens a new one
      for the same record, as after a ``DisconnectionError`` raised by a checkout listener.
      A failure there gives the record back (invalidated), as SQLAlchemy does.
    * The leak watch's record, once the proxy exists (:meth:`connect`): the proxy is what
      tells a garbage-collected checkout from a detached one.
    * On the way back (:meth:`_return_conn`, reached only from SQLAlchemy's checkin, not from
      a ``detach``): the idle stamp, and the leak watch forgets the checkout.

    * Its queue is a :class:`HandoffQueue`: waiting checkouts are served in arrival order, a
      connection coming back goes straight to the longest waiter.

    Until :meth:`watch` is called it is an ``AsyncAdaptedQueuePool`` with that queue.
    ``recreate()`` (``engine.dispose()``) carries the watch over to the new pool, as it does
    the event listeners.
    """

    _queue_class = HandoffQueue
    _sheetanchor_leaks: LeakTable | None = None
    _sheetanchor_idle_limit: float | None = None

    def watch(self, leaks: LeakTable, idle_limit: float | None) -> None:
        """Record checkouts in ``leaks``; ping connections idle ``idle_limit`` s or more."""
        self._sheetanchor_leaks = leaks
        self._sheetanchor_idle_limit = idle_limit

    def recreate(self) -> WatchedPool:
        new = cast("WatchedPool", super().recreate())
        new._sheetanchor_leaks = self._sheetanchor_leaks
        new._sheetanchor_idle_limit = self._sheetanchor_idle_limit
        return new

    def _do_get(self) -> Any:
        rec: Any = super()._do_get()
        conn = rec.dbapi_connection
        if conn is None or self._sheetanchor_leaks is None:
            return rec  # a new connection is opened for it, or not watched: nothing to check
        try:
            # Free check: the server closed it (pg_terminate_backend, restart) while it sat in
            # the pool and the loop already read the EOF.
            if conn.driver_connection.is_closed():
                rec.invalidate(_closed_while_idle())
                return rec
            info = rec.info
            poller = info.get(_POLLER)
            if poller is not None and poller.poll(0):
                # Input on an idle connection: the server closed it, most likely, and the loop
                # has not read that yet (is_closed() cannot know). Ping it.
                _ping_or_invalidate(rec, info.get(IDLE_SINCE), must=True)
                return rec
            limit = self._sheetanchor_idle_limit
            if limit is not None:
                idle_since = info.get(IDLE_SINCE)
                if idle_since is not None and time.monotonic() - idle_since >= limit:
                    _ping_or_invalidate(rec, idle_since)
        except BaseException as err:
            rec._checkin_failed(err, _fairy_was_created=False)
            raise
        return rec

    def connect(self) -> PoolProxiedConnection:
        fairy = super().connect()
        leaks = self._sheetanchor_leaks
        if leaks is not None:
            # After the health check: only good checkouts are recorded. Frames skipped: the
            # capture, the table's method and this one.
            rec: Any = fairy._connection_record
            ref = rec.fairy_ref  # SQLAlchemy's weak reference to the proxy: reused
            leaks.checkout(
                rec, fairy, proxy_ref=ref if ref is not None and ref() is fairy else None
            )
        return fairy

    def _return_conn(self, record: Any) -> None:
        leaks = self._sheetanchor_leaks
        if leaks is not None:
            record.info[IDLE_SINCE] = time.monotonic()
            leaks.checkin(record)
        self._do_return_conn(record)


def _closed_while_idle() -> DisconnectionError:
    return DisconnectionError("connection closed by the server while idle in the pool")


def _ping_or_invalidate(rec: Any, idle_since: float | None, *, must: bool = False) -> None:
    """Ping ``rec``'s connection, idle since ``idle_since``; invalidate it if the ping fails.

    Only in SQLAlchemy's greenlet: outside it (the fast path, which checked the idle time and
    the socket) no I/O is possible, so none is attempted; a connection that ``must`` be
    checked is invalidated instead (that needs no I/O).
    """
    if not in_greenlet():
        if must:
            rec.invalidate(DisconnectionError("input on a connection idle in the pool"))
        return
    rec.get_connection()  # what SQLAlchemy does next: recycle it if due, before any ping
    if rec.info.get(IDLE_SINCE) != idle_since:
        return  # recycled just now (a new connection, stamped by the connect hook): no ping
    try:
        _await(rec.dbapi_connection.driver_connection.execute("SELECT 1"))  # one round trip
    except Exception as exc:  # noqa: BLE001 - any failure: the connection is replaced
        rec.invalidate(DisconnectionError(f"ping failed: {exc}"))


def close_dead_loop_sockets(pool: Any) -> None:
    """Close the sockets of a closed loop's idle connections without that loop.

    Only for a loop that is already closed (its selector is gone, so nothing is shared with a
    live loop). Uses private attributes of asyncio's selector transports and asyncpg, guarded:
    where they are missing (uvloop) the sockets are left to the garbage collector.
    """
    try:
        idle = list(_idle_records(pool))
    except AttributeError:
        return
    for rec in idle:
        driver = getattr(getattr(rec, "dbapi_connection", None), "driver_connection", None)
        transport = getattr(driver, "_transport", None)
        sock = getattr(transport, "_sock", None)
        if sock is None:
            continue
        with contextlib.suppress(OSError):
            sock.close()
        with contextlib.suppress(AttributeError):
            transport._sock = None  # type: ignore[union-attr]  # nothing left for __del__
            driver._aborted = True  # type: ignore[union-attr]  # asyncpg: is_closed() is True


def pool_waiters(pool: Any) -> int:
    # Tasks blocked in the pool's queue (private, hence best effort).
    queue = getattr(pool, "_pool", None)
    if isinstance(queue, HandoffQueue):
        return sum(1 for _, fut in queue.waiters if not fut.done())
    inner = getattr(queue, "__dict__", {}).get("_queue")
    getters = getattr(inner, "_getters", ())
    return sum(1 for fut in getters if not fut.done())


async def release(fairy: PoolProxiedConnection, pool: Any, failure: BaseException | None) -> None:
    """Give a raw checkout back: reuse it if it is sound, else close it and let the pool replace it.

    Args:
        fairy: the checked-out connection.
        pool: its pool.
        failure: what the caller's work raised, if anything.
    """
    if not await _settle(driver_of(fairy), fairy, failure):
        return  # invalidated: the pool replaces it
    if checkin_is_io_free(pool):
        fairy.close()  # back into the queue: no I/O, no greenlet needed
    else:
        await greenlet_spawn(fairy.close)  # an overflow connection is closed: I/O
