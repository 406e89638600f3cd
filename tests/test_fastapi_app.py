"""Issue #4 item 1 in a FastAPI app: module-level ``db``/``rc`` under a real ASGI server.

uvicorn serves tests/_fastapi_app.py in a subprocess (one process, one loop, as deployed);
40 concurrent requests each run a session, Redis commands and a one-shot read. PostgreSQL
never sees more of the app's connections than its pool allows (size 3 + overflow 2), Redis
no more than ``max_connections``; the lifespan closes both, and the server then shows none.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from sheetanchor.embedded import EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent

_POOL_BUDGET = 3 + 2  # the app's PoolSettings(size=3, max_overflow=2)
_REDIS_BUDGET = 4  # its RedisClient(max_connections=4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        return json.loads(response.read())


def _pg_count(pg_url: str, app_name: str) -> int:
    with psycopg.connect(pg_url, autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app_name,)
        ).fetchone()
    assert row is not None
    count: int = row[0]
    return count


def _redis_count(admin: redis.Redis) -> int:
    return len(admin.client_list()) - 1  # not the admin's own connection


def _settles_at(count: Any, want: int) -> bool:
    """Whether ``count()`` reaches ``want`` within 10 s (a closed backend takes a moment)."""
    deadline = time.monotonic() + 10
    while count() != want:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def served_app(
    pg_url: str, private_redis: EmbeddedRedis, tmp_path: Path
) -> Iterator[tuple[str, str, Path, subprocess.Popen[bytes]]]:
    port = _free_port()
    role = f"fastapi{port}"
    report = tmp_path / "report.json"
    env = {
        **os.environ,
        "FASTAPI_APP_PG_URL": pg_url,
        "FASTAPI_APP_REDIS_URL": private_redis.url,
        "FASTAPI_APP_ROLE": role,
        "FASTAPI_APP_REPORT": str(report),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(ROOT / "tests"),
         "_fastapi_app:app", "--host", "127.0.0.1", "--port", str(port),
         "--lifespan", "on", "--log-level", "warning"],
        env=env,
        cwd=ROOT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                assert _get(f"{base}/health") == {"ok": True}
                break
            except OSError:
                assert proc.poll() is None, "uvicorn exited"
                assert time.monotonic() < deadline, "uvicorn did not come up"
                time.sleep(0.05)
        yield base, role, report, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_fastapi_app_serves_concurrent_requests_within_the_pool_budget(
    served_app: tuple[str, str, Path, subprocess.Popen[bytes]],
    pg_url: str,
    private_redis: EmbeddedRedis,
) -> None:
    base, role, report, proc = served_app
    app_name = f"sheetanchor:{role}:{proc.pid}"
    admin = redis.Redis.from_url(private_redis.url)
    others = _redis_count(admin)  # clients of earlier tests on this server, if any
    seen_pg: list[int] = []
    seen_redis: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen_pg.append(_pg_count(pg_url, app_name))
            seen_redis.append(_redis_count(admin) - others)
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(max_workers=20) as pool:
            replies = list(pool.map(lambda n: _get(f"{base}/item/{n}"), range(40)))
    finally:
        done.set()
        watcher.join()
    assert replies == [{"n": n, "cached": n, "double": 2 * n} for n in range(40)]
    # Requests overlapped (20 at once on a pool of 5), yet the app stayed within budget.
    assert 0 < max(seen_pg) <= _POOL_BUDGET
    assert max(seen_pg) > 1
    assert 0 < max(seen_redis) <= _REDIS_BUDGET

    # Shutdown: uvicorn runs the lifespan's exit, which closes db and rc.
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0
    assert json.loads(report.read_text()) == {
        "checked_out": 0,
        "leaks": 0,
        "db_closed": True,
        "rc_closed": True,
    }
    assert _settles_at(lambda: _pg_count(pg_url, app_name), 0)
    assert _settles_at(lambda: _redis_count(admin), others)
    admin.close()
