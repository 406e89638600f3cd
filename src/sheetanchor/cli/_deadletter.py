"""``sheetanchor deadletter list | show | replay | purge``: inspect and recover dead letters."""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sheetanchor.cli import app
from sheetanchor.config import pg_url_from_env
from sheetanchor.errors import ConfigError
from sheetanchor.ingest.deadletter import REASONS, DeadLetterFile, DeadLetterStore

__all__ = ["deadletter_app"]

deadletter_app = typer.Typer(
    help="Inspect, replay and purge dead-lettered ingest rows.\n\n"
    "Example: sheetanchor deadletter replay --stream ticks",
    no_args_is_help=True,
)
app.add_typer(deadletter_app, name="deadletter")

DirOption = Annotated[
    Path | None,
    typer.Option("--dir", help="dead-letter directory (default: <SHEETANCHOR_HOME>/deadletter)"),
]
StreamOption = Annotated[str | None, typer.Option("--stream", help="only this stream")]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]


def _reason(value: str | None) -> str | None:
    if value is not None and value not in REASONS:
        raise typer.BadParameter(f"reason must be one of {', '.join(REASONS)}, got {value!r}")
    return value


ReasonOption = Annotated[
    str | None,
    typer.Option("--reason", callback=_reason, help=f"only this reason ({', '.join(REASONS)})"),
]


def _store(directory: Path | None) -> DeadLetterStore:
    return DeadLetterStore(directory)


def _file_json(f: DeadLetterFile, header: dict[str, Any]) -> dict[str, Any]:
    return {
        "path": str(f.path),
        "stream": f.stream,
        "reason": f.reason,
        "bytes": f.size,
        "rows": header.get("rows"),
        "table": f"{header.get('schema', 'public')}.{header.get('table')}",
        "created": header.get("created"),
        "batch_id": header.get("batch_id"),
    }


def _file_row(store: DeadLetterStore, f: DeadLetterFile) -> dict[str, Any]:
    """One file's listing; a file whose header cannot be read is listed with its error."""
    try:
        header = store.read_header(f.path)
    except (OSError, ValueError) as exc:
        row = _file_json(f, {})
        row["table"] = "?"
        row["error"] = f"unreadable header: {type(exc).__name__}: {exc}"
        return row
    return _file_json(f, header)


def _echo_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


@deadletter_app.command("list")
def list_(
    directory: DirOption = None,
    stream: StreamOption = None,
    reason: ReasonOption = None,
    as_json: JsonOption = False,
) -> None:
    """List dead-letter files, oldest first.

    Example: sheetanchor deadletter list --reason poison --json
    """
    store = _store(directory)
    files = store.files(stream, reason)
    rows = [_file_row(store, f) for f in files]
    if as_json:
        _echo_json({"directory": str(store.directory), "files": rows})
        return
    table = Table(title=f"dead letters in {store.directory}")
    for col in ("stream", "reason", "rows", "bytes", "table", "created", "file"):
        table.add_column(col)
    for r, f in zip(rows, files, strict=True):
        table.add_row(
            r["stream"], r["reason"], str(r["rows"]), str(r["bytes"]), r["table"],
            str(r["created"]), f.path.name,
        )  # fmt: skip
    Console().print(table)
    typer.echo(f"{len(files)} file(s), {sum(f.size for f in files)} bytes")
    for r in rows:
        if "error" in r:
            typer.echo(f"{r['path']}: {r['error']}", err=True)


def _resolve(store: DeadLetterStore, name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    for f in store.files():
        if f.path.name == name:
            return f.path
    raise ConfigError(
        f"no dead-letter file {name!r} in {store.directory}; see `sheetanchor deadletter list`"
    )


@deadletter_app.command()
def show(
    file: Annotated[str, typer.Argument(help="file name (from `list`) or path")],
    directory: DirOption = None,
    limit: Annotated[int, typer.Option(help="records to print at most")] = 20,
    as_json: JsonOption = False,
) -> None:
    """Print a file's header and its first records with their PostgreSQL errors.

    Example: sheetanchor deadletter show 20260101T000000000000Z-1000001.ndjson
    """
    store = _store(directory)
    path = _resolve(store, file)
    header = store.read_header(path)
    entries = []
    for i, entry in enumerate(store.iter_entries(path)):
        if i >= limit:
            break
        entries.append(entry)
    if as_json:
        _echo_json({"header": header, "records": entries})
        return
    console = Console()
    console.print(
        f"[bold]{path}[/bold]\nstream={header['stream']} reason={header['reason']} "
        f"rows={header['rows']} table={header.get('schema')}.{header['table']} "
        f"created={header.get('created')}"
    )
    for entry in entries:
        error = entry.get("error")
        console.print(orjson.dumps(entry["record"]).decode(), markup=False, highlight=False)
        if error:
            console.print(
                f"  -> {error.get('sqlstate', '')} {error.get('message', '')}",
                markup=False,
                highlight=False,
            )


@deadletter_app.command()
def replay(
    directory: DirOption = None,
    stream: StreamOption = None,
    reason: ReasonOption = None,
    url: Annotated[
        str | None, typer.Option(help="PostgreSQL URL (default: SHEETANCHOR_PG_URL)")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Write dead-lettered rows into PostgreSQL; a file is deleted only after its rows commit.

    Idempotent: rows already in the table (natural key) are skipped, so replaying twice is
    safe. By default ``failed`` and ``spilled`` files are replayed; ``--reason poison`` retries
    quarantined rows (after you fixed the table or the data).

    Example: sheetanchor deadletter replay --stream ticks
    """
    url = url or pg_url_from_env()
    if not url:
        raise ConfigError("no PostgreSQL URL: pass --url or set SHEETANCHOR_PG_URL")
    store = _store(directory)
    reasons = (reason,) if reason else ("failed", "spilled")
    files = [f for f in store.files(stream) if f.reason in reasons]
    results = asyncio.run(_replay(url, store, files, progress=not as_json))
    summary = {
        "files": len(results),
        "deleted": sum(r["deleted"] for r in results),
        "rows_written": sum(r["written"] for r in results),
        "rows_quarantined": sum(r["quarantined"] for r in results),
        "errors": [r for r in results if r["error"]],
    }
    if as_json:
        _echo_json({"summary": summary, "files": results})
    else:
        typer.echo(
            f"replayed {summary['deleted']}/{summary['files']} file(s): "
            f"{summary['rows_written']} row(s) in the table, "
            f"{summary['rows_quarantined']} still refused (poison)"
        )
        for r in summary["errors"]:
            typer.echo(f"kept {r['path']}: {r['error']}", err=True)
    if summary["errors"]:
        raise typer.Exit(1)


async def _replay(
    url: str, store: DeadLetterStore, files: list[DeadLetterFile], *, progress: bool
) -> list[dict[str, Any]]:
    from sheetanchor.ingest._replay import replay_file_guarded, stops_replay
    from sheetanchor.postgres import Database

    db = Database(url, name="deadletter-replay")
    out: list[dict[str, Any]] = []
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    try:
        with Progress(*columns, disable=not progress, transient=False) as bar:
            task = bar.add_task("replaying", total=sum(f.size for f in files) or 1)
            for f in files:
                result = await replay_file_guarded(db, store, f.path)
                out.append(
                    {
                        "path": str(result.path),
                        "rows": result.rows,
                        "written": result.written,
                        "already_committed": result.skipped_batch,
                        "quarantined": result.quarantined,
                        "deleted": result.deleted,
                        "error": result.error,
                    }
                )
                bar.advance(task, f.size)
                if stops_replay(result):
                    break  # the database is not answering: stop, keep the rest
    finally:
        await db.close()
    return out


@deadletter_app.command()
def purge(
    directory: DirOption = None,
    stream: StreamOption = None,
    reason: ReasonOption = None,
    older_than: Annotated[
        float | None, typer.Option(help="only files older than this many hours")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask for confirmation")] = False,
    as_json: JsonOption = False,
) -> None:
    """Delete dead-letter files (their rows are lost for good).

    Example: sheetanchor deadletter purge --reason poison --older-than 168 --yes
    """
    store = _store(directory)
    files = store.files(stream, reason)
    if older_than is not None:
        cutoff = dt.datetime.now().timestamp() - older_than * 3600
        files = [f for f in files if f.created < cutoff]
    if not files:
        if as_json:
            _echo_json({"deleted": 0, "bytes": 0})
        else:
            typer.echo("nothing to purge")
        return
    total = sum(f.size for f in files)
    if not yes and not typer.confirm(f"delete {len(files)} file(s), {total} bytes?"):
        raise typer.Exit(1)
    for f in files:
        store.delete(f.path)
    if as_json:
        _echo_json({"deleted": len(files), "bytes": total})
    else:
        typer.echo(f"deleted {len(files)} file(s), {total} bytes")
