"""Incident 002 in a real Celery worker: tasks that each run ``asyncio.run(...)``.

A module-level ``AsyncEngine`` used from a new event loop per task fails ("attached to a
different loop", "another operation is in progress"). sheetanchor's module-level
``Database`` and ``RedisClient`` serve every loop of every worker process, and the
connections they hold on the server stay within the pool budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from celery import Celery
from celery.result import AsyncResult, ResultSet

from sheetanchor.postgres import PoolBudget

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
NAIVE_TASK = "sheetanchor_test.naive_engine"
OURS_TASK = "sheetanchor_test.sheetanchor_asyncio_run"
OURS_RUN_ASYNC_TASK = "sheetanchor_test.sheetanchor_run_async"
TASKS = 200
POOL_SIZE, MAX_OVERFLOW = 2, 1
CONCURRENCY = 2
RESULT_TIMEOUT = 40.0


def _redis_db(url: str, db: int) -> str:
    base, _, query = url.partition("?")
    head = base.rsplit("/", 1)[0] if base.count("/") >= 3 else base
    return f"{head}/{db}" + (f"?{query}" if query else "")


@dataclass
class Worker:
    """A running ``celery worker`` subprocess and a client app on the same broker."""

    pool: str
    process: subprocess.Popen[bytes]
    client: Celery
    queue: str
    log: Path
    pg_url: str
    budget: PoolBudget
    role: str  # the worker Database's role, unique to this run: its application_name prefix

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def run(self, task: str, count: int) -> tuple[list[object], int]:
        """Send ``count`` tasks; return their results (exceptions for failures) and the most
        sheetanchor connections seen on the server while they ran."""
        results = ResultSet(
            [self.client.send_task(task, args=(n,), queue=self.queue) for n in range(count)]
        )
        peak = 0
        deadline = time.monotonic() + RESULT_TIMEOUT
        with psycopg.connect(self.pg_url, autocommit=True) as monitor:
            while not results.ready():
                peak = max(peak, _sheetanchor_connections(monitor, self.role))
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"{count} {task} tasks not done after {RESULT_TIMEOUT} s on the "
                        f"{self.pool} worker; its log ends with:\n{self.log_tail()}"
                    )
                if self.process.poll() is not None:
                    pytest.fail(f"the {self.pool} worker exited:\n{self.log_tail()}")
                time.sleep(0.1)
            peak = max(peak, _sheetanchor_connections(monitor, self.role))
        values = [r.get(propagate=False) for r in results.results]
        for result in results.results:
            assert isinstance(result, AsyncResult)
            result.forget()
        return values, peak

    def connections_after_idle(self, limit: float = 10.0) -> int:
        """sheetanchor connections left on the server, waiting up to ``limit`` s for zero."""
        deadline = time.monotonic() + limit
        with psycopg.connect(self.pg_url, autocommit=True) as monitor:
            while (
                count := _sheetanchor_connections(monitor, self.role)
            ) and time.monotonic() < deadline:
                time.sleep(0.1)
        return count


def _sheetanchor_connections(monitor: psycopg.Connection[tuple[object, ...]], role: str) -> int:
    # Only this worker's Database (its role is unique to this run): other runs and other
    # tests sharing the server cannot inflate the count.
    row = monitor.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name LIKE %s",
        (f"sheetanchor:{role}:%",),
    ).fetchone()
    assert row is not None
    return int(str(row[0]))


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Warm shutdown (SIGTERM); the worker's process group is killed if that takes too long.

    The group is the one the worker leads (``start_new_session``): its pool children and
    nothing else.
    """
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
    # Pool children that outlived their parent (none after a warm shutdown).
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module", params=["prefork", "solo"])
def worker(
    request: pytest.FixtureRequest,
    pg_url: str,
    sheetanchor_redis_server_url: str,
    sheetanchor_redis_db: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Worker]:
    pool: str = request.param
    # The sizes every worker process uses, checked against the real server's limits first.
    budget = asyncio.run(
        PoolBudget.from_server(
            pg_url,
            processes=CONCURRENCY if pool == "prefork" else 1,
            pool_size=POOL_SIZE,
            max_overflow=MAX_OVERFLOW,
        )
    )
    # The Redis database this test session claimed (no other session uses it): broker,
    # results and the tasks' keys, kept apart by a unique queue name and key prefix.
    broker = _redis_db(sheetanchor_redis_server_url, sheetanchor_redis_db)
    run_id = uuid.uuid4().hex[:12]
    queue = f"sheetanchor-test-{run_id}"
    role = f"celery-{run_id}"
    log = tmp_path_factory.mktemp(f"celery-{pool}") / "worker.log"
    env = {
        **os.environ,
        "SHEETANCHOR_TEST_CELERY_BROKER": broker,
        "SHEETANCHOR_TEST_CELERY_QUEUE": queue,
        "SHEETANCHOR_TEST_CELERY_ROLE": role,
        "SHEETANCHOR_PG_URL": pg_url,
        "SHEETANCHOR_REDIS_URL": broker,
        "SHEETANCHOR_TEST_POOL_SIZE": str(budget.pool_size),
        "SHEETANCHOR_TEST_MAX_OVERFLOW": str(budget.max_overflow),
    }
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tests._celery_app",
        "worker",
        f"--pool={pool}",
        "--queues",
        queue,
        "--loglevel=WARNING",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    if pool == "prefork":
        command.append(f"--concurrency={CONCURRENCY}")
    client = Celery("sheetanchor_test_client", broker=broker, backend=broker)
    client.conf.update(broker_connection_retry_on_startup=True, task_serializer="json")
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so teardown can reap children
        )
    try:
        yield Worker(pool, process, client, queue, log, pg_url, budget, role)
    finally:
        _stop(process)
        client.close()


def test_naive_module_level_engine_fails_across_task_loops(worker: Worker) -> None:
    values, _ = worker.run(NAIVE_TASK, 20)
    errors = [str(v) for v in values if isinstance(v, BaseException)]
    assert errors, f"the naive engine should fail on the {worker.pool} worker"
    assert any(
        "attached to a different loop" in e or "another operation is in progress" in e
        for e in errors
    ), errors[:3]


@pytest.mark.parametrize("task", [OURS_TASK, OURS_RUN_ASYNC_TASK])
def test_module_level_database_and_redis_survive_every_task_loop(worker: Worker, task: str) -> None:
    values, peak = worker.run(task, TASKS)
    errors = [f"{type(v).__name__}: {v}" for v in values if isinstance(v, BaseException)]
    assert errors == [], f"{len(errors)} of {TASKS} tasks failed on the {worker.pool} worker"
    assert values == list(range(TASKS))
    if task == OURS_RUN_ASYNC_TASK:
        assert peak > 0  # its pools outlive each task, so the monitor must have seen them
    else:
        # Each task's engine was disposed inside its loop when asyncio.run ended.
        assert worker.connections_after_idle() == 0
    assert peak <= worker.budget.worst_case, (
        f"{peak} sheetanchor connections on the server; budget {worker.budget.formula()}"
    )
