"""RedisClient.execute_command: the lean path keeps every guarantee of the normal one.

Same replies and errors as redis-py's ``execute_command``, the same retry rule (a command
is never applied twice because a reply was lost), the pool's limit shared with the normal
path, and a connection whose round trip failed or was cancelled is never reused with its
reply still pending. Faults come from the fault proxy in front of the real Redis.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.exceptions
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.connection import Connection

from _redis_helpers import (
    ProxyFactory,
    outcome_unknown,
    proxy_for,
    reply_held_once,
    retries,
)
from sheetanchor.redis import (
    CommandOutcomeUnknown,
    LuaScript,
    RedisClient,
    assume_idempotent,
    was_not_sent,
)
from sheetanchor.redis._lean import _pack
from sheetanchor.retry import RetryPolicy

_TIMEOUT = 1.0
_POLICY = RetryPolicy(max_attempts=3, initial=0.01, maximum=0.05)
_INCR = LuaScript("t_lean_incr", "return redis.call('INCR', KEYS[1])")


def _lean_ping(rc: RedisClient) -> Callable[[], Awaitable[Any]]:
    """Opens the pooled connection through the lean path itself."""
    return lambda: rc.execute_command("PING")


def _lean_in_use(rc: RedisClient) -> bool:
    entry = rc._entries.get(asyncio.get_running_loop())
    return entry is not None and entry.lean is not None


_ARG = st.one_of(
    st.text(max_size=30),
    st.binary(max_size=30),
    st.binary(min_size=4090, max_size=5000),
    st.integers(),
    st.floats(allow_nan=False),
)


@given(
    name=st.sampled_from(["GET", "MGET", "EVALSHA", "CLIENT ID", b"SET", b"CONFIG GET"]),
    args=st.lists(_ARG, max_size=12) | st.lists(st.text(max_size=30), min_size=17, max_size=40),
)
def test_commands_are_packed_byte_for_byte_as_redis_py_packs_them(
    name: str | bytes, args: list[Any]
) -> None:
    conn = Connection()
    assert _pack(conn.encoder, [name, *args]) == b"".join(conn.pack_command(name, *args))


@pytest.mark.parametrize("bad", [True, None, 1j])
def test_unencodable_arguments_raise_redis_pys_data_error(bad: object) -> None:
    with pytest.raises(redis.exceptions.DataError):
        _pack(Connection().encoder, ["SET", "k", bad])


async def test_replies_and_errors_are_those_of_redis_py(redis_url: str) -> None:
    async with RedisClient(redis_url, name="t_lean_replies") as rc:
        r = rc.client()
        assert _lean_in_use(rc)
        assert await rc.execute_command("SET", "lean:a", "1") is True  # SET's callback
        assert await rc.execute_command("SET", "lean:a", "2", "NX") is None
        assert await rc.execute_command("GET", "lean:a") == await r.get("lean:a") == b"1"
        assert await rc.execute_command("MGET", "lean:a", "lean:none") == [b"1", None]
        await _INCR.load(r)
        assert await rc.execute_command("EVALSHA", _INCR.sha, 1, "lean:n") == 1
        with pytest.raises(redis.exceptions.NoScriptError):
            await rc.execute_command("EVALSHA", "0" * 40, 0)
        with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
            await rc.execute_command("LPUSH", "lean:a", "x")
        # An error reply leaves the connection usable; nothing is left checked out.
        assert await rc.execute_command("GET", "lean:a") == b"1"
        stats = rc.stats()
        assert (stats.connections_in_use, stats.connections_idle) == (0, 1)


async def test_pool_limit_is_shared_with_the_normal_path(redis_url: str) -> None:
    # One connection for both paths: a caller of the normal path waiting for it must be
    # woken when a lean command gives it back (else it times out after pool_timeout).
    async with RedisClient(
        redis_url, name="t_lean_limit", max_connections=1, pool_timeout=2.0
    ) as rc:
        r = rc.client()
        await r.set("lean:l", "v")
        calls: list[Awaitable[Any]] = []
        for _ in range(30):
            calls.append(rc.execute_command("GET", "lean:l"))
            calls.append(r.get("lean:l"))
        assert await asyncio.gather(*calls) == [b"v"] * 60
        stats = rc.stats()
        assert (stats.connections_in_use, stats.connections_idle) == (0, 1)


async def test_reply_timed_out_idempotent_retried_other_raisesoutcome_unknown(
    redis_url: str, fault_proxy: ProxyFactory
) -> None:
    proxy = proxy_for(redis_url, fault_proxy)
    async with (
        RedisClient(
            proxy.url(redis_url), name="t_lean_held", socket_timeout=_TIMEOUT, retry=_POLICY
        ) as rc,
        RedisClient(redis_url, name="t_lean_held_direct") as direct,
    ):
        d = direct.client()
        await d.set("lean:g", "v")
        await _INCR.load(d)
        before = retries("t_lean_held", "idempotent")
        got = await reply_held_once(
            proxy, _lean_ping(rc), lambda: rc.execute_command("GET", "lean:g"), None
        )
        assert got == b"v"
        assert retries("t_lean_held", "idempotent") == before + 1

        async def applied() -> bool:
            return await d.get("lean:s") == b"1"

        with pytest.raises(CommandOutcomeUnknown) as info:
            await reply_held_once(
                proxy,
                _lean_ping(rc),
                lambda: rc.execute_command("EVALSHA", _INCR.sha, 1, "lean:s"),
                applied,
            )
        assert info.value.command == "EVALSHA"
        assert isinstance(info.value.__cause__, redis.exceptions.TimeoutError)
        assert outcome_unknown("t_lean_held") == 1
        assert await d.get("lean:s") == b"1"  # applied once, not retried
        # The timed-out connection was dropped: the next command reads its own reply.
        assert await rc.execute_command("EVALSHA", _INCR.sha, 1, "lean:s") == 2

        async def declared() -> Any:
            with assume_idempotent():
                return await rc.execute_command("EVALSHA", _INCR.sha, 1, "lean:d")

        async def applied_d() -> bool:
            return await d.get("lean:d") == b"1"

        # Declared idempotent (wrongly, to see the declaration act): retried, INCR ran twice.
        assert await reply_held_once(proxy, _lean_ping(rc), declared, applied_d) == 2


async def test_connection_reset_while_awaiting_the_reply(
    redis_url: str, fault_proxy: ProxyFactory
) -> None:
    proxy = proxy_for(redis_url, fault_proxy)
    async with RedisClient(
        proxy.url(redis_url), name="t_lean_reset", socket_timeout=_TIMEOUT, retry=_POLICY
    ) as rc:
        await rc.execute_command("SET", "lean:r", "v")
        await _INCR.load(rc.client())

        async def lose_reply(call: Awaitable[Any]) -> Any:
            proxy.blackhole()
            task = asyncio.ensure_future(call)
            await asyncio.sleep(0.1)
            proxy.reset_all()
            proxy.pass_through()
            return await task

        assert await lose_reply(rc.execute_command("GET", "lean:r")) == b"v"  # retried
        with pytest.raises(CommandOutcomeUnknown) as info:
            await lose_reply(rc.execute_command("EVALSHA", _INCR.sha, 1, "lean:c"))
        assert isinstance(info.value.__cause__, redis.exceptions.ConnectionError)
        assert await rc.execute_command("GET", "lean:c") is None  # never left the proxy
        assert rc.stats().connections_in_use == 0


async def test_refused_connect_is_retried_for_any_command(
    redis_url: str, fault_proxy: ProxyFactory
) -> None:
    proxy = proxy_for(redis_url, fault_proxy)
    patient = RetryPolicy(max_attempts=60, initial=0.02, maximum=0.05)
    async with (
        RedisClient(proxy.url(redis_url), name="t_lean_refused", retry=patient) as rc,
        RedisClient(redis_url, name="t_lean_refused_direct") as direct,
    ):
        await _INCR.load(direct.client())
        await rc.execute_command("PING")
        proxy.reset_all()  # the pooled connection dies ...
        proxy.refuse()  # ... and reconnecting is refused for a while
        await asyncio.sleep(0.05)  # the reset reaches the idle connection
        task = asyncio.ensure_future(rc.execute_command("EVALSHA", _INCR.sha, 1, "lean:f"))
        await asyncio.sleep(0.3)
        assert not task.done()
        proxy.pass_through()
        assert await task == 1
        assert await direct.client().get("lean:f") == b"1"
        assert retries("t_lean_refused", "not_sent") >= 1
        assert outcome_unknown("t_lean_refused") == 0


async def test_connection_closed_by_the_server_while_idle_is_reconnected_not_unknown(
    redis_url: str,
) -> None:
    # The server drops an idle pooled connection (restart, idle timeout, CLIENT KILL): the
    # next command must see that before writing (the command surely was not sent), not
    # after (a non-idempotent one would raise CommandOutcomeUnknown for nothing).
    async with (
        RedisClient(redis_url, name="t_lean_killed", retry=RetryPolicy(max_attempts=1)) as rc,
        RedisClient(redis_url, name="t_lean_killed_direct") as direct,
    ):
        d = direct.client()
        await _INCR.load(d)
        victim = int(await rc.execute_command("CLIENT", "ID"))
        await d.execute_command("CLIENT", "KILL", "ID", victim)
        await asyncio.sleep(0.1)  # the end of stream reaches the idle connection
        assert await rc.execute_command("EVALSHA", _INCR.sha, 1, "lean:k") == 1
        assert int(await rc.execute_command("CLIENT", "ID")) != victim


async def test_a_server_that_is_not_there_is_a_plain_connection_error() -> None:
    # Nothing was sent: not an unknown outcome, whatever the command.
    async with RedisClient(
        "redis://127.0.0.1:1/0", name="t_lean_dead", socket_connect_timeout=0.5
    ) as rc:
        with pytest.raises(redis.exceptions.ConnectionError) as info:
            await rc.execute_command("EVALSHA", _INCR.sha, 1, "lean:x")
        assert not isinstance(info.value, CommandOutcomeUnknown)
        assert was_not_sent(info.value)
        assert rc.stats().connections_in_use == 0


@pytest.mark.parametrize("how", ["cancel", "outer_timeout"])
async def test_a_cancelled_command_never_leaves_its_reply_pending(
    redis_url: str, fault_proxy: ProxyFactory, how: str
) -> None:
    # The command is written, its reply held by the proxy; the caller gives up. If the
    # connection went back to the pool as it was, the late reply ("first") would be read as
    # the answer to the next command on it.
    proxy = proxy_for(redis_url, fault_proxy)
    async with RedisClient(
        proxy.url(redis_url), name=f"t_lean_{how}", socket_timeout=5.0, max_connections=1
    ) as rc:
        await rc.execute_command("SET", "lean:first", "first")
        await rc.execute_command("SET", "lean:second", "second")
        proxy.add_latency(0.5)
        if how == "cancel":
            task = asyncio.ensure_future(rc.execute_command("GET", "lean:first"))
            await asyncio.sleep(0.1)  # written; the reply is on its way, slowly
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):  # the caller's own deadline, same task
                    await rc.execute_command("GET", "lean:first")
        assert rc.stats().connections_in_use == 0
        # At once, while the late reply is still on its way (no check can see it yet).
        assert await rc.execute_command("GET", "lean:second") == b"second"
        proxy.add_latency(0)
        assert await rc.execute_command("GET", "lean:first") == b"first"


def test_each_loop_has_its_own_connections(redis_url: str) -> None:
    rc = RedisClient(redis_url, name="t_lean_loops")

    async def client_id() -> int:
        return int(await rc.execute_command("CLIENT", "ID"))

    first = asyncio.run(client_id())
    second = asyncio.run(client_id())  # a new loop: a new pool, never the old loop's socket
    assert first != second
    results: list[int] = []

    def in_thread() -> None:
        results.append(asyncio.run(client_id()))

    threads = [threading.Thread(target=in_thread) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(set(results)) == 3
    stats = rc.stats()
    assert (stats.clients_created, stats.clients_alive) == (5, 0)


def _child(rc: RedisClient, queue: multiprocessing.Queue[object]) -> None:
    async def main() -> int:
        await rc.execute_command("SET", "lean:child", "1")
        return int(await rc.execute_command("CLIENT", "ID"))

    queue.put(asyncio.run(main()))


def test_fork_child_uses_its_own_connections(redis_url: str) -> None:
    rc = RedisClient(redis_url, name="t_lean_fork")

    async def client_id() -> int:
        return int(await rc.execute_command("CLIENT", "ID"))

    with asyncio.Runner() as runner:  # the parent's loop and pool stay open across the fork
        parent_id = runner.run(client_id())
        ctx = multiprocessing.get_context("fork")
        queue: multiprocessing.Queue[object] = ctx.Queue()
        proc = ctx.Process(target=_child, args=(rc, queue))
        proc.start()
        child_id = queue.get(timeout=60)
        proc.join(60)
        assert proc.exitcode == 0
        assert child_id != parent_id
        # The parent's idle connection was never touched by the child: same one, working.
        assert runner.run(client_id()) == parent_id
        assert runner.run(rc.execute_command("GET", "lean:child")) == b"1"
