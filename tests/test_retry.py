"""is_transient() against real errors from real servers, and the retry policies.

Every classification of a database or Redis error is proven with the exception a real
server (or the real client talking to a closed port) raised, through asyncpg, SQLAlchemy's
asyncpg dialect and psycopg 3. The policies run on a fake clock: no real sleeping.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import socket
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import asyncpg
import psycopg
import pytest
import redis
import redis.asyncio as aredis
import sqlalchemy.exc as sa_exc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis._parsers import BaseParser
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from sheetanchor.config import to_asyncpg_dsn, to_sqlalchemy_url
from sheetanchor.errors import (
    ConnectionLost,
    NotReady,
    OperationTimeout,
    PoolTimeout,
    TransientError,
    WrongEventLoop,
)
from sheetanchor.observe import REGISTRY
from sheetanchor.retry import (
    DEFAULT_POLICY,
    STARTUP_POLICY,
    RetryPolicy,
    describe_error,
    is_connection_error,
    is_transient,
)

# --------------------------------------------------------------------------------------------
# Helpers: three real drivers behind one tiny interface, and a port nobody listens on.
# --------------------------------------------------------------------------------------------


class Driver(Protocol):
    name: str

    async def connect(self, url: str) -> Any: ...
    async def execute(self, conn: Any, sql: str) -> None: ...
    async def scalar(self, conn: Any, sql: str) -> Any: ...
    async def close(self, conn: Any) -> None: ...


class AsyncpgDriver:
    name = "asyncpg"

    async def connect(self, url: str) -> asyncpg.Connection:
        return await asyncpg.connect(to_asyncpg_dsn(url))

    async def execute(self, conn: asyncpg.Connection, sql: str) -> None:
        await conn.execute(sql)

    async def scalar(self, conn: asyncpg.Connection, sql: str) -> Any:
        return await conn.fetchval(sql)

    async def close(self, conn: asyncpg.Connection) -> None:
        await conn.close()


class SQLAlchemyDriver:
    """SQLAlchemy over asyncpg, autocommit, so tests spell BEGIN/COMMIT in SQL themselves."""

    name = "sqlalchemy"

    async def connect(self, url: str) -> tuple[AsyncEngine, AsyncConnection]:
        engine = create_async_engine(
            to_sqlalchemy_url(url), poolclass=NullPool, isolation_level="AUTOCOMMIT"
        )
        try:
            return engine, await engine.connect()
        except BaseException:
            await engine.dispose()
            raise

    async def execute(self, conn: tuple[AsyncEngine, AsyncConnection], sql: str) -> None:
        await conn[1].execute(text(sql))

    async def scalar(self, conn: tuple[AsyncEngine, AsyncConnection], sql: str) -> Any:
        return (await conn[1].execute(text(sql))).scalar()

    async def close(self, conn: tuple[AsyncEngine, AsyncConnection]) -> None:
        try:
            await conn[1].close()
        finally:
            await conn[0].dispose()


class PsycopgDriver:
    name = "psycopg"

    async def connect(self, url: str) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(to_asyncpg_dsn(url), autocommit=True)

    async def execute(self, conn: psycopg.AsyncConnection[Any], sql: str) -> None:
        await conn.execute(sql.encode())

    async def scalar(self, conn: psycopg.AsyncConnection[Any], sql: str) -> Any:
        cur = await conn.execute(sql.encode())
        row = await cur.fetchone()
        return None if row is None else row[0]

    async def close(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.close()


DRIVERS = [AsyncpgDriver(), SQLAlchemyDriver(), PsycopgDriver()]
driver_param = pytest.mark.parametrize("drv", DRIVERS, ids=lambda d: d.name)


def closed_port() -> int:
    """A local TCP port that was free a moment ago and that nobody listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def sqlstates(exc: BaseException) -> list[str]:
    """Every SQLSTATE found in the exception, what it wraps, its causes and contexts."""
    found: list[str] = []
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        cur = todo.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        state = getattr(cur, "sqlstate", None)
        if isinstance(state, str):
            found.append(state)
        for nxt in (getattr(cur, "orig", None), cur.__cause__, cur.__context__):
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    return found


async def capture(awaitable: Awaitable[object]) -> BaseException:
    """Await and return the exception it raised; fail when it did not raise."""
    try:
        await awaitable
    except Exception as exc:
        return exc
    pytest.fail("expected the server to raise an error")


async def wait_for_row(admin: asyncpg.Connection, sql: str, *args: object) -> None:
    """Poll until the query returns true (a condition, not a timing assumption)."""
    while not await admin.fetchval(sql, *args):
        await asyncio.sleep(0.01)


@pytest.fixture
async def admin(pg_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(to_asyncpg_dsn(pg_url))
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def table(admin: asyncpg.Connection) -> AsyncIterator[str]:
    """A fresh table ``t_<hex>(id int primary key, v int)`` with rows 1 and 2."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    await admin.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, v int NOT NULL)")
    await admin.execute(f"INSERT INTO {name} VALUES (1, 0), (2, 0)")
    try:
        yield name
    finally:
        await admin.execute(f"DROP TABLE IF EXISTS {name}")


# --------------------------------------------------------------------------------------------
# PostgreSQL: transient errors, produced for real
# --------------------------------------------------------------------------------------------


@driver_param
async def test_backend_terminated_during_query_is_transient(
    drv: Driver, pg_url: str, admin: asyncpg.Connection
) -> None:
    conn = await drv.connect(pg_url)
    try:
        pid = await drv.scalar(conn, "SELECT pg_backend_pid()")
        query = asyncio.ensure_future(drv.execute(conn, "SELECT pg_sleep(60)"))
        await wait_for_row(
            admin,
            "SELECT count(*) = 1 FROM pg_stat_activity "
            "WHERE pid = $1 AND state = 'active' AND query LIKE '%pg_sleep%'",
            pid,
        )
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        exc = await capture(query)
    finally:
        await drv.close(conn)

    assert "57P01" in sqlstates(exc), exc  # admin_shutdown reached the client
    assert is_transient(exc)
    assert is_connection_error(exc)


@driver_param
@pytest.mark.parametrize("wait_until_gone", [True, False], ids=["settled", "racing"])
async def test_backend_terminated_while_idle_is_transient(
    drv: Driver, pg_url: str, admin: asyncpg.Connection, wait_until_gone: bool
) -> None:
    errors: list[BaseException] = []
    # Without waiting, the server's FATAL races our next query; a few rounds see both orders.
    for _ in range(1 if wait_until_gone else 6):
        conn = await drv.connect(pg_url)
        try:
            pid = await drv.scalar(conn, "SELECT pg_backend_pid()")
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
            if wait_until_gone:
                await wait_for_row(
                    admin, "SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = $1", pid
                )
            errors.append(await capture(drv.execute(conn, "SELECT 1")))
        finally:
            await drv.close(conn)

    # asyncpg: ConnectionDoesNotExistError (08003), InterfaceError "connection is closed" or
    # InternalClientError "another operation (2) is in progress"; SQLAlchemy: a DBAPIError
    # with connection_invalidated=True around one of those; psycopg: an OperationalError.
    for exc in errors:
        assert is_transient(exc), repr(exc)
        assert is_connection_error(exc), repr(exc)


@driver_param
async def test_idle_session_timeout_is_transient(
    drv: Driver, pg_url: str, admin: asyncpg.Connection
) -> None:
    if await admin.fetchval("SELECT current_setting('server_version_num')::int") < 140000:
        pytest.skip("idle_session_timeout needs PostgreSQL 14")
    conn = await drv.connect(pg_url)
    try:
        pid = await drv.scalar(conn, "SELECT pg_backend_pid()")
        await drv.execute(conn, "SET idle_session_timeout = '20ms'")
        await wait_for_row(admin, "SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = $1", pid)
        exc = await capture(drv.execute(conn, "SELECT 1"))
    finally:
        await drv.close(conn)
    assert is_transient(exc), repr(exc)
    assert is_connection_error(exc), repr(exc)


async def test_sqlalchemy_exposes_sqlstate_on_the_adapted_error(
    pg_url: str, admin: asyncpg.Connection
) -> None:
    """Document the shape is_transient relies on: DBAPIError.orig.sqlstate, orig.__cause__."""
    drv = SQLAlchemyDriver()
    conn = await drv.connect(pg_url)
    try:
        exc = await capture(drv.execute(conn, "SELECT 1/0"))
    finally:
        await drv.close(conn)
    assert isinstance(exc, sa_exc.DBAPIError)
    assert not hasattr(exc, "sqlstate")
    assert exc.orig is not None
    assert getattr(exc.orig, "sqlstate", None) == "22012"
    assert isinstance(exc.orig.__cause__, asyncpg.DivisionByZeroError)


@driver_param
async def test_deadlock_is_transient(
    drv: Driver, pg_url: str, admin: asyncpg.Connection, table: str
) -> None:
    a = await drv.connect(pg_url)
    b = await drv.connect(pg_url)
    try:
        pid_a = await drv.scalar(a, "SELECT pg_backend_pid()")
        if await admin.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
            # Only makes the test quicker: b notices the deadlock, not a (default 1 s).
            await drv.execute(b, "SET deadlock_timeout = '20ms'")
        await drv.execute(a, "BEGIN")
        await drv.execute(a, f"UPDATE {table} SET v = v + 1 WHERE id = 1")
        await drv.execute(b, "BEGIN")
        await drv.execute(b, f"UPDATE {table} SET v = v + 1 WHERE id = 2")
        a_waits = asyncio.ensure_future(
            drv.execute(a, f"UPDATE {table} SET v = v + 1 WHERE id = 2")
        )
        await wait_for_row(
            admin,
            "SELECT count(*) = 1 FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'",
            pid_a,
        )
        b_closes_cycle = drv.execute(b, f"UPDATE {table} SET v = v + 1 WHERE id = 1")
        results = await asyncio.gather(a_waits, b_closes_cycle, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        await drv.execute(a, "ROLLBACK")
        await drv.execute(b, "ROLLBACK")
    finally:
        await drv.close(a)
        await drv.close(b)

    assert len(errors) == 1, results
    exc = errors[0]
    assert "40P01" in sqlstates(exc)
    assert is_transient(exc)
    assert not is_connection_error(exc)


@driver_param
async def test_serialization_failure_is_transient(drv: Driver, pg_url: str, table: str) -> None:
    a = await drv.connect(pg_url)
    b = await drv.connect(pg_url)
    try:
        await drv.execute(a, "BEGIN ISOLATION LEVEL SERIALIZABLE")
        await drv.scalar(a, f"SELECT v FROM {table} WHERE id = 1")  # takes the snapshot
        await drv.execute(b, f"UPDATE {table} SET v = v + 1 WHERE id = 1")  # commits
        exc = await capture(drv.execute(a, f"UPDATE {table} SET v = v + 1 WHERE id = 1"))
        await drv.execute(a, "ROLLBACK")
    finally:
        await drv.close(a)
        await drv.close(b)

    assert "40001" in sqlstates(exc)
    assert is_transient(exc)
    assert not is_connection_error(exc)


@driver_param
async def test_lock_timeout_is_transient_only_when_asked(
    drv: Driver, pg_url: str, table: str
) -> None:
    a = await drv.connect(pg_url)
    b = await drv.connect(pg_url)
    try:
        await drv.execute(a, "BEGIN")
        await drv.execute(a, f"UPDATE {table} SET v = v + 1 WHERE id = 1")
        await drv.execute(b, "SET lock_timeout = '20ms'")
        exc = await capture(drv.execute(b, f"UPDATE {table} SET v = v + 1 WHERE id = 1"))
        await drv.execute(a, "ROLLBACK")
    finally:
        await drv.close(a)
        await drv.close(b)

    assert "55P03" in sqlstates(exc)
    assert not is_transient(exc)
    assert is_transient(exc, lock_timeout_is_transient=True)


# --------------------------------------------------------------------------------------------
# PostgreSQL: permanent errors, produced for real
# --------------------------------------------------------------------------------------------


@driver_param
@pytest.mark.parametrize(
    ("sql", "state"),
    [
        ("SELEC 1", "42601"),  # syntax_error
        ("INSERT INTO {table} VALUES (1, 0)", "23505"),  # unique_violation
        ("SELECT 1 / 0", "22012"),  # division_by_zero
        ("SELECT 'abc'::int", "22P02"),  # invalid_text_representation
    ],
    ids=["syntax", "unique", "division", "invalid-text"],
)
async def test_statement_errors_are_not_transient(
    drv: Driver, pg_url: str, table: str, sql: str, state: str
) -> None:
    conn = await drv.connect(pg_url)
    try:
        exc = await capture(drv.execute(conn, sql.format(table=table)))
    finally:
        await drv.close(conn)
    assert state in sqlstates(exc)
    assert not is_transient(exc)
    assert not is_transient(exc, lock_timeout_is_transient=True)
    assert not is_connection_error(exc)


@driver_param
async def test_connect_to_closed_port_is_transient(drv: Driver) -> None:
    url = f"postgresql://postgres@127.0.0.1:{closed_port()}/postgres"
    exc = await capture(drv.connect(url))
    assert is_transient(exc), repr(exc)
    assert is_connection_error(exc)


async def test_another_operation_in_progress_is_not_transient(pg_url: str) -> None:
    conn = await asyncpg.connect(to_asyncpg_dsn(pg_url))
    try:
        results = await asyncio.gather(
            conn.execute("SELECT pg_sleep(0.05)"), conn.execute("SELECT 1"), return_exceptions=True
        )
    finally:
        await conn.close()
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1
    assert "another operation is in progress" in str(errors[0])
    assert isinstance(errors[0], asyncpg.InterfaceError)
    assert not is_transient(errors[0])


def test_attached_to_a_different_loop_is_not_transient(pg_url: str) -> None:
    """An asyncpg connection made in one event loop, used in another (incident 002)."""
    home = asyncio.new_event_loop()
    try:
        conn = home.run_until_complete(asyncpg.connect(to_asyncpg_dsn(pg_url)))
        try:

            async def use_elsewhere() -> BaseException:
                return await capture(conn.fetchval("SELECT 1"))

            exc = asyncio.run(use_elsewhere())
        finally:
            home.run_until_complete(conn.close())
    finally:
        home.close()
    assert isinstance(exc, RuntimeError)
    assert "attached to a different loop" in str(exc)
    assert not is_transient(exc)
    assert not is_transient(sa_exc.DBAPIError("SELECT 1", None, exc))


# --------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------


def test_redis_sync_connect_to_closed_port_is_transient() -> None:
    # No client-side retries: the error itself is what is under test.
    client = redis.Redis(
        host="127.0.0.1", port=closed_port(), socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
    )
    try:
        with pytest.raises(redis.ConnectionError) as info:
            client.ping()
    finally:
        client.close()
    assert is_transient(info.value)
    assert is_connection_error(info.value)


async def test_redis_asyncio_connect_to_closed_port_is_transient() -> None:
    client = aredis.Redis(
        host="127.0.0.1",
        port=closed_port(),
        socket_connect_timeout=2,
        retry=AsyncRetry(NoBackoff(), 0),
    )
    try:
        exc = await capture(client.ping())
    finally:
        await client.aclose()
    assert isinstance(exc, redis.ConnectionError)
    assert is_transient(exc)


async def test_redis_wrong_type_is_not_transient(redis_url: str) -> None:
    client = aredis.Redis.from_url(redis_url)
    try:
        await client.set("sa:retry:string", "x")
        exc = await capture(client.lpush("sa:retry:string", "y"))
        await client.delete("sa:retry:string")
    finally:
        await client.aclose()
    assert isinstance(exc, redis.ResponseError)
    assert "WRONGTYPE" in str(exc)
    assert not is_transient(exc)

    sync = redis.Redis.from_url(redis_url)
    try:
        sync.set("sa:retry:string", "x")
        with pytest.raises(redis.ResponseError) as info:
            sync.lpush("sa:retry:string", "y")
        sync.delete("sa:retry:string")
    finally:
        sync.close()
    assert not is_transient(info.value)


@pytest.mark.parametrize(
    ("reply", "transient"),
    [
        ("LOADING Redis is loading the dataset in memory", True),
        ("READONLY You can't write against a read only replica.", True),
        ("TRYAGAIN Multiple keys request during rehashing of slot", True),
        ("CLUSTERDOWN The cluster is down", True),
        ("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.", True),
        ("ERR max number of clients reached", True),
        ("WRONGPASS invalid username-password pair or user is disabled.", False),
        ("NOAUTH Authentication required.", False),
        ("NOSCRIPT No matching script. Please use EVAL.", False),
        ("MOVED 3999 127.0.0.1:6381", False),
        ("OOM command not allowed when used memory > 'maxmemory'.", False),
    ],
)
def test_redis_error_replies(reply: str, transient: bool) -> None:
    # The server's error line, turned into an exception by redis-py's own reply parser
    # (the servers we can use in tests are never loading, read-only or clustered).
    exc = BaseParser.parse_error(reply)
    assert is_transient(exc) is transient


# --------------------------------------------------------------------------------------------
# The classifier without a server: builtins, sheetanchor errors, chains and groups
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (asyncio.CancelledError(), False),
        (KeyboardInterrupt(), False),
        (TimeoutError("connect timed out"), True),
        (ConnectionResetError(errno.ECONNRESET, "reset"), True),
        (BrokenPipeError(errno.EPIPE, "pipe"), True),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), True),
        (OSError(errno.ENOSPC, "No space left"), False),
        (socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"), True),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), False),
        (TransientError("x"), True),
        (ConnectionLost("x"), True),
        (OperationTimeout("x"), True),
        (NotReady("x"), False),
        (PoolTimeout("x"), False),
        (WrongEventLoop("x"), False),
        (ValueError("x"), False),
        (RuntimeError("Event loop is closed"), False),
        (sa_exc.DisconnectionError("pre-ping failed"), True),
        (sa_exc.DBAPIError("SELECT 1", None, RuntimeError("?"), connection_invalidated=True), True),
    ],
    ids=repr,
)
def test_classifier_table(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_explicit_cause_is_followed_but_context_is_not() -> None:
    caused = RuntimeError("wrapper")
    caused.__cause__ = ConnectionRefusedError(errno.ECONNREFUSED, "refused")
    assert is_transient(caused)

    during_handling = RuntimeError("wrapper")
    during_handling.__context__ = ConnectionRefusedError(errno.ECONNREFUSED, "refused")
    assert not is_transient(during_handling)


class Hostile(Exception):
    """An exception whose message and attributes blow up when looked at."""

    def __str__(self) -> str:
        raise RuntimeError("no message for you")

    @property
    def sqlstate(self) -> str:
        raise RuntimeError("no sqlstate either")


def test_classifier_survives_hostile_exceptions() -> None:
    assert not is_transient(Hostile())
    wrapper = sa_exc.DBAPIError("SELECT 1", None, Hostile())
    assert not is_transient(wrapper)
    assert describe_error(Hostile()) == "Hostile"
    caused = RuntimeError("x")
    caused.__cause__ = Hostile()
    assert not is_transient(caused)


def test_cycles_and_groups() -> None:
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__cause__ = b, a
    assert not is_transient(a)

    refused = ConnectionRefusedError(errno.ECONNREFUSED, "refused")
    assert is_transient(ExceptionGroup("all transient", [refused, TimeoutError()]))
    assert is_connection_error(ExceptionGroup("all transient", [refused, TimeoutError()]))
    assert not is_transient(ExceptionGroup("mixed", [refused, ValueError("bad")]))
    assert not is_transient(BaseExceptionGroup("cancelled", [asyncio.CancelledError(), refused]))


_LEAVES: list[Callable[[], BaseException]] = [
    ValueError,
    RuntimeError,
    asyncio.CancelledError,
    KeyboardInterrupt,
    lambda: ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
    lambda: OSError(errno.EIO, "io"),
    lambda: TimeoutError(),
    lambda: TransientError("t"),
    lambda: NotReady("n"),
    lambda: asyncpg.InterfaceError("connection is closed"),
    lambda: asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
    lambda: redis.ConnectionError("Error 111"),
    lambda: redis.ResponseError("WRONGTYPE"),
    lambda: redis.exceptions.AuthenticationError("WRONGPASS"),
    lambda: RuntimeError("got Future attached to a different loop"),
    lambda: psycopg.OperationalError("connection failed"),
    Hostile,
]


@st.composite
def exception_trees(draw: st.DrawFn, depth: int = 0) -> BaseException:
    """Arbitrary exceptions: leaves, odd sqlstate attributes, wrappers, groups, cycles."""
    kind = draw(
        st.sampled_from(["leaf", "sqlstate", "dbapi", "group", "cause"] if depth < 4 else ["leaf"])
    )
    exc: BaseException
    if kind == "leaf":
        exc = draw(st.sampled_from(_LEAVES))()
    elif kind == "sqlstate":
        exc = Exception(draw(st.text(max_size=20)))
        exc.sqlstate = draw(st.one_of(st.none(), st.text(max_size=6), st.integers()))  # type: ignore[attr-defined]
        exc.pgcode = draw(st.one_of(st.none(), st.text(max_size=6)))  # type: ignore[attr-defined]
    elif kind == "dbapi":
        exc = sa_exc.DBAPIError(
            draw(st.one_of(st.none(), st.text(max_size=10))),
            None,
            draw(exception_trees(depth + 1)),
            connection_invalidated=draw(st.booleans()),
        )
    elif kind == "group":
        members = draw(st.lists(exception_trees(depth + 1), min_size=1, max_size=3))
        exc = BaseExceptionGroup("group", members)
    else:
        exc = RuntimeError(draw(st.text(max_size=30)))
        exc.__cause__ = draw(exception_trees(depth + 1))
    exc.__context__ = draw(st.one_of(st.none(), st.builds(ValueError)))
    if draw(st.booleans()) and exc.__cause__ is not None:
        exc.__cause__.__cause__ = exc  # a cycle
    return exc


@given(exception_trees(), st.booleans())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_classifier_is_total_on_arbitrary_trees(exc: BaseException, lock_ok: bool) -> None:
    verdict = is_transient(exc, lock_timeout_is_transient=lock_ok)
    assert isinstance(verdict, bool)
    if is_connection_error(exc):
        assert is_transient(exc)
    assert isinstance(describe_error(exc), str)


# --------------------------------------------------------------------------------------------
# Policies, on a fake clock
# --------------------------------------------------------------------------------------------


class FakeClock:
    """A monotonic clock that only moves when the policy sleeps (or a test advances it)."""

    def __init__(self) -> None:
        self.now = 1_000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def fake_policy(clock: FakeClock, **kwargs: Any) -> RetryPolicy:
    return RetryPolicy(sleep=clock.sleep, clock=clock, **kwargs)


def retry_count(outcome: str) -> float:
    value = REGISTRY.get_sample_value("sheetanchor_retry_attempts_total", {"outcome": outcome})
    return value or 0.0


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 2.5}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),
        ({"initial": -1.0}, "initial"),
        ({"initial": float("nan")}, "initial"),
        ({"maximum": 0.01, "initial": 1.0}, "maximum"),
        ({"deadline": 0.0}, "deadline"),
        ({"deadline": float("inf")}, "deadline"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"multiplier": "2"}, "multiplier"),
        ({"sleep": 3}, "sleep"),
    ],
)
def test_policy_validation_names_the_argument(kwargs: dict[str, Any], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        RetryPolicy(**kwargs)


def test_policy_defaults() -> None:
    assert (DEFAULT_POLICY.max_attempts, DEFAULT_POLICY.deadline) == (5, 30.0)
    assert (DEFAULT_POLICY.initial, DEFAULT_POLICY.maximum, DEFAULT_POLICY.multiplier) == (
        0.1,
        5.0,
        2.0,
    )
    assert STARTUP_POLICY.deadline == 60.0
    assert STARTUP_POLICY.max_attempts > DEFAULT_POLICY.max_attempts
    assert RetryPolicy(deadline=None).deadline is None


async def test_non_transient_error_propagates_at_once_untouched() -> None:
    clock = FakeClock()
    calls = 0
    original = ValueError("bad input")

    async def fails() -> None:
        nonlocal calls
        calls += 1
        raise original

    with pytest.raises(ValueError, match="bad input") as info:
        await fake_policy(clock).call(fails)
    assert info.value is original
    assert calls == 1
    assert clock.sleeps == []


async def test_cancellation_is_never_retried() -> None:
    clock = FakeClock()
    calls = 0

    async def cancelled() -> None:
        nonlocal calls
        calls += 1
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await fake_policy(clock).call(cancelled)
    assert calls == 1


async def test_transient_errors_are_retried_until_success(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    before = retry_count("retried")
    attempts = 0

    async def flaky(value: int) -> int:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        return value * 2

    with caplog.at_level(logging.WARNING, logger="sheetanchor.retry"):
        assert await fake_policy(clock).named("load things").call(flaky, 21) == 42
    assert attempts == 3
    assert len(clock.sleeps) == 2
    assert retry_count("retried") - before == 2
    warnings = [r for r in caplog.records if r.name == "sheetanchor.retry"]
    assert len(warnings) == 2
    assert all(r.levelno == logging.WARNING for r in warnings)
    assert "load things" in warnings[0].getMessage()
    assert "ConnectionResetError" in warnings[0].getMessage()
    assert warnings[0].args  # lazy %s arguments, not a pre-formatted string
    assert getattr(warnings[0], "attempt", None) == 1


async def test_exhaustion_raises_transient_error_chained_from_the_last_error() -> None:
    clock = FakeClock()
    before = retry_count("exhausted")
    errors: list[BaseException] = []

    async def always_deadlocks() -> None:
        exc = TransientError(f"deadlock {len(errors)}")
        errors.append(exc)
        raise exc

    policy = fake_policy(clock, max_attempts=3).named("move money")
    with pytest.raises(TransientError) as info:
        await policy.call(always_deadlocks)
    assert type(info.value) is TransientError
    assert info.value.__cause__ is errors[-1]
    message = str(info.value)
    assert "move money" in message
    assert "3 attempt(s)" in message
    assert "deadlock 2" in message
    assert "max_attempts" in message
    assert retry_count("exhausted") - before == 1


async def test_deadline_stops_retries_and_says_so() -> None:
    clock = FakeClock()
    attempts = 0

    async def slow_refusal() -> None:
        nonlocal attempts
        attempts += 1
        clock.now += 4.0  # each attempt takes 4 s of fake time
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    policy = fake_policy(clock, max_attempts=100, deadline=10.0, initial=0.0, maximum=0.0)
    with pytest.raises(ConnectionLost) as info:
        await policy.call(slow_refusal)
    assert attempts == 3
    assert "deadline of 10.0 s" in str(info.value)
    assert isinstance(info.value, ConnectionError)


async def test_exhausted_timeouts_stay_timeout_errors() -> None:
    clock = FakeClock()

    async def times_out() -> None:
        raise TimeoutError("read timed out")

    policy = fake_policy(clock, max_attempts=3, initial=0.0, maximum=0.0)
    with pytest.raises(OperationTimeout) as info:
        await policy.call(times_out)
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, TransientError)
    assert not isinstance(info.value, ConnectionLost)
    assert "3 attempt(s)" in str(info.value)


async def test_wrap_and_retrying() -> None:
    clock = FakeClock()
    policy = fake_policy(clock)
    attempts = 0

    @policy.wrap
    async def fetch(key: str) -> str:
        """Fetch a key."""
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise TimeoutError
        return key.upper()

    assert fetch.__name__ == "fetch"
    assert fetch.__doc__ == "Fetch a key."
    assert await fetch("k") == "K"

    seen = 0
    async for attempt in policy.retrying():
        with attempt:
            seen += 1
            if seen < 2:
                raise ConnectionResetError(errno.ECONNRESET, "reset")
    assert seen == 2


async def test_lock_timeout_predicate_is_configurable() -> None:
    clock = FakeClock()
    policy = fake_policy(
        clock, retry_if=functools.partial(is_transient, lock_timeout_is_transient=True)
    )
    lock_error = asyncpg.LockNotAvailableError("canceling statement due to lock timeout")
    attempts = 0

    async def locked() -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise lock_error
        return "ok"

    assert await policy.call(locked) == "ok"
    with pytest.raises(asyncpg.LockNotAvailableError):
        await fake_policy(clock).call(functools.partial(_raise, lock_error))


async def _raise(exc: BaseException) -> None:
    raise exc


@given(
    max_attempts=st.integers(1, 30),
    initial=st.floats(0.0, 2.0),
    extra=st.floats(0.0, 20.0),
    multiplier=st.floats(1.0, 4.0),
    deadline=st.one_of(st.none(), st.floats(0.01, 60.0)),
    attempt_time=st.floats(0.0, 3.0),
)
@settings(max_examples=200, deadline=None)
def test_backoff_is_bounded_and_respects_the_deadline(
    max_attempts: int,
    initial: float,
    extra: float,
    multiplier: float,
    deadline: float | None,
    attempt_time: float,
) -> None:
    clock = FakeClock()
    policy = fake_policy(
        clock,
        max_attempts=max_attempts,
        initial=initial,
        maximum=initial + extra,
        multiplier=multiplier,
        deadline=deadline,
    )
    attempts = 0

    async def refused() -> None:
        nonlocal attempts
        attempts += 1
        clock.now += attempt_time
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    async def run() -> BaseException:
        return await capture(policy.call(refused))

    start = clock.now
    exc = asyncio.run(run())
    assert isinstance(exc, ConnectionLost)
    assert attempts <= max_attempts
    assert len(clock.sleeps) == attempts - 1
    for n, slept in enumerate(clock.sleeps, start=1):
        assert 0.0 <= slept <= min(policy.maximum, initial * multiplier ** (n - 1)) + 1e-9
        assert slept <= policy.backoff_cap(n) + 1e-9
    if deadline is not None:
        assert sum(clock.sleeps) <= deadline + 1e-9
        # No attempt starts after the deadline.
        assert (attempts - 1) * attempt_time + sum(clock.sleeps) <= deadline + attempt_time + 1e-9
    expected = sum(clock.sleeps) + attempts * attempt_time
    assert clock.now - start == pytest.approx(expected, abs=1e-6)


# --------------------------------------------------------------------------------------------
# No password anywhere: logs, messages, tracebacks of a failing connect
# --------------------------------------------------------------------------------------------

SECRET = "SuperSecret123"


@driver_param
async def test_failing_connect_never_shows_the_password(
    drv: Driver, caplog: pytest.LogCaptureFixture
) -> None:
    port = closed_port()
    url = "postgresql://u:" + SECRET + f"@127.0.0.1:{port}/x"
    clock = FakeClock()
    policy = fake_policy(clock, max_attempts=3).named(f"connect to {url}")

    async def connect() -> None:
        conn = await drv.connect(url)
        await drv.close(conn)

    with caplog.at_level(logging.DEBUG):
        exc = await capture(policy.call(connect))
    assert isinstance(exc, ConnectionLost)

    rendered = [
        str(exc),
        repr(exc),
        "".join(traceback.format_exception(exc)),
        repr(policy),
        caplog.text,
        *(record.getMessage() for record in caplog.records),
        *(repr(vars(record)) for record in caplog.records),
    ]
    assert len([r for r in caplog.records if r.name == "sheetanchor.retry"]) == 2
    for text_ in rendered:
        assert SECRET not in text_
    assert "u:***@127.0.0.1" in str(exc)
