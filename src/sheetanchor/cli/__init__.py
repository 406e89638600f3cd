"""The ``sheetanchor`` command line: a thin layer over the public API.

Each command group lives in its own ``_<name>.py`` module and registers itself on ``app``
in :func:`_register`. Exit codes: 0 ok, 1 findings or failure, 2 usage error.
"""

from __future__ import annotations

import sys

import typer

from sheetanchor import __version__
from sheetanchor.errors import SheetAnchorError

__all__ = ["app", "main"]

app = typer.Typer(
    name="sheetanchor",
    help="Fault-tolerant async data layer over PostgreSQL and Redis.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def version() -> None:
    """Print the installed sheetanchor version."""
    typer.echo(__version__)


def _register() -> None:
    # Command modules import heavier parts (SQLAlchemy, redis); keep them out of `--help` cost
    # only where it matters. Order here is the order in `--help`.
    from sheetanchor.cli import _commands  # noqa: F401  (registers on import)


def main() -> None:
    """Entry point of the ``sheetanchor`` script: errors print as ``TypeName: message``."""
    _register()
    try:
        app()
    except SheetAnchorError as exc:
        typer.echo(f"{type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
