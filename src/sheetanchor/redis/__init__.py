"""Loop-aware, fork-safe Redis client, its retry rule, and a Lua script helper."""

from __future__ import annotations

from sheetanchor.redis._client import (
    DEFAULT_REDIS_RETRY,
    AnyRedis,
    RedisClient,
    RedisStats,
)
from sheetanchor.redis._retry import (
    IDEMPOTENT_COMMANDS,
    CommandOutcomeUnknown,
    assume_idempotent,
    command_is_idempotent,
    was_not_sent,
)
from sheetanchor.redis._scripts import LuaScript

__all__ = [
    "DEFAULT_REDIS_RETRY",
    "IDEMPOTENT_COMMANDS",
    "AnyRedis",
    "CommandOutcomeUnknown",
    "LuaScript",
    "RedisClient",
    "RedisStats",
    "assume_idempotent",
    "command_is_idempotent",
    "was_not_sent",
]
