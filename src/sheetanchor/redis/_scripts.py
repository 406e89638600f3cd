"""Lua scripts: sent once per client, then called by SHA (EVALSHA) with a NOSCRIPT fallback.

A script's SHA1 is computed locally, so the first call is already an ``EVALSHA``. When the
server does not know the script (first use, a restart, ``SCRIPT FLUSH``, a failover to a
replica that never saw it) it answers ``NOSCRIPT``; the script is then sent once with
``EVAL``, which also caches it on that server (and, in a cluster, on the node that owns the
key), so later calls go back to ``EVALSHA``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from sheetanchor.redis import _metrics

__all__ = ["LuaScript"]

_Arg = str | bytes | int | float


class LuaScript:
    """A Lua script called by SHA with a NOSCRIPT fallback.

    Args:
        name: short label for metrics and errors (``"set_if_newer"``).
        source: the Lua source.

    Example::

        incr_to = LuaScript("incr_to", "return redis.call('INCRBY', KEYS[1], ARGV[1])")
        await incr_to(rc.client(), keys=["k"], args=[5])
    """

    __slots__ = ("name", "sha", "source")

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    def __repr__(self) -> str:
        return f"LuaScript({self.name!r}, sha={self.sha[:12]})"

    async def load(self, client: aioredis.Redis) -> None:
        """Register the script on the server now (optional: the first call does it too)."""
        await client.script_load(self.source)

    async def __call__(
        self,
        client: aioredis.Redis,
        *,
        keys: Sequence[str | bytes] = (),
        args: Sequence[_Arg] = (),
    ) -> Any:
        """Run the script: ``EVALSHA``, or ``EVAL`` once if the server answers NOSCRIPT."""
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            _metrics.SCRIPT_RELOADS.labels(self.name).inc()
            return await client.eval(self.source, len(keys), *keys, *args)
