"""FaultProxy.hold_matching: client chunks with a pattern wait; everything else flows.

Real servers through the real TCP proxy: PostgreSQL (asyncpg) for the statement scope, Redis
(a raw socket) for a pattern split over two reads.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

import asyncpg
import pytest

from sheetanchor.config import parse_url, to_asyncpg_dsn
from sheetanchor.testing import FaultProxy

pytestmark = pytest.mark.faults

ProxyFactory = Callable[[str, int], FaultProxy]


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


async def _until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll ``predicate`` (a generous bound: never a timing assertion)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_only_the_matching_statement_waits_and_the_connection_recovers(
    pg_proxy: FaultProxy, pg_via_proxy: str
) -> None:
    a = await asyncpg.connect(pg_via_proxy, timeout=10)
    b = await asyncpg.connect(pg_via_proxy, timeout=10)
    try:
        pg_proxy.hold_matching(b"hold_me")
        held = asyncio.create_task(a.fetchval("SELECT 'hold_me'"))
        await _until(lambda: pg_proxy.stats.held == 1)
        # Another connection is not held: it answers while the first statement waits.
        assert await b.fetchval("SELECT 1") == 1
        assert await b.fetchval("SELECT 'free'") == "free"
        assert not held.done()
        assert pg_proxy.stats.held == 1

        pg_proxy.release_held()
        assert await asyncio.wait_for(held, 30) == "hold_me"
        assert pg_proxy.stats.held == 0
        assert pg_proxy.stats.matched == 1

        # The rule stays, but it does not stick to the connection that matched: the next
        # statement on it (a pooled connection's next user) flows without being held.
        assert await asyncio.wait_for(a.fetchval("SELECT 2"), 30) == 2
        assert pg_proxy.stats.matched == 1

        # A new match on the same connection is held again, until pass_through().
        again = asyncio.create_task(a.fetchval("SELECT 'hold_me' || 'again'"))
        await _until(lambda: pg_proxy.stats.held == 1)
        assert pg_proxy.stats.matched == 2
        assert not again.done()
        pg_proxy.pass_through()
        assert await asyncio.wait_for(again, 30) == "hold_meagain"
        # pass_through() removed the rule.
        assert await a.fetchval("SELECT 'hold_me'") == "hold_me"
        assert pg_proxy.stats.matched == 2
    finally:
        await a.close()
        await b.close()


async def test_a_transaction_waits_behind_its_held_statement(
    pg_proxy: FaultProxy, pg_via_proxy: str, sheetanchor_pg_server_url: str
) -> None:
    direct = await asyncpg.connect(to_asyncpg_dsn(sheetanchor_pg_server_url), timeout=10)
    conn = await asyncpg.connect(pg_via_proxy, timeout=10)
    table = f"hold_{time.monotonic_ns() % 10**9}"
    try:
        await direct.execute(f'CREATE TABLE "{table}" (id int PRIMARY KEY)')
        pg_proxy.hold_matching(f'"{table}"'.encode())

        async def write() -> None:
            async with conn.transaction():
                await conn.copy_records_to_table(table, records=[(1,), (2,)])

        task = asyncio.create_task(write())
        await _until(lambda: pg_proxy.stats.held >= 1)
        await asyncio.sleep(0.2)  # room for the rest of the transaction to slip through
        assert not task.done()
        assert await direct.fetchval(f'SELECT count(*) FROM "{table}"') == 0
        pg_proxy.pass_through()
        await asyncio.wait_for(task, 30)
        assert await direct.fetchval(f'SELECT count(*) FROM "{table}"') == 2
    finally:
        await conn.close()
        await direct.execute(f'DROP TABLE IF EXISTS "{table}"')
        await direct.close()


async def test_a_delay_forwards_the_chunk_after_its_seconds(
    pg_proxy: FaultProxy, pg_via_proxy: str
) -> None:
    conn = await asyncpg.connect(pg_via_proxy, timeout=10)
    try:
        pg_proxy.hold_matching(b"slow_one", seconds=0.3)
        began = time.monotonic()
        assert await asyncio.wait_for(conn.fetchval("SELECT 'slow_one'"), 30) == "slow_one"
        # A lower bound only: the statement was held at least this long.
        assert time.monotonic() - began >= 0.3
        assert pg_proxy.stats.matched == 1
        assert pg_proxy.stats.held == 0
        # release_held() ends a long delay early.
        pg_proxy.hold_matching(b"slow_two", seconds=600)
        task = asyncio.create_task(conn.fetchval("SELECT 'slow_two'"))
        await _until(lambda: pg_proxy.stats.held == 1)
        pg_proxy.release_held()
        assert await asyncio.wait_for(task, 30) == "slow_two"
    finally:
        await conn.close()


def test_a_pattern_split_over_two_reads_still_matches(
    fault_proxy: ProxyFactory, redis_url: str
) -> None:
    proxy = fault_proxy(*_address(redis_url))
    proxy.hold_matching(b"hold_me")
    with socket.create_connection((proxy.host, proxy.port), timeout=30) as sock:
        sock.sendall(b"ECHO hol")
        # The proxy forwards the first half before the second is sent (two reads).
        deadline = time.monotonic() + 30
        while proxy.stats.bytes_to_server < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proxy.stats.bytes_to_server == 8
        assert proxy.stats.matched == 0
        sock.sendall(b"d_me\r\n")
        while proxy.stats.held == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proxy.stats.held == 1
        assert proxy.stats.bytes_to_server == 8  # the second half waits at the proxy
        proxy.release_held()
        reply = b""
        while not reply.endswith(b"hold_me\r\n"):
            part = sock.recv(100)
            assert part, reply
            reply += part
        assert reply == b"$7\r\nhold_me\r\n"
        assert proxy.stats.matched == 1


def test_bad_arguments(pg_proxy: FaultProxy) -> None:
    with pytest.raises(ValueError, match="non-empty bytes"):
        pg_proxy.hold_matching(b"")
    with pytest.raises(ValueError, match="non-empty bytes"):
        pg_proxy.hold_matching("text")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seconds"):
        pg_proxy.hold_matching(b"x", seconds=-1)
    pg_proxy.release_held()  # no rule: nothing to do
    assert "hold=None" in repr(pg_proxy)
    pg_proxy.hold_matching(b"x")
    assert "hold=b'x'" in repr(pg_proxy)
