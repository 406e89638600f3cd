"""The driver-error boundary: connection failures become ConnectionLost, the rest pass."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import asyncpg
import pytest
import redis.asyncio as aredis
import redis.exceptions
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff

from sheetanchor._translate import translate_errors
from sheetanchor.config import parse_url, to_asyncpg_dsn
from sheetanchor.errors import ConnectionLost, OperationTimeout, TransientError
from sheetanchor.retry import is_transient
from sheetanchor.testing import FaultProxy

SECRET = "SuperSecret123"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_refused_connect_becomes_connection_lost_without_password() -> None:
    url = "postgresql://u:" + SECRET + f"@127.0.0.1:{closed_port()}/x"
    with pytest.raises(ConnectionLost) as info:
        async with translate_errors(f"PostgreSQL at {url}"):
            await asyncpg.connect(url)
    exc = info.value
    assert isinstance(exc, TransientError)
    assert isinstance(exc, ConnectionError)
    assert isinstance(exc.__cause__, ConnectionRefusedError)
    assert SECRET not in str(exc)
    assert "PostgreSQL at postgresql://u:***@127.0.0.1" in str(exc)
    assert "ConnectionRefusedError" in str(exc)
    assert "check that the server is running" in str(exc)


async def test_redis_refused_becomes_connection_lost() -> None:
    client = aredis.Redis(port=closed_port(), retry=AsyncRetry(NoBackoff(), 0))
    try:
        with pytest.raises(ConnectionLost) as info:
            async with translate_errors("Redis"):
                await client.ping()
    finally:
        await client.aclose()
    assert "Redis" in str(info.value)


async def test_terminated_backend_picks_the_most_specific_cause(pg_url: str) -> None:
    conn = await asyncpg.connect(to_asyncpg_dsn(pg_url))
    other = await asyncpg.connect(to_asyncpg_dsn(pg_url))
    try:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        query = asyncio.ensure_future(conn.execute("SELECT pg_sleep(60)"))
        while not await other.fetchval(
            "SELECT count(*) = 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active'", pid
        ):
            await asyncio.sleep(0.01)
        await other.fetchval("SELECT pg_terminate_backend($1)", pid)
        with pytest.raises(ConnectionLost) as info:
            async with translate_errors("PostgreSQL"):
                await query
    finally:
        await conn.close()
        await other.close()
    # asyncpg raises ConnectionDoesNotExistError (08003) caused by AdminShutdownError (57P01);
    # the message names the server's own reason.
    assert "AdminShutdownError (57P01): terminating connection due to administrator command" in (
        str(info.value)
    )
    assert isinstance(info.value.__cause__, asyncpg.ConnectionDoesNotExistError)


async def test_other_errors_pass_through_untouched(pg_url: str) -> None:
    conn = await asyncpg.connect(to_asyncpg_dsn(pg_url))
    try:
        with pytest.raises(asyncpg.PostgresSyntaxError) as info, translate_errors("PostgreSQL"):
            await conn.execute("SELEC 1")
    finally:
        await conn.close()
    assert info.value.__cause__ is None


def test_sync_use_and_passthrough_of_own_errors_and_cancellation() -> None:
    own = ConnectionLost("already translated")
    with pytest.raises(ConnectionLost) as info, translate_errors("x"):
        raise own
    assert info.value is own
    with pytest.raises(asyncio.CancelledError), translate_errors("x"):
        raise asyncio.CancelledError
    with pytest.raises(ConnectionLost), translate_errors("x"):
        raise ConnectionResetError("reset")
    with translate_errors("x"):
        pass


async def test_query_timeout_stays_a_timeout_error(pg_url: str) -> None:
    # A client-side timeout is not a lost connection: callers' `except TimeoutError` must
    # still catch it after the boundary, and it stays retryable.
    conn = await asyncpg.connect(to_asyncpg_dsn(pg_url))
    try:
        with pytest.raises(TimeoutError) as info:
            async with translate_errors("PostgreSQL"):
                await conn.execute("SELECT pg_sleep(60)", timeout=0.2)
    finally:
        conn.terminate()
    exc = info.value
    assert isinstance(exc, OperationTimeout)
    assert isinstance(exc, TransientError)
    assert not isinstance(exc, ConnectionLost)
    assert isinstance(exc.__cause__, TimeoutError)
    assert is_transient(exc)
    assert "PostgreSQL" in str(exc)
    assert "idempotent" in str(exc)


async def test_redis_read_timeout_stays_a_timeout_error(
    fault_proxy: Callable[[str, int], FaultProxy], sheetanchor_redis_server_url: str
) -> None:
    parsed = parse_url(sheetanchor_redis_server_url)
    assert parsed.host is not None
    assert parsed.port is not None
    proxy = fault_proxy(parsed.host, parsed.port)
    client = aredis.Redis.from_url(
        proxy.url(sheetanchor_redis_server_url),
        socket_timeout=0.2,
        retry=AsyncRetry(NoBackoff(), 0),
    )
    try:
        assert await client.ping()
        proxy.blackhole()
        with pytest.raises(OperationTimeout) as info:
            async with translate_errors("Redis"):
                await client.ping()
    finally:
        proxy.pass_through()
        await client.aclose()
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value.__cause__, redis.exceptions.TimeoutError)


def test_timeouts_and_resets_are_told_apart() -> None:
    with pytest.raises(OperationTimeout), translate_errors("x"):
        raise TimeoutError("read timed out")
    with pytest.raises(ConnectionLost) as info, translate_errors("x"):
        raise ConnectionResetError("reset")
    assert not isinstance(info.value, TimeoutError)
