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
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest
import redis

from sheetanchor.config import parse_url, to_asyncpg_dsn
from sheetanchor.embedded import EmbeddedPostgres, EmbeddedRedis, pg_major_version
from sheetanchor.embedded._os import free_port, redis_server_bin
from sheetanchor.testing import FaultProxy
from sheetanchor.testing._redis_claim import CLAIM_PREFIX, RedisClaim, claim_redis_db
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


def _client_names(client: redis.Redis) -> dict[int, str]:
    return {int(e["id"]): e.get("name", "") for e in client.client_list()}


def test_redis_claim_outlives_the_servers_idle_timeout(private_redis: EmbeddedRedis) -> None:
    admin = redis.Redis.from_url(private_redis.url, single_connection_client=True)
    idle = redis.Redis.from_url(private_redis.url, single_connection_client=True)
    admin.config_set("timeout", 1)
    claim = RedisClaim(private_redis.url, where="the private Redis")
    try:
        name = f"{CLAIM_PREFIX}{claim.index}"
        idle.client_setname("idle-control")
        # A condition, not a sleep: wait until the server dropped an idle connection.
        deadline = time.monotonic() + 30
        while "idle-control" in _client_names(admin).values():
            assert time.monotonic() < deadline, "the server never dropped the idle connection"
            admin.ping()  # keep the admin connection itself from idling out
            time.sleep(0.1)
        assert name in _client_names(admin).values()  # the claim was kept alive
        claim.verify()
    finally:
        claim.close()
        admin.config_set("timeout", 0)
        admin.close()
        idle.close()


def test_a_lost_redis_claim_is_retaken_or_refused(private_redis: EmbeddedRedis) -> None:
    admin = redis.Redis.from_url(private_redis.url, single_connection_client=True)
    first = RedisClaim(private_redis.url, where="the private Redis")
    try:
        name = f"{CLAIM_PREFIX}{first.index}"
        (claim_id,) = [cid for cid, n in _client_names(admin).items() if n == name]
        admin.client_kill_filter(_id=str(claim_id))  # the claim connection drops
        second = RedisClaim(private_redis.url, where="the private Redis")
        try:
            assert second.index == first.index  # the index looked free to a new session
            with pytest.raises(RuntimeError, match="lost its claim on Redis database"):
                first.verify()
        finally:
            second.close()
        first.verify()  # free again: taken back
        assert name in _client_names(admin).values()
    finally:
        first.close()
        admin.close()


def test_a_server_with_one_database_gets_an_accurate_message(tmp_path: Path) -> None:
    # `databases` is fixed at startup: run a real redis-server with `databases 1`.
    port = free_port()
    args = [str(redis_server_bin()), "--port", str(port), "--bind", "127.0.0.1"]
    args += ["--databases", "1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    server = subprocess.Popen(
        args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, single_connection_client=True, socket_connect_timeout=5)
    try:
        deadline = time.monotonic() + 30
        while True:  # until it answers
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert server.poll() is None, "redis-server exited"
                assert time.monotonic() < deadline, "redis-server did not answer"
                time.sleep(0.05)
        with pytest.raises(RuntimeError, match=r"only 1 database\(s\) \(`databases 1`\)"):
            claim_redis_db(client, where=f"redis://127.0.0.1:{port}")
    finally:
        client.close()
        server.terminate()
        server.wait(timeout=30)
