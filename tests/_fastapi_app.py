"""A FastAPI app the way a service writes one: module-level ``db`` and ``rc``, closed by the
lifespan. Served by uvicorn in a subprocess by tests/test_fastapi_app.py (configured through
the environment); at shutdown it writes what it saw to ``FASTAPI_APP_REPORT``.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from sqlalchemy import text

from sheetanchor.postgres import Database, PoolSettings
from sheetanchor.redis import RedisClient

db = Database(
    os.environ["FASTAPI_APP_PG_URL"],
    pool=PoolSettings(size=3, max_overflow=2, timeout=30),
    role=os.environ["FASTAPI_APP_ROLE"],
)
rc = RedisClient(os.environ["FASTAPI_APP_REDIS_URL"], name="fastapi_app", max_connections=4)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    stats = db.stats()
    await rc.close()
    await db.close()
    report = {
        "checked_out": stats.checked_out,
        "leaks": stats.leaks,
        "db_closed": db.closed,
        "rc_closed": rc.closed,
    }
    Path(os.environ["FASTAPI_APP_REPORT"]).write_text(json.dumps(report))


app = FastAPI(lifespan=lifespan)


@app.get("/health")
async def health() -> dict[str, bool]:
    return {"ok": True}


@app.get("/item/{n}")
async def item(n: int) -> dict[str, int]:
    # A session holding its connection a while (so requests overlap), Redis, a one-shot read.
    async with db.session() as s:
        value = (
            await s.execute(text("SELECT CAST(:n AS int) FROM pg_sleep(0.05)"), {"n": n})
        ).scalar_one()
    await rc.client().set(f"fastapi:item:{n}", value)
    cached = await rc.client().get(f"fastapi:item:{n}")
    again = await db.fetchval("SELECT $1::int * 2", n)
    return {"n": int(value), "cached": int(cached or 0), "double": int(again)}
