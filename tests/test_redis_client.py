"""RedisClient: one pool per (process, event loop), closed in its loop, fork-safe.

Incident 002's lesson applies to Redis too: a module-level ``redis.asyncio.Redis`` reused by
successive ``asyncio.run`` calls breaks. With redis-py 8.1 it fails every second run with
``RuntimeError: Event loop is closed`` (the pooled connection of the dead loop is reused;
the failed call drops it, so the next run connects afresh and works) and leaks the sockets.
"""

from __future__ import annotations

import asyncio
import gc
import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable

import pytest
import redis.exceptions
from prometheus_client import generate_latest

from sheetanchor.config import parse_url
from sheetanchor.errors import ResourceClosed, WrongEventLoop
from sheetanchor.observe import REGISTRY
from sheetanchor.redis import LuaScript, RedisClient
from sheetanchor.retry import RetryPolicy
from sheetanchor.testing import FaultProxy

_NAIVE = textwrap.dedent(
    """
    import asyncio, json, sys, warnings
    warnings.simplefilter("ignore")  # the leaked sockets warn at exit; we report the errors
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(sys.argv[1])  # module-level, as in the incident

    async def job(i):
        await r.set("naive:k", i)
        return int(await r.get("naive:k"))

    out = []
    for i in range(5):
        try:
            out.append({"ok": asyncio.run(job(i)) == i})
        except Exception as exc:
            out.append({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    print(json.dumps(out))
    """
)


def test_naive_module_level_redis_fails_across_asyncio_run(redis_url: str) -> None:
    # In a subprocess: the naive client leaks sockets of dead loops that cannot be closed.
    proc = subprocess.run(
        [sys.executable, "-c", _NAIVE, redis_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    runs = json.loads(proc.stdout)
    errors = [r["error"] for r in runs if not r["ok"]]
    assert errors, "the naive pattern should fail in at least one of 5 runs"
    assert any("Event loop is closed" in e or "different loop" in e for e in errors), errors


def test_redis_client_survives_five_asyncio_runs(redis_url: str) -> None:
    rc = RedisClient(redis_url, name="t_runs")

    async def job(i: int) -> int:
        r = rc.client()
        assert r is rc.client()  # one client per loop
        await r.set("ours:k", i)
        return int(await r.get("ours:k"))

    assert [asyncio.run(job(i)) for i in range(5)] == list(range(5))
    stats = rc.stats()
    # Each loop got its own client, closed in that loop when asyncio.run ended.
    assert stats.clients_created == 5
    assert stats.clients_disposed == 5
    assert stats.clients_alive == 0
    assert stats.clients_abandoned == 0


def test_threads_each_get_their_own_client(redis_url: str) -> None:
    rc = RedisClient(redis_url, name="t_threads", max_connections=4)
    results: list[int] = []
    failures: list[BaseException] = []
    barrier = threading.Barrier(8)

    async def job(n: int) -> int:
        r = rc.client()
        # All 8 loops alive at once: the registry holds 8 distinct clients.
        await asyncio.to_thread(barrier.wait, 30)
        assert rc.stats().clients_alive == 8
        await asyncio.gather(*(r.incr("threads:n") for _ in range(50)))
        return n

    def worker(n: int) -> None:
        try:
            results.append(asyncio.run(job(n)))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures
    assert sorted(results) == list(range(8))
    stats = rc.stats()
    assert (stats.clients_created, stats.clients_disposed, stats.clients_alive) == (8, 8, 0)

    async def total() -> int:
        async with RedisClient(redis_url) as check:
            return int(await check.client().get("threads:n"))

    assert asyncio.run(total()) == 400


def _child(rc: RedisClient, parent_id: int, queue: multiprocessing.Queue[object]) -> None:
    async def main() -> dict[str, int]:
        abandoned = rc.stats().clients_abandoned
        client_id = int(await rc.client().client_id())
        await rc.client().set("fork:child", 1)
        return {"abandoned": abandoned, "client_id": client_id, "parent_id": parent_id}

    queue.put(asyncio.run(main()))


def test_fork_child_never_uses_parent_sockets(redis_url: str) -> None:
    rc = RedisClient(redis_url, name="t_fork")

    async def client_id() -> int:
        return int(await rc.client().client_id())

    async def get(key: str) -> bytes | None:
        return await rc.client().get(key)

    with asyncio.Runner() as runner:  # the parent's loop and client stay open across the fork
        parent_id = runner.run(client_id())
        ctx = multiprocessing.get_context("fork")
        queue: multiprocessing.Queue[object] = ctx.Queue()
        proc = ctx.Process(target=_child, args=(rc, parent_id, queue))
        proc.start()
        got = queue.get(timeout=60)
        proc.join(60)
        assert proc.exitcode == 0
        assert isinstance(got, dict)
        assert got["abandoned"] == 1  # the inherited client was set aside, untouched
        assert got["client_id"] != parent_id  # the child opened its own connection
        # The parent's connection was not disturbed by the child: same connection, working.
        assert runner.run(client_id()) == parent_id
        assert runner.run(get("fork:child")) == b"1"
    assert rc.stats().clients_disposed == 1


def test_client_outside_a_loop_is_a_clear_error(redis_url: str) -> None:
    rc = RedisClient(redis_url)
    with pytest.raises(WrongEventLoop, match="running event loop"):
        rc.client()


async def test_close_and_async_with(redis_url: str) -> None:
    async with RedisClient(redis_url, name="t_close") as rc:
        assert await rc.ping()
        assert rc.stats().clients_alive == 1
    assert rc.closed
    assert rc.stats().clients_alive == 0
    assert rc.stats().clients_disposed == 1
    with pytest.raises(ResourceClosed):
        rc.client()


async def test_metrics_are_exported(redis_url: str) -> None:
    async with RedisClient(redis_url, name="t_metrics") as rc:
        await rc.ping()
        text = generate_latest(REGISTRY).decode()
        assert 'sheetanchor_redis_clients{client="t_metrics"} 1.0' in text
        assert 'sheetanchor_redis_connections{client="t_metrics",state="idle"} 1.0' in text
        assert 'sheetanchor_redis_clients_created_total{client="t_metrics"}' in text


async def test_lua_script_reloads_after_script_flush(redis_url: str) -> None:
    script = LuaScript("t_add", "return redis.call('INCRBY', KEYS[1], ARGV[1])")
    async with RedisClient(redis_url) as rc:
        r = rc.client()
        await r.script_flush()
        assert await script(r, keys=["lua:n"], args=[2]) == 2  # first use: SCRIPT LOAD
        assert await r.script_exists(script.sha) == [True]
        await r.script_flush()  # the server forgets it (as after a restart)
        assert await script(r, keys=["lua:n"], args=[3]) == 5  # NOSCRIPT -> load, again


async def test_transient_connection_reset_is_retried(
    redis_url: str, fault_proxy: Callable[[str, int], FaultProxy]
) -> None:
    parsed = parse_url(redis_url)
    proxy = fault_proxy(parsed.host or "127.0.0.1", parsed.port or 6379)
    # The project's retry policy fits the client's retry seam.
    policy = RetryPolicy(max_attempts=3, initial=0.01, maximum=0.05, deadline=5.0)
    async with (
        RedisClient(proxy.url(redis_url), retry=policy) as ours,
        RedisClient(proxy.url(redis_url), retry=RetryPolicy(max_attempts=1)) as once,
    ):
        await ours.ping()
        await once.ping()
        proxy.reset_all()  # both pooled connections die under the clients
        # Without retries the call fails on the dead pooled connection...
        with pytest.raises(redis.exceptions.ConnectionError):
            await once.client().set("retry:k", 1)
        # ...with them, it reconnects and succeeds.
        assert await ours.client().set("retry:k", 2)
        assert await ours.client().get("retry:k") == b"2"


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_loops_closed_by_hand_close_their_clients(redis_url: str) -> None:
    # The usual Celery helper: new_event_loop / run_until_complete / close, no task cancelled.
    rc = RedisClient(redis_url, name="t_by_hand")

    async def use(i: int) -> None:
        await rc.client().set("by_hand:k", i)

    def one_loop(i: int) -> None:
        loop = asyncio.new_event_loop()
        loop.run_until_complete(use(i))
        loop.close()

    one_loop(0)  # warm-up: imports, lazily opened files
    gc.collect()
    start = _open_fds()
    for i in range(1, 51):
        one_loop(i)
    gc.collect()
    assert _open_fds() == start  # every loop's socket closed (flat, not +50)
    assert rc._inherited == []  # only fork-inherited clients are kept there
    stats = rc.stats()
    assert (stats.clients_alive, stats.clients_disposed, stats.clients_abandoned) == (0, 51, 0)


def test_client_of_a_loop_closed_without_hooks_is_abandoned_with_its_sockets_closed(
    redis_url: str,
) -> None:
    rc = RedisClient(redis_url, name="t_unhooked")

    async def use() -> None:
        await rc.client().set("unhooked:k", 1)

    asyncio.run(use())  # warm-up
    gc.collect()
    start = _open_fds()
    for _ in range(5):
        loop = asyncio.new_event_loop()
        loop.run_until_complete(use())
        type(loop).close(loop)  # bypasses the instance hook, like a loop we cannot patch
    asyncio.run(use())  # sweeps the closed loops' clients
    gc.collect()  # no ResourceWarning (filterwarnings=error): sockets closed, not left to GC
    assert _open_fds() == start
    assert rc._inherited == []
    stats = rc.stats()
    assert (stats.clients_alive, stats.clients_abandoned) == (0, 5)


_FORK_CHILD_CLOSES_INHERITED_LOOP = textwrap.dedent(
    """
    import asyncio, os, sys, time
    from sheetanchor.redis import RedisClient
    rc = RedisClient(sys.argv[1], name="t_fork_close")
    loop = asyncio.new_event_loop()
    async def client_id() -> int:
        return int(await rc.client().client_id())
    before = loop.run_until_complete(client_id())
    pid = os.fork()
    if pid == 0:
        loop.close()  # must neither close the parent's client nor unhook its epoll set
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0, status
    async def check() -> tuple[int, str]:
        async with asyncio.timeout(10):
            same = await client_id()
            woke = await asyncio.to_thread(lambda: (time.sleep(0.2), "woke")[1])
            return same, woke
    after, woke = loop.run_until_complete(check())
    loop.close()
    print("same-connection" if after == before else "other-connection", woke)
    """
)


def test_fork_child_closing_its_inherited_loop_leaves_the_parents_client_alone(
    redis_url: str,
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _FORK_CHILD_CLOSES_INHERITED_LOOP, redis_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "same-connection woke", done.stdout
