"""A real PgBouncer in transaction mode in front of the test PostgreSQL.

Fixtures:
    sheetanchor_pgbouncer  session: the running :class:`PgBouncer` (its own process and port)
    pgbouncer_url          module: ``pg_url`` (this module's fresh database) through PgBouncer

PgBouncer comes from the system (Debian package ``pgbouncer``). When it is missing the tests
that need it are skipped, unless ``SHEETANCHOR_REQUIRE_PGBOUNCER=1`` (CI), then they fail.
PgBouncer refuses to run as root; as root it is told to switch to ``nobody`` after binding.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO
from urllib.parse import quote, urlencode

import pytest

from sheetanchor.config import env, parse_url, redact
from sheetanchor.errors import EmbeddedServerError

__all__ = [
    "ENV_REQUIRE_PGBOUNCER",
    "PgBouncer",
    "binary_or_skip",
    "find_pgbouncer",
    "pgbouncer_url",
    "sheetanchor_pgbouncer",
]

ENV_REQUIRE_PGBOUNCER = "SHEETANCHOR_REQUIRE_PGBOUNCER"
#: Server connections per (database, user): small, so clients really share them.
DEFAULT_POOL_SIZE = 4
_START_TIMEOUT = 15.0
# Debian installs the binary in /usr/sbin, which is not on a normal user's PATH.
_FALLBACK_PATHS = ("/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer")
_UNPRIVILEGED_USER = "nobody"


def find_pgbouncer() -> str | None:
    """Path of the ``pgbouncer`` binary, or ``None`` when it is not installed."""
    found = shutil.which("pgbouncer")
    if found:
        return found
    return next((p for p in _FALLBACK_PATHS if os.access(p, os.X_OK)), None)


def _version(binary: str) -> tuple[int, int]:
    """(major, minor) of ``pgbouncer --version``; (0, 0) when it cannot be read."""
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    match = re.search(r"PgBouncer (\d+)\.(\d+)", out)
    return (int(match[1]), int(match[2])) if match else (0, 0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _quote(value: str) -> str:
    """Quote a value for a PgBouncer connection string (single quotes, doubled inside)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class PgBouncer:
    """One PgBouncer process in transaction mode, in front of ``upstream_url``'s server.

    Every database name is forwarded (``* =``) to the same host and port, as the upstream
    URL's user; clients authenticate with ``auth_type = trust``. ``server_round_robin = 1``
    makes consecutive transactions of a client use different server connections, so code
    that relies on server-side session state fails deterministically. Use :meth:`url_for` to turn
    a PostgreSQL URL into the same URL through PgBouncer.

    Args:
        binary: path of ``pgbouncer``.
        upstream_url: URL of the PostgreSQL server to pool.
        directory: where the config, user list and log go.
        pool_size: server connections per (database, user).
    """

    def __init__(
        self,
        binary: str,
        upstream_url: str,
        directory: Path,
        *,
        pool_size: int = DEFAULT_POOL_SIZE,
    ) -> None:
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        self.binary = binary
        self.upstream = parse_url(upstream_url)
        self.directory = directory
        self.pool_size = pool_size
        self.host = "127.0.0.1"
        self.port = 0
        self.log_path = directory / "pgbouncer.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def url_for(self, url: str) -> str:
        """``url`` (same user, password and database) pointed at this PgBouncer."""
        parsed = parse_url(url)
        userinfo = ""
        if parsed.user:
            userinfo = quote(parsed.user, safe="")
            if parsed.password:
                userinfo += ":" + quote(parsed.password, safe="")
            userinfo += "@"
        database = quote(parsed.database or "postgres", safe="")
        query = urlencode([(k, v) for k, v in parsed.query if k != "host"])
        tail = f"?{query}" if query else ""
        return f"postgresql://{userinfo}{self.host}:{self.port}/{database}{tail}"

    def _write_config(self) -> Path:
        upstream_user = self.upstream.user or "postgres"
        target = f"host={self.upstream.host or '127.0.0.1'} port={self.upstream.port or 5432}"
        target += f" user={upstream_user}"
        if self.upstream.password:
            target += f" password={_quote(self.upstream.password)}"
        users = self.directory / "users.txt"
        users.write_text(f'"{upstream_user}" ""\n', encoding="utf-8")
        lines = [
            "[databases]",
            f"* = {target}",
            "[pgbouncer]",
            f"listen_addr = {self.host}",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            "auth_type = trust",
            f"auth_file = {users}",
            "pool_mode = transaction",
            # Hand out server connections in turn instead of reusing the last one (LIFO):
            # consecutive transactions of one client land on different server connections,
            # as they do on a busy production PgBouncer, so per-connection server state
            # (prepared statements, SET, temp tables) breaks every time, not by chance.
            "server_round_robin = 1",
            f"default_pool_size = {self.pool_size}",
            "max_client_conn = 500",
            # psycopg and JDBC send it; PgBouncer would refuse the login otherwise.
            "ignore_startup_parameters = extra_float_digits",
        ]
        if _version(self.binary) >= (1, 21):
            # Newer PgBouncers can track protocol-level prepared statements; keep the classic
            # behaviour, which is what production PgBouncers in transaction mode still do.
            lines.append("max_prepared_statements = 0")
        if os.geteuid() == 0:
            # "PgBouncer should not run as root": it drops to this user after binding.
            lines.append(f"user = {_UNPRIVILEGED_USER}")
        config = self.directory / "pgbouncer.ini"
        config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return config

    def start(self) -> None:
        """Start PgBouncer on a free port and wait until it accepts connections.

        Raises:
            EmbeddedServerError: it exited or did not listen within 15 s (log tail included).
        """
        self.port = _free_port()
        config = self._write_config()
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [self.binary, str(config)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            try:
                with socket.create_connection((self.host, self.port), timeout=1.0):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise EmbeddedServerError(
            f"PgBouncer ({self.binary}) did not listen on {self.host}:{self.port} within "
            f"{_START_TIMEOUT} s in front of {self.upstream.address}; its log "
            f"({self.log_path}) ends with:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of PgBouncer's log, passwords redacted."""
        if not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return redact("\n".join(text.splitlines()[-lines:]))

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after 10 s) and close the log."""
        if self._process is not None:
            if self._process.poll() is None:
                self._process.terminate()
                try:
                    self._process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait(timeout=10)
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> PgBouncer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def binary_or_skip(binary: str | None) -> str:
    """``binary``, or skip the test (fail it when ``SHEETANCHOR_REQUIRE_PGBOUNCER=1``)."""
    if binary is not None:
        return binary
    reason = (
        "pgbouncer is not installed (Debian: apt-get install pgbouncer); "
        f"{ENV_REQUIRE_PGBOUNCER}=1 makes this a failure"
    )
    if env(ENV_REQUIRE_PGBOUNCER) == "1":
        pytest.fail(f"{ENV_REQUIRE_PGBOUNCER}=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def sheetanchor_pgbouncer(
    sheetanchor_pg_server_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PgBouncer]:
    """A PgBouncer (transaction mode, trust auth) in front of the test PostgreSQL server."""
    binary = binary_or_skip(find_pgbouncer())
    with PgBouncer(
        binary, sheetanchor_pg_server_url, tmp_path_factory.mktemp("pgbouncer")
    ) as bouncer:
        yield bouncer


@pytest.fixture(scope="module")
def pgbouncer_url(sheetanchor_pgbouncer: PgBouncer, pg_url: str) -> str:
    """URL of this module's fresh database (``pg_url``) through PgBouncer in transaction mode."""
    return sheetanchor_pgbouncer.url_for(pg_url)
