"""The ``sheetanchor`` command line: a thin layer over the public API.

Each command group lives in its own ``_<name>.py`` module and registers itself on ``app``
in :func:`_register`. Exit codes: 0 ok, 1 findings or failure, 2 usage error.
"""

from __future__ import annotations

import sys

import typer

from sheetanchor import __version__
from sheetanchor.errors import ConfigError, SheetAnchorError
from sheetanchor.observe import configure_logging

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


def main() -> None:
    """Entry point of the ``sheetanchor`` script: errors print as ``TypeName: message``.

    Exit codes: 0 ok, 1 findings or failure, 2 usage error (a bad option or setting).
    """
    try:
        # Level and format from SHEETANCHOR_LOG_LEVEL / SHEETANCHOR_LOG_FORMAT.
        configure_logging()
        app()
    except ConfigError as exc:
        typer.echo(f"{type(exc).__name__}: {exc}", err=True)
        sys.exit(2)
    except SheetAnchorError as exc:
        typer.echo(f"{type(exc).__name__}: {exc}", err=True)
        sys.exit(1)


# Command modules register themselves on `app` when imported; `app` must exist first.
from sheetanchor.cli import _commands  # noqa: E402, F401
