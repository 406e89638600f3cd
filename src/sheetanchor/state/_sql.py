"""SQL for one cached table, built once from the catalog (identifiers quoted, never pasted).

The store needs the type of each column (to bind arrays for ``= ANY($1)`` and ``unnest``)
and the sequence behind the version column. Versions come from that sequence, not from
``version + 1``: they are then unique across the table and keep growing across a delete
and a re-insert, so a tombstone can never be mistaken for a newer row.

JSON columns travel as text (``$n::text::jsonb`` in, ``col::text`` out) and are encoded and
decoded with orjson by the store, so the result does not depend on which codecs the pool's
connections have registered.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from sheetanchor.errors import ConfigError

__all__ = ["TableSQL", "describe_sql", "quote_ident"]

_JSON_TYPES = {"json", "jsonb"}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$")


def quote_ident(name: str) -> str:
    """Quote a (possibly schema-qualified) identifier; reject anything that is not a name."""
    if not _NAME.match(name):
        raise ConfigError(
            f"invalid SQL identifier {name!r}: use letters, digits and _ (optionally schema.name)"
        )
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


# $1: the quoted table name. Returns (column, SQL type, base type name).
describe_sql = """
SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), t.typname::text
FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""
sequence_sql = "SELECT pg_get_serial_sequence($1, $2)"


@dataclass(frozen=True, slots=True)
class TableSQL:
    """Every statement the store runs on one table.

    Attributes:
        columns: the value columns, in order.
        json_columns: those of them carried as JSON text.
    """

    columns: tuple[str, ...]
    json_columns: frozenset[str]
    table_expr: str
    key_expr: str
    read_one: str
    read_many: str
    read_current: str
    upsert_one: str
    upsert_many: str
    update_cas: str
    insert_new: str
    create: str
    delete: str
    scan: str
    next_version: str

    @classmethod
    def build(
        cls,
        *,
        table: str,
        read_from: str,
        key: str,
        version: str,
        columns: Sequence[str],
        types: dict[str, tuple[str, str]],
        sequence: str,
    ) -> TableSQL:
        """Build the statements from the column types found in the catalog."""
        for col in (key, version, *columns):
            if col not in types:
                raise ConfigError(
                    f"column {col!r} not found in table {table!r} "
                    f"(it has: {', '.join(sorted(types))})"
                )
        t, rf = quote_ident(table), quote_ident(read_from)
        k, v = quote_ident(key), quote_ident(version)
        seq = "nextval(" + _literal(sequence) + "::regclass)"
        jcols = frozenset(c for c in columns if types[c][1] in _JSON_TYPES)
        qcols = [quote_ident(c) for c in columns]
        ktype = types[key][0]

        def out(c: str) -> str:
            return f"{quote_ident(c)}::text" if c in jcols else quote_ident(c)

        def param(c: str, n: int) -> str:
            return f"${n}::text::{types[c][0]}" if c in jcols else f"${n}::{types[c][0]}"

        def cmp(prefix: str, c: str) -> str:
            # json has no equality operator; compare it as jsonb.
            expr = f"{prefix}.{quote_ident(c)}"
            return f"{expr}::jsonb" if types[c][1] == "json" else expr

        select = ", ".join([k, v, *(out(c) for c in columns)])
        changed = (
            f"({', '.join(cmp('cur', c) for c in columns)}) IS DISTINCT FROM "
            f"({', '.join(cmp('EXCLUDED', c) for c in columns)})"
            if columns
            else "false"
        )
        set_cols = ", ".join([*(f"{q} = EXCLUDED.{q}" for q in qcols), f"{v} = {seq}"])
        params = [param(c, i + 2) for i, c in enumerate(columns)]
        unnest_types = [
            f"${i + 2}::{'text' if c in jcols else types[c][0]}[]" for i, c in enumerate(columns)
        ]
        unnest_cols = [
            f"u.c{i}::{types[c][0]}" if c in jcols else f"u.c{i}" for i, c in enumerate(columns)
        ]
        u_alias = ", ".join(["k", *(f"c{i}" for i in range(len(columns)))])
        assign = [f"{q} = {p}" for q, p in zip(qcols, params, strict=True)]
        upsert_tail = (
            f"ON CONFLICT ({k}) DO UPDATE SET {set_cols} WHERE {changed} RETURNING {k}, {v}"
        )
        return cls(
            columns=tuple(columns),
            json_columns=jcols,
            table_expr=t,
            key_expr=k,
            read_one=f"SELECT {select} FROM {rf} WHERE {k} = $1::{ktype}",
            read_many=f"SELECT {select} FROM {rf} WHERE {k} = ANY($1::{ktype}[])",
            read_current=f"SELECT {select} FROM {t} WHERE {k} = $1::{ktype}",
            upsert_one=(
                f"INSERT INTO {t} AS cur ({', '.join([k, *qcols, v])}) "
                f"VALUES ($1::{ktype}, {', '.join([*params, seq])}) {upsert_tail}"
            ),
            upsert_many=(
                f"INSERT INTO {t} AS cur ({', '.join([k, *qcols, v])}) "
                f"SELECT {', '.join(['u.k', *unnest_cols, seq])} "
                f"FROM unnest({', '.join([f'$1::{ktype}[]', *unnest_types])}) AS u({u_alias}) "
                f"{upsert_tail}"
            ),
            update_cas=(
                f"UPDATE {t} SET {', '.join([*assign, f'{v} = {seq}'])} "
                f"WHERE {k} = $1::{ktype} AND {v} = ${len(columns) + 2} RETURNING {v}"
            ),
            insert_new=(
                f"INSERT INTO {t} ({', '.join([k, *qcols, v])}) "
                f"VALUES ($1::{ktype}, {', '.join([*params, seq])}) "
                f"ON CONFLICT ({k}) DO NOTHING RETURNING {v}"
            ),
            create=(
                f"INSERT INTO {t} ({', '.join([*qcols, v])}) "
                f"VALUES ({', '.join([*(param(c, i + 1) for i, c in enumerate(columns)), seq])}) "
                f"RETURNING {k}, {v}"
            ),
            delete=f"DELETE FROM {t} WHERE {k} = $1::{ktype} RETURNING {v}",
            scan=(
                f"SELECT {select} FROM {rf} WHERE ($1::{ktype} IS NULL OR {k} > $1::{ktype}) "
                f"ORDER BY {k} LIMIT $2"
            ),
            next_version=f"SELECT {seq}",
        )


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
