"""Pool budgets: per-process pool sizes that can never exceed the server's ``max_connections``.

Incident 002: five processes with pools of 60 each hit a server capped at 200 connections.
The worst case of every pool is ``processes x replicas x (pool_size + max_overflow)``; it must
fit in what the server leaves to applications::

    processes x replicas x (pool_size + max_overflow)
        <= max_connections - reserved - headroom

``reserved`` is ``superuser_reserved_connections`` plus ``reserved_connections`` (PostgreSQL
16+); ``headroom`` keeps slots free for admin sessions, migrations and monitoring.

Example::

    budget = PoolBudget.compute(max_connections=200, reserved=3, processes=5)
    budget.pool_size, budget.max_overflow      # (27, 8): 5 x 35 = 175 <= 200 - 3 - 20

    budget = await PoolBudget.from_server("postgresql://app@db/app", processes=4, replicas=3)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from sheetanchor.config import parse_url, pg_url_from_env, redact, to_asyncpg_dsn
from sheetanchor.errors import BudgetExceeded, ConfigError, ConnectionLost
from sheetanchor.postgres._settings import PoolSettings

__all__ = [
    "DEFAULT_HEADROOM_FRACTION",
    "MIN_HEADROOM",
    "OVERFLOW_SHARE",
    "PoolBudget",
    "default_headroom",
    "reserved_slots",
]

#: Share of ``max_connections`` kept free for admin sessions, migrations and monitoring.
DEFAULT_HEADROOM_FRACTION = 0.10
#: Never keep fewer free slots than this (one psql, one migration, one exporter).
MIN_HEADROOM = 3
#: Of each process's connections, this share (rounded down) is overflow, the rest the pool.
OVERFLOW_SHARE = 4  # one in four

_FORMULA = (
    "processes x replicas x (pool_size + max_overflow) <= max_connections - reserved - headroom"
)
_APPLICATION_NAME = "sheetanchor:budget"


def default_headroom(max_connections: int) -> int:
    """The headroom used when none is given: 10 % of ``max_connections``, at least 3.

    It never grows faster than ``max_connections`` itself, so a bigger server never yields
    a smaller budget.
    """
    return max(MIN_HEADROOM, math.ceil(max_connections * DEFAULT_HEADROOM_FRACTION))


def _check_int(name: str, value: int, minimum: int) -> None:
    # bool is an int subclass; True as a pool size is a bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")


def _split(per_process: int) -> tuple[int, int]:
    """Split a per-process limit into (pool_size, max_overflow); both monotone in the input."""
    overflow = per_process // OVERFLOW_SHARE
    return per_process - overflow, overflow


@dataclass(frozen=True, slots=True)
class PoolBudget:
    """A per-process pool size that keeps every process of every replica within the server.

    Build one with :meth:`compute` (pure) or :meth:`from_server` (reads the server's limits);
    both raise :class:`~sheetanchor.errors.BudgetExceeded` instead of returning a budget that
    could exceed ``max_connections``.

    Attributes:
        max_connections: the server's ``max_connections``.
        reserved: slots applications cannot use (``superuser_reserved_connections`` +
            ``reserved_connections``).
        headroom: slots kept free for admin, migrations and monitoring.
        processes: processes per replica that each hold a pool.
        replicas: replicas (containers, machines) of the service.
        pool_size: connections each process keeps in its pool.
        max_overflow: extra connections each process may open under load.
        server: the redacted address the limits were read from, if any.
    """

    max_connections: int
    reserved: int
    headroom: int
    processes: int
    replicas: int
    pool_size: int
    max_overflow: int
    server: str | None = None

    @property
    def available(self) -> int:
        """Connections left to applications: ``max_connections - reserved - headroom``."""
        return self.max_connections - self.reserved - self.headroom

    @property
    def process_count(self) -> int:
        """Processes holding a pool, across all replicas."""
        return self.processes * self.replicas

    @property
    def per_process(self) -> int:
        """Worst case of one process: ``pool_size + max_overflow``."""
        return self.pool_size + self.max_overflow

    @property
    def per_process_limit(self) -> int:
        """The most connections one process may have: ``available // process_count``."""
        return max(self.available, 0) // self.process_count

    @property
    def worst_case(self) -> int:
        """Connections if every pool of every process is full, overflow included."""
        return self.per_process * self.process_count

    @property
    def spare(self) -> int:
        """Available connections the worst case still leaves unused."""
        return self.available - self.worst_case

    def formula(self) -> str:
        """The budget with its numbers, e.g. ``5 x 1 x (27 + 8) = 175 <= 200 - 3 - 20 = 177``."""
        return (
            f"{self.processes} x {self.replicas} x ({self.pool_size} + {self.max_overflow}) "
            f"= {self.worst_case} <= {self.max_connections} - {self.reserved} - "
            f"{self.headroom} = {self.available}"
        )

    def pool_settings(self, base: PoolSettings | None = None) -> PoolSettings:
        """``base`` (default :class:`PoolSettings`) with this budget's ``size``/``max_overflow``.

        Example::

            budget = await PoolBudget.from_server(url, processes=4, replicas=3)
            db = Database(url, pool=budget.pool_settings())
        """
        return replace(
            base if base is not None else PoolSettings(),
            size=self.pool_size,
            max_overflow=self.max_overflow,
        )

    def as_dict(self) -> dict[str, int | str | None]:
        """Every field and derived figure, for ``--json`` and logs."""
        data: dict[str, int | str | None] = dict(asdict(self))
        data.update(
            available=self.available,
            process_count=self.process_count,
            per_process=self.per_process,
            per_process_limit=self.per_process_limit,
            worst_case=self.worst_case,
            spare=self.spare,
        )
        return data

    @classmethod
    def compute(
        cls,
        *,
        max_connections: int,
        reserved: int = 0,
        processes: int = 1,
        replicas: int = 1,
        headroom: int | None = None,
        pool_size: int | None = None,
        max_overflow: int | None = None,
        server: str | None = None,
    ) -> PoolBudget:
        """Compute per-process pool sizes from the server's limits (pure; no I/O).

        Without ``pool_size``/``max_overflow`` the largest safe sizes are proposed: each
        process gets ``available // (processes x replicas)`` connections, a quarter of them
        (rounded down) as overflow. With them, the requested sizes are checked instead.

        Args:
            max_connections: the server's ``max_connections``.
            reserved: ``superuser_reserved_connections`` + ``reserved_connections``.
            processes: processes per replica, each with its own pool (workers x loops).
            replicas: replicas of the service sharing the server.
            headroom: slots kept free; default :func:`default_headroom`.
            pool_size: a requested pool size per process, to check instead of propose.
            max_overflow: a requested overflow per process; ``0`` when only ``pool_size``
                is given, the rest of the per-process limit when only this is given.
            server: the redacted server address, for messages.

        Raises:
            ConfigError: an argument is not an integer in range (the message names it).
            BudgetExceeded: the requested sizes, or even one connection per process, do not
                fit; the message shows the numbers, the formula and what to change.
        """
        _check_int("max_connections", max_connections, 1)
        _check_int("reserved", reserved, 0)
        _check_int("processes", processes, 1)
        _check_int("replicas", replicas, 1)
        if headroom is None:
            headroom = default_headroom(max_connections)
        _check_int("headroom", headroom, 0)
        if pool_size is not None:
            _check_int("pool_size", pool_size, 1)
        if max_overflow is not None:
            _check_int("max_overflow", max_overflow, 0)

        limit = max(max_connections - reserved - headroom, 0) // (processes * replicas)
        if pool_size is None and max_overflow is None:
            size, overflow = _split(limit)
        elif pool_size is None:
            assert max_overflow is not None  # narrowed above; keeps mypy precise
            size, overflow = limit - max_overflow, max_overflow
        else:
            size, overflow = pool_size, max_overflow if max_overflow is not None else 0

        budget = cls(
            max_connections=max_connections,
            reserved=reserved,
            headroom=headroom,
            processes=processes,
            replicas=replicas,
            pool_size=size,
            max_overflow=overflow,
            server=server,
        )
        if size < 1 or budget.worst_case > budget.available:
            raise BudgetExceeded(budget._refusal())
        return budget

    def _refusal(self) -> str:
        """The BudgetExceeded message: numbers, formula, what to change."""
        where = f" at {self.server}" if self.server else ""
        limit = self.per_process_limit
        if limit < 1:
            advice = (
                f"{self.process_count} processes cannot each get even one connection; run "
                "fewer processes or replicas, lower headroom, raise max_connections on the "
                "server, or put PgBouncer in front"
            )
        else:
            size, overflow = _split(limit)
            advice = (
                f"use at most {limit} connections per process (e.g. pool_size={size}, "
                f"max_overflow={overflow}), run fewer processes or replicas, raise "
                "max_connections on the server, or put PgBouncer in front"
            )
        if self.pool_size < 1:
            wanted = (
                f"max_overflow {self.max_overflow} leaves no room for a pool "
                f"(per-process limit {limit})"
            )
        else:
            wanted = (
                f"{self.processes} processes x {self.replicas} replicas x (pool_size "
                f"{self.pool_size} + max_overflow {self.max_overflow}) = {self.worst_case} "
                "connections"
            )
        return (
            f"pool budget exceeded{where}: {wanted}, but only max_connections "
            f"{self.max_connections} - reserved {self.reserved} - headroom {self.headroom} = "
            f"{self.available} are available (rule: {_FORMULA}); {advice}"
        )

    @classmethod
    async def from_server(
        cls,
        url: str | None = None,
        *,
        processes: int = 1,
        replicas: int = 1,
        headroom: int | None = None,
        pool_size: int | None = None,
        max_overflow: int | None = None,
        connect_timeout: float = 10.0,
    ) -> PoolBudget:
        """Read ``max_connections`` and the reserved slots from the server, then :meth:`compute`.

        Args:
            url: PostgreSQL URL; default ``SHEETANCHOR_PG_URL``. Point it at PostgreSQL
                itself, not at PgBouncer (PgBouncer has its own limits).
            connect_timeout: seconds to connect, and again to read the settings.
            processes, replicas, headroom, pool_size, max_overflow: as in :meth:`compute`.

        Raises:
            ConfigError: no URL, or an argument out of range.
            ConnectionLost: the server could not be reached or queried.
            BudgetExceeded: as in :meth:`compute`.
        """
        if url is None:
            url = pg_url_from_env()
        if url is None:
            raise ConfigError("no PostgreSQL URL: pass url= or set SHEETANCHOR_PG_URL")
        if connect_timeout <= 0:
            raise ConfigError(f"connect_timeout must be > 0 seconds, got {connect_timeout!r}")
        address = parse_url(url).address
        max_connections, reserved = await _read_limits(url, connect_timeout)
        return cls.compute(
            max_connections=max_connections,
            reserved=reserved,
            processes=processes,
            replicas=replicas,
            headroom=headroom,
            pool_size=pool_size,
            max_overflow=max_overflow,
            server=address,
        )


def reserved_slots(superuser_reserved: str, reserved: str | None) -> int:
    """Slots applications cannot use, from the two settings as the server reports them.

    ``reserved`` is ``None`` on PostgreSQL 15 and older, which have no
    ``reserved_connections``.
    """
    return int(superuser_reserved) + (int(reserved) if reserved else 0)


async def _read_limits(url: str, seconds: float) -> tuple[int, int]:
    """Return (max_connections, reserved slots) as the server at ``url`` reports them."""
    import asyncpg

    address = parse_url(url).address
    try:
        conn = await asyncpg.connect(
            to_asyncpg_dsn(url),
            timeout=seconds,
            server_settings={"application_name": _APPLICATION_NAME},
        )
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise ConnectionLost(
            f"could not connect to PostgreSQL at {address} to read max_connections: "
            f"{redact(str(exc)) or type(exc).__name__}; is it running? check the URL "
            "(SHEETANCHOR_PG_URL or --pg)"
        ) from exc
    try:
        # current_setting(name, true) is NULL instead of an error when the setting does not
        # exist: reserved_connections is new in PostgreSQL 16.
        row = await conn.fetchrow(
            "SELECT current_setting('max_connections') AS max_connections,"
            " current_setting('superuser_reserved_connections') AS superuser_reserved,"
            " current_setting('reserved_connections', true) AS reserved",
            timeout=seconds,
        )
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise ConnectionLost(
            f"could not read max_connections from PostgreSQL at {address}: "
            f"{redact(str(exc)) or type(exc).__name__}"
        ) from exc
    finally:
        await conn.close()
    assert row is not None  # a SELECT without FROM always returns one row
    return int(row["max_connections"]), reserved_slots(row["superuser_reserved"], row["reserved"])
