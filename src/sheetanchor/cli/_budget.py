"""``sheetanchor budget``: per-process pool sizes that fit the server's ``max_connections``."""

from __future__ import annotations

import asyncio
import json

import typer
from rich.console import Console
from rich.table import Table

from sheetanchor.cli import app
from sheetanchor.config import pg_url_from_env
from sheetanchor.errors import BudgetExceeded, ConfigError
from sheetanchor.postgres._budget import PoolBudget

__all__ = ["budget"]


@app.command()
def budget(
    processes: int = typer.Option(
        ..., "--processes", "-p", min=1, help="Processes per replica that each hold a pool."
    ),
    replicas: int = typer.Option(1, "--replicas", "-r", min=1, help="Replicas of the service."),
    pg: str | None = typer.Option(
        None, "--pg", help="PostgreSQL URL (itself, not PgBouncer); default SHEETANCHOR_PG_URL."
    ),
    max_connections: int | None = typer.Option(
        None,
        "--max-connections",
        min=1,
        help="Compute offline with this max_connections instead of asking the server.",
    ),
    reserved: int = typer.Option(
        0, "--reserved", min=0, help="Reserved slots, with --max-connections only."
    ),
    headroom: int | None = typer.Option(
        None, "--headroom", min=0, help="Slots kept free for admin/migrations (default 10%)."
    ),
    pool_size: int | None = typer.Option(
        None, "--pool-size", min=1, help="Check this pool size per process instead of proposing."
    ),
    max_overflow: int | None = typer.Option(
        None, "--max-overflow", min=0, help="Check this overflow per process (default 0)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the budget as JSON."),
) -> None:
    """Compute per-process pool sizes that can never exceed max_connections.

    Exit code 1 when the requested --pool-size/--max-overflow could exceed the server.

    Example: sheetanchor budget --processes 5 --replicas 2 --pg postgresql://app@db/app
    """
    try:
        result = _compute(
            pg=pg,
            max_connections=max_connections,
            reserved=reserved,
            processes=processes,
            replicas=replicas,
            headroom=headroom,
            pool_size=pool_size,
            max_overflow=max_overflow,
        )
    except BudgetExceeded as exc:
        if as_json:
            typer.echo(json.dumps({"ok": False, "error": str(exc)}))
        else:
            typer.echo(f"BudgetExceeded: {exc}", err=True)
        raise typer.Exit(1) from exc
    if as_json:
        typer.echo(json.dumps({"ok": True, **result.as_dict()}))
        return
    console = Console()
    console.print(_table(result))
    console.print(result.formula())


def _compute(
    *,
    pg: str | None,
    max_connections: int | None,
    reserved: int,
    processes: int,
    replicas: int,
    headroom: int | None,
    pool_size: int | None,
    max_overflow: int | None,
) -> PoolBudget:
    """The budget, offline from ``--max-connections`` or read from the server."""
    if max_connections is not None:
        return PoolBudget.compute(
            max_connections=max_connections,
            reserved=reserved,
            processes=processes,
            replicas=replicas,
            headroom=headroom,
            pool_size=pool_size,
            max_overflow=max_overflow,
        )
    url = pg or pg_url_from_env()
    if url is None:
        raise ConfigError(
            "no PostgreSQL URL: pass --pg, set SHEETANCHOR_PG_URL, or give --max-connections"
        )
    return asyncio.run(
        PoolBudget.from_server(
            url,
            processes=processes,
            replicas=replicas,
            headroom=headroom,
            pool_size=pool_size,
            max_overflow=max_overflow,
        )
    )


def _table(result: PoolBudget) -> Table:
    """A two-column table of the budget, worst case last."""
    title = "Pool budget" + (f" for {result.server}" if result.server else "")
    table = Table(title=title, show_header=True)
    table.add_column("item")
    table.add_column("value", justify="right")
    rows = [
        ("max_connections", result.max_connections),
        ("reserved", result.reserved),
        ("headroom", result.headroom),
        ("available", result.available),
        ("processes x replicas", f"{result.processes} x {result.replicas}"),
        ("per-process pool_size", result.pool_size),
        ("per-process max_overflow", result.max_overflow),
        ("total worst case", result.worst_case),
        ("spare", result.spare),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    return table
