"""Shared helpers of the ingest tests: a tick stream, its table, records, fast retries."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sheetanchor.ingest import Stream
from sheetanchor.postgres import Database
from sheetanchor.retry import RetryPolicy

BASE = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
TICK_COLUMNS = {"ts": "timestamptz", "symbol": "text", "price": "float8", "volume": "bigint"}


def table_name(prefix: str = "tick") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


async def create_tick_table(db: Database, table: str, *, check: bool = True) -> None:
    extra = ", CHECK (price >= 0)" if check else ""
    await db.execute(
        f"CREATE TABLE {table} (ts timestamptz NOT NULL, symbol text NOT NULL, "
        f"price float8 NOT NULL, volume bigint NOT NULL, PRIMARY KEY (ts, symbol){extra})"
    )


def tick_stream(table: str, name: str = "ticks", **kwargs: Any) -> Stream:
    return Stream(name, table=table, columns=TICK_COLUMNS, natural_key=("ts", "symbol"), **kwargs)


def tick(i: int, *, price: float = 1.0, symbol: str | None = None) -> dict[str, Any]:
    return {
        "ts": BASE + dt.timedelta(seconds=i),
        "symbol": symbol if symbol is not None else f"S{i % 7}",
        "price": price,
        "volume": i,
    }


def fast_retry(attempts: int = 2) -> RetryPolicy:
    """Tiny backoff and a short budget: tests never wait long for a down database."""
    return RetryPolicy(max_attempts=attempts, initial=0.01, maximum=0.02, deadline=2.0)
