"""sheetanchor.integrations.celery: one reusable event loop per worker thread."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator

import pytest
from celery import signals

from sheetanchor.integrations.celery import _LOOPS, close_loops, install, run_async


@pytest.fixture(autouse=True)
def _fresh_loops() -> Iterator[None]:
    close_loops()
    yield
    close_loops()


async def _current_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


async def _fail() -> None:
    raise KeyError("boom")


def test_run_async_reuses_the_thread_loop_until_closed() -> None:
    first = run_async(_current_loop())
    assert run_async(_current_loop()) is first
    assert close_loops() == 1
    assert first.is_closed()
    assert run_async(_current_loop()) is not first


def test_each_thread_gets_its_own_loop() -> None:
    seen: list[asyncio.AbstractEventLoop] = []
    thread = threading.Thread(target=lambda: seen.append(run_async(_current_loop())))
    thread.start()
    thread.join()
    assert seen
    assert seen[0] is not run_async(_current_loop())
    assert close_loops() == 2


def test_exceptions_propagate_unchanged() -> None:
    with pytest.raises(KeyError, match="boom"):
        run_async(_fail())


async def test_refuses_to_nest_in_a_running_loop() -> None:
    coro = _current_loop()
    try:
        with pytest.raises(RuntimeError, match="running event loop"):
            run_async(coro)
    finally:
        coro.close()


def test_install_closes_loops_on_worker_shutdown() -> None:
    install()
    install()  # idempotent
    loop = run_async(_current_loop())
    signals.worker_shutdown.send(sender=None)
    assert loop.is_closed()


async def _close_raises_once() -> asyncio.AbstractEventLoop:
    loop = asyncio.get_running_loop()
    original = loop.close

    def close() -> None:
        original()  # the loop is closed (nothing leaks) but its close reports a failure
        raise RuntimeError("close failed")

    loop.close = close  # type: ignore[method-assign]
    return loop


def test_a_failing_loop_close_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    failures = _LOOPS.close_failures
    seen: list[asyncio.AbstractEventLoop] = []
    thread = threading.Thread(target=lambda: seen.append(run_async(_close_raises_once())))
    thread.start()
    thread.join()
    other = run_async(_current_loop())
    with caplog.at_level(logging.WARNING, logger="sheetanchor"):
        assert close_loops() == 1  # the other loop, whatever the order
    assert other.is_closed()
    assert _LOOPS.close_failures == failures + 1
    assert "close failed" in caplog.text


def test_a_loop_running_in_another_thread_is_skipped_then_closed_later() -> None:
    started, release = threading.Event(), threading.Event()
    seen: list[asyncio.AbstractEventLoop] = []

    async def busy() -> None:
        seen.append(asyncio.get_running_loop())
        started.set()
        await asyncio.to_thread(release.wait, 30)

    thread = threading.Thread(target=lambda: run_async(busy()))
    thread.start()
    assert started.wait(30)
    skipped = _LOOPS.skipped
    try:
        assert close_loops() == 0  # running a task in its thread: not closed from here
        assert _LOOPS.skipped == skipped + 1
        assert not seen[0].is_closed()
    finally:
        release.set()
        thread.join(30)
    assert close_loops() == 1
    assert seen[0].is_closed()
