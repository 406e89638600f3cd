"""pytest plugin: fixtures for real PostgreSQL/Redis servers and a fault-injecting proxy.

Fixtures (names are the public contract):
    sheetanchor_pg_server_url  session: URL of a PostgreSQL server (admin database)
    pg_url                     module: URL of a fresh database for this test module
    sheetanchor_redis_server_url  session: URL of a Redis server
    redis_url                  function: URL of a Redis database, flushed before the test

Servers come from ``SHEETANCHOR_PG_URL`` / ``SHEETANCHOR_REDIS_URL`` when set.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from sheetanchor.config import parse_url, pg_url_from_env, redis_url_from_env, to_asyncpg_dsn


def _with_database(url: str, database: str) -> str:
    base, _, query = url.partition("?")
    head = base.rsplit("/", 1)[0] if base.count("/") >= 3 else base
    return f"{head}/{database}" + (f"?{query}" if query else "")


@pytest.fixture(scope="session")
def sheetanchor_pg_server_url() -> str:
    url = pg_url_from_env()
    if url is None:
        pytest.fail("SHEETANCHOR_PG_URL is not set (embedded servers not wired yet)")
    return url


@pytest.fixture(scope="session")
def sheetanchor_redis_server_url() -> str:
    url = redis_url_from_env()
    if url is None:
        pytest.fail("SHEETANCHOR_REDIS_URL is not set (embedded servers not wired yet)")
    return url


@pytest.fixture(scope="module")
def pg_url(sheetanchor_pg_server_url: str) -> Iterator[str]:
    """A fresh, empty database for this test module, dropped afterwards."""
    import asyncpg

    name = f"sa_test_{uuid.uuid4().hex[:12]}"
    admin = to_asyncpg_dsn(sheetanchor_pg_server_url)

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run(f'CREATE DATABASE "{name}"'))
    try:
        yield _with_database(sheetanchor_pg_server_url, name)
    finally:
        asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def redis_url(sheetanchor_redis_server_url: str) -> str:
    """A Redis database flushed before the test."""
    import redis

    parse_url(sheetanchor_redis_server_url)
    client = redis.Redis.from_url(sheetanchor_redis_server_url)
    try:
        client.flushdb()
    finally:
        client.close()
    return sheetanchor_redis_server_url


from sheetanchor.testing._pgbouncer import pgbouncer_url, sheetanchor_pgbouncer  # noqa: E402, F401
