"""The README's examples, run as written (so the documentation cannot drift from the code)."""

from __future__ import annotations

from collections.abc import Callable

from sheetanchor.config import parse_url
from sheetanchor.postgres import Database
from sheetanchor.retry import DEFAULT_POLICY
from sheetanchor.testing import FaultProxy


async def test_survives_a_reset(pg_url: str, fault_proxy: Callable[[str, int], FaultProxy]) -> None:
    server = parse_url(pg_url)
    assert server.host is not None
    assert server.port is not None
    proxy = fault_proxy(server.host, server.port)
    db = Database(proxy.url(pg_url))
    assert await db.fetchval("SELECT 1") == 1
    proxy.reset_all()  # every open connection gets a TCP RST
    # A query racing the reset fails with ConnectionLost (transient); the policy retries it.
    assert await DEFAULT_POLICY.call(db.fetchval, "SELECT 1") == 1
    await db.close()
