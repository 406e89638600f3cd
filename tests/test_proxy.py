"""FaultProxy against real PostgreSQL and Redis servers: every mode, from sync and async code."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable

import asyncpg
import pytest
import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from sheetanchor.config import parse_url, to_asyncpg_dsn
from sheetanchor.errors import ConfigError, ResourceClosed
from sheetanchor.testing import FaultProxy, ProxyMode

pytestmark = pytest.mark.faults

ProxyFactory = Callable[[str, int], FaultProxy]

# asyncpg reports a dropped connection as one of these, depending on when it notices.
# Not OSError: TimeoutError is one, and a hang that ends in a timeout must not pass for a reset.
CONNECTION_ERRORS = (
    ConnectionError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.PostgresConnectionError,
)


def _address(url: str) -> tuple[str, int]:
    parsed = parse_url(url)
    assert parsed.host is not None
    assert parsed.port is not None
    return parsed.host, parsed.port


@pytest.fixture
def pg_proxy(fault_proxy: ProxyFactory, sheetanchor_pg_server_url: str) -> FaultProxy:
    return fault_proxy(*_address(sheetanchor_pg_server_url))


@pytest.fixture
def pg_via_proxy(pg_proxy: FaultProxy, sheetanchor_pg_server_url: str) -> str:
    return to_asyncpg_dsn(pg_proxy.url(sheetanchor_pg_server_url))


@pytest.fixture
def redis_proxy(fault_proxy: ProxyFactory, redis_url: str) -> FaultProxy:
    return fault_proxy(*_address(redis_url))


def _sync_redis(url: str) -> redis.Redis:
    # No retries: the test wants to see the fault itself.
    return redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), socket_timeout=5)


async def _select_one(dsn: str) -> int:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        value: int = await conn.fetchval("SELECT 1")
        return value
    finally:
        await conn.close()


async def test_pass_through_forwards_and_counts(pg_proxy: FaultProxy, pg_via_proxy: str) -> None:
    assert await _select_one(pg_via_proxy) == 1
    stats = pg_proxy.stats
    assert stats.accepted == 1
    assert stats.bytes_to_server > 0
    assert stats.bytes_to_client > 0
    assert pg_proxy.mode is ProxyMode.PASS


def test_works_from_repeated_asyncio_run(pg_proxy: FaultProxy, pg_via_proxy: str) -> None:
    for _ in range(3):
        assert asyncio.run(_select_one(pg_via_proxy)) == 1
    assert pg_proxy.stats.accepted == 3


def test_works_from_sync_redis_client(redis_proxy: FaultProxy, redis_url: str) -> None:
    client = _sync_redis(redis_proxy.url(redis_url))
    try:
        client.set("k", "v")
        assert client.get("k") == b"v"
    finally:
        client.close()


async def test_latency_slows_each_round_trip(pg_proxy: FaultProxy, pg_via_proxy: str) -> None:
    conn = await asyncpg.connect(pg_via_proxy, timeout=10)
    try:
        pg_proxy.add_latency(0.2)
        began = time.monotonic()
        assert await conn.fetchval("SELECT 1") == 1
        # A lower bound only: the reply was held at least this long.
        assert time.monotonic() - began >= 0.2
        pg_proxy.add_latency(0)
        assert await conn.fetchval("SELECT 2") == 2
    finally:
        await conn.close()


async def test_refuse_then_pass_through_on_the_same_port(
    pg_proxy: FaultProxy, pg_via_proxy: str
) -> None:
    port = pg_proxy.port
    pg_proxy.refuse()
    assert pg_proxy.mode is ProxyMode.REFUSE
    with pytest.raises(ConnectionRefusedError):
        await asyncpg.connect(pg_via_proxy, timeout=5)
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), 5):
        pass
    pg_proxy.pass_through()
    assert pg_proxy.port == port
    assert await _select_one(pg_via_proxy) == 1


async def test_refuse_keeps_open_connections(pg_proxy: FaultProxy, pg_via_proxy: str) -> None:
    conn = await asyncpg.connect(pg_via_proxy, timeout=10)
    try:
        pg_proxy.refuse()
        assert await conn.fetchval("SELECT 3") == 3
    finally:
        await conn.close()


async def test_blackhole_connect_hangs_until_healed(
    pg_proxy: FaultProxy, pg_via_proxy: str
) -> None:
    pg_proxy.blackhole()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncpg.connect(pg_via_proxy), 0.5)
    pg_proxy.pass_through()
    assert await _select_one(pg_via_proxy) == 1


async def test_blackhole_stalls_an_open_connection(pg_proxy: FaultProxy, pg_via_proxy: str) -> None:
    conn = await asyncpg.connect(pg_via_proxy, timeout=10)
    try:
        pg_proxy.blackhole()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(conn.fetchval("SELECT 1"), 0.5)
    finally:
        conn.terminate()
    pg_proxy.pass_through()


def test_connection_errors_do_not_include_timeouts() -> None:
    # The reset tests below must fail if a query hangs and then times out.
    assert not issubclass(TimeoutError, CONNECTION_ERRORS)
    assert not issubclass(asyncio.TimeoutError, CONNECTION_ERRORS)


async def test_reset_all_breaks_open_connections(pg_proxy: FaultProxy, pg_via_proxy: str) -> None:
    conn = await asyncpg.connect(pg_via_proxy, timeout=10)
    try:
        assert pg_proxy.stats.active == 1
        pg_proxy.reset_all()
        assert pg_proxy.stats.active == 0
        with pytest.raises(CONNECTION_ERRORS):
            await conn.fetchval("SELECT 1")
    finally:
        conn.terminate()
    # New connections are proxied as before.
    assert await _select_one(pg_via_proxy) == 1


async def test_reset_all_on_redis(redis_proxy: FaultProxy, redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_proxy.url(redis_url), retry=Retry(NoBackoff(), 0))
    try:
        assert await client.ping()
        redis_proxy.reset_all()
        with pytest.raises(redis.ConnectionError):
            await client.ping()
    finally:
        await client.aclose()


async def test_cut_after_cuts_mid_stream(redis_proxy: FaultProxy) -> None:
    redis_proxy.cut_after(10)
    reader, writer = await asyncio.open_connection(redis_proxy.host, redis_proxy.port)
    try:
        # One command of more than 10 bytes: only the first 10 reach Redis, then the cut.
        writer.write(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100\r\n" + b"x" * 100 + b"\r\n")

        # A reset, not an orderly end of stream (which would read b"" and fail the test).
        async def exchange() -> bytes:
            await writer.drain()
            return await asyncio.wait_for(reader.read(100), 10)

        with pytest.raises(ConnectionResetError):
            await exchange()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert redis_proxy.stats.bytes_to_server == 10


async def test_cut_after_applies_to_open_connections(
    pg_proxy: FaultProxy, pg_via_proxy: str
) -> None:
    conn = await asyncpg.connect(pg_via_proxy, timeout=10)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        pg_proxy.cut_after(0)
        with pytest.raises(CONNECTION_ERRORS):
            await conn.fetchval("SELECT 2")
    finally:
        conn.terminate()
    pg_proxy.pass_through()
    assert await _select_one(pg_via_proxy) == 1


def test_cut_after_breaks_redis_commands(redis_proxy: FaultProxy, redis_url: str) -> None:
    client = _sync_redis(redis_proxy.url(redis_url))
    try:
        assert client.ping()
        redis_proxy.cut_after(5)
        with pytest.raises(redis.ConnectionError):
            client.set("k", "v" * 100)
        redis_proxy.pass_through()
        assert client.set("k", "v")
    finally:
        client.close()


def test_reset_all_right_after_accepting_leaks_nothing(sheetanchor_redis_server_url: str) -> None:
    # Connections whose handler has not run yet must be closed too (filterwarnings=error
    # turns a leaked socket's ResourceWarning into a failure).
    with FaultProxy(*_address(sheetanchor_redis_server_url)) as proxy:
        for _ in range(5):
            socks = [socket.create_connection((proxy.host, proxy.port), 5) for _ in range(20)]
            try:
                proxy.reset_all()
            finally:
                for sock in socks:
                    sock.close()
        # Closed connections may still wait in the accept queue: drain until all are seen.
        deadline = time.monotonic() + 10
        while (proxy.stats.accepted < 100 or proxy.stats.active) and time.monotonic() < deadline:
            proxy.reset_all()
            time.sleep(0.01)
        assert proxy.stats.accepted == 100
        assert proxy.stats.active == 0


def _ping_raw(sock: socket.socket) -> bytes:
    sock.sendall(b"PING\r\n")
    return sock.recv(10)


def _ping_new_connection(host: str, port: int) -> None:
    with socket.create_connection((host, port), 5) as sock:
        sock.settimeout(5)
        _ping_raw(sock)


def test_connections_are_capped(sheetanchor_redis_server_url: str) -> None:
    with FaultProxy(*_address(sheetanchor_redis_server_url), max_connections=2) as proxy:
        held = [socket.create_connection((proxy.host, proxy.port), 5) for _ in range(2)]
        try:
            # Let the proxy register both before the third arrives.
            deadline = time.monotonic() + 10
            while proxy.stats.active < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            # The reset may hit the connect, the send (EPIPE/ECONNRESET) or the receive.
            with pytest.raises(ConnectionError):
                _ping_new_connection(proxy.host, proxy.port)
            assert proxy.stats.rejected == 1
        finally:
            for sock in held:
                sock.close()


def test_close_stops_listening_and_rejects_control(sheetanchor_redis_server_url: str) -> None:
    proxy = FaultProxy(*_address(sheetanchor_redis_server_url)).start()
    port = proxy.port
    proxy.close()
    assert proxy.closed
    proxy.close()  # idempotent
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), 5):
        pass
    with pytest.raises(ResourceClosed):
        proxy.refuse()


def test_url_rewrites_host_and_port_only() -> None:
    with FaultProxy("127.0.0.1", 6379) as proxy:
        assert proxy.url("redis://:pw@localhost:6379/3") == f"redis://:pw@127.0.0.1:{proxy.port}/3"
        assert (
            proxy.url("postgresql://u:p@db:5432/x?sslmode=disable")
            == f"postgresql://u:p@127.0.0.1:{proxy.port}/x?sslmode=disable"
        )
        with pytest.raises(ConfigError):
            proxy.url("unix:///tmp/redis.sock")


def test_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="target_port"):
        FaultProxy("127.0.0.1", 0)
    with pytest.raises(ValueError, match="max_connections"):
        FaultProxy("127.0.0.1", 1, max_connections=0)
    with FaultProxy("127.0.0.1", 6379) as proxy:
        with pytest.raises(ValueError, match="seconds"):
            proxy.add_latency(-1)
        with pytest.raises(ValueError, match="nbytes"):
            proxy.cut_after(-1)


def _proxy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("sheetanchor-proxy->")]


def test_failed_start_leaves_no_thread_behind(sheetanchor_redis_server_url: str) -> None:
    before = set(_proxy_threads())
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        proxy = FaultProxy(*_address(sheetanchor_redis_server_url), port=busy.getsockname()[1])
        with pytest.raises(OSError, match="cannot listen"):
            proxy.start()
    # The failed start closed the proxy: its thread stopped, no ResourceWarning comes later.
    assert proxy.closed
    assert set(_proxy_threads()) == before
    with pytest.raises(ResourceClosed):
        proxy.start()


def test_unclosed_proxy_warns_where_it_was_created(sheetanchor_redis_server_url: str) -> None:
    proxy = FaultProxy(*_address(sheetanchor_redis_server_url)).start()
    try:
        with pytest.warns(ResourceWarning, match="was not closed") as record:
            proxy.__del__()  # what the garbage collector would call
    finally:
        proxy.close()
    message = str(record[0].message)
    assert "created at" in message
    assert "test_unclosed_proxy_warns_where_it_was_created" in message
    assert __file__ in message
