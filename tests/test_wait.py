"""`sheetanchor wait` and the readiness waits behind it (incident 001)."""

from __future__ import annotations

import asyncio
import socket

import pytest
from typer.testing import CliRunner

from sheetanchor._readiness import wait_until_ready
from sheetanchor.cli import app
from sheetanchor.config import parse_url
from sheetanchor.errors import NotReady
from sheetanchor.runtime import Attempt, wait_for_postgres, wait_for_redis, wait_for_services
from sheetanchor.testing import FaultProxy


def _closed_port() -> int:
    # Bind then close: nothing listens there afterwards.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_ready_server_answers_at_once(pg_url: str, redis_url: str) -> None:
    assert await wait_for_postgres(pg_url, timeout=10) < 10
    assert await wait_for_redis(redis_url, timeout=10) < 10


async def test_unreachable_postgres_times_out_with_last_error_and_no_password() -> None:
    url = f"postgresql://app:TopSecret99@127.0.0.1:{_closed_port()}/x"
    attempts: list[Attempt] = []
    with pytest.raises(NotReady) as info:
        await wait_for_postgres(url, timeout=1.0, on_attempt=attempts.append)
    message = str(info.value)
    assert "not ready after" in message
    assert "last error" in message
    assert "TopSecret99" not in message
    assert info.value.last_error
    assert len(attempts) >= 2, "it retried with backoff, not once"
    assert all("TopSecret99" not in a.error and "TopSecret99" not in a.target for a in attempts)


async def test_error_that_waiting_cannot_fix_fails_fast(pg_url: str) -> None:
    url = pg_url.rsplit("/", 1)[0] + "/no_such_database_here"
    attempts: list[Attempt] = []
    with pytest.raises(NotReady, match="waiting will not fix"):
        await wait_for_postgres(url, timeout=30.0, on_attempt=attempts.append)
    assert len(attempts) == 1


async def test_waits_through_an_outage_of_both_servers(pg_url: str, redis_url: str) -> None:
    pg, rd = parse_url(pg_url), parse_url(redis_url)
    with (
        FaultProxy(pg.host or "127.0.0.1", pg.port or 5432) as pg_proxy,
        FaultProxy(rd.host or "127.0.0.1", rd.port or 6379) as redis_proxy,
    ):
        pg_proxy.refuse()
        redis_proxy.refuse()
        loop = asyncio.get_running_loop()
        loop.call_later(0.6, pg_proxy.pass_through)
        loop.call_later(0.6, redis_proxy.pass_through)
        attempts: list[Attempt] = []
        took = await wait_for_services(
            pg=pg_proxy.url(pg_url),
            redis=redis_proxy.url(redis_url),
            timeout=20,
            on_attempt=attempts.append,
        )
    assert set(took) == {"postgres", "redis"}
    targets = {a.target.split("://", 1)[0] for a in attempts}
    assert targets == {"postgresql", "redis"}, "both outages were seen and waited out"


async def test_when_one_wait_fails_the_other_is_cancelled(pg_url: str, redis_url: str) -> None:
    rd = parse_url(redis_url)
    wrong_database = pg_url.rsplit("/", 1)[0] + "/no_such_database_here"
    with FaultProxy(rd.host or "127.0.0.1", rd.port or 6379) as redis_proxy:
        redis_proxy.refuse()  # alone, the Redis wait would keep trying for the whole 30 s
        before = asyncio.all_tasks()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(NotReady, match="waiting will not fix"):
            await wait_for_services(pg=wrong_database, redis=redis_proxy.url(redis_url), timeout=30)
        assert loop.time() - started < 25, "the failed PostgreSQL wait ended the call"
        leftover = {t for t in asyncio.all_tasks() - before if not t.done()}
        assert not leftover, f"waits still running after the call: {leftover}"


async def test_deadline_is_kept_with_a_fake_clock() -> None:
    now = [0.0]
    sleeps: list[float] = []

    def clock() -> float:
        return now[0]

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    async def refused(_budget: float) -> None:
        now[0] += 0.01
        raise ConnectionRefusedError("refused")

    with pytest.raises(NotReady):
        await wait_until_ready("X", "x://h", refused, timeout=10.0, sleep=sleep, clock=clock)
    assert now[0] <= 10.0, "no attempt started or slept past the deadline"
    assert len(sleeps) >= 5, "it backed off and retried until the deadline"
    assert max(sleeps) <= 2.0


def test_cli_wait_ok_timeout_and_usage(
    pg_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["wait", "--pg", pg_url, "--redis", redis_url, "--timeout", "10"])
    assert ok.exit_code == 0, ok.output
    assert "ready" in ok.output

    closed = f"postgresql://u:pw12345@127.0.0.1:{_closed_port()}/x"
    late = runner.invoke(app, ["wait", "--pg", closed, "--timeout", "1"])
    assert late.exit_code == 1
    assert "NotReady" in late.output
    assert "pw12345" not in late.output

    monkeypatch.delenv("SHEETANCHOR_PG_URL", raising=False)
    monkeypatch.delenv("SHEETANCHOR_REDIS_URL", raising=False)
    usage = runner.invoke(app, ["wait"])
    assert usage.exit_code == 2
