"""Loop-aware, fork-safe Redis client and Lua script helper."""

from __future__ import annotations

from sheetanchor.redis._client import (
    DEFAULT_REDIS_RETRY,
    AnyRedis,
    RedisClient,
    RedisStats,
)
from sheetanchor.redis._scripts import LuaScript

__all__ = [
    "DEFAULT_REDIS_RETRY",
    "AnyRedis",
    "LuaScript",
    "RedisClient",
    "RedisStats",
]
