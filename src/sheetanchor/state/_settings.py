"""Settings of a cached store, and the hooks tests use to interleave operations."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sheetanchor.errors import ConfigError

__all__ = ["DEFAULT_CACHE_SETTINGS", "CacheSettings", "StoreClock", "StoreHooks"]


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """How a :class:`~sheetanchor.state.CachedStore` uses Redis. Seconds as floats.

    Attributes:
        ttl: lifetime of a cached row; each set takes up to ``ttl_jitter`` off it at random,
            so entries written together do not expire together.
        ttl_jitter: fraction of ``ttl`` randomized (0.1 = between 90 % and 100 %).
        tombstone_ttl: lifetime of a deletion's tombstone (keeps slow backfills out).
        absent_ttl: lifetime of a cached "no such row".
        early_refresh: refresh hot entries before they expire (probabilistic early
            expiration: the closer to expiry and the slower the load, the likelier).
        early_refresh_beta: > 1 refreshes earlier, < 1 later.
        lease_ttl: how long one loader may hold a key's load lease.
        lease_wait: how long other readers wait for the holder before reading PostgreSQL.
        timeout: seconds any single Redis call of the store may take before it counts as
            a failure (and the read is served by PostgreSQL). ``None`` (the default): the
            Redis client's own ``socket_timeout`` bounds each call; a per-call timer costs
            several microseconds, so prefer giving the cache a :class:`RedisClient` with
            ``socket_timeout=0.5``.
        max_backfill_age: a backfill whose database read started longer ago than this is
            not written to Redis (a newer entry might have expired meanwhile). It must be
            shorter than the shortest life of an entry, ``min(ttl, tombstone_ttl) *
            (1 - ttl_jitter)`` (jitter shortens tombstones too): a backfill that read a row
            just before it was deleted must land while the delete's tombstone still fences
            it out. ``None``: half of that bound. The age holds when the set reaches
            Redis, not only when it is sent: the fence script refuses a set past the
            deadline by the server's clock (``TIME``; the client's and the server's clocks
            must agree to well within this age), and a backfill that must wait for a pooled
            connection stops waiting at the deadline.
        max_flights: in-process single-flight table size.
        max_backfills: backfills written in the background at once (default 64). A miss
            returns the value as soon as PostgreSQL answered; the fenced set (with the lease
            release) follows in a tracked task of the running loop, which saves the caller a
            Redis round trip. Beyond this many pending, a miss writes its backfill before it
            returns again; ``0``: always so. The fence keeps it correct (a late backfill
            never overwrites a newer entry or a deletion's tombstone). Pending backfills
            are finished in their loop before its Redis client closes: when the loop ends
            (``asyncio.run`` cancels them: they are run once more), when it is closed by
            hand, or in :meth:`RedisClient.close`; one whose client was closed before it
            could run is dropped (counted; its lease expires after ``lease_ttl``).
            :meth:`CachedStore.drain` waits until they are written (a test that reads Redis
            right after a miss needs it); :meth:`CachedStore.close` does too.
        max_pending: keys remembered while Redis is unreachable; beyond it, the whole
            namespace is dropped from Redis when it returns.
        update_attempts: optimistic-update attempts before :class:`VersionConflict`.
    """

    ttl: float = 300.0
    ttl_jitter: float = 0.1
    tombstone_ttl: float = 10.0
    absent_ttl: float = 5.0
    early_refresh: bool = False
    early_refresh_beta: float = 1.0
    lease_ttl: float = 5.0
    lease_wait: float = 3.0
    timeout: float | None = None
    max_backfill_age: float | None = None
    max_flights: int = 10_000
    max_backfills: int = 64
    max_pending: int = 10_000
    update_attempts: int = 10

    def __post_init__(self) -> None:
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError(f"timeout must be > 0 seconds or None, got {self.timeout}")
        for name in ("ttl", "tombstone_ttl", "absent_ttl", "lease_ttl"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.lease_wait < 0:
            raise ConfigError(f"lease_wait must be >= 0 seconds, got {self.lease_wait}")
        if not 0 <= self.ttl_jitter < 1:
            raise ConfigError(f"ttl_jitter must be in [0, 1), got {self.ttl_jitter}")
        for name in ("max_flights", "max_pending", "update_attempts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_backfills < 0:
            raise ConfigError(f"max_backfills must be >= 0 (0: inline), got {self.max_backfills}")
        age = self.max_backfill_age
        if age is not None:
            if age <= 0:
                raise ConfigError(f"max_backfill_age must be > 0 seconds or None, got {age}")
            if age >= self._entry_life:
                shortest = "tombstone_ttl" if self.tombstone_ttl <= self.ttl else "ttl"
                raise ConfigError(
                    f"max_backfill_age ({age} s) must be shorter than the shortest life of a "
                    f"cached entry, min(ttl, tombstone_ttl) * (1 - ttl_jitter) = "
                    f"{self._entry_life:.1f} s (here {shortest}): a backfill that read a row "
                    "before it was deleted could land after the tombstone expired and cache "
                    f"the deleted row again. Lower max_backfill_age (e.g. "
                    f"{self._entry_life / 2:.1f}, the default) or raise {shortest}"
                )

    @property
    def _entry_life(self) -> float:
        # The shortest time a value or tombstone stays in Redis (jitter shortens both).
        return min(self.ttl, self.tombstone_ttl) * (1 - self.ttl_jitter)

    @property
    def backfill_age(self) -> float:
        """The effective ``max_backfill_age``."""
        if self.max_backfill_age is not None:
            return self.max_backfill_age
        return self._entry_life / 2


DEFAULT_CACHE_SETTINGS = CacheSettings()


@dataclass(frozen=True, slots=True)
class StoreHooks:
    """Test seams (no effect when unset).

    Attributes:
        after_db_read: awaited by a backfill after it read the database and before it
            writes Redis, with the key and the version read (``None``: no row). Tests pause
            here to reproduce the incident's stale backfill.
    """

    after_db_read: Callable[[Any, int | None], Awaitable[None]] | None = None


@dataclass(frozen=True, slots=True)
class StoreClock:
    """Time sources of a store, injectable for tests."""

    wall: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    rand: Callable[[], float] = random.random
    sleep: Callable[[float], Awaitable[None]] = field(default=asyncio.sleep)
