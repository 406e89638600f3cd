"""``Database``: a PostgreSQL client that is safe as a module-level global.

One SQLAlchemy ``AsyncEngine`` (asyncpg) per process and running event loop, created on first
use and disposed with its loop (see ``_loops.py``); sessions, transactions and raw connections
that always go back to the pool; a leak watch; driver errors mapped at one boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import asyncpg
import orjson
from sqlalchemy import event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn

from sheetanchor.config import parse_url, pg_url_from_env, redact, to_sqlalchemy_url
from sheetanchor.errors import CommitFailed, ConfigError, NotReady, ResourceClosed
from sheetanchor.observe import get_logger
from sheetanchor.postgres._errors import is_connection_error, translate_errors
from sheetanchor.postgres._json import install_json_codecs
from sheetanchor.postgres._leaks import LeakReport, LeakWatch
from sheetanchor.postgres._loops import PerLoop
from sheetanchor.postgres._settings import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT,
    DEFAULT_LEAK_THRESHOLD,
    DEFAULT_STATEMENT_TIMEOUT,
    PoolSettings,
    check_name,
    check_seconds,
)
from sheetanchor.postgres._stats import DatabaseStats, register_source

try:  # SQLAlchemy 2.1 renamed await_only to await_
    from sqlalchemy.util import await_ as _await
except ImportError:  # pragma: no cover - SQLAlchemy 2.0
    from sqlalchemy.util import await_only as _await

__all__ = ["Database"]

_log = get_logger("postgres")
_IDLE_SINCE = "sheetanchor_idle_since"


@dataclass(slots=True)
class _Engine:
    """The engine of one event loop and what hangs off it."""

    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    forget_leaks: Any
    timer: asyncio.TimerHandle | None = None
    cleanups: set[asyncio.Task[None]] = field(default_factory=set)


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
        engine_options: extra keyword arguments for ``create_async_engine`` (``echo=True``...).

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
        self._closed = False
        self._commit_failures = 0
        self._leaks = LeakWatch(name, leak_threshold)
        self._engines: PerLoop[_Engine] = PerLoop(
            self._create_engine, self._dispose_engine, self._abandon_engine, what="engine"
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
        import os

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
            # Our checkout hook below pings only connections idle > pre_ping_idle.
            "pool_pre_ping": False,
            "json_serializer": _json_dumps_str,
            "json_deserializer": orjson.loads,
            "connect_args": self._connect_args(),
        }
        options.update(self._engine_options)
        engine = create_async_engine(self._sa_url, **options)
        sync_pool = engine.sync_engine.pool
        if self.json_codecs:
            event.listen(sync_pool, "connect", _on_connect_json)
        event.listen(sync_pool, "connect", _on_connect_mark)
        event.listen(sync_pool, "checkout", self._make_checkout_check())
        event.listen(sync_pool, "checkin", _on_checkin_mark)
        forget = self._leaks.attach(sync_pool)  # after the health check: only good checkouts
        entry = _Engine(
            engine=engine,
            sessions=async_sessionmaker(engine, expire_on_commit=False),
            forget_leaks=forget,
        )
        self._schedule_sweep(entry)
        _log.debug("engine created for %s (role %s)", self.url, self.role)
        return entry

    def _make_checkout_check(self) -> Any:
        idle_limit = self.pool.pre_ping_idle

        def on_checkout(dbapi_conn: Any, rec: Any, proxy: Any) -> None:
            driver = dbapi_conn.driver_connection
            # Free check: the server closed it (pg_terminate_backend, restart) while it sat in
            # the pool and the loop already read the EOF.
            if driver.is_closed():
                raise DisconnectionError("connection closed by the server while idle in the pool")
            if idle_limit is None:
                return
            idle_since = rec.info.get(_IDLE_SINCE)
            if idle_since is not None and time.monotonic() - idle_since >= idle_limit:
                try:
                    _await(driver.execute("SELECT 1"))  # simple query: one round trip
                except Exception as exc:
                    raise DisconnectionError(f"ping failed: {exc}") from exc

        return on_checkout

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
        entry.forget_leaks()
        await entry.engine.dispose()

    def _abandon_engine(self, entry: _Engine) -> None:
        # The loop that owned the sockets is closed or gone: no protocol I/O is possible. Close
        # the idle sockets (the server sees the disconnect at once) and drop the pool.
        entry.timer = None
        entry.forget_leaks()
        sync_engine = entry.engine.sync_engine
        _close_dead_loop_sockets(sync_engine.pool)
        sync_engine.dispose(close=False)

    # -- sessions -----------------------------------------------------------------------------

    @asynccontextmanager
    async def session(self, **options: Any) -> AsyncIterator[AsyncSession]:
        """An ``AsyncSession``: committed on success, rolled back on error, always closed.

        Closed also when the task is cancelled or the commit fails. ``expire_on_commit`` is
        off, so objects stay readable after the block.

        Raises:
            CommitFailed: COMMIT failed; nothing was saved (cause chained).
            ConnectionLost: the connection dropped inside the block.
            PoolTimeout: no connection became free in time.
        """
        entry = self._entry()
        session = entry.sessions(**options)
        try:
            with translate_errors(self.address):
                yield session
        except BaseException:
            await self._cleanup(entry, _rollback_and_close(session))
            raise
        try:
            await session.commit()
        except Exception as exc:
            await self._cleanup(entry, _rollback_and_close(session))
            raise self._commit_failed(exc) from exc
        except BaseException:
            await self._cleanup(entry, _rollback_and_close(session))
            raise
        await self._cleanup(entry, session.close())

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """A Core ``AsyncConnection`` inside BEGIN ... COMMIT (ROLLBACK on error).

        Raises:
            CommitFailed: COMMIT failed; nothing was saved (cause chained).
        """
        entry = self._entry()
        with translate_errors(self.address):
            conn = await entry.engine.connect()
        try:
            with translate_errors(self.address):
                await conn.begin()
            with translate_errors(self.address):
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
        await self._cleanup(entry, conn.close())

    def _commit_failed(self, exc: Exception) -> CommitFailed:
        self._commit_failures += 1
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
        _log.error("%s", msg)
        return CommitFailed(msg)

    async def _cleanup(self, entry: _Engine, aw: Any) -> None:
        # Run the rollback/close even if this task is cancelled again while it runs: shield
        # it in its own task, kept referenced until done (the loop only holds tasks weakly).
        task: asyncio.Task[None] = asyncio.ensure_future(aw)
        if task.done():
            task.result()
            return
        entry.cleanups.add(task)
        task.add_done_callback(entry.cleanups.discard)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - routed: logged; the caller gets its own outcome
            # A rollback/close that fails leaves SQLAlchemy to invalidate the connection; the
            # caller already has the real outcome (its error, CommitFailed, or a commit).
            _log.warning("closing a session failed; its connection was invalidated", exc_info=True)

    def _entry(self) -> _Engine:
        if self._closed:
            raise ResourceClosed(f"{self!r} is closed; create a new Database")
        return self._engines.get()

    # -- raw connections ----------------------------------------------------------------------

    async def _acquire(self) -> tuple[PoolProxiedConnection, _Engine]:
        entry = self._entry()
        with translate_errors(self.address):
            fairy = await entry.engine.raw_connection()
        return fairy, entry

    async def _release(self, fairy: PoolProxiedConnection, failure: BaseException | None) -> None:
        driver = _driver(fairy)
        if failure is not None and (
            not isinstance(failure, Exception) or is_connection_error(failure)
        ):
            # Cancelled mid-statement, or the connection is gone: it cannot be trusted. Close the
            # socket now (no I/O to wait for) and let the pool replace it.
            driver.terminate()
            fairy.invalidate(failure if isinstance(failure, Exception) else None)
            return
        if not driver.is_closed() and driver.is_in_transaction():
            # A transaction opened on the raw connection and left open: end it before reuse.
            try:
                await driver.execute("ROLLBACK")
            except BaseException as exc:
                driver.terminate()
                fairy.invalidate(exc if isinstance(exc, Exception) else None)
                raise
        # Checkin may close an overflow connection, which needs SQLAlchemy's greenlet.
        await greenlet_spawn(fairy.close)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection[Any]]:
        """The raw asyncpg connection of a pooled connection (for COPY, LISTEN, ``executemany``).

        It is in autocommit mode; a transaction you open and leave open is rolled back when the
        block ends. The connection goes back to the pool in every case (it is closed and
        replaced if the block was cancelled mid-statement or the connection broke).
        """
        fairy, _entry = await self._acquire()
        failure: BaseException | None = None
        try:
            with translate_errors(self.address):
                yield _driver(fairy)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            await self._release(fairy, failure)

    async def fetchval(self, sql: str, *args: Any, column: int = 0) -> Any:
        """Run ``sql`` on a pooled connection and return one value (one round trip, no BEGIN).

        Example::

            name = await db.fetchval("SELECT name FROM users WHERE id = $1", 42)
        """
        fairy, _entry = await self._acquire()
        failure: BaseException | None = None
        try:
            with translate_errors(self.address):
                return await _driver(fairy).fetchval(sql, *args, column=column)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            await self._release(fairy, failure)

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        """Run ``sql`` on a pooled connection and return the first row, or ``None``."""
        fairy, _entry = await self._acquire()
        failure: BaseException | None = None
        try:
            with translate_errors(self.address):
                row: asyncpg.Record | None = await _driver(fairy).fetchrow(sql, *args)
                return row
        except BaseException as exc:
            failure = exc
            raise
        finally:
            await self._release(fairy, failure)

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """Run ``sql`` on a pooled connection and return every row."""
        fairy, _entry = await self._acquire()
        failure: BaseException | None = None
        try:
            with translate_errors(self.address):
                rows: list[asyncpg.Record] = await _driver(fairy).fetch(sql, *args)
                return rows
        except BaseException as exc:
            failure = exc
            raise
        finally:
            await self._release(fairy, failure)

    async def execute(self, sql: str, *args: Any) -> str:
        """Run ``sql`` on a pooled connection in autocommit mode; return the status tag."""
        fairy, _entry = await self._acquire()
        failure: BaseException | None = None
        try:
            with translate_errors(self.address):
                status: str = await _driver(fairy).execute(sql, *args)
                return status
        except BaseException as exc:
            failure = exc
            raise
        finally:
            await self._release(fairy, failure)

    # -- readiness, stats, lifecycle ----------------------------------------------------------

    async def wait_ready(self, timeout: float = 30.0) -> float:
        """Wait until a real query succeeds; return the seconds it took.

        Retries with bounded exponential backoff (0.05 s doubling to 2 s, jittered).

        Raises:
            NotReady: no query succeeded within ``timeout`` (with the last error).
        """
        check_seconds("timeout", timeout)
        start = time.monotonic()
        deadline = start + timeout
        delay = 0.05
        last: str | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(min(remaining, self.connect_timeout + 1.0)):
                    await self.fetchval("SELECT 1")
                return time.monotonic() - start
            except (Exception, TimeoutError) as exc:  # noqa: BLE001 - every failure is retried
                last = redact(f"{type(exc).__name__}: {exc}".rstrip(": "))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await asyncio.sleep(min(remaining, delay * random.uniform(0.5, 1.0)))
            delay = min(delay * 2, 2.0)
        raise NotReady(
            f"PostgreSQL at {self.address} not ready after {timeout:.1f} s "
            f"(last error: {last or 'none'}); is it running and reachable? check "
            f"{self.url} (SHEETANCHOR_PG_URL), or raise wait_ready(timeout=)",
            target=self.url,
            last_error=last,
        )

    def stats(self) -> DatabaseStats:
        """A snapshot of the pools of every loop in this process (see :class:`DatabaseStats`)."""
        self._leaks.sweep()
        engines = self._engines.peek()
        pool_size = idle = checked_out = overflow = waiting = 0
        for entry in engines:
            pool: Any = entry.engine.sync_engine.pool
            try:
                opened = pool.size() + pool.overflow()
                pool_size += opened
                idle += pool.checkedin()
                checked_out += pool.checkedout()
                overflow += max(0, pool.overflow())
                waiting += _waiters(pool)
            except AttributeError:  # a pool class without QueuePool's counters
                continue
        return DatabaseStats(
            name=self.name,
            engines_alive=len(engines),
            engines_disposed=self._engines.disposed,
            pool_size=pool_size,
            idle=idle,
            checked_out=checked_out,
            overflow=overflow,
            waiting=waiting,
            capacity=self.pool.capacity * len(engines),
            leaks=self._leaks.leaks,
            leaks_unreturned=self._leaks.unreturned,
            commit_failures=self._commit_failures,
        )

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


def _driver(fairy: PoolProxiedConnection) -> asyncpg.Connection[Any]:
    return cast("asyncpg.Connection[Any]", fairy.driver_connection)


def _json_dumps_str(value: Any) -> str:
    return orjson.dumps(value).decode()


def _on_connect_json(dbapi_conn: Any, rec: Any) -> None:
    _await(install_json_codecs(dbapi_conn.driver_connection))


def _on_connect_mark(dbapi_conn: Any, rec: Any) -> None:
    rec.info[_IDLE_SINCE] = time.monotonic()


def _on_checkin_mark(dbapi_conn: Any, rec: Any) -> None:
    rec.info[_IDLE_SINCE] = time.monotonic()


def _close_dead_loop_sockets(pool: Any) -> None:
    """Close the sockets of a closed loop's idle connections without that loop.

    Only for a loop that is already closed (its selector is gone, so nothing is shared with a
    live loop). Uses private attributes of asyncio's selector transports and asyncpg, guarded:
    where they are missing (uvloop) the sockets are left to the garbage collector.
    """
    queue = getattr(getattr(pool, "_pool", None), "__dict__", {}).get("_queue")
    for rec in list(getattr(queue, "_queue", ())):
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


def _waiters(pool: Any) -> int:
    # Tasks blocked in the pool's asyncio queue (private, hence best effort).
    queue = getattr(pool, "_pool", None)
    inner = getattr(queue, "__dict__", {}).get("_queue")
    getters = getattr(inner, "_getters", ())
    return sum(1 for fut in getters if not fut.done())


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
