"""Celery app for the incident-002 test: every task runs its own ``asyncio.run(...)``.

Started by ``tests/test_celery_incident.py`` as ``celery -A tests._celery_app worker``;
configured through the environment the test gives the worker:

    SHEETANCHOR_TEST_CELERY_BROKER  Redis URL for broker and result backend (dedicated db)
    SHEETANCHOR_TEST_CELERY_QUEUE   queue name, unique per test run
    SHEETANCHOR_TEST_CELERY_ROLE    role of the sheetanchor Database, unique per test run
    SHEETANCHOR_PG_URL              the test module's database
    SHEETANCHOR_REDIS_URL           Redis for the tasks' own data
    SHEETANCHOR_TEST_POOL_SIZE      pool size per process for the sheetanchor Database
    SHEETANCHOR_TEST_MAX_OVERFLOW   max_overflow per process for the sheetanchor Database
"""

from __future__ import annotations

import asyncio
import os

from celery import Celery
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from sheetanchor.config import to_sqlalchemy_url
from sheetanchor.integrations.celery import install, run_async
from sheetanchor.postgres import Database, PoolSettings
from sheetanchor.redis import RedisClient

BROKER = os.environ["SHEETANCHOR_TEST_CELERY_BROKER"]
QUEUE = os.environ["SHEETANCHOR_TEST_CELERY_QUEUE"]
ROLE = os.environ.get("SHEETANCHOR_TEST_CELERY_ROLE", "celery")
PG_URL = os.environ["SHEETANCHOR_PG_URL"]
REDIS_URL = os.environ["SHEETANCHOR_REDIS_URL"]

POOL_SIZE = int(os.environ.get("SHEETANCHOR_TEST_POOL_SIZE", "2"))
MAX_OVERFLOW = int(os.environ.get("SHEETANCHOR_TEST_MAX_OVERFLOW", "1"))

NAIVE_TASK = "sheetanchor_test.naive_engine"
OURS_TASK = "sheetanchor_test.sheetanchor_asyncio_run"
OURS_RUN_ASYNC_TASK = "sheetanchor_test.sheetanchor_run_async"

app = Celery("sheetanchor_test", broker=BROKER, backend=BROKER)
app.conf.update(
    task_default_queue=QUEUE,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
    result_expires=600,
)

# Incident 002, verbatim: one engine created at import, used by tasks that each run in a new
# event loop. Its pooled connections stay bound to the loop that opened them.
naive_engine = create_async_engine(
    to_sqlalchemy_url(PG_URL),
    connect_args={"server_settings": {"application_name": "naive:celery"}},
)


async def _naive(number: int) -> int:
    async with naive_engine.connect() as conn:
        value = (await conn.execute(text("SELECT CAST(:n AS int)"), {"n": number})).scalar_one()
    return int(value)


@app.task(name=NAIVE_TASK)
def naive_engine_task(number: int) -> int:
    """The incident's pattern: ``asyncio.run`` around a module-level ``AsyncEngine``."""
    return asyncio.run(_naive(number))


# The sheetanchor way: the same module-level globals, but loop-aware and fork-safe.
install()
db = Database(PG_URL, pool=PoolSettings(size=POOL_SIZE, max_overflow=MAX_OVERFLOW), role=ROLE)
rc = RedisClient(REDIS_URL)


async def _ours(number: int) -> int:
    value = await db.fetchval("SELECT $1::int", number)
    async with db.session() as session:
        await session.execute(text("SELECT pg_catalog.txid_current()"))
    key = f"sheetanchor-test:{QUEUE}:{number % 10}"
    async with rc.client().pipeline(transaction=True) as pipe:
        pipe.incr(key)
        pipe.expire(key, 600)
        await pipe.execute()
    return int(value)


@app.task(name=OURS_TASK)
def sheetanchor_asyncio_run_task(number: int) -> int:
    """The incident's task shape, ``asyncio.run`` per task, over sheetanchor's clients."""
    return asyncio.run(_ours(number))


@app.task(name=OURS_RUN_ASYNC_TASK)
def sheetanchor_run_async_task(number: int) -> int:
    """``run_async``: one loop per worker process, so pools are reused across tasks."""
    return run_async(_ours(number))
