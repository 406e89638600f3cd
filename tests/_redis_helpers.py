"""Shared helpers of the Redis fault tests (tests/test_redis_retry.py, tests/test_redis_lean.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from sheetanchor.config import parse_url
from sheetanchor.observe import REGISTRY
from sheetanchor.testing import FaultProxy

ProxyFactory = Callable[[str, int], FaultProxy]


def proxy_for(redis_url: str, fault_proxy: ProxyFactory) -> FaultProxy:
    """A fault proxy in front of the Redis server of ``redis_url``."""
    parsed = parse_url(redis_url)
    return fault_proxy(parsed.host or "127.0.0.1", parsed.port or 6379)


def sample(name: str, labels: dict[str, str]) -> float:
    """A metric's current value (0.0 before its first increment)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def retries(client: str, reason: str) -> float:
    return sample("sheetanchor_redis_retries_total", {"client": client, "reason": reason})


def outcome_unknown(client: str) -> float:
    return sample("sheetanchor_redis_outcome_unknown_total", {"client": client})


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait (at most ~3 s) until ``check()`` is true."""
    for _ in range(300):
        if await check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting until {what}")


async def reply_held_once(
    proxy: FaultProxy,
    warm: Callable[[], Awaitable[Any]],
    call: Callable[[], Awaitable[Any]],
    applied: Callable[[], Awaitable[bool]] | None,
) -> Any:
    """Run ``call`` with its first reply held past the socket timeout, later ones not.

    ``warm()`` runs first so the pooled connection is open (no handshake under the latency).
    The proxy then holds every reply for 5 s; once the server has applied the command
    (``applied``, checked on a direct connection) and a moment more has passed for the proxy
    to take its reply, replies flow at once again, while the first one is still held. So the
    first attempt times out *after* the server ran the command, and a retry, if any, goes
    through and is applied again.
    """
    await warm()
    proxy.add_latency(5.0)
    task = asyncio.ensure_future(call())
    if applied is not None:
        await eventually(applied, "the server applied the command")
    # The server's reply may have reached the proxy in the same loop iteration as our check's
    # answer: give its pump time to read it (and start holding it) before the latency goes,
    # well within the socket timeout, so the held reply is the first attempt's.
    await asyncio.sleep(0.3)
    assert not task.done()
    proxy.add_latency(0)
    return await task
