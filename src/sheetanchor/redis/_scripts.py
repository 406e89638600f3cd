"""Lua scripts: registered once per client, then called by SHA (EVALSHA), NOSCRIPT-safe.

The first call through a client sends ``SCRIPT LOAD`` (to every primary of a cluster), and
every call is an ``EVALSHA`` of the locally computed SHA1. When a server forgot the script
(a restart, ``SCRIPT FLUSH``, a failover to a replica that never saw it) it answers
``NOSCRIPT``: the script is loaded again and the call repeated once.

Loading up front rather than answering NOSCRIPT with ``EVAL`` matters on a cluster:
redis-py 8.1's asyncio cluster client breaks connections when many concurrent EVALSHA calls
hit NOSCRIPT (``'NoneType' object has no attribute 'writelines'``).

Retries: a script is not idempotent unless declared so (``idempotent=True``): after a lost
reply (read timeout, connection dropped mid-call) an undeclared script raises
:class:`~sheetanchor.redis.CommandOutcomeUnknown` instead of running again. Declare only a
script whose second run leaves the data as the first left it (a version-fenced set, a delete
if equal); never one that increments, appends or hands out tokens.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Sequence
from typing import Any

from redis.exceptions import NoScriptError

from sheetanchor.redis import _metrics
from sheetanchor.redis._client import AnyRedis
from sheetanchor.redis._retry import assume_idempotent

__all__ = ["LuaScript"]

_Arg = str | bytes | int | float


class LuaScript:
    """A Lua script called by SHA with a NOSCRIPT fallback.

    Args:
        name: short label for metrics and errors (``"set_if_newer"``).
        source: the Lua source.
        idempotent: running it twice leaves the data as running it once does, so a call
            whose reply was lost may be sent again (see the module docstring). Default
            ``False``: such a call raises ``CommandOutcomeUnknown``.

    Example::

        incr_to = LuaScript("incr_to", "return redis.call('INCRBY', KEYS[1], ARGV[1])")
        await incr_to(rc.client(), keys=["k"], args=[5])
    """

    __slots__ = ("_loaded", "idempotent", "name", "sha", "source")

    def __init__(self, name: str, source: str, *, idempotent: bool = False) -> None:
        self.name = name
        self.source = source
        self.idempotent = idempotent
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()
        # Clients this script was registered through (weak: a closed client just goes away).
        self._loaded: weakref.WeakSet[AnyRedis] = weakref.WeakSet()

    def __repr__(self) -> str:
        return f"LuaScript({self.name!r}, sha={self.sha[:12]})"

    async def load(self, client: AnyRedis) -> None:
        """Register the script on the server(s) now (optional: the first call does it too)."""
        await client.script_load(self.source)
        self._loaded.add(client)

    async def __call__(
        self,
        client: AnyRedis,
        *,
        keys: Sequence[str | bytes] = (),
        args: Sequence[_Arg] = (),
    ) -> Any:
        """Run the script with ``EVALSHA`` (registering it first through a new client)."""
        if client not in self._loaded:
            await self.load(client)
        if self.idempotent:
            with assume_idempotent():
                return await self._evalsha(client, keys, args)
        return await self._evalsha(client, keys, args)

    async def _evalsha(
        self, client: AnyRedis, keys: Sequence[str | bytes], args: Sequence[_Arg]
    ) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            _metrics.SCRIPT_RELOADS.labels(self.name).inc()
            await self.load(client)
            return await client.evalsha(self.sha, len(keys), *keys, *args)
