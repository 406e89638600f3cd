"""sheetanchor.integrations.celery: one reusable event loop per worker thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
from celery import signals

from sheetanchor.integrations.celery import close_loops, install, run_async


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
