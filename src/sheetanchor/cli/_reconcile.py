"""``sheetanchor reconcile``: compare a cached table with Redis; report and repair drift."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import typer
from rich.console import Console

from sheetanchor.cli import app
from sheetanchor.config import ENV_PG_URL, ENV_REDIS_URL, pg_url_from_env, redis_url_from_env
from sheetanchor.state import DriftReport

__all__ = ["reconcile"]


async def _run(
    pg_url: str,
    redis_url: str,
    *,
    table: str,
    key_column: str,
    version_column: str,
    columns: list[str] | None,
    namespace: str | None,
    limit: int | None,
    sample: float | None,
    repair: bool,
    fill_missing: bool,
) -> DriftReport:
    from sheetanchor.postgres import Database
    from sheetanchor.redis import RedisClient
    from sheetanchor.state import CachedStore, Reconciler

    async with Database(pg_url) as db, RedisClient(redis_url) as rc:
        store = CachedStore(
            db,
            rc,
            table=table,
            key_column=key_column,
            version_column=version_column,
            value_columns=columns,
            namespace=namespace,
        )
        reconciler = Reconciler(store, fill_missing=fill_missing)
        return await reconciler.run(limit=limit, sample=sample, repair=repair)


@app.command()
def reconcile(
    table: Annotated[str, typer.Option(help="The cached table (name or schema.name).")],
    key_column: Annotated[str, typer.Option(help="Its key column.")] = "id",
    version_column: Annotated[str, typer.Option(help="Its version column.")] = "version",
    columns: Annotated[
        str | None,
        typer.Option(help="Comma-separated value columns (default: all other columns)."),
    ] = None,
    namespace: Annotated[
        str | None, typer.Option(help="Redis key prefix (default: sa:<table>).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Check at most this many rows.")] = None,
    sample: Annotated[
        float | None, typer.Option(help="Check this random fraction of rows (0 < s <= 1).")
    ] = None,
    repair: Annotated[bool, typer.Option("--repair", help="Fix what is wrong.")] = False,
    fill_missing: Annotated[
        bool, typer.Option("--fill-missing", help="With --repair, also cache uncached rows.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    pg: Annotated[
        str | None, typer.Option(help=f"PostgreSQL URL (default: ${ENV_PG_URL}).")
    ] = None,
    redis: Annotated[
        str | None, typer.Option(help=f"Redis URL (default: ${ENV_REDIS_URL}).")
    ] = None,
) -> None:
    """Compare a CachedStore's table with its Redis entries: missing, stale, ahead, orphan.

    Exit 0 when nothing is wrong (or everything wrong was repaired), 1 when drift remains
    (uncached rows filled by --fill-missing are reported apart and do not count as repairs),
    2 on bad usage. Repairs go through the version fence, so they are safe on a live system.

    Example: sheetanchor reconcile --table worlds --repair --json
    """
    console = Console(stderr=True)
    pg_url = pg or pg_url_from_env()
    redis_url = redis or redis_url_from_env()
    if not pg_url or not redis_url:
        console.print(f"need both servers: pass --pg/--redis or set {ENV_PG_URL}/{ENV_REDIS_URL}")
        raise typer.Exit(2)
    if sample is not None and not 0 < sample <= 1:
        console.print(f"--sample must be in (0, 1], got {sample}")
        raise typer.Exit(2)
    if limit is not None and limit < 1:
        console.print(f"--limit must be >= 1, got {limit}")
        raise typer.Exit(2)
    report = asyncio.run(
        _run(
            pg_url,
            redis_url,
            table=table,
            key_column=key_column,
            version_column=version_column,
            columns=[c.strip() for c in columns.split(",") if c.strip()] if columns else None,
            namespace=namespace,
            limit=limit,
            sample=sample,
            repair=repair,
            fill_missing=fill_missing,
        )
    )
    data = {
        **report._asdict(),
        "drift": report.drift,
        "remaining": report.remaining,
        "examples": list(report.examples),
    }
    if as_json:
        typer.echo(json.dumps(data))
    else:
        out = Console()
        out.print(
            f"{report.table}: checked {report.checked}, cached {report.cached}, "
            f"missing {report.missing}, stale {report.stale}, ahead {report.ahead}, "
            f"orphan {report.orphan}, repaired {report.repaired}, filled {report.filled}, "
            f"drift left {report.remaining} ({report.seconds:.2f} s)",
            highlight=False,
        )
        for example in report.examples:
            out.print(f"  {example}", highlight=False)
    # Only drift repaired counts against drift found: cached rows that were merely missing
    # (--fill-missing) are reported as "filled" and never hide a refused or failed repair.
    if report.remaining > 0:
        raise typer.Exit(1)
