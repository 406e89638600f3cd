"""``python -m sheetanchor`` runs the command line."""

from __future__ import annotations

from sheetanchor.cli import main

main()
