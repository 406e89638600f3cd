"""pytest plugin: fixtures for real PostgreSQL/Redis servers and a fault-injecting proxy.

Fixtures (names are the public contract):
    sheetanchor_pg_server_url     session: URL of a PostgreSQL server (admin database)
    pg_url                        module: URL of a fresh, empty database for this module
    sheetanchor_redis_server_url  session: URL of a Redis server
    redis_url                     function: URL of this session's Redis database, flushed
    fault_proxy                   function: ``fault_proxy(host, port) -> FaultProxy``, closed
                                  at teardown
    private_pg / private_redis    function: a server this session started itself (own
                                  directory and port) that a test may stop and restart; it
                                  is running when the test begins and is shut down at the
                                  end of the session

Also available: ``sheetanchor_pg_template`` (session: the template's name),
``sheetanchor_redis_db`` (session: the claimed Redis index), and
``sheetanchor_private_pg_server`` / ``sheetanchor_private_redis_server`` (session: the
private servers themselves, for module- or session-scoped fixtures of your own).

Servers come from ``SHEETANCHOR_PG_URL`` / ``SHEETANCHOR_REDIS_URL`` when set; otherwise the
shared embedded servers of :mod:`sheetanchor.embedded` are started (or reused).

Isolation on a shared server:
    * PostgreSQL: every module gets its own database, copied from a template database that
      this session creates from ``template0``. Copying our own template, to which nobody
      connects, avoids "source database is being accessed by other users", which copying
      ``template1`` hits whenever any other client is connected to it.
    * Redis: each session claims one database index (1 to ``databases - 1``; 0 is left to
      applications) by naming a connection it holds open ``sheetanchor-test-db:<index>``.
      Concurrent sessions on the same server see each other's claims in ``CLIENT LIST``,
      and a claim vanishes with the process that held it. ``redis_url`` flushes that
      database before every test.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from sheetanchor.config import (
    ENV_PG_URL,
    ENV_REDIS_URL,
    parse_url,
    pg_url_from_env,
    redact,
    redis_url_from_env,
)
from sheetanchor.embedded import EmbeddedPostgres, EmbeddedRedis
from sheetanchor.embedded._os import run_in_thread
from sheetanchor.testing._proxy import FaultProxy

if TYPE_CHECKING:
    import redis

__all__ = [
    "fault_proxy",
    "pg_url",
    "private_pg",
    "private_redis",
    "redis_url",
    "sheetanchor_pg_server_url",
    "sheetanchor_pg_template",
    "sheetanchor_private_pg_server",
    "sheetanchor_private_redis_server",
    "sheetanchor_redis_db",
    "sheetanchor_redis_server_url",
]

_log = logging.getLogger("sheetanchor.testing")

_DB_PREFIX = "sa_test_"
_TEMPLATE_PREFIX = "sa_tpl_"
_STALE_AFTER = 24 * 3600.0  # databases of sessions that died without cleaning up
_CLAIM_PREFIX = "sheetanchor-test-db:"


def _with_database(url: str, database: str) -> str:
    """``url`` with its path (the database name or Redis index) replaced by ``database``."""
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


def _new_name(prefix: str) -> str:
    # The creation time in the name lets a later session drop what a crashed one left.
    return f"{prefix}{int(time.time())}_{uuid.uuid4().hex[:8]}"


def _pg_admin(url: str, *statements: str) -> list[Any]:
    """Run ``statements`` on the admin database; return the rows of the last one."""
    import asyncpg

    from sheetanchor.config import to_asyncpg_dsn

    async def run() -> list[Any]:
        conn = await asyncpg.connect(to_asyncpg_dsn(url), timeout=30)
        try:
            rows: list[Any] = []
            for sql in statements:
                rows = list(await conn.fetch(sql))
            return rows
        finally:
            await conn.close()

    return run_in_thread(run)


def _drop_stale_databases(server_url: str) -> None:
    rows = _pg_admin(
        server_url,
        "SELECT datname FROM pg_database "
        f"WHERE datname LIKE '{_DB_PREFIX}%' OR datname LIKE '{_TEMPLATE_PREFIX}%'",
    )
    cutoff = time.time() - _STALE_AFTER
    for row in rows:
        name: str = row["datname"]
        try:
            created = int(name.split("_")[2])
        except (IndexError, ValueError):
            continue  # not a name this plugin made
        if created < cutoff:
            _pg_admin(
                server_url,
                f'ALTER DATABASE "{name}" WITH IS_TEMPLATE false',
                f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
            )


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def sheetanchor_pg_server_url() -> str:
    """URL of a PostgreSQL server's ``postgres`` database: the env URL or the embedded one."""
    import asyncpg

    url = pg_url_from_env()
    if url is None:
        return EmbeddedPostgres().start()
    try:
        _pg_admin(url, "SELECT 1")
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        pytest.fail(
            f"PostgreSQL at {redact(url)} (from {ENV_PG_URL}) does not answer: {exc!r}; "
            f"start it, fix the URL, or unset {ENV_PG_URL} to use an embedded server",
            pytrace=False,
        )
    return url


@pytest.fixture(scope="session")
def sheetanchor_pg_template(sheetanchor_pg_server_url: str) -> Iterator[str]:
    """Name of this session's template database (empty; copied by ``pg_url``)."""
    url = sheetanchor_pg_server_url
    _drop_stale_databases(url)
    name = _new_name(_TEMPLATE_PREFIX)
    _pg_admin(
        url,
        f'CREATE DATABASE "{name}" TEMPLATE template0',
        # Nobody may connect to it, so copying it never fails with "being accessed".
        f'ALTER DATABASE "{name}" WITH IS_TEMPLATE true ALLOW_CONNECTIONS false',
    )
    try:
        yield name
    finally:
        _pg_admin(
            url,
            f'ALTER DATABASE "{name}" WITH IS_TEMPLATE false',
            f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
        )


@pytest.fixture(scope="module")
def pg_url(sheetanchor_pg_server_url: str, sheetanchor_pg_template: str) -> Iterator[str]:
    """URL of a fresh, empty database for this test module; dropped afterwards."""
    name = _new_name(_DB_PREFIX)
    _pg_admin(
        sheetanchor_pg_server_url, f'CREATE DATABASE "{name}" TEMPLATE "{sheetanchor_pg_template}"'
    )
    try:
        yield _with_database(sheetanchor_pg_server_url, name)
    finally:
        _pg_admin(sheetanchor_pg_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --------------------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def sheetanchor_redis_server_url() -> str:
    """URL of a Redis server: the env URL or the embedded one."""
    import redis

    url = redis_url_from_env()
    if url is None:
        return EmbeddedRedis().start()
    client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=10)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(
            f"Redis at {redact(url)} (from {ENV_REDIS_URL}) does not answer: {exc!r}; "
            f"start it, fix the URL, or unset {ENV_REDIS_URL} to use an embedded server",
            pytrace=False,
        )
    finally:
        client.close()
    return url


def _claim_redis_db(client: redis.Redis) -> int:
    """Claim a database index for this session by naming ``client``'s connection."""
    import redis

    try:
        databases = int(client.config_get("databases").get("databases") or 16)
    except redis.ResponseError:
        databases = 16  # CONFIG may be disabled on managed servers; 16 is the default
    my_id = client.client_id()
    for _ in range(50):
        taken: dict[int, int] = {}
        for entry in client.client_list():
            name, cid = entry.get("name", ""), int(entry["id"])
            if name.startswith(_CLAIM_PREFIX) and cid != my_id:
                taken[int(name[len(_CLAIM_PREFIX) :])] = cid
        free = [i for i in range(1, databases) if i not in taken]
        if not free:
            raise RuntimeError(
                f"all {databases - 1} Redis databases of this server are claimed by other "
                "test sessions; wait for them, or raise `databases` in the Redis config"
            )
        index = free[0]
        client.client_setname(f"{_CLAIM_PREFIX}{index}")
        # Two sessions may have picked the same index at once: the older connection wins.
        rivals = [
            int(e["id"])
            for e in client.client_list()
            if e.get("name") == f"{_CLAIM_PREFIX}{index}" and int(e["id"]) != my_id
        ]
        if not rivals or my_id < min(rivals):
            return index
        client.client_setname("sheetanchor-test-unclaimed")
    raise RuntimeError("could not claim a Redis database for the tests after 50 attempts")


@pytest.fixture(scope="session")
def sheetanchor_redis_db(sheetanchor_redis_server_url: str) -> Iterator[int]:
    """The Redis database index this session claimed (held until the session ends)."""
    import redis

    client = redis.Redis.from_url(sheetanchor_redis_server_url, single_connection_client=True)
    try:
        try:
            index = _claim_redis_db(client)
        except redis.ResponseError as exc:
            # CLIENT LIST / SETNAME refused (ACLs, managed Redis): use the URL's database.
            index = int(parse_url(sheetanchor_redis_server_url).database or 0)
            _log.warning(
                "cannot claim a Redis database (%s); the tests use and flush database %d of %s",
                exc,
                index,
                redact(sheetanchor_redis_server_url),
            )
        yield index
    finally:
        client.close()


@pytest.fixture
def redis_url(sheetanchor_redis_server_url: str, sheetanchor_redis_db: int) -> str:
    """URL of this session's Redis database, flushed before the test."""
    import redis

    url = _with_database(sheetanchor_redis_server_url, str(sheetanchor_redis_db))
    parse_url(url)
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()
    return url


# --------------------------------------------------------------------------- faults


@pytest.fixture
def fault_proxy() -> Iterator[Callable[[str, int], FaultProxy]]:
    """Factory ``fault_proxy(host, port)`` of started :class:`FaultProxy` objects.

    Every proxy it made is closed at teardown. Route a client through one with
    ``proxy.url(original_url)``.
    """
    made: list[FaultProxy] = []

    def make(host: str, port: int) -> FaultProxy:
        proxy = FaultProxy(host, port).start()
        made.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in made:
            proxy.close()


@pytest.fixture(scope="session")
def sheetanchor_private_pg_server() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL server for this session only (own directory and port); removed at end."""
    server = EmbeddedPostgres(private=True)
    server.start()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="session")
def sheetanchor_private_redis_server() -> Iterator[EmbeddedRedis]:
    """A Redis server for this session only (own directory and port); removed at end."""
    server = EmbeddedRedis(private=True)
    server.start()
    try:
        yield server
    finally:
        server.remove()


def _running(server: EmbeddedPostgres | EmbeddedRedis) -> Iterator[Any]:
    # A previous test may have stopped it: every test starts with a running server, and
    # none leaves it stopped for the next one.
    server.start()
    yield server
    if not server.is_ready():
        server.start()


@pytest.fixture
def private_pg(sheetanchor_private_pg_server: EmbeddedPostgres) -> Iterator[EmbeddedPostgres]:
    """This session's own PostgreSQL, running; the test may ``stop()``/``restart()`` it.

    Use ``private_pg.url`` (the ``postgres`` database). Shut down when the session ends.
    """
    yield from _running(sheetanchor_private_pg_server)


@pytest.fixture
def private_redis(sheetanchor_private_redis_server: EmbeddedRedis) -> Iterator[EmbeddedRedis]:
    """This session's own Redis, running; the test may ``stop()``/``restart()`` it."""
    yield from _running(sheetanchor_private_redis_server)


def pytest_report_header(config: pytest.Config) -> str:
    """Say where the servers come from, with passwords masked."""
    pg = pg_url_from_env()
    rd = redis_url_from_env()
    return (
        f"sheetanchor: PostgreSQL={redact(pg) if pg else 'embedded'} "
        f"Redis={redact(rd) if rd else 'embedded'}"
    )


from sheetanchor.testing._pgbouncer import pgbouncer_url, sheetanchor_pgbouncer  # noqa: E402, F401
