"""Celery app for the incident-002 test: every task runs its own ``asyncio.run(...)``.

Started by ``tests/test_celery_incident.py`` as ``celery -A tests._celery_app worker``;
configured through the environment the test gives the worker:

    SHEETANCHOR_TEST_CELERY_BROKER  Redis URL for broker and result backend (dedicated db)
    SHEETANCHOR_TEST_CELERY_QUEUE   queue name, unique per test run
    SHEETANCHOR_PG_URL              the test module's database
    SHEETANCHOR_REDIS_URL           Redis for the tasks' own data
    SHEETANCHOR_TEST_POOL_SIZE      pool_size per process for the sheetanchor Database
    SHEETANCHOR_TEST_MAX_OVERFLOW   max_overflow per process for the sheetanchor Database
"""

from __future__ import annotations

import asyncio
import os

from celery import Celery
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from sheetanchor.config import to_sqlalchemy_url

BROKER = os.environ["SHEETANCHOR_TEST_CELERY_BROKER"]
QUEUE = os.environ["SHEETANCHOR_TEST_CELERY_QUEUE"]
PG_URL = os.environ["SHEETANCHOR_PG_URL"]
REDIS_URL = os.environ["SHEETANCHOR_REDIS_URL"]

NAIVE_TASK = "sheetanchor_test.naive_engine"
OURS_TASK = "sheetanchor_test.sheetanchor_clients"

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
