"""RedisClient's ``health_check_interval``: a connection idle past it is checked before use.

The connection is killed (``CLIENT KILL``, on a server this suite started) from a blocking
client, so this event loop has not read the end of stream when the next command comes: only
the health check (a PING, whose failure happens before the command is written) can tell.
"""

from __future__ import annotations

import time

import pytest
import redis

from sheetanchor.embedded import EmbeddedRedis
from sheetanchor.redis import CommandOutcomeUnknown, RedisClient


def _kill_blocking(url: str, client_id: int) -> None:
    admin = redis.Redis.from_url(url)
    try:
        assert admin.client_kill_filter(_id=str(client_id)) == 1
        deadline = time.monotonic() + 5
        while any(int(c["id"]) == client_id for c in admin.client_list()):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        admin.close()


async def test_a_killed_idle_connection_is_replaced_transparently(
    private_redis: EmbeddedRedis,
) -> None:
    async with RedisClient(
        private_redis.url,
        name="t_health_check",
        health_check_interval=0.05,
        max_connections=1,
    ) as rc:
        victim = int(await rc.execute_command("CLIENT", "ID"))
        _kill_blocking(private_redis.url, victim)
        time.sleep(0.1)  # idle past the interval, and the loop has not run meanwhile
        # INCR is not idempotent: written to the dead connection, it would fail (below), as
        # it would not be retried; the failed PING is retried (the command was not sent).
        assert await rc.execute_command("INCR", "health:n") == 1
        assert int(await rc.execute_command("CLIENT", "ID")) != victim


async def test_without_the_health_check_the_killed_connection_is_used(
    private_redis: EmbeddedRedis,
) -> None:
    # The other half: the same kill with the check off, and the INCR is written to the dead
    # connection: its outcome is unknown, so it is not retried. The test above passes because
    # of the health check (whose failing PING comes before the command is written).
    async with RedisClient(
        private_redis.url,
        name="t_health_check_off",
        health_check_interval=0,
        max_connections=1,
    ) as rc:
        victim = int(await rc.execute_command("CLIENT", "ID"))
        _kill_blocking(private_redis.url, victim)
        time.sleep(0.1)
        with pytest.raises(CommandOutcomeUnknown):
            await rc.execute_command("INCR", "health:off")
