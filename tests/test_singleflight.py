"""SingleFlight: a failed flight reaches its followers and never logs "never retrieved"."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from sheetanchor.state._singleflight import SingleFlight


async def test_a_failed_flight_nobody_joined_is_not_reported_as_unretrieved() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        flights = SingleFlight()

        async def fail() -> None:
            raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            await flights.run("k", fail)
        gc.collect()  # the flight's future is gone: an unretrieved exception would log now
        await asyncio.sleep(0)
        assert reported == []
        assert flights.inflight() == 0
    finally:
        loop.set_exception_handler(previous)


async def test_followers_of_a_failed_flight_get_its_exception() -> None:
    flights = SingleFlight()
    started = asyncio.Event()
    release = asyncio.Event()

    async def fail() -> None:
        started.set()
        await release.wait()
        raise ValueError("boom")

    leader = asyncio.ensure_future(flights.run("k", fail))
    await started.wait()
    follower = asyncio.ensure_future(flights.run("k", fail))
    await asyncio.sleep(0)
    release.set()
    for task in (leader, follower):
        with pytest.raises(ValueError, match="boom"):
            await task
    assert flights.shared == 1
