"""Time-partitioned ingest tables: create native RANGE partitions ahead of time, drop old ones.

PostgreSQL refuses a row for which no partition exists (``no partition of relation ... found
for row``), so partitions must exist before the data arrives: run :func:`ensure_partitions`
at start-up and then periodically (e.g. daily), with ``ahead`` covering more than the longest
time the job could fail to run. It is idempotent and safe to run from several replicas.

Partition names follow the parent: ``<table>_p20261123`` (day), ``<table>_p2026w48`` (ISO
week), ``<table>_p202611`` (month). Bounds are UTC midnights. Identifiers are always quoted.

Example::

    await create_partitioned_table(conn, "ticks", {
        "symbol": "text NOT NULL", "ts": "timestamptz NOT NULL", "price": "double precision",
    }, primary_key=("symbol", "ts"))
    await ensure_partitions(conn, "ticks", interval="day", ahead=7)
    await drop_partitions_older_than(conn, "ticks", datetime.now(UTC) - timedelta(days=90))

``conn`` is anything with ``await execute(sql, *args)`` and ``await fetch(sql, *args)``: an
asyncpg connection or pool, or ``sheetanchor.postgres.Database``.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import asyncpg

from sheetanchor.errors import ConfigError
from sheetanchor.observe import get_logger

__all__ = [
    "Executor",
    "Interval",
    "create_partitioned_table",
    "drop_partitions_older_than",
    "ensure_partitions",
    "partition_bounds",
    "quote_ident",
]

Interval = Literal["day", "week", "month"]
_INTERVALS: tuple[str, ...] = ("day", "week", "month")
_MAX_IDENT_BYTES = 63  # NAMEDATALEN - 1: longer names are silently truncated by PostgreSQL
_SUPPORTED_TYPES = ("timestamp with time zone", "timestamp without time zone", "date")
_NAME_DAY = re.compile(r"_p(\d{4})(\d{2})(\d{2})$")
_NAME_WEEK = re.compile(r"_p(\d{4})w(\d{2})$")
_NAME_MONTH = re.compile(r"_p(\d{4})(\d{2})$")

_log = get_logger("ingest.partitions")


class Executor(Protocol):
    """Anything that runs SQL: an asyncpg connection or pool, or a sheetanchor Database."""

    async def execute(self, query: str, /, *args: Any) -> Any:
        """Run a statement."""
        ...

    async def fetch(self, query: str, /, *args: Any) -> Any:
        """Run a query and return its rows."""
        ...


def quote_ident(name: str) -> str:
    """Quote one SQL identifier, doubling embedded double quotes; safe for any name.

    Example: the name ``odd"name`` becomes ``"odd""name"``.
    """
    if not name or "\x00" in name:
        raise ConfigError(f"invalid SQL identifier {name!r}: empty or contains NUL")
    if len(name.encode()) > _MAX_IDENT_BYTES:
        raise ConfigError(
            f"SQL identifier {name!r} is longer than {_MAX_IDENT_BYTES} bytes; "
            "PostgreSQL would truncate it, so use a shorter name"
        )
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class _Table:
    schema: str | None
    name: str

    @classmethod
    def parse(cls, table: str) -> _Table:
        # "schema.table" or "table"; a name containing a dot needs the schema given too.
        schema, dot, name = table.partition(".")
        return cls(schema, name) if dot else cls(None, table)

    @property
    def sql(self) -> str:
        head = f"{quote_ident(self.schema)}." if self.schema else ""
        return head + quote_ident(self.name)

    def child(self, suffix: str) -> _Table:
        return _Table(self.schema, f"{self.name}{suffix}")


def partition_bounds(
    at: dt.date, interval: Interval, steps: int = 0
) -> tuple[dt.date, dt.date, str]:
    """Return ``(start, end, suffix)`` of the partition holding ``at``, moved by ``steps``.

    Example: ``partition_bounds(date(2026, 11, 23), "week")`` is
    ``(date(2026, 11, 23), date(2026, 11, 30), "_p2026w48")``.
    """
    day = at.date() if isinstance(at, dt.datetime) else at
    if interval == "day":
        start = day + dt.timedelta(days=steps)
        return start, start + dt.timedelta(days=1), f"_p{start:%Y%m%d}"
    if interval == "week":
        start = day - dt.timedelta(days=day.weekday()) + dt.timedelta(weeks=steps)
        year, week, _ = start.isocalendar()
        return start, start + dt.timedelta(weeks=1), f"_p{year:04d}w{week:02d}"
    if interval == "month":
        index = day.year * 12 + day.month - 1 + steps
        start = dt.date(index // 12, index % 12 + 1, 1)
        end = dt.date((index + 1) // 12, (index + 1) % 12 + 1, 1)
        return start, end, f"_p{start:%Y%m}"
    raise ConfigError(f"interval={interval!r} is not one of {', '.join(_INTERVALS)}")


async def create_partitioned_table(
    conn: Executor,
    table: str,
    columns: Mapping[str, str],
    *,
    column: str = "ts",
    primary_key: Sequence[str] = (),
) -> None:
    """Create the parent table ``PARTITION BY RANGE (column)`` if it does not exist.

    Args:
        conn: where to run it.
        table: ``"name"`` or ``"schema.name"``.
        columns: column name -> SQL type and constraints (``"timestamptz NOT NULL"``); names
            are quoted, types are written as given (they are code, never user input).
        column: the partition key, one of ``columns``.
        primary_key: optional key; PostgreSQL requires it to include ``column``.
    """
    if column not in columns:
        raise ConfigError(f"partition column {column!r} is not among the columns {list(columns)}")
    if primary_key and column not in primary_key:
        raise ConfigError(
            f"primary_key={tuple(primary_key)!r} must include the partition column {column!r} "
            "(PostgreSQL enforces uniqueness per partition only)"
        )
    parts = [f"{quote_ident(name)} {sql_type}" for name, sql_type in columns.items()]
    if primary_key:
        parts.append(f"PRIMARY KEY ({', '.join(quote_ident(c) for c in primary_key)})")
    target = _Table.parse(table)
    await conn.execute(
        f"CREATE TABLE IF NOT EXISTS {target.sql} ({', '.join(parts)}) "
        f"PARTITION BY RANGE ({quote_ident(column)})"
    )


async def ensure_partitions(
    conn: Executor,
    table: str,
    *,
    column: str = "ts",
    interval: Interval = "day",
    ahead: int = 7,
    behind: int = 0,
    now: dt.datetime | None = None,
) -> list[str]:
    """Create the partitions from ``behind`` intervals ago to ``ahead`` intervals from now.

    Idempotent: existing partitions are left alone. Returns the names it created.

    Args:
        conn: where to run it.
        table: the partitioned parent, ``"name"`` or ``"schema.name"``.
        column: its partition key (checked against the table).
        interval: ``"day"``, ``"week"`` or ``"month"``; bounds are UTC midnights.
        ahead: partitions after the current one (rows later than that are refused).
        behind: partitions before the current one (for backfills).
        now: the current time (default: now, UTC).

    Raises:
        ConfigError: the table is missing or not range-partitioned on ``column``, the column
            type is not a date/timestamp, or a new partition would overlap an existing one
            (was the interval changed?).
    """
    if interval not in _INTERVALS:
        raise ConfigError(f"interval={interval!r} is not one of {', '.join(_INTERVALS)}")
    if ahead < 0 or behind < 0:
        raise ConfigError(f"ahead={ahead!r} and behind={behind!r} must be >= 0")
    parent = _Table.parse(table)
    column_type = await _partition_column_type(conn, parent, column)
    existing = set(await _partition_names(conn, parent))
    today = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).date()
    created: list[str] = []
    for step in range(-behind, ahead + 1):
        start, end, suffix = partition_bounds(today, interval, step)
        child = parent.child(suffix)
        if child.name in existing:
            continue
        sql = (
            f"CREATE TABLE IF NOT EXISTS {child.sql} PARTITION OF {parent.sql} "
            f"FOR VALUES FROM ({_literal(start, column_type)}) TO ({_literal(end, column_type)})"
        )
        try:
            await conn.execute(sql)
        except asyncpg.InvalidObjectDefinitionError as exc:
            raise ConfigError(
                f"cannot create partition {child.name} [{start}, {end}) of {table}: {exc}; "
                "an existing partition overlaps it (was the interval changed?) - keep the "
                "interval or drop the overlapping partitions first"
            ) from exc
        except (asyncpg.DuplicateTableError, asyncpg.UniqueViolationError):
            # Another replica created it between our check and our CREATE: that is the goal.
            continue
        created.append(child.name)
    if created:
        _log.info("created %d partition(s) of %s: %s", len(created), table, ", ".join(created))
    return created


async def drop_partitions_older_than(
    conn: Executor, table: str, before: dt.datetime | dt.date
) -> list[str]:
    """Drop the partitions of ``table`` whose whole range ends at or before ``before``.

    Only partitions named by :func:`ensure_partitions` are considered; others are never
    touched. Their rows are deleted with them. Returns the names dropped.
    """
    parent = _Table.parse(table)
    cutoff = _as_utc(before)
    dropped: list[str] = []
    for name in sorted(await _partition_names(conn, parent)):
        end = _end_of(name.removeprefix(parent.name)) if name.startswith(parent.name) else None
        if end is None:
            continue
        if _as_utc(end) <= cutoff:
            await conn.execute(f"DROP TABLE IF EXISTS {parent.child(name[len(parent.name) :]).sql}")
            dropped.append(name)
    if dropped:
        _log.info("dropped %d partition(s) of %s: %s", len(dropped), table, ", ".join(dropped))
    return dropped


_NAME_PATTERNS: tuple[tuple[re.Pattern[str], Interval], ...] = (
    (_NAME_DAY, "day"),
    (_NAME_WEEK, "week"),
    (_NAME_MONTH, "month"),
)


def _as_utc(at: dt.datetime | dt.date) -> dt.datetime:
    if not isinstance(at, dt.datetime):
        return dt.datetime(at.year, at.month, at.day, tzinfo=dt.UTC)
    return at.replace(tzinfo=dt.UTC) if at.tzinfo is None else at.astimezone(dt.UTC)


def _end_of(suffix: str) -> dt.date | None:
    """The (exclusive) end of a partition named by ensure_partitions, from its suffix."""
    for pattern, interval in _NAME_PATTERNS:
        match = pattern.fullmatch(suffix)
        if match is None:
            continue
        numbers = [int(g) for g in match.groups()]
        try:
            if interval == "day":
                start = dt.date(numbers[0], numbers[1], numbers[2])
            elif interval == "week":
                start = dt.date.fromisocalendar(numbers[0], numbers[1], 1)
            else:
                start = dt.date(numbers[0], numbers[1], 1)
        except ValueError:
            return None
        return partition_bounds(start, interval)[1]
    return None


def _literal(day: dt.date, column_type: str) -> str:
    # Bounds are our own dates, formatted here: no user text reaches the SQL.
    if column_type == "date":
        return f"'{day:%Y-%m-%d}'"
    if column_type == "timestamp without time zone":
        return f"'{day:%Y-%m-%d} 00:00:00'"
    return f"'{day:%Y-%m-%d} 00:00:00+00'"


async def _partition_column_type(conn: Executor, parent: _Table, column: str) -> str:
    try:
        rows = await conn.fetch(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type, "
            "pt.partstrat::text AS partstrat, pt.partnatts "
            "FROM pg_partitioned_table pt JOIN pg_attribute a "
            "ON a.attrelid = pt.partrelid AND a.attnum = pt.partattrs[0] "
            "WHERE pt.partrelid = $1::regclass",
            parent.sql,
        )
    except asyncpg.UndefinedTableError as exc:
        raise ConfigError(
            f"table {parent.sql} does not exist; create it first, e.g. with "
            "create_partitioned_table(...)"
        ) from exc
    if not rows:
        raise ConfigError(
            f"table {parent.sql} is not partitioned; it must be created with "
            f"PARTITION BY RANGE ({quote_ident(column)}) (see create_partitioned_table)"
        )
    row = rows[0]
    if row["partstrat"] != "r" or row["partnatts"] != 1 or row["attname"] != column:
        raise ConfigError(
            f"table {parent.sql} is not partitioned BY RANGE ({quote_ident(column)}) alone "
            f"(its key starts with {row['attname']!r}, strategy {row['partstrat']!r})"
        )
    column_type = str(row["type"])
    if column_type not in _SUPPORTED_TYPES:
        raise ConfigError(
            f"partition column {column!r} of {parent.sql} has type {column_type}; "
            f"time partitions need one of {', '.join(_SUPPORTED_TYPES)}"
        )
    return column_type


async def _partition_names(conn: Executor, parent: _Table) -> list[str]:
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = $1::regclass",
        parent.sql,
    )
    return [str(r["relname"]) for r in rows]
