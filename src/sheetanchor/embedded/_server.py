"""The lifecycle both embedded servers share: directory, lock, remembered port, start/stop."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

import psutil

from sheetanchor.config import home_dir
from sheetanchor.embedded._os import (
    HOST,
    STOP_TIMEOUT,
    check_port_arg,
    file_lock,
    free_port,
    live_process,
    log,
    port_is_free,
    read_state,
    tail,
    terminate,
    write_state,
)
from sheetanchor.errors import EmbeddedServerError

_OWNER_FILE = "owner.json"


class Server:
    """What both servers share: a directory, a lock, a remembered port, start/stop."""

    _kind = "server"

    def __init__(
        self,
        data_dir: Path | str | None,
        *,
        port: int | None,
        private: bool,
        start_timeout: float,
        default_name: str,
    ) -> None:
        check_port_arg(port)
        if start_timeout <= 0:
            raise ValueError(f"start_timeout must be > 0 seconds, got {start_timeout!r}")
        self._private = private
        self._owns_dir = False
        if data_dir is not None:
            self._dir = Path(data_dir).expanduser().absolute()
        elif private:
            # Not under pytest's tmp_path: pytest resets its base directory to 0700 at
            # every session start, which would lock the system user out of a live server.
            prefix = f"sheetanchor-{default_name}-"
            self._reap_orphans(prefix)
            self._dir = Path(tempfile.mkdtemp(prefix=prefix))
            self._owns_dir = True
            me = psutil.Process()
            write_state(self._dir / _OWNER_FILE, {"pid": me.pid, "created": me.create_time()})
        else:
            self._dir = (home_dir() / "embedded" / default_name).absolute()
        self._requested_port = port
        self._port: int | None = None
        self._start_timeout = start_timeout

    # -- public surface shared by both

    @property
    def data_dir(self) -> Path:
        """The directory holding this instance's data, logs, state file and lock."""
        return self._dir

    @property
    def private(self) -> bool:
        """True for a private test instance (own directory and port)."""
        return self._private

    @property
    def port(self) -> int:
        """The TCP port on 127.0.0.1, known once started (or found running)."""
        if self._port is None:
            running = self._running()
            if running is None:
                raise EmbeddedServerError(
                    f"embedded {self._kind} in {self._dir} is not running; call start() first"
                )
            self._port = running[1]
        return self._port

    @property
    def url(self) -> str:
        """The URL to connect to this server (raises when it is not started)."""
        return self._url(self.port)

    @property
    def pid(self) -> int | None:
        """PID of the running server, or ``None`` when it is not running."""
        running = self._running()
        return running[0] if running else None

    def start(self) -> str:
        """Start the server, or reuse it if it is already running; return its URL.

        Raises:
            EmbeddedServerError: the directory or port is unusable, or the server did not
                answer within ``start_timeout``. The message says what to fix.
        """
        began = time.monotonic()
        with self._locked():
            running = self._running()
            if running is not None:
                pid, port = running
                if self._requested_port is not None and port != self._requested_port:
                    raise EmbeddedServerError(
                        f"embedded {self._kind} in {self._dir} already runs on port {port} "
                        f"(pid {pid}), not on the requested port {self._requested_port}; "
                        "stop it first or pass port=None"
                    )
                self._port = port
                self._wait_ready(pid)
                log.debug("reusing embedded %s pid %d on %s:%d", self._kind, pid, HOST, port)
                return self.url
            self._launch()
        log.info(
            "embedded %s ready on %s:%d in %.1f s",
            self._kind,
            HOST,
            self.port,
            time.monotonic() - began,
        )
        return self.url

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the server if it runs (a fast shutdown: sessions are ended); idempotent."""
        with self._locked():
            running = self._running()
            if running is None:
                return
            proc = live_process(running[0], self._needle, self._workdir)
            if proc is not None:
                terminate(proc, self._stop_signal, f"embedded {self._kind}", timeout)
            self._after_stop()
        log.info("embedded %s in %s stopped", self._kind, self._dir)

    def restart(self) -> str:
        """Stop then start again on the same port; return the URL."""
        self.stop()
        return self.start()

    def is_ready(self, timeout: float = 2.0) -> bool:
        """True when the server answers a real request (``SELECT 1`` / ``PING``)."""
        running = self._running()
        if running is None:
            return False
        return self._ping(running[1], timeout)

    def remove(self) -> None:
        """Stop the server and delete its directory (all its data)."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=False)
        self._port = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # A private instance made its own temporary directory: leave nothing behind.
        if self._owns_dir:
            self.remove()
        else:
            self.stop()

    def __repr__(self) -> str:
        port = self._port if self._port is not None else "?"
        kind = "private" if self._private else "shared"
        return f"{type(self).__name__}({kind}, dir={str(self._dir)!r}, port={port})"

    # -- shared machinery

    @classmethod
    def _reap_orphans(cls, prefix: str) -> None:
        """Stop and delete private instances whose creating process is gone.

        A test run killed with SIGKILL never reaches its teardown; without this, its
        servers would run, and its directories pile up, until the machine restarts.
        """
        for path in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
            if not os.access(path / _OWNER_FILE, os.R_OK):
                continue  # another user's instance, or one being created right now
            owner = read_state(path / _OWNER_FILE)
            pid, created = owner.get("pid"), owner.get("created")
            if not isinstance(pid, int) or not isinstance(created, int | float):
                continue  # not ours, or just being created
            try:
                if abs(psutil.Process(pid).create_time() - created) < 1.0:
                    continue  # the owner is alive
            except psutil.NoSuchProcess:
                pass
            log.warning("removing orphaned private %s in %s (pid %d is gone)", cls._kind, path, pid)
            try:
                cls._for_dir(path).remove()
            except FileNotFoundError:
                continue  # another process reaped it first
            except (EmbeddedServerError, OSError) as exc:
                log.warning("could not remove orphaned %s: %s", path, exc)

    @classmethod
    def _for_dir(cls, path: Path) -> Server:
        raise NotImplementedError

    _needle = ""
    _stop_signal = signal.SIGTERM

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._make_dir()
        with file_lock(self._dir / "lock"):
            yield

    def _make_dir(self) -> None:
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EmbeddedServerError(
                f"cannot create the {self._kind} directory {self._dir}: {exc.strerror}; "
                f"choose another data_dir or set SHEETANCHOR_HOME to a writable directory"
            ) from exc
        if not self._dir.is_dir():
            raise EmbeddedServerError(
                f"{self._dir} is not a directory; remove it or choose another data_dir"
            )

    @property
    def _state_file(self) -> Path:
        return self._dir / "state.json"

    def _choose_port(self) -> int:
        if self._requested_port is not None:
            if not port_is_free(self._requested_port):
                raise EmbeddedServerError(
                    f"port {self._requested_port} on {HOST} is already in use by another "
                    f"process, so the embedded {self._kind} cannot listen there; pass another "
                    "port, or port=None to pick a free one"
                )
            return self._requested_port
        remembered = read_state(self._state_file).get("port")
        if isinstance(remembered, int):
            if port_is_free(remembered):
                return remembered
            log.warning(
                "port %d remembered for the embedded %s is taken by another process; "
                "picking a new one",
                remembered,
                self._kind,
            )
        return free_port()

    def _remember_port(self, port: int) -> None:
        write_state(self._state_file, {"port": port})

    def _wait_ready(self, pid: int) -> None:
        port = self.port
        deadline = time.monotonic() + self._start_timeout
        while True:
            if self._ping(port, timeout=2.0):
                return
            if live_process(pid, self._needle, self._workdir) is None:
                raise EmbeddedServerError(
                    f"embedded {self._kind} (pid {pid}) exited while starting on "
                    f"{HOST}:{port}. Last log lines of {self._log_file}:\n{tail(self._log_file)}"
                )
            if time.monotonic() > deadline:
                raise EmbeddedServerError(
                    f"embedded {self._kind} on {HOST}:{port} (pid {pid}) did not answer within "
                    f"{self._start_timeout:.0f} s; see {self._log_file}, or stop it and retry. "
                    f"Last log lines:\n{tail(self._log_file)}"
                )
            time.sleep(0.1)

    # -- per-server hooks

    @property
    def _log_file(self) -> Path:
        raise NotImplementedError

    @property
    def _workdir(self) -> Path:
        """The directory the server process runs in (its data directory)."""
        return self._dir

    def _url(self, port: int) -> str:
        raise NotImplementedError

    def _running(self) -> tuple[int, int] | None:
        """``(pid, port)`` of the live server of this directory, or ``None``."""
        raise NotImplementedError

    def _launch(self) -> None:
        raise NotImplementedError

    def _ping(self, port: int, timeout: float) -> bool:
        raise NotImplementedError

    def _after_stop(self) -> None:
        """Clean-up once the process is gone."""
