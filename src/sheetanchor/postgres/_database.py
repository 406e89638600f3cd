"""``Database``: a PostgreSQL client that is safe as a module-level global.

One SQLAlchemy ``AsyncEngine`` (asyncpg) per process and running event loop, created on first
use and disposed with its loop (see ``_loops.py``); sessions, transactions and raw connections
that always go back to the pool; a leak watch; driver errors mapped at one boundary.

Which call for what:

* ``async with db.session() as s`` — ORM ``AsyncSession``; COMMIT on success, ROLLBACK on
  error, always closed (also on cancellation); a failed COMMIT raises ``CommitFailed``.
* ``async with db.transaction() as conn`` — Core ``AsyncConnection`` inside BEGIN ... COMMIT.
* ``async with db.connection() as conn`` — the raw ``asyncpg.Connection`` of a pooled
  connection (COPY, ``executemany``, LISTEN); autocommit; a transaction left open is rolled
  back; cancelled mid-statement, it is closed and replaced, never handed out again.
* ``await db.fetchval/fetchrow/fetch/execute(sql, *args)`` — one round trip on a pooled
  connection, no BEGIN/ROLLBACK, ``$1`` parameters.

Connection health without a round trip per checkout: a connection the server closed while it
sat in the pool (``pg_terminate_backend``, a restart) is seen on checkout and replaced (for free
once the loop has read its EOF; before that, its socket has input: pinged first, one round trip);
one idle longer than ``PoolSettings.pre_ping_idle`` (10 s) is pinged first (``SELECT 1``, one
round trip), which catches silent drops (NAT, failover); ``recycle`` replaces old connections.

Event loops dropped without ``close()``: an engine is disposed when its loop ends
(``asyncio.run``/``asyncio.Runner``, or ``loop.close()``), and abandoned, its sockets closed,
once its loop is found closed. A loop that is neither closed nor running (``new_event_loop()``,
``run_until_complete()``, then dropped) cannot be told from one that will run again (a worker's
loop between jobs), and it is never freed: its asyncpg connections, their transports and the
pool's queue all hold it. So its engine and up to ``PoolSettings.capacity`` server connections
stay until the process exits. Disposing them needs I/O in that loop, which nobody runs, and
closing their sockets from elsewhere is only safe once the loop is closed. ``stats()`` and the
``sheetanchor_pg_engines_idle_loops`` gauge count such engines, and a warning is logged when
4, 8, 16... of them exist. Close loops you create (or use ``asyncio.run``).

PgBouncer (``pool_mode = transaction``): pass ``Database(url_of_pgbouncer, pgbouncer=True)``.

* Server-side prepared statements do not survive a change of server connection, so asyncpg's
  statement cache is off (``statement_cache_size=0``), SQLAlchemy's too
  (``prepared_statement_cache_size=0``), and the statements SQLAlchemy still prepares get a
  unique name each (``prepared_statement_name_func``), so two clients never collide on one.
* PgBouncer refuses start-up parameters it does not know, so only ``application_name`` is
  sent; ``statement_timeout`` and ``idle_in_transaction_session_timeout`` are *not* set per
  connection: set them on the role or database instead
  (``ALTER ROLE app SET statement_timeout = '30s'``), or add them to PgBouncer's
  ``ignore_startup_parameters`` and set them there.
* Session state (``SET``, advisory locks, ``LISTEN``, temporary tables) does not survive a
  transaction in this mode: keep it inside one ``db.transaction()`` or ``db.session()``.
* Cost: every statement is parsed and planned again (no statement cache); a hot point query
  is slower than with direct connections.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from types import CodeType, TracebackType
from typing import Any

import asyncpg
import orjson
from sqlalchemy import event
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn

from sheetanchor._readiness import wait_until_ready
from sheetanchor.config import parse_url, pg_url_from_env, redact, to_sqlalchemy_url
from sheetanchor.errors import CommitFailed, ConfigError, ResourceClosed
from sheetanchor.observe import get_logger
from sheetanchor.postgres._errors import (
    is_connection_error,
    map_error,
    translate,
    translate_errors,
)
from sheetanchor.postgres._leaks import OPENER, LeakReport, LeakTable, LeakWatch
from sheetanchor.postgres._loops import PerLoop
from sheetanchor.postgres._pool import (
    WatchedPool,
    checkin_hook,
    checkout_hook,
    checkout_without_io,
    close_dead_loop_sockets,
    driver_of,
    lease_without_io,
    on_connect_json,
    on_connect_mark,
    pool_waiters,
    release,
    release_lease,
)
from sheetanchor.postgres._settings import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT,
    DEFAULT_LEAK_THRESHOLD,
    DEFAULT_STATEMENT_TIMEOUT,
    PoolSettings,
    check_name,
    check_seconds,
)
from sheetanchor.postgres._stats import DatabaseStats, register_source, tally_for

__all__ = ["Database"]

# Warn when this many engines (then twice as many, ...) belong to open loops that are idle.
_IDLE_LOOPS_WARN = 4

_log = get_logger("postgres")


@dataclass(slots=True)
class _Engine:
    """The engine of one event loop and what hangs off it."""

    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    new_session: Any  # sessions() without options, minus the sessionmaker's keyword merge
    leaks: LeakTable
    timer: asyncio.TimerHandle | None = None
    cleanups: set[asyncio.Task[None]] = field(default_factory=set)


# Pool options of create_async_engine and the PoolSettings field that replaces each: the
# fast checkout path relies on the pool being configured by Database (pool_pre_ping=True, for
# one, would ping outside SQLAlchemy's greenlet and fail with MissingGreenlet).
_POOL_OPTIONS = {
    "pool_size": "size",
    "max_overflow": "max_overflow",
    "pool_timeout": "timeout",
    "pool_recycle": "recycle",
    "pool_use_lifo": "use_lifo",
    "pool_pre_ping": "pre_ping_idle",
}


def _pgbouncer_statement_name() -> str:
    # Unique per statement: behind PgBouncer in transaction mode a name may meet a server
    # connection that already has (or lacks) a statement of that name.
    return f"__sa_{uuid.uuid4().hex}__"


class Database:
    """A PostgreSQL client safe to create at import time and use from any event loop.

    Each running event loop (``asyncio.run`` after ``asyncio.run``, a thread with its own loop,
    pytest-asyncio's per-test loops, a Celery task's loop, a forked worker) gets its own engine
    and pool, disposed when that loop shuts down. After ``os.fork()`` the child never touches
    the parent's connections.

    Args:
        url: PostgreSQL URL; defaults to ``SHEETANCHOR_PG_URL``.
        pool: sizes and timings of each engine's pool.
        name: label for logs and the ``database`` label of the ``sheetanchor_pg_*`` metrics.
        role: what this process is (``app``, ``worker``...), sent as
            ``application_name = sheetanchor:<role>:<pid>`` so ``pg_stat_activity`` shows it.
        statement_timeout: server-side limit per statement, seconds (``None``: server default).
        idle_in_transaction_timeout: server-side limit for an idle open transaction, seconds.
        connect_timeout: limit for one connection attempt, seconds.
        pgbouncer: the URL points at PgBouncer in transaction mode: no server-side prepared
            statement cache, unique statement names, and only ``application_name`` sent at
            start-up (PgBouncer rejects other start-up parameters; set the timeouts with
            ``ALTER ROLE ... SET statement_timeout`` instead).
        leak_threshold: report a connection held longer than this, seconds (``None``: only
            report connections garbage-collected without being returned).
        json_codecs: bind ``dict``/``list`` to ``json``/``jsonb`` natively (orjson).
        engine_options: extra keyword arguments for ``create_async_engine`` (``echo=True``...);
            pool options (``pool_size``, ``pool_pre_ping``...) are refused: use ``pool``.

    Raises:
        ConfigError: a setting is invalid (the message names it) or no URL is configured.

    Example::

        db = Database()  # module level; SHEETANCHOR_PG_URL

        async def handler(user_id: int) -> str:
            return await db.fetchval("SELECT name FROM users WHERE id = $1", user_id)

        async def rename(user_id: int, name: str) -> None:
            async with db.session() as s:  # commit on success, rollback on error
                await s.execute(text("UPDATE users SET name = :n WHERE id = :i"),
                                {"n": name, "i": user_id})
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        pool: PoolSettings | None = None,
        name: str = "default",
        role: str = "app",
        statement_timeout: float | None = DEFAULT_STATEMENT_TIMEOUT,
        idle_in_transaction_timeout: float | None = DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        pgbouncer: bool = False,
        leak_threshold: float | None = DEFAULT_LEAK_THRESHOLD,
        json_codecs: bool = True,
        engine_options: Mapping[str, Any] | None = None,
    ) -> None:
        url = url if url is not None else pg_url_from_env()
        if url is None:
            raise ConfigError("no PostgreSQL URL: pass Database(url=...) or set SHEETANCHOR_PG_URL")
        self._parsed = parse_url(url)
        self._target = f"PostgreSQL at {self._parsed.address}"
        # Stateless, so one instance serves every block (redacting the target costs a regex).
        self._errors = translate_errors(self._target)
        self._sa_url = to_sqlalchemy_url(url)
        pool = pool if pool is not None else PoolSettings()
        if not isinstance(pool, PoolSettings):
            raise ConfigError(f"pool must be a PoolSettings, got {pool!r}")
        check_name("name", name)
        check_name("role", role)
        check_seconds("statement_timeout", statement_timeout, allow_none=True)
        check_seconds("idle_in_transaction_timeout", idle_in_transaction_timeout, allow_none=True)
        check_seconds("connect_timeout", connect_timeout)
        check_seconds("leak_threshold", leak_threshold, allow_none=True)
        if not isinstance(pgbouncer, bool):
            raise ConfigError(f"pgbouncer must be True or False, got {pgbouncer!r}")
        self.pool = pool
        self.name = name
        self.role = role
        self.statement_timeout = statement_timeout
        self.idle_in_transaction_timeout = idle_in_transaction_timeout
        self.connect_timeout = connect_timeout
        self.pgbouncer = pgbouncer
        self.leak_threshold = leak_threshold
        self.json_codecs = json_codecs
        self._engine_options = dict(engine_options or {})
        for option in self._engine_options:
            if option in _POOL_OPTIONS:
                raise ConfigError(
                    f"engine_options={{{option!r}: ...}} is not allowed: the pool is configured "
                    f"by pool=PoolSettings({_POOL_OPTIONS[option]}=...) instead"
                )
        self._closed = False
        self._idle_warned = 0
        self._commit_failures = 0
        self._cleanup_failures = 0
        # The process-wide counters of this name: they outlive this object, so the exported
        # counters never go down when a Database is garbage-collected (see _stats.py).
        tally = self._tally = tally_for(name)

        def count_leak(report: LeakReport) -> None:
            tally.add("leaks")
            if report.kind == "unreturned":
                tally.add("leaks_unreturned")

        self._leaks = LeakWatch(name, leak_threshold, on_leak=count_leak)
        self._engines: PerLoop[_Engine] = PerLoop(
            self._create_engine,
            self._dispose_engine,
            self._abandon_engine,
            what="engine",
            on_disposed=functools.partial(tally.add, "engines_disposed"),
            on_failure=functools.partial(tally.add, "dispose_failures"),
        )
        register_source(self)

    def __repr__(self) -> str:
        return f"Database({self.url!r}, name={self.name!r}, role={self.role!r})"

    @property
    def url(self) -> str:
        """The URL with its password masked."""
        return self._parsed.display

    @property
    def address(self) -> str:
        """``host:port`` of the server, for messages."""
        return self._parsed.address

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    # -- engines ------------------------------------------------------------------------------

    def engine(self) -> AsyncEngine:
        """The ``AsyncEngine`` of the running event loop (for ORM set-up, Alembic, ``run_sync``).

        Prefer :meth:`session`, :meth:`transaction` and :meth:`connection`: they always give the
        connection back. An ``AsyncSession(db.engine())`` you forget to close is reported by the
        leak watch, not prevented.

        Raises:
            WrongEventLoop: no event loop is running.
            ResourceClosed: :meth:`close` was called.
        """
        if self._closed:
            raise ResourceClosed(f"{self!r} is closed; create a new Database")
        return self._engines.get().engine

    def _connect_args(self) -> dict[str, Any]:
        # Built per engine, so a forked child's connections carry the child's pid.
        server_settings = {"application_name": f"sheetanchor:{self.role}:{os.getpid()}"}
        if not self.pgbouncer:
            if self.statement_timeout is not None:
                server_settings["statement_timeout"] = str(int(self.statement_timeout * 1000))
            if self.idle_in_transaction_timeout is not None:
                server_settings["idle_in_transaction_session_timeout"] = str(
                    int(self.idle_in_transaction_timeout * 1000)
                )
        args: dict[str, Any] = {"timeout": self.connect_timeout, "server_settings": server_settings}
        if self.pgbouncer:
            args["statement_cache_size"] = 0  # asyncpg's own cache (raw connections)
            args["prepared_statement_cache_size"] = 0  # SQLAlchemy's adapter cache
            args["prepared_statement_name_func"] = _pgbouncer_statement_name
        return args

    def _create_engine(self) -> _Engine:
        pool = self.pool
        options: dict[str, Any] = {
            "pool_size": pool.size,
            "max_overflow": pool.max_overflow,
            "pool_timeout": pool.timeout,
            "pool_recycle": -1 if pool.recycle is None else pool.recycle,
            "pool_use_lifo": pool.use_lifo,
            # Our pool (WatchedPool) pings only connections idle > pre_ping_idle.
            "pool_pre_ping": False,
            "json_serializer": _json_dumps_str,
            "json_deserializer": orjson.loads,
            "connect_args": self._connect_args(),
        }
        if "pool" not in self._engine_options:
            # Does the checkout/checkin work below itself: no event listener per checkout.
            options["poolclass"] = WatchedPool
        options.update(self._engine_options)
        engine = create_async_engine(self._sa_url, **options)
        sync_pool = engine.sync_engine.pool
        if self.json_codecs:
            event.listen(sync_pool, "connect", on_connect_json)
        event.listen(sync_pool, "connect", on_connect_mark)
        leaks = self._leaks.attach(sync_pool)
        if isinstance(sync_pool, WatchedPool):
            sync_pool.watch(leaks, self.pool.pre_ping_idle)
        else:  # a pool class from engine_options: the same work, as event listeners
            event.listen(sync_pool, "checkout", checkout_hook(leaks, self.pool.pre_ping_idle))
            event.listen(sync_pool, "checkin", checkin_hook(leaks))
        entry = _Engine(
            engine=engine,
            sessions=async_sessionmaker(
                engine, expire_on_commit=False, sync_session_class=_TrackedSession
            ),
            new_session=functools.partial(
                AsyncSession, engine, expire_on_commit=False, sync_session_class=_TrackedSession
            ),
            leaks=leaks,
        )
        self._schedule_sweep(entry)
        _log.debug("engine created for %s (role %s)", self.url, self.role)
        self._warn_idle_loops()
        return entry

    def _warn_idle_loops(self) -> None:
        # Called under the registry's lock while a new engine is made. Warn at 4, 8, 16...
        # engines of open but idle loops: once per doubling, not per engine.
        idle = self._engines.idle_loops()
        if idle < _IDLE_LOOPS_WARN or idle < 2 * self._idle_warned:
            return
        self._idle_warned = idle
        _log.warning(
            "Database %s: %d engines belong to event loops that are open but not running; each "
            "keeps up to %d PostgreSQL connections. An event loop dropped without close() is "
            "never disposed of (its connections hold it alive): close loops when done "
            "(asyncio.run and asyncio.Runner do), or reuse one loop per thread",
            self.name,
            idle,
            self.pool.capacity,
        )

    def _schedule_sweep(self, entry: _Engine) -> None:
        threshold = self.leak_threshold
        if threshold is None:
            return
        interval = min(max(threshold / 4.0, 0.02), 5.0)
        loop = asyncio.get_running_loop()
        leaks = self._leaks

        def tick() -> None:
            leaks.sweep()
            if entry.timer is not None and not loop.is_closed():
                entry.timer = loop.call_later(interval, tick)

        entry.timer = loop.call_later(interval, tick)

    async def _dispose_engine(self, entry: _Engine) -> None:
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        if entry.cleanups:
            await asyncio.gather(*entry.cleanups, return_exceptions=True)
        self._leaks.sweep()
        entry.leaks.forget()
        await entry.engine.dispose()

    def _abandon_engine(self, entry: _Engine) -> None:
        # The loop that owned the sockets is closed or gone: no protocol I/O is possible. Close
        # the idle sockets (the server sees the disconnect at once) and drop the pool.
        entry.timer = None
        entry.leaks.forget()
        sync_engine = entry.engine.sync_engine
        close_dead_loop_sockets(sync_engine.pool)
        sync_engine.dispose(close=False)

    # -- sessions -----------------------------------------------------------------------------

    def session(self, **options: Any) -> AbstractAsyncContextManager[AsyncSession]:
        """An ``AsyncSession``: committed on success, rolled back on error, always closed.

        Closed also when the task is cancelled or the commit fails. ``expire_on_commit`` is
        off, so objects stay readable after the block. ``options`` go to ``AsyncSession``.

        Raises:
            CommitFailed: COMMIT failed; nothing was saved (cause chained).
            ConnectionLost: the connection dropped inside the block.
            PoolTimeout: no connection became free in time.
        """
        return _SessionBlock(self, options)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """A Core ``AsyncConnection`` inside BEGIN ... COMMIT (ROLLBACK on error).

        Raises:
            CommitFailed: COMMIT failed; nothing was saved (cause chained).
        """
        entry = self._entry()
        token = _open_block(sys._getframe(2))  # the caller (above contextlib's __aenter__)
        try:
            with self._errors:
                conn = await entry.engine.connect()
        finally:
            _close_block(token)  # the checkout is recorded: later ones are not this block's
        try:
            with self._errors:
                await conn.begin()
            with self._errors:
                yield conn
        except BaseException:
            await self._cleanup(entry, _rollback_and_close_conn(conn))
            raise
        try:
            await conn.commit()
        except Exception as exc:
            await self._cleanup(entry, _rollback_and_close_conn(conn))
            raise self._commit_failed(exc) from exc
        except BaseException:
            await self._cleanup(entry, _rollback_and_close_conn(conn))
            raise
        # The commit already ended the transaction; shielded, like every other cleanup.
        await self._cleanup(entry, conn.close(), after_commit=True)

    def _commit_failed(self, exc: Exception) -> CommitFailed:
        self._commit_failures += 1
        self._tally.add("commit_failures")
        detail = redact(f"{type(exc).__name__}: {exc}")
        if is_connection_error(exc):
            msg = (
                f"the connection to {self.address} was lost during COMMIT, so the outcome is "
                f"unknown ({detail}); check the data before retrying and do not report success"
            )
        else:
            msg = (
                f"COMMIT failed on {self.address} and the transaction was rolled back: nothing "
                f"was saved ({detail}); do not report success to the user"
            )
        _log.warning("%s", msg)
        return CommitFailed(msg)

    async def _cleanup(self, entry: _Engine, aw: Any, *, after_commit: bool = False) -> None:
        # Run the rollback/close even if this task is cancelled again while it runs: shield
        # it in its own task, kept referenced until done (the loop only holds tasks weakly).
        task: asyncio.Task[None] = asyncio.ensure_future(aw)
        if not task.done():
            entry.cleanups.add(task)
            task.add_done_callback(entry.cleanups.discard)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - routed: counted and logged; the caller has its outcome
            # A rollback/close that fails leaves SQLAlchemy to invalidate the connection; the
            # caller already has the real outcome (its error, CommitFailed, or a commit).
            if after_commit:
                self._close_failed_after_commit(task.exception())
            else:
                self._cleanup_failures += 1
                self._tally.add("cleanup_failures")
                _log.warning(
                    "closing a session failed; its connection was invalidated", exc_info=True
                )

    def _close_failed_after_commit(self, exc: BaseException | None) -> None:
        self._cleanup_failures += 1
        self._tally.add("cleanup_failures")
        _log.warning(
            "COMMIT succeeded on %s (the data is saved) but releasing the connection failed "
            "afterwards; the connection was invalidated",
            self.address,
            exc_info=exc,
        )

    def _entry(self) -> _Engine:
        if self._closed:
            raise ResourceClosed(f"{self!r} is closed; create a new Database")
        return self._engines.get()

    # -- raw connections ----------------------------------------------------------------------

    async def _acquire(self) -> tuple[PoolProxiedConnection, Any]:
        entry = self._entry()
        pool = entry.engine.sync_engine.pool
        try:
            # An idle connection that needs no ping/recycle is handed out without a greenlet.
            fairy = checkout_without_io(pool, self.pool.pre_ping_idle)
            if fairy is None:
                fairy = await greenlet_spawn(pool.connect)  # may open, ping or wait: I/O
        except Exception as exc:
            mapped = map_error(exc, self._target)
            if mapped is None:
                raise
            raise mapped from exc
        return fairy, pool

    def _raise_mapped(self, exc: BaseException) -> None:
        mapped = map_error(exc, self._target)
        if mapped is not None:
            raise mapped from exc

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection[Any]]:
        """The raw asyncpg connection of a pooled connection (for COPY, LISTEN, ``executemany``).

        It is in autocommit mode; a transaction you open and leave open is rolled back when the
        block ends. The connection goes back to the pool in every case (it is closed and
        replaced if the block was cancelled mid-statement or the connection broke).
        """
        token = _open_block(sys._getframe(2))  # the caller (above contextlib's __aenter__)
        try:
            fairy, pool = await self._acquire()
        finally:
            _close_block(token)  # the checkout is recorded: later ones are not this block's
        try:
            yield driver_of(fairy)
        except BaseException as exc:
            await release(fairy, pool, exc)
            self._raise_mapped(exc)
            raise
        await release(fairy, pool, None)

    async def _one_shot(self, method: str, sql: str, args: tuple[Any, ...], **kw: Any) -> Any:
        # One statement on a pooled connection that never leaves this method: leased straight
        # from the pool's queue when no I/O is needed (see _pool.py), else checked out through
        # SQLAlchemy's pool. Given back in every case, also on cancellation.
        entry = self._entry()
        # Read the pool each time: engine.dispose() swaps in a new one, and a lease given back
        # to the old pool would live on there, uncounted and never closed.
        pool = entry.engine.sync_engine.pool
        rec = lease_without_io(pool, self.pool.pre_ping_idle)
        if rec is None:
            return await self._one_shot_checkout(method, sql, args, kw)
        leaks = entry.leaks
        leaks.lease(rec)  # when, and by which task (its stack is read only if reported)
        try:
            result = await getattr(rec.dbapi_connection.driver_connection, method)(sql, *args, **kw)
        except BaseException as exc:
            disposed = entry.engine.sync_engine.pool is not pool
            await release_lease(rec, pool, leaks, exc, disposed=disposed)
            self._raise_mapped(exc)
            raise
        await release_lease(
            rec, pool, leaks, None, disposed=entry.engine.sync_engine.pool is not pool
        )
        return result

    async def _one_shot_checkout(
        self, method: str, sql: str, args: tuple[Any, ...], kw: dict[str, Any]
    ) -> Any:
        fairy, pool = await self._acquire()
        try:
            result = await getattr(driver_of(fairy), method)(sql, *args, **kw)
        except BaseException as exc:
            await release(fairy, pool, exc)
            self._raise_mapped(exc)
            raise
        await release(fairy, pool, None)
        return result

    async def fetchval(self, sql: str, *args: Any, column: int = 0) -> Any:
        """Run ``sql`` on a pooled connection and return one value (one round trip, no BEGIN).

        Example::

            name = await db.fetchval("SELECT name FROM users WHERE id = $1", 42)
        """
        if column:
            return await self._one_shot("fetchval", sql, args, column=column)
        return await self._one_shot("fetchval", sql, args)

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        """Run ``sql`` on a pooled connection and return the first row, or ``None``."""
        row: asyncpg.Record | None = await self._one_shot("fetchrow", sql, args)
        return row

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """Run ``sql`` on a pooled connection and return every row."""
        rows: list[asyncpg.Record] = await self._one_shot("fetch", sql, args)
        return rows

    async def execute(self, sql: str, *args: Any) -> str:
        """Run ``sql`` on a pooled connection in autocommit mode; return the status tag."""
        status: str = await self._one_shot("execute", sql, args)
        return status

    # -- readiness, stats, lifecycle ----------------------------------------------------------

    async def wait_ready(self, timeout: float = 30.0) -> float:
        """Wait until a real query succeeds through this database's pool; return the seconds.

        Retries what waiting can cure (refused connection, "the database system is starting
        up") with bounded, jittered exponential backoff; fails at once on what it cannot (a
        wrong password or database name).

        Raises:
            NotReady: not ready within ``timeout`` (the message has the redacted URL, the last
                error and what to check), or refused for good.
            ConfigError: ``timeout`` is not a positive number of seconds.
        """
        check_seconds("timeout", timeout)

        async def probe(budget: float) -> None:
            async with asyncio.timeout(budget):
                await self.fetchval("SELECT 1")

        return await wait_until_ready("PostgreSQL", self.url, probe, timeout=timeout)

    def stats(self) -> DatabaseStats:
        """A snapshot of the pools of every loop in this process (see :class:`DatabaseStats`).

        Also reports connections held past ``leak_threshold`` and drops the engines of loops
        that were closed without disposing them (the metrics scrape does neither).
        """
        self._leaks.sweep()
        gauges = self._gauges(self._engines.peek())
        return DatabaseStats(
            name=self.name,
            engines_alive=gauges["engines_alive"],
            engines_disposed=self._engines.disposed,
            pool_size=gauges["pool_size"],
            idle=gauges["idle"],
            checked_out=gauges["checked_out"],
            overflow=gauges["overflow"],
            waiting=gauges["waiting"],
            capacity=gauges["capacity"],
            leaks=self._leaks.leaks,
            leaks_unreturned=self._leaks.unreturned,
            commit_failures=self._commit_failures,
            cleanup_failures=self._cleanup_failures,
            dispose_failures=self._engines.dispose_failures,
            engines_idle_loops=gauges["engines_idle_loops"],
        )

    def _gauges(self, engines: list[_Engine] | None = None) -> dict[str, int]:
        # Read-only (the metrics collector calls it from the scrape thread): no sweep, no reap.
        if engines is None:
            engines = self._engines.values()
        pool_size = idle = checked_out = overflow = waiting = 0
        for entry in engines:
            pool: Any = entry.engine.sync_engine.pool
            try:
                opened = pool.size() + pool.overflow()
                pool_size += opened
                idle += pool.checkedin()
                checked_out += pool.checkedout()
                overflow += max(0, pool.overflow())
                waiting += pool_waiters(pool)
            except AttributeError:  # a pool class without QueuePool's counters
                continue
        return {
            "engines_alive": len(engines),
            "engines_idle_loops": self._engines.idle_loops(),
            "pool_size": pool_size,
            "idle": idle,
            "checked_out": checked_out,
            "overflow": overflow,
            "waiting": waiting,
            "capacity": self.pool.capacity * len(engines),
        }

    def leak_reports(self) -> list[LeakReport]:
        """The most recent leak reports (at most 100), oldest first."""
        self._leaks.sweep()
        return list(self._leaks.reports)

    async def dispose(self) -> None:
        """Close the running loop's engine and its connections; the next use opens a new one."""
        await self._engines.retire_current()

    async def close(self) -> None:
        """Dispose the running loop's engine and refuse further use.

        Engines of other loops are disposed when those loops shut down.
        """
        self._closed = True
        await self._engines.retire_current()

    async def __aenter__(self) -> Database:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class _SessionBlock:
    """``async with db.session()``: a class, not ``@asynccontextmanager``, because the
    generator machinery costs a few percent of a point query (see BENCHMARKS.md)."""

    __slots__ = ("_db", "_entry", "_options", "_session", "_token")

    def __init__(self, db: Database, options: dict[str, Any]) -> None:
        self._db = db
        self._options = options

    async def __aenter__(self) -> AsyncSession:
        db = self._db
        if db._closed:
            raise ResourceClosed(f"{db!r} is closed; create a new Database")
        entry = self._entry = db._engines.get()
        options = self._options
        session = entry.sessions(**options) if options else entry.new_session()
        self._session: AsyncSession = session
        # The session checks out at its first statement: until the block ends, a checkout in
        # this context is recorded as this block's (its line, and the task's stack if reported).
        caller = sys._getframe(1)
        self._token = OPENER.set((caller.f_code, caller.f_lasti))
        return session

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        db, entry, session = self._db, self._entry, self._session
        try:  # noqa: SIM105 - as _close_block, inlined: once per block
            OPENER.reset(self._token)
        except ValueError:  # left in another context than it was entered in
            pass
        if exc is not None:
            # The block failed: roll back and close (shielded), then raise the error, driver
            # errors mapped at the boundary (the original is the cause).
            await db._cleanup(entry, _rollback_and_close(session))
            mapped = translate(exc, db._target)
            if mapped is not None:
                raise mapped from exc
            return False
        try:
            # session.run_sync(_commit), minus its frame: one trip through the greenlet.
            released = await greenlet_spawn(_commit, session.sync_session)
        except Exception as err:
            await db._cleanup(entry, _rollback_and_close(session))
            raise db._commit_failed(err) from err
        except BaseException:
            await db._cleanup(entry, _rollback_and_close(session))
            raise
        # Told apart from the COMMIT: a release or close that fails after a good COMMIT is not
        # a failed commit (the data is saved); it is logged and counted, and closed again.
        if released is not None:
            db._close_failed_after_commit(released)
            await db._cleanup(entry, session.close(), after_commit=True)
        return False


def _open_block(caller: Any) -> contextvars.Token[tuple[CodeType, int] | None]:
    """Record ``caller``'s line as the opener of the checkouts until :func:`_close_block`."""
    return OPENER.set((caller.f_code, caller.f_lasti))


def _close_block(token: contextvars.Token[tuple[CodeType, int] | None]) -> None:
    # Left in another context than it was entered in: nothing to undo here. A try, not
    # contextlib.suppress: this runs once per block, and suppress costs an object and two calls.
    try:  # noqa: SIM105
        OPENER.reset(token)
    except ValueError:
        pass


def _json_dumps_str(value: Any) -> str:
    return orjson.dumps(value).decode()


class _TrackedSession(Session):
    """A ``Session`` that records when the database accepted its COMMIT (``after_commit``).

    In an attribute, not in ``session.info``: that dict is made on first use, per session.
    """

    _sheetanchor_committed = False


def _mark_committed(session: Session) -> None:
    tracked: Any = session
    tracked._sheetanchor_committed = True


event.listen(_TrackedSession, "after_commit", _mark_committed)


def _commit(session: Session) -> Exception | None:
    """COMMIT, then close; return what failed *after* the database committed, or ``None``.

    ``Session.commit()`` also gives its connection back to the pool; a failure there (a pool
    ``checkin`` listener, a reset that breaks) is raised by ``commit()`` although the data is
    saved. Such a failure, or one in the close that follows, is returned, not raised; a
    failure before the COMMIT is raised. COMMIT and close share one trip through SQLAlchemy's
    greenlet: a second trip costs ~10 % of a point query.
    """
    tracked: Any = session
    tracked._sheetanchor_committed = False  # a COMMIT inside the block has set it already
    try:
        session.commit()
    except Exception as exc:
        if not getattr(session, "_sheetanchor_committed", False):
            raise
        return exc
    try:
        session.close()
    except Exception as exc:  # noqa: BLE001 - returned: counted and logged by the caller
        return exc
    return None


async def _rollback_and_close(session: AsyncSession) -> None:
    try:
        await session.rollback()
    finally:
        await session.close()


async def _rollback_and_close_conn(conn: AsyncConnection) -> None:
    try:
        await conn.rollback()
    finally:
        await conn.close()
