"""RedisClient's retry rule: a command is never applied twice because a reply was lost.

Retrying ``TimeoutError`` for every command (redis-py's default, and this client's before)
applies ``INCR``/``LPUSH``/``XADD``/scripts twice when the first reply is merely late. Here:
an error before the command was written is retried for every command; an error once it may
have reached the server only for idempotent ones; the others raise ``CommandOutcomeUnknown``.

The faults come from the fault proxy in front of the real Redis: latency that holds a reply
past ``socket_timeout`` *after* the server applied the command, a reset while the reply is
awaited, and a refused connect.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.exceptions

from _redis_helpers import (
    ProxyFactory,
    outcome_unknown,
    proxy_for,
    reply_held_once,
    retries,
)
from sheetanchor.errors import OutcomeUnknown
from sheetanchor.redis import (
    CommandOutcomeUnknown,
    LuaScript,
    RedisClient,
    assume_idempotent,
    command_is_idempotent,
    was_not_sent,
)
from sheetanchor.redis._retry import may_retry
from sheetanchor.retry import RetryPolicy, is_transient

pytestmark = pytest.mark.faults

_TIMEOUT = 1.0  # socket_timeout of the proxied clients: a held reply times out after it
_POLICY = RetryPolicy(max_attempts=3, initial=0.01, maximum=0.05)

# -- the rule, as a pure classifier -----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "idempotent"),
    [
        (["GET", "k"], True),
        ([b"get", b"k"], True),
        (["MGET", "a", "b"], True),
        (["SET", "k", "v"], True),
        (["SET", "k", "v", "EX", 10], True),
        (["SET", "NX", "GET"], True),  # the key is "NX", the value "GET": no options
        (["SET", "k", "v", "NX"], False),  # a repeat would report "not set"
        (["SET", "k", "v", b"get"], False),
        (["DEL", "k"], True),
        (["EXPIRE", "k", 10], True),
        (["HSET", "h", "f", "v"], True),
        (["ZADD", "z", 1, "m"], True),
        (["ZADD", "z", "INCR", 1, "m"], False),
        (["SCRIPT LOAD", "return 1"], True),
        (["SCRIPT", "KILL"], False),
        (["CLIENT SETNAME", "x"], True),
        (["CLIENT KILL", "ID", 3], False),
        (["INCR", "k"], False),
        (["INCRBY", "k", 2], False),
        (["LPUSH", "l", "x"], False),
        (["XADD", "s", "*", "f", "v"], False),
        (["XREADGROUP", "GROUP", "g", "c", "STREAMS", "s", ">"], False),
        (["EVALSHA", "abc", 0], False),
        (["EVAL", "return 1", 0], False),
        (["PUBLISH", "ch", "m"], False),
        (["SETNX", "k", "v"], False),
        (["NOSUCHCOMMAND"], False),
        ([], False),
    ],
)
def test_which_commands_are_idempotent(args: list[Any], idempotent: bool) -> None:
    assert command_is_idempotent(args) is idempotent


def test_the_rule_retries_unsent_errors_of_any_command_and_sent_ones_of_idempotent_only() -> None:
    refused = redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:1. Refused.")
    connect_timeout = redis.exceptions.TimeoutError("Timeout connecting to server")
    read_timeout = redis.exceptions.TimeoutError("Timeout reading from 127.0.0.1:6379")
    reset = redis.exceptions.ConnectionError("Error while reading from 127.0.0.1:6379 : (104,)")
    for exc in (refused, connect_timeout):
        assert was_not_sent(exc)
        assert may_retry(exc, idempotent=False)
    for exc in (read_timeout, reset):
        assert not was_not_sent(exc)
        assert not may_retry(exc, idempotent=False)
        assert may_retry(exc, idempotent=True)
    unknown = CommandOutcomeUnknown("lost", command="INCR")
    assert not may_retry(unknown, idempotent=True)  # never repeated, whatever is declared
    # Typed for sheetanchor, still caught by redis-py's families, and not "transient": no
    # retry policy repeats it either.
    assert isinstance(unknown, OutcomeUnknown)
    assert isinstance(unknown, redis.exceptions.ConnectionError)
    assert isinstance(unknown, redis.exceptions.TimeoutError)
    assert not is_transient(unknown)


# -- against a real Redis through the fault proxy ---------------------------------------------


async def test_incr_whose_reply_times_out_is_applied_once_and_says_so(
    redis_url: str, fault_proxy: ProxyFactory
) -> None:
    proxy = proxy_for(redis_url, fault_proxy)
    async with (
        RedisClient(
            proxy.url(redis_url), name="t_incr", socket_timeout=_TIMEOUT, retry=_POLICY
        ) as rc,
        RedisClient(redis_url, name="t_incr_direct") as direct,
    ):
        await rc.ping()  # a pooled connection through the proxy
        d = direct.client()

        async def applied() -> bool:
            return await d.get("retry:n") == b"1"

        with pytest.raises(CommandOutcomeUnknown) as info:
            await reply_held_once(
                proxy, rc.client().ping, lambda: rc.client().incr("retry:n"), applied
            )
        # The old rule retried here on a fresh connection and INCR ran twice (value 2).
        assert await d.get("retry:n") == b"1"
        err = info.value
        assert err.command == "INCRBY"  # redis-py sends incr() as INCRBY k 1
        assert "may or may not have been applied" in str(err)
        assert isinstance(err.__cause__, redis.exceptions.TimeoutError)
        assert outcome_unknown("t_incr") == 1
        # The connection that timed out was dropped, not reused: the late reply is never
        # read as the answer to the next command.
        assert await rc.client().incr("retry:n") == 2


async def test_get_whose_reply_times_out_is_retried_and_succeeds(
    redis_url: str, fault_proxy: ProxyFactory
) -> None:
    proxy = proxy_for(redis_url, fault_proxy)
    async with RedisClient(
        proxy.url(redis_url), name="t_get", socket_timeout=_TIMEOUT, retry=_POLICY
    ) as rc:
        r = rc.client()
        await r.set("retry:g", "v")
        before = retries("t_get", "idempotent")
        assert await reply_held_once(proxy, r.ping, lambda: r.get("retry:g"), None) == b"v"
        assert retries("t_get", "idempotent") == before + 1
        assert outcome_unknown("t_get") == 0


async def test_connection_lost_while_awaiting_the_reply(
    redis_url: str, fault_proxy: ProxyFactory
) -> None:
    # The request is written, the proxy holds it unread (black hole), then resets the
    # connection: the client sees a ConnectionError while waiting for the reply and cannot
    # know whether the server got the command.
    proxy = proxy_for(redis_url, fault_proxy)
    async with RedisClient(
        proxy.url(redis_url), name="t_reset", socket_timeout=_TIMEOUT, retry=_POLICY
    ) as rc:
        r = rc.client()
        await r.set("retry:r", "v")

        async def lose_reply(call: Awaitable[Any]) -> Any:
            proxy.blackhole()
            task = asyncio.ensure_future(call)
            await asyncio.sleep(0.1)
            proxy.reset_all()
            proxy.pass_through()  # a retry would go through
            return await task

        assert await lose_reply(r.get("retry:r")) == b"v"  # idempotent: retried
        with pytest.raises(CommandOutcomeUnknown) as info:
            await lose_reply(r.incr("retry:c"))
        assert isinstance(info.value.__cause__, redis.exceptions.ConnectionError)
        # Here the request never left the proxy, so nothing was applied: "unknown" is honest.
        assert await r.get("retry:c") is None


async def test_refused_connects_are_retried_for_every_command(
    redis_url: str, fault_proxy: ProxyFactory
) -> None:
    proxy = proxy_for(redis_url, fault_proxy)
    patient = RetryPolicy(max_attempts=60, initial=0.02, maximum=0.05)
    async with (
        RedisClient(proxy.url(redis_url), name="t_refused", retry=patient) as rc,
        RedisClient(redis_url, name="t_refused_direct") as direct,
    ):
        proxy.refuse()  # no pooled connection yet: the first connect is refused
        task = asyncio.ensure_future(rc.client().incr("retry:refused"))
        await asyncio.sleep(0.3)
        assert not task.done()
        proxy.pass_through()
        assert await task == 1
        assert await direct.client().get("retry:refused") == b"1"
        assert retries("t_refused", "not_sent") >= 1
        assert retries("t_refused", "idempotent") == 0


async def test_pipelines_and_scripts_follow_the_rule(
    redis_url: str, fault_proxy: ProxyFactory
) -> None:
    proxy = proxy_for(redis_url, fault_proxy)
    incr = LuaScript("t_incr_script", "return redis.call('INCR', KEYS[1])")
    set_to = LuaScript(
        "t_set_script", "return redis.call('SET', KEYS[1], ARGV[1])", idempotent=True
    )
    async with (
        RedisClient(
            proxy.url(redis_url), name="t_pipe", socket_timeout=_TIMEOUT, retry=_POLICY
        ) as rc,
        RedisClient(redis_url, name="t_pipe_direct") as direct,
    ):
        r, d = rc.client(), direct.client()
        await incr.load(r)
        await set_to.load(r)

        def value_is(key: str, want: bytes) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return await d.get(key) == want

            return check

        # A pipeline with a non-idempotent command: applied once, typed error.
        pipe = r.pipeline(transaction=True).set("retry:p1", "x").incr("retry:p2")
        with pytest.raises(CommandOutcomeUnknown):
            await reply_held_once(proxy, r.ping, pipe.execute, value_is("retry:p2", b"1"))
        assert await d.get("retry:p2") == b"1"
        # A pipeline of idempotent commands: retried.
        pipe = r.pipeline(transaction=False).set("retry:p3", "y").get("retry:p3")
        assert await reply_held_once(proxy, r.ping, pipe.execute, None) == [True, b"y"]
        # A script not declared idempotent: applied once, typed error.
        with pytest.raises(CommandOutcomeUnknown):
            await reply_held_once(
                proxy, r.ping, lambda: incr(r, keys=["retry:s1"]), value_is("retry:s1", b"1")
            )
        assert await d.get("retry:s1") == b"1"
        # A script declared idempotent, and any call inside assume_idempotent(): retried.
        assert await reply_held_once(
            proxy,
            r.ping,
            lambda: set_to(r, keys=["retry:s2"], args=["z"]),
            value_is("retry:s2", b"z"),
        ) in (b"OK", "OK")

        async def declared() -> Any:
            with assume_idempotent():
                return await r.evalsha(incr.sha, 1, "retry:s3")

        # (Declared wrongly here on purpose, to see the declaration act: INCR ran twice.)
        assert await reply_held_once(proxy, r.ping, declared, value_is("retry:s3", b"1")) == 2
