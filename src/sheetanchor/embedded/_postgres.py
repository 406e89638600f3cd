"""PostgreSQL from the binaries in the ``pgserver`` wheel."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sheetanchor.embedded._os import (
    DEFAULT_START_TIMEOUT,
    HOST,
    SYSTEM_USER,
    grant_pg_binaries,
    grant_traverse,
    is_root,
    live_process,
    log,
    pg_bin_dir,
    pg_major_version,
    port_is_free,
    run_in_thread,
    system_user,
    tail,
)
from sheetanchor.embedded._server import Server
from sheetanchor.errors import EmbeddedServerError

__all__ = ["EmbeddedPostgres"]


class EmbeddedPostgres(Server):
    """A real PostgreSQL server from the ``pgserver`` wheel, on ``127.0.0.1``.

    Args:
        data_dir: the instance directory (``data/`` for PGDATA, ``postgres.log``,
            ``state.json``, ``lock``). Default: ``<home>/embedded/pg<major>`` for the shared
            instance, a fresh temporary directory for a private one.
        port: the TCP port; default: a free one, chosen on the first start and remembered.
        private: a test instance: own directory and port, and durability off (``fsync``,
            ``synchronous_commit``, ``full_page_writes``) because its data is thrown away.
            The shared instance keeps durability on: it outlives test runs and holds the
            demo's data, and a crash with fsync off can corrupt the whole cluster.
        start_timeout: seconds to wait for ``SELECT 1`` to succeed after a start.
        settings: extra ``postgresql.conf`` settings, written verbatim at ``initdb`` time
            (quote string values: ``{"work_mem": "'64MB'"}``).

    The superuser is ``postgres`` with no password (trust authentication on loopback).

    Example::

        with EmbeddedPostgres(private=True) as pg:
            print(pg.url)      # postgresql://postgres@127.0.0.1:<port>/postgres
            pg.restart()
    """

    _kind = "PostgreSQL"
    _needle = "postgres"
    # SIGINT is PostgreSQL's "fast" shutdown: roll back open sessions, then exit cleanly.
    _stop_signal = signal.SIGINT

    def __init__(
        self,
        data_dir: Path | str | None = None,
        *,
        port: int | None = None,
        private: bool = False,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            data_dir,
            port=port,
            private=private,
            start_timeout=start_timeout,
            default_name="pg" if private else f"pg{pg_major_version()}",
        )
        self._settings = dict(settings or {})

    @property
    def pgdata(self) -> Path:
        """The PostgreSQL data directory (``PGDATA``)."""
        return self._dir / "data"

    @classmethod
    def _for_dir(cls, path: Path) -> EmbeddedPostgres:
        return cls(path, private=True)

    @property
    def _log_file(self) -> Path:
        return self._dir / "postgres.log"

    @property
    def _workdir(self) -> Path:
        return self.pgdata

    def _url(self, port: int) -> str:
        return f"postgresql://postgres@{HOST}:{port}/postgres"

    def _running(self) -> tuple[int, int] | None:
        pid_file = self.pgdata / "postmaster.pid"
        try:
            lines = pid_file.read_text().splitlines()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise EmbeddedServerError(
                f"cannot read {pid_file}: {exc.strerror}; fix its permissions or remove it"
            ) from exc
        try:
            pid, port = int(lines[0]), int(lines[3])
        except (IndexError, ValueError):
            # Written line by line at start-up: a partial file means "starting".
            log.debug("incomplete %s: %r", pid_file, lines)
            return None
        return (pid, port) if live_process(pid, self._needle, self.pgdata) else None

    def _ping(self, port: int, timeout: float) -> bool:
        import asyncpg

        url = self._url(port)

        async def select_one() -> object:
            conn = await asyncpg.connect(url, timeout=timeout)
            try:
                return await conn.fetchval("SELECT 1", timeout=timeout)
            finally:
                await conn.close(timeout=timeout)

        try:
            return run_in_thread(select_one) == 1
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.debug("PostgreSQL on %s:%d not ready: %r", HOST, port, exc)
            return False

    # -- running the binaries, as the system user when root

    def _run_as(self) -> dict[str, Any]:
        """``subprocess`` arguments that run a command as the server's owner."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        kwargs: dict[str, Any] = {"env": env, "cwd": str(self._dir)}
        if is_root():
            user = system_user()
            kwargs.update(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
            env["HOME"] = str(self._dir)
        return kwargs

    def _run(self, args: list[str], what: str, timeout: float) -> None:
        # Output goes to temporary files, never pipes: the postmaster that pg_ctl starts
        # inherits them, and reading a pipe would then wait for the server to exit.
        with tempfile.TemporaryFile("w+") as out:
            try:
                result = subprocess.run(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                    start_new_session=True,  # Ctrl-C on the caller must not kill the server
                    **self._run_as(),
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise EmbeddedServerError(
                    f"{what} failed for {self.pgdata}: {exc}; see {self._log_file}"
                ) from exc
            if result.returncode != 0:
                out.seek(0)
                output = out.read().strip()
                raise EmbeddedServerError(
                    f"{what} failed for {self.pgdata} (exit {result.returncode}): {output}\n"
                    f"Last lines of {self._log_file}:\n{tail(self._log_file)}"
                )

    def _prepare_dir(self) -> None:
        if not is_root():
            self._dir.chmod(0o700)
            return
        user = system_user()
        grant_pg_binaries()
        grant_traverse(self._dir.parent)
        for path in [self._dir, *self._dir.iterdir()]:
            if path.name in ("lock", "state.json", "owner.json"):
                continue  # root's own files; the server never touches them
            if path.lstat().st_uid != user.pw_uid and path != self.pgdata:
                os.chown(path, user.pw_uid, user.pw_gid)
        self._dir.chmod(0o700)
        if self.pgdata.exists() and self.pgdata.stat().st_uid != user.pw_uid:
            raise EmbeddedServerError(
                f"{self.pgdata} belongs to uid {self.pgdata.stat().st_uid}, but PostgreSQL "
                f"runs as {SYSTEM_USER!r} (uid {user.pw_uid}) because this process is root; "
                f"run chown -R {SYSTEM_USER} {self.pgdata}, or remove it to start afresh"
            )

    def _initdb(self) -> None:
        if self.pgdata.exists():
            if any(self.pgdata.iterdir()):
                raise EmbeddedServerError(
                    f"{self.pgdata} exists but is not a PostgreSQL data directory (no "
                    "PG_VERSION), maybe an interrupted initdb; remove it to start afresh, "
                    "or choose another data_dir"
                )
            self.pgdata.rmdir()
        args = [
            str(pg_bin_dir() / "initdb"),
            "-D",
            str(self.pgdata),
            "--username=postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
        ]
        if self._private:
            args.append("--no-sync")  # thrown away afterwards; see the class docstring
        self._run(args, "initdb", timeout=300)
        settings = {
            "listen_addresses": "'127.0.0.1'",
            # TCP only: no socket file in /tmp to collide with a system PostgreSQL.
            "unix_socket_directories": "''",
            # Tests open many pools at once; the default 100 is tight.
            "max_connections": "200",
            "shared_buffers": "32MB" if self._private else "128MB",
            "log_min_messages": "warning",
            "log_line_prefix": "'%m [%p] '",
        }
        if self._private:
            settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        settings.update(self._settings)
        conf = "".join(f"{key} = {value}\n" for key, value in settings.items())
        with (self.pgdata / "postgresql.conf").open("a") as fh:
            fh.write(f"\n# added by sheetanchor.embedded\n{conf}")

    def _remove_stale_pid_file(self) -> None:
        pid_file = self.pgdata / "postmaster.pid"
        if pid_file.exists() and self._running() is None:
            # PostgreSQL itself refuses to start if the PID in a stale file now belongs to
            # another process (common after a container restart); the file is ours to drop.
            log.info("removing stale %s", pid_file)
            pid_file.unlink()

    def _launch(self) -> None:
        self._prepare_dir()
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb()
        self._remove_stale_pid_file()
        for attempt in (1, 2):
            port = self._choose_port()
            try:
                self._run(
                    [
                        str(pg_bin_dir() / "pg_ctl"),
                        "start",
                        "-D",
                        str(self.pgdata),
                        "-l",
                        str(self._log_file),
                        "-w",
                        "-t",
                        str(int(self._start_timeout)),
                        "-o",
                        f"-p {port}",
                    ],
                    f"pg_ctl start on {HOST}:{port}",
                    timeout=self._start_timeout + 30,
                )
            except EmbeddedServerError:
                # Another process may have taken the free port between check and bind.
                if attempt == 1 and self._requested_port is None and not port_is_free(port):
                    log.warning("port %d was taken while starting; retrying on another", port)
                    continue
                raise
            break
        self._remember_port(port)
        self._port = port
        running = self._running()
        if running is None:
            raise EmbeddedServerError(
                f"PostgreSQL in {self.pgdata} reported a start but is not running; see "
                f"{self._log_file}:\n{tail(self._log_file)}"
            )
        self._wait_ready(running[0])
