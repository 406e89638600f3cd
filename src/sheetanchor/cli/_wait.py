"""``sheetanchor wait``: block until PostgreSQL and Redis are really ready."""

from __future__ import annotations

import asyncio
import math
from typing import Annotated

import typer
from rich.console import Console

from sheetanchor.cli import app
from sheetanchor.config import ENV_PG_URL, ENV_REDIS_URL, pg_url_from_env, redis_url_from_env
from sheetanchor.errors import NotReady
from sheetanchor.runtime import Attempt, wait_for_services

__all__ = ["wait"]


@app.command()
def wait(
    pg: Annotated[
        str | None, typer.Option(help=f"PostgreSQL URL (default: ${ENV_PG_URL}).")
    ] = None,
    redis: Annotated[
        str | None, typer.Option(help=f"Redis URL (default: ${ENV_REDIS_URL}).")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 60.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on success.")] = False,
) -> None:
    """Wait until PostgreSQL answers a real query and Redis answers PING.

    Exit 0 when both are ready, 1 on timeout (with the last error), 2 on bad usage.
    Use it before the app starts, e.g. in a container entrypoint:

        sheetanchor wait --timeout 60 && exec python -m myservice
    """
    console = Console(stderr=True)
    pg_url = pg or pg_url_from_env()
    redis_url = redis or redis_url_from_env()
    if not pg_url and not redis_url:
        console.print(f"nothing to wait for: pass --pg/--redis or set {ENV_PG_URL}/{ENV_REDIS_URL}")
        raise typer.Exit(2)
    if not math.isfinite(timeout) or timeout <= 0:
        console.print(f"--timeout must be a finite number of seconds > 0, got {timeout}")
        raise typer.Exit(2)

    def progress(attempt: Attempt) -> None:
        if not quiet:
            console.print(
                f"[dim]{attempt.elapsed:5.1f}s[/] waiting for {attempt.target} "
                f"(attempt {attempt.number}): {attempt.error}",
                highlight=False,
            )

    try:
        took = asyncio.run(
            wait_for_services(pg=pg_url, redis=redis_url, timeout=timeout, on_attempt=progress)
        )
    except NotReady as exc:
        console.print(f"[red]NotReady[/]: {exc}", highlight=False)
        raise typer.Exit(1) from None
    if not quiet:
        for name, seconds in took.items():
            console.print(f"[green]ready[/] {name} after {seconds:.2f} s", highlight=False)
