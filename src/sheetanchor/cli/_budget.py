"""``sheetanchor budget``: per-process pool sizes that fit the server's ``max_connections``."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sheetanchor.cli import app
from sheetanchor.config import ENV_PG_URL, pg_url_from_env
from sheetanchor.errors import BudgetExceeded
from sheetanchor.postgres._budget import PoolBudget

__all__ = ["budget"]


@app.command()
def budget(
    processes: Annotated[
        int,
        typer.Option("--processes", "-p", min=1, help="Processes per replica, each with a pool."),
    ],
    replicas: Annotated[
        int, typer.Option("--replicas", "-r", min=1, help="Replicas of the service.")
    ] = 1,
    pg: Annotated[
        str | None,
        typer.Option(help=f"PostgreSQL URL, not PgBouncer's (default: ${ENV_PG_URL})."),
    ] = None,
    max_connections: Annotated[
        int | None,
        typer.Option(min=1, help="Compute offline with this max_connections; no server needed."),
    ] = None,
    reserved: Annotated[
        int | None,
        typer.Option(min=0, help="Reserved slots; only with --max-connections (default 0)."),
    ] = None,
    headroom: Annotated[
        int | None,
        typer.Option(min=0, help="Slots kept free for admin and migrations (default 10%, >= 3)."),
    ] = None,
    pool_size: Annotated[
        int | None,
        typer.Option(min=1, help="Check this pool size per process instead of proposing one."),
    ] = None,
    max_overflow: Annotated[
        int | None,
        typer.Option(
            min=0, help="Check this max_overflow per process (default 0 with --pool-size)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the budget as JSON.")] = False,
) -> None:
    """Per-process pool sizes that can never exceed the server's max_connections.

    Rule: processes x replicas x (pool_size + max_overflow) <= available connections.

    Exit 0 when it fits, 1 when the requested sizes could exceed it, 2 on bad usage.

    Example: sheetanchor budget -p 5 -r 2 --pg postgresql://app@db:5432/app
    """
    url = pg or pg_url_from_env()
    if max_connections is None and url is None:
        typer.echo(f"no server: pass --pg, set {ENV_PG_URL}, or give --max-connections", err=True)
        raise typer.Exit(2)
    if max_connections is None and reserved is not None:
        typer.echo("--reserved needs --max-connections (the server reports its own)", err=True)
        raise typer.Exit(2)
    try:
        if max_connections is not None:
            result = PoolBudget.compute(
                max_connections=max_connections,
                reserved=reserved or 0,
                processes=processes,
                replicas=replicas,
                headroom=headroom,
                pool_size=pool_size,
                max_overflow=max_overflow,
            )
        else:
            assert url is not None  # checked above
            result = asyncio.run(
                PoolBudget.from_server(
                    url,
                    processes=processes,
                    replicas=replicas,
                    headroom=headroom,
                    pool_size=pool_size,
                    max_overflow=max_overflow,
                )
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
    console.print(result.formula(), highlight=False)


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
