"""The pytest plugin's fixtures, against real servers."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest
import redis

from sheetanchor.config import parse_url, to_asyncpg_dsn
from sheetanchor.embedded import EmbeddedPostgres, EmbeddedRedis, pg_major_version
from sheetanchor.testing import FaultProxy
from sheetanchor.testing.plugin import _claim_redis_db


def fetch(url: str, sql: str) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(to_asyncpg_dsn(url), timeout=10)
        try:
            return list(await conn.fetch(sql))
        finally:
            await conn.close()

    return asyncio.run(run())


def test_pg_url_is_a_fresh_empty_database(pg_url: str, sheetanchor_pg_server_url: str) -> None:
    name = parse_url(pg_url).database
    assert name is not None
    assert name.startswith("sa_test_")
    assert name != parse_url(sheetanchor_pg_server_url).database
    assert fetch(pg_url, "SELECT current_database() AS db")[0]["db"] == name
    tables = fetch(pg_url, "SELECT count(*) AS n FROM pg_tables WHERE schemaname = 'public'")
    assert tables[0]["n"] == 0


def test_redis_url_is_a_claimed_flushed_database(redis_url: str, sheetanchor_redis_db: int) -> None:
    assert parse_url(redis_url).database == str(sheetanchor_redis_db)
    assert sheetanchor_redis_db >= 1  # database 0 is left to applications
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.dbsize() == 0
        client.set("left-behind", "1")  # the next test's flush removes it
    finally:
        client.close()


def test_a_second_session_claims_another_redis_database(
    sheetanchor_redis_server_url: str, sheetanchor_redis_db: int
) -> None:
    client = redis.Redis.from_url(sheetanchor_redis_server_url, single_connection_client=True)
    try:
        assert _claim_redis_db(client) != sheetanchor_redis_db
    finally:
        client.close()


def test_private_pg_is_running_and_may_be_stopped(private_pg: EmbeddedPostgres) -> None:
    assert private_pg.private
    assert private_pg.is_ready()
    private_pg.stop()  # the fixture starts it again for the next test


def test_private_pg_restart_behind_a_proxy(
    private_pg: EmbeddedPostgres, fault_proxy: Callable[[str, int], FaultProxy]
) -> None:
    assert private_pg.is_ready()
    proxy = fault_proxy("127.0.0.1", private_pg.port)
    url = proxy.url(private_pg.url)
    assert fetch(url, "SELECT 1 AS one")[0]["one"] == 1
    private_pg.stop()
    # The proxy accepts, cannot reach the server, and drops the client.
    with pytest.raises((ConnectionError, asyncpg.InterfaceError)):
        fetch(url, "SELECT 1")
    private_pg.start()
    assert fetch(url, "SELECT 1 AS one")[0]["one"] == 1


def test_private_redis_restart(private_redis: EmbeddedRedis) -> None:
    assert private_redis.is_ready()
    private_redis.restart()
    client = redis.Redis.from_url(private_redis.url)
    try:
        assert client.ping()
    finally:
        client.close()
    private_redis.stop()


INNER_TEST = """
import asyncio
import json
import os

import asyncpg
import redis


def test_fixtures(pg_url, redis_url, sheetanchor_pg_server_url, private_pg):
    async def db():
        conn = await asyncpg.connect(pg_url)
        try:
            return await conn.fetchval("SELECT current_database()")
        finally:
            await conn.close()

    client = redis.Redis.from_url(redis_url)
    try:
        assert client.dbsize() == 0
    finally:
        client.close()
    private_pg.restart()
    out = {"db": asyncio.run(db()), "server": sheetanchor_pg_server_url,
           "redis": redis_url, "private": private_pg.url}
    with open(os.environ["INNER_OUT"], "a") as fh:
        fh.write(json.dumps(out) + "\\n")
"""


@pytest.mark.slow
@pytest.mark.embedded
@pytest.mark.timeout(420)  # above the inner run's own 300 s, which includes a cold start
def test_whole_flow_without_server_urls() -> None:
    """A user with no servers: a suite using our fixtures starts embedded ones itself."""
    # A fresh SHEETANCHOR_HOME (outside pytest's tmp: see test_embedded.scratch) means a
    # cold start of a second embedded PostgreSQL: a few seconds, once.
    home = Path(tempfile.mkdtemp(prefix="sheetanchor-home-"))
    try:
        suite = home / "suite"
        suite.mkdir()
        (suite / "pytest.ini").write_text(
            "[pytest]\nasyncio_default_fixture_loop_scope = function\nfilterwarnings = error\n"
        )
        for module in ("test_one.py", "test_two.py"):
            (suite / module).write_text(textwrap.dedent(INNER_TEST))
        out_file = home / "out.ndjson"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHEETANCHOR_")}
        env.update(SHEETANCHOR_HOME=str(home), INNER_OUT=str(out_file))
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
            cwd=suite,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        rows = [json.loads(line) for line in out_file.read_text().splitlines()]
        assert len(rows) == 2
        assert rows[0]["db"] != rows[1]["db"]  # one database per module
        shared = EmbeddedPostgres(home / "embedded" / f"pg{pg_major_version()}")
        assert rows[0]["server"] == rows[1]["server"] == shared.url
        assert rows[0]["private"] != shared.url
        assert parse_url(rows[0]["redis"]).port == EmbeddedRedis(home / "embedded" / "redis").port
    finally:
        EmbeddedPostgres(home / "embedded" / f"pg{pg_major_version()}").stop()
        EmbeddedRedis(home / "embedded" / "redis").stop()
        shutil.rmtree(home)
