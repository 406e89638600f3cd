"""Shared helpers for the CachedStore tests: tables with a bigserial version column."""

from __future__ import annotations

import uuid

from sheetanchor.postgres import Database


def table_name(prefix: str = "items") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


async def make_items_table(db: Database, name: str) -> None:
    await db.execute(
        f"""
        CREATE TABLE {name} (
            id bigint PRIMARY KEY,
            version bigserial NOT NULL,
            name text NOT NULL,
            data jsonb NOT NULL DEFAULT '{{}}'
        )
        """
    )
