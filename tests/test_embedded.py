"""Embedded PostgreSQL and Redis from the wheels: start, reuse, stop, restart, clear errors.

Marked ``embedded``: these run even when SHEETANCHOR_PG_URL / SHEETANCHOR_REDIS_URL point at
other servers, so both paths are always covered. Nothing here stops the *shared* servers
(other sessions may be using them); stop and restart are tested on private instances.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest
import redis

from sheetanchor.embedded import EmbeddedPostgres, EmbeddedRedis, ensure_servers, pg_major_version
from sheetanchor.errors import EmbeddedServerError

pytestmark = pytest.mark.embedded


def select_one(url: str) -> int:
    async def run() -> int:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            value: int = await conn.fetchval("SELECT 1")
            return value
        finally:
            await conn.close()

    return asyncio.run(run())


def ping(url: str) -> bool:
    client = redis.Redis.from_url(url)
    try:
        return bool(client.ping())
    finally:
        client.close()


@pytest.fixture
def private_pg_server() -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres(private=True) as server:
        yield server


def test_shared_servers_start_and_answer() -> None:
    pg_url, redis_url = ensure_servers()
    assert pg_url.startswith("postgresql://postgres@127.0.0.1:")
    assert select_one(pg_url) == 1
    assert ping(redis_url)
    assert EmbeddedPostgres().is_ready()
    assert EmbeddedRedis().is_ready()


def test_second_start_reuses_the_running_server() -> None:
    first_pg, first_redis = EmbeddedPostgres(), EmbeddedRedis()
    url_pg, url_redis = first_pg.start(), first_redis.start()
    pid_pg, pid_redis = first_pg.pid, first_redis.pid
    assert pid_pg is not None
    assert pid_redis is not None
    again_pg, again_redis = EmbeddedPostgres(), EmbeddedRedis()
    assert again_pg.start() == url_pg
    assert again_redis.start() == url_redis
    assert (again_pg.pid, again_redis.pid) == (pid_pg, pid_redis)


def test_another_process_reuses_the_running_server() -> None:
    pg = EmbeddedPostgres()
    pg.start()
    code = (
        "from sheetanchor.embedded import EmbeddedPostgres as P; p = P(); p.start(); print(p.pid)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120
    )
    assert int(out.stdout.strip()) == pg.pid


def test_private_postgres_stop_start_restart(private_pg_server: EmbeddedPostgres) -> None:
    server = private_pg_server
    assert server.private
    shared = EmbeddedPostgres()
    shared.start()
    assert server.port != shared.port
    assert select_one(server.url) == 1
    port, pid = server.port, server.pid

    server.restart()
    assert server.port == port  # the port is remembered
    assert server.pid != pid
    assert select_one(server.url) == 1

    server.stop()
    assert not server.is_ready()
    assert server.pid is None
    server.stop()  # idempotent
    with pytest.raises(ConnectionRefusedError):
        select_one(f"postgresql://postgres@127.0.0.1:{port}/postgres")
    server.start()
    assert select_one(server.url) == 1


def test_private_instance_leaves_nothing_behind() -> None:
    with EmbeddedRedis(private=True) as server:
        data_dir = server.data_dir
        assert ping(server.url)
        pid = server.pid
        server.restart()
        assert server.pid != pid
        assert ping(server.url)
    assert not data_dir.exists()


@pytest.mark.parametrize("owner", ["this-python", "another-postgres"])
def test_stale_pid_file_naming_another_process_is_ignored(
    private_pg_server: EmbeddedPostgres, owner: str
) -> None:
    # After a container restart the PID in postmaster.pid often belongs to someone else,
    # possibly to another PostgreSQL.
    server = private_pg_server
    port = server.port
    server.stop()
    if owner == "this-python":
        pid = os.getpid()
    else:
        shared = EmbeddedPostgres()
        shared.start()
        assert shared.pid is not None
        pid = shared.pid
    pid_file = server.pgdata / "postmaster.pid"
    pid_file.write_text(f"{pid}\n{server.pgdata}\n0\n{port}\n\n\n\nready\n")
    assert server.pid is None
    assert not server.is_ready()
    server.start()
    assert select_one(server.url) == 1


def test_busy_port_gives_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = EmbeddedRedis(tmp_path / "redis", port=port)
        with pytest.raises(EmbeddedServerError, match=rf"port {port} .* already in use"):
            server.start()


def test_unusable_directory_gives_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(EmbeddedServerError, match="choose another data_dir"):
        EmbeddedRedis(blocker / "redis").start()


def test_foreign_data_directory_is_not_overwritten() -> None:
    with EmbeddedPostgres(private=True, start_timeout=30) as server:
        server.stop()
        # Not a data directory: PG_VERSION is missing but files are there.
        (server.pgdata / "PG_VERSION").unlink()
        with pytest.raises(EmbeddedServerError, match="not a PostgreSQL data directory"):
            server.start()


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="port"):
        EmbeddedRedis(port=70000)
    with pytest.raises(ValueError, match="start_timeout"):
        EmbeddedRedis(start_timeout=0)


@pytest.fixture
def scratch() -> Iterator[Path]:
    # Not tmp_path: as root, the server's user must traverse the path, and pytest resets
    # its base directory to 0700 whenever any pytest session starts on this machine.
    path = Path(tempfile.mkdtemp(prefix="sheetanchor-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.slow
def test_two_processes_initialising_at_once_share_one_server(scratch: Path) -> None:
    data_dir = scratch / "pg"
    code = textwrap.dedent(
        f"""
        from sheetanchor.embedded import EmbeddedPostgres
        p = EmbeddedPostgres({str(data_dir)!r}, private=True)
        p.start()
        print(p.pid)
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs)
        pids = {int(out.strip()) for out in outputs}
        assert len(pids) == 1
    finally:
        EmbeddedPostgres(data_dir, private=True).remove()


def test_orphaned_private_instance_is_reaped() -> None:
    # A run killed with SIGKILL never tears down; the next private instance cleans up.
    code = textwrap.dedent(
        """
        import os, signal
        from sheetanchor.embedded import EmbeddedRedis
        r = EmbeddedRedis(private=True)
        r.start()
        print(r.data_dir, r.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == -9, out.stderr
    data_dir, pid = out.stdout.split()
    orphan = psutil.Process(int(pid))
    assert Path(data_dir).is_dir()
    with EmbeddedRedis(private=True) as fresh:
        assert Path(data_dir) != fresh.data_dir
        assert not Path(data_dir).exists()
        assert psutil.wait_procs([orphan], timeout=10)[1] == [] or (
            orphan.status() == psutil.STATUS_ZOMBIE
        )


def _reachable_by_others(path: Path) -> bool:
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents])


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_non_root_user_path(scratch: Path) -> None:
    """The path of an ordinary user: no system user, no chmod, servers run as that user."""
    import sheetanchor
    from sheetanchor.embedded import pg_bin_dir

    package = Path(sheetanchor.__file__).parent
    if not (_reachable_by_others(package) and _reachable_by_others(pg_bin_dir())):
        pytest.skip("the project is in a private directory other users cannot reach")
    nobody = pwd.getpwnam("nobody")
    scratch.chmod(0o755)
    home = scratch / "home"
    home.mkdir()
    os.chown(home, nobody.pw_uid, nobody.pw_gid)
    code = textwrap.dedent(
        """
        from sheetanchor.embedded import EmbeddedPostgres, EmbeddedRedis, ensure_servers
        first = ensure_servers()
        pid = EmbeddedPostgres().pid
        assert ensure_servers() == first and EmbeddedPostgres().pid == pid
        EmbeddedPostgres().stop()
        EmbeddedRedis().stop()
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHEETANCHOR_")}
    env.update(HOME=str(home), SHEETANCHOR_HOME=str(home / "sa"))
    try:
        out = subprocess.run(
            [sys.executable, "-W", "error", "-c", code],
            user=nobody.pw_uid,
            group=nobody.pw_gid,
            extra_groups=[],
            env=env,
            cwd=home,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        # Whatever happened in there, leave no server running.
        EmbeddedPostgres(home / "sa" / "embedded" / f"pg{pg_major_version()}").stop()
        EmbeddedRedis(home / "sa" / "embedded" / "redis").stop()
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    assert (home / "sa" / "embedded").stat().st_uid == nobody.pw_uid
