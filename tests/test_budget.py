"""PoolBudget: pool sizes that never exceed max_connections (incident 002), and its CLI."""

from __future__ import annotations

import json

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from sheetanchor.cli import _budget as _budget_cli  # noqa: F401  (registers `budget`)
from sheetanchor.cli import app
from sheetanchor.config import to_asyncpg_dsn
from sheetanchor.errors import BudgetExceeded, ConfigError, ConnectionLost
from sheetanchor.postgres import PoolBudget, PoolSettings
from sheetanchor.postgres._budget import default_headroom, reserved_slots

_limits = st.fixed_dictionaries(
    {
        "max_connections": st.integers(1, 10_000),
        "reserved": st.integers(0, 50),
        "processes": st.integers(1, 64),
        "replicas": st.integers(1, 32),
        "headroom": st.none() | st.integers(0, 100),
    }
)


def _compute_or_none(**kwargs: int | None) -> PoolBudget | None:
    try:
        return PoolBudget.compute(**kwargs)  # type: ignore[arg-type]
    except BudgetExceeded:
        return None


def _per_process(**kwargs: int | None) -> int:
    budget = _compute_or_none(**kwargs)
    return 0 if budget is None else budget.per_process


@given(_limits)
def test_proposed_budget_never_exceeds_max_connections(limits: dict[str, int | None]) -> None:
    budget = _compute_or_none(**limits)
    if budget is None:
        # Refused only when not even one connection per process fits.
        assert (
            limits["max_connections"]  # type: ignore[operator]
            - limits["reserved"]  # type: ignore[operator]
            - (
                limits["headroom"]
                if limits["headroom"] is not None
                else default_headroom(limits["max_connections"])  # type: ignore[arg-type]
            )
        ) < limits["processes"] * limits["replicas"]  # type: ignore[operator]
        return
    assert budget.pool_size >= 1
    assert budget.max_overflow >= 0
    total = budget.reserved + budget.headroom + budget.worst_case
    assert total <= budget.max_connections
    # It uses what it may: fewer than one connection per process is left over.
    assert budget.spare < budget.process_count


@given(_limits, st.integers(1, 500))
def test_more_connections_never_shrink_the_budget(
    limits: dict[str, int | None], extra: int
) -> None:
    bigger = {**limits, "max_connections": limits["max_connections"] + extra}  # type: ignore[operator]
    small, large = _compute_or_none(**limits), _compute_or_none(**bigger)
    if small is not None:
        assert large is not None
        assert large.pool_size >= small.pool_size
        assert large.max_overflow >= small.max_overflow


@given(_limits, st.sampled_from(["processes", "replicas", "reserved"]), st.integers(1, 20))
def test_more_consumers_never_grow_the_budget(
    limits: dict[str, int | None], field: str, extra: int
) -> None:
    more = {**limits, field: limits[field] + extra}  # type: ignore[operator]
    assert _per_process(**more) <= _per_process(**limits)


@given(_limits, st.integers(1, 100), st.integers(0, 100))
def test_requested_sizes_accepted_exactly_when_they_fit(
    limits: dict[str, int | None], pool_size: int, max_overflow: int
) -> None:
    budget = _compute_or_none(**limits, pool_size=pool_size, max_overflow=max_overflow)
    proposal = _compute_or_none(**limits)
    fits = proposal is not None and pool_size + max_overflow <= proposal.per_process_limit
    assert (budget is not None) == fits
    if budget is not None:
        assert (budget.pool_size, budget.max_overflow) == (pool_size, max_overflow)
        assert budget.reserved + budget.headroom + budget.worst_case <= budget.max_connections


def test_incident_002_five_processes_of_sixty_are_refused_with_numbers_and_advice() -> None:
    with pytest.raises(BudgetExceeded) as info:
        PoolBudget.compute(max_connections=200, reserved=3, processes=5, pool_size=60)
    message = str(info.value)
    assert "5 processes x 1 replicas x (pool_size 60 + max_overflow 0) = 300" in message
    assert "max_connections 200 - reserved 3 - headroom 20 = 177" in message
    assert "pool_size + max_overflow" in message  # the rule
    assert "at most 35 connections per process" in message  # what to change
    proposal = PoolBudget.compute(max_connections=200, reserved=3, processes=5)
    assert (proposal.pool_size, proposal.max_overflow) == (27, 8)
    assert proposal.formula() == "5 x 1 x (27 + 8) = 175 <= 200 - 3 - 20 = 177"


def test_pool_settings_carry_the_budget_sizes() -> None:
    budget = PoolBudget.compute(max_connections=200, reserved=3, processes=5)
    settings = budget.pool_settings(PoolSettings(timeout=5.0))
    assert (settings.size, settings.max_overflow, settings.timeout) == (27, 8, 5.0)
    assert settings.capacity == budget.per_process
    assert budget.pool_settings().size == 27


def test_not_even_one_connection_per_process_is_refused() -> None:
    with pytest.raises(BudgetExceeded, match="cannot each get even one connection"):
        PoolBudget.compute(max_connections=20, reserved=3, processes=10, replicas=2)


def test_overflow_only_request_takes_the_rest_as_pool() -> None:
    budget = PoolBudget.compute(max_connections=100, reserved=0, headroom=0, max_overflow=10)
    assert (budget.pool_size, budget.max_overflow) == (90, 10)
    with pytest.raises(BudgetExceeded, match="leaves no room for a pool"):
        PoolBudget.compute(max_connections=100, reserved=0, headroom=0, max_overflow=100)


@pytest.mark.parametrize(
    ("name", "value"),
    [("max_connections", 0), ("processes", 0), ("replicas", -1), ("headroom", -1)],
)
def test_bad_arguments_name_themselves(name: str, value: int) -> None:
    kwargs: dict[str, int] = {"max_connections": 100, name: value}
    with pytest.raises(ConfigError, match=rf"{name} must be >= "):
        PoolBudget.compute(**kwargs)


def test_reserved_slots_without_reserved_connections_setting() -> None:
    assert reserved_slots("3", None) == 3  # PostgreSQL 15: no reserved_connections
    assert reserved_slots("3", "") == 3
    assert reserved_slots("3", "5") == 8  # PostgreSQL 16+


async def _server_limits(url: str) -> tuple[int, int]:
    conn = await asyncpg.connect(to_asyncpg_dsn(url))
    try:
        max_connections = int(await conn.fetchval("SHOW max_connections"))
        superuser = await conn.fetchval("SHOW superuser_reserved_connections")
        reserved = await conn.fetchval("SELECT current_setting('reserved_connections', true)")
    finally:
        await conn.close()
    return max_connections, reserved_slots(superuser, reserved)


async def test_from_server_reads_the_real_limits(sheetanchor_pg_server_url: str) -> None:
    max_connections, reserved = await _server_limits(sheetanchor_pg_server_url)
    budget = await PoolBudget.from_server(sheetanchor_pg_server_url, processes=2, replicas=2)
    assert (budget.max_connections, budget.reserved) == (max_connections, reserved)
    assert budget.process_count == 4
    assert budget.reserved + budget.headroom + budget.worst_case <= max_connections
    assert budget.server is not None


async def test_from_server_refuses_a_pool_larger_than_the_server(
    sheetanchor_pg_server_url: str,
) -> None:
    max_connections, _ = await _server_limits(sheetanchor_pg_server_url)
    with pytest.raises(BudgetExceeded, match=f"max_connections {max_connections} "):
        await PoolBudget.from_server(
            sheetanchor_pg_server_url, processes=5, pool_size=max_connections
        )


async def test_from_server_unreachable_says_where_without_password() -> None:
    # Port 1 on loopback: nothing listens, the connection is refused at once.
    with pytest.raises(ConnectionLost, match=r"127\.0\.0\.1:1") as info:
        await PoolBudget.from_server("postgresql://app:s3cret@127.0.0.1:1/x", connect_timeout=5)
    assert "s3cret" not in str(info.value)


def test_cli_prints_a_table_from_the_server(sheetanchor_pg_server_url: str) -> None:
    result = CliRunner().invoke(
        app, ["budget", "--processes", "3", "--replicas", "2", "--pg", sheetanchor_pg_server_url]
    )
    assert result.exit_code == 0, result.output
    for label in ("max_connections", "reserved", "headroom", "pool_size", "total worst case"):
        assert label in result.output


def test_cli_json_from_the_server(sheetanchor_pg_server_url: str) -> None:
    result = CliRunner().invoke(
        app, ["budget", "--processes", "3", "--json", "--pg", sheetanchor_pg_server_url]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["ok"] is True
    assert data["worst_case"] + data["reserved"] + data["headroom"] <= data["max_connections"]
    assert data["process_count"] == 3


def test_cli_exits_1_when_the_requested_pool_size_exceeds(sheetanchor_pg_server_url: str) -> None:
    result = CliRunner().invoke(
        app,
        ["budget", "--processes", "5", "--pool-size", "60", "--pg", sheetanchor_pg_server_url],
    )
    assert result.exit_code == 1
    assert "BudgetExceeded" in result.output
    assert "pool_size 60" in result.output


def test_cli_offline_with_max_connections() -> None:
    result = CliRunner().invoke(
        app, ["budget", "-p", "5", "--max-connections", "200", "--reserved", "3", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["pool_size"] == 27


def test_cli_usage_errors_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHEETANCHOR_PG_URL", raising=False)
    result = CliRunner().invoke(app, ["budget", "--processes", "2"])
    assert result.exit_code == 2
    assert "--max-connections" in result.output
    result = CliRunner().invoke(
        app, ["budget", "-p", "2", "--pg", "postgresql://x@h/d", "--reserved", "3"]
    )
    assert result.exit_code == 2
    result = CliRunner().invoke(app, ["budget", "--processes", "0", "--max-connections", "100"])
    assert result.exit_code == 2


def test_cli_unreachable_server_is_a_connection_error() -> None:
    result = CliRunner().invoke(app, ["budget", "-p", "2", "--pg", "postgresql://x@127.0.0.1:1/d"])
    assert isinstance(result.exception, ConnectionLost)
