"""``sheetanchor demo``: replay the incidents, naive pattern against sheetanchor."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sheetanchor.cli import app
from sheetanchor.config import home_dir, redact
from sheetanchor.demo._drill import Drill, DrillResult
from sheetanchor.demo._runner import resolve_servers, run_drills
from sheetanchor.demo.drills import all_drills
from sheetanchor.observe import configure_logging

__all__ = ["demo"]

#: Default demo runs kept under the sheetanchor home (older ones are removed): bounded disk use.
_KEEP_RUNS = 5


def _default_workdir() -> Path:
    runs = home_dir() / "demo"
    runs.mkdir(parents=True, exist_ok=True)
    previous = sorted(p for p in runs.iterdir() if p.is_dir())  # names sort by time
    keep = _KEEP_RUNS - 1  # room for the run about to start
    for old in previous[: max(0, len(previous) - keep)]:
        shutil.rmtree(old)
    return runs / time.strftime("%Y%m%d-%H%M%S")


def _table(results: list[DrillResult]) -> Table:
    table = Table(title="sheetanchor demo: the incidents, replayed against real servers")
    table.add_column("drill", style="bold")
    table.add_column("failure")
    table.add_column("naive pattern")
    table.add_column("sheetanchor")
    table.add_column("time", justify="right")
    table.add_column("verdict")
    for r in results:
        naive = f"[red]{r.naive}[/]" if r.naive_failed else f"[yellow]{r.naive}[/]"
        ours = f"[green]{r.ours}[/]" if r.ours_ok else f"[red]{r.ours}[/]"
        took = f"{r.seconds:.2f} s" if r.seconds is not None else "-"
        verdict = "[green]PASS[/]" if r.passed else "[red]FAIL[/]"
        table.add_row(r.drill, r.title, naive, ours, took, verdict)
    return table


@app.command()
def demo(
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help="Run only these drills (repeatable), e.g. --only 001."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
    workdir: Annotated[
        Path | None,
        typer.Option(
            help="Directory for drill files (charts, dead letters); "
            "default: a new run directory under the sheetanchor home (last 5 kept)."
        ),
    ] = None,
    list_only: Annotated[bool, typer.Option("--list", help="List the drills and exit.")] = False,
) -> None:
    """Replay each incident: the naive pattern fails, sheetanchor survives.

    Uses SHEETANCHOR_PG_URL / SHEETANCHOR_REDIS_URL when set, otherwise starts embedded
    PostgreSQL and Redis from the installed wheels. Exit 1 if any drill fails.

    Example: sheetanchor demo --only 001 --json
    """
    console = Console(stderr=as_json)
    if as_json:
        configure_logging(stream="stderr")  # stdout carries the JSON document only
    drills: list[Drill] = all_drills()
    if list_only:
        for d in drills:
            typer.echo(f"{d.id}  {d.title}")
        return
    if only:
        unknown = sorted(set(only) - {d.id for d in drills})
        if unknown:
            known = ", ".join(d.id for d in drills)
            console.print(f"unknown drill(s): {', '.join(unknown)}; known: {known}")
            raise typer.Exit(2)
        drills = [d for d in drills if d.id in only]

    with console.status("starting servers (embedded PostgreSQL and Redis on first run)..."):
        servers = resolve_servers()
    console.print(
        f"servers ({servers.source}): PostgreSQL {redact(servers.pg_url)}, "
        f"Redis {redact(servers.redis_url)}",
        highlight=False,
    )
    target = workdir or _default_workdir()
    status = console.status("")

    def started(drill: Drill) -> None:
        status.update(f"drill {drill.id}: {drill.title} ...")

    def done(result: DrillResult) -> None:
        mark = "[green]PASS[/]" if result.passed else "[red]FAIL[/]"
        console.print(f"{mark} drill {result.drill}: {result.title}", highlight=False)

    with status:
        results = asyncio.run(run_drills(drills, servers, target, on_start=started, on_done=done))
    if as_json:
        payload = {
            "servers": servers.source,
            "workdir": str(target),
            "passed": all(r.passed for r in results),
            "drills": [
                {
                    "drill": r.drill,
                    "title": r.title,
                    "naive": r.naive,
                    "naive_failed": r.naive_failed,
                    "ours": r.ours,
                    "ours_ok": r.ours_ok,
                    "seconds": r.seconds,
                    "passed": r.passed,
                    "details": r.details,
                }
                for r in results
            ],
        }
        typer.echo(json.dumps(payload, indent=2, default=str))
    else:
        console.print(_table(results))
        console.print(f"files: {target}", highlight=False)
    if not results or not all(r.passed for r in results):
        raise typer.Exit(1)
