"""The Redis side of a cached store: fenced sets, leases, the breaker and pending invalidations.

Every Redis call of the store goes through :class:`CacheSide`, which bounds it with a short
timeout and routes failures: the call is counted, the breaker is told, and the caller gets
:data:`DOWN` and serves the read from PostgreSQL. Writes that could not reach Redis are
remembered in :class:`PendingInvalidations`; when the breaker lets a probe through, those
keys are invalidated (with the fence) *before* the cache is trusted again. The probe does not
wait for the store's next call: other processes read Redis as soon as it answers, so a
background task probes as soon as the breaker allows it.

One helper (``_call``) holds the breaker admission, the optional timeout and the failure
routing; the operations are plain functions of the :class:`RedisClient`, and scripts run by
SHA (all are registered again on NOSCRIPT). The single commands of the hot paths (the GET of
a hit, the scripts of a miss and of a write, MGET) go through
:meth:`RedisClient.execute_command`, the client's lean path; pipelines and cluster-wide work
use the redis-py client of the running loop.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Final, cast

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sheetanchor.observe import get_logger
from sheetanchor.redis import AnyRedis, LuaScript, RedisClient
from sheetanchor.redis._metrics import SCRIPT_RELOADS as _SCRIPT_RELOADS
from sheetanchor.state import _metrics
from sheetanchor.state._breaker import ALLOW, DENY, CircuitBreaker
from sheetanchor.state._entry import KIND_INVALID, KIND_VALUE, RANK, build
from sheetanchor.state._fence import (
    DELETE_IF_EQUAL,
    FENCED_SET,
    FENCED_SET_RELEASE,
    FENCED_SET_RELEASE_MANY,
    GET_OR_LEASE,
    GET_OR_LEASE_MANY,
    LEASE_RELEASE,
    SCRIPTS,
)
from sheetanchor.state._pending import PendingInvalidations

__all__ = ["DOWN", "REDIS_DOWN_ERRORS", "CacheSide", "FencedItem", "mget"]

_log = get_logger("state")


class _Down:
    __slots__ = ()

    def __repr__(self) -> str:
        return "DOWN"


DOWN: Final = _Down()
"""Returned instead of a result when Redis is skipped or failed."""

# What "Redis is unreachable or too slow" looks like (the retry classifier's Redis half).
REDIS_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    TimeoutError,
)
# Writing the pending keys may also meet a refusing server (OOM, READONLY): not recovered.
_RECOVER_ERRORS: tuple[type[BaseException], ...] = (*REDIS_DOWN_ERRORS, ResponseError)

_CLUSTER_CONCURRENCY = 16
# Bounds of the background recovery's sleep between probes (seconds).
_MIN_RECOVERY_WAIT = 0.05
_MAX_RECOVERY_WAIT = 60.0

# (redis key, entry bytes, version, rank, ttl ms)
FencedItem = tuple[str, bytes, int, int, int]


async def mget(client: AnyRedis, rkeys: Sequence[str]) -> list[bytes | None]:
    """MGET; on a cluster, split by hash slot (one MGET per slot, in parallel)."""
    if isinstance(client, aioredis.RedisCluster):
        return cast(list[bytes | None], await client.mget_nonatomic(rkeys))
    return cast(list[bytes | None], await client.mget(rkeys))


def _mget(rc: RedisClient, rkeys: Sequence[str]) -> Awaitable[Any]:
    # The lean path on a single server; split by slot on a cluster.
    if rc.cluster:
        return mget(rc.cluster_client(), rkeys)
    return rc.execute_command("MGET", *rkeys)


class CacheSide:
    """Redis access of one store, behind a circuit breaker.

    Args:
        rc: the loop-aware Redis client.
        table: the store's metric label.
        namespace: key prefix (``SCAN`` pattern for the overflow flush).
        breaker: the circuit breaker.
        pending: the pending-invalidation set.
        timeout: seconds any single cache call may take before it counts as a failure;
            ``None``: only the Redis client's own socket timeouts apply.
    """

    def __init__(
        self,
        rc: RedisClient,
        *,
        table: str,
        namespace: str,
        breaker: CircuitBreaker,
        pending: PendingInvalidations,
        timeout: float | None,
    ) -> None:
        self.rc = rc
        self.table = table
        self.namespace = namespace
        self.breaker = breaker
        self.pending = pending
        self.timeout = timeout
        self._errors = _metrics.REDIS_ERRORS.labels(table)
        self._refused = _metrics.FENCE_REFUSED.labels(table)
        self._open_gauge = _metrics.BREAKER_OPEN.labels(table)
        self._pending_gauge = _metrics.PENDING.labels(table)
        self._recovery: asyncio.Task[None] | None = None

    # -- breaker -----------------------------------------------------------------------

    async def usable(self) -> bool:
        """True when the store may call Redis now (runs the recovery when it is the probe)."""
        verdict = self.breaker.check()
        return (verdict == ALLOW and not self.pending.dirty) or await self._admit(verdict)

    async def _admit(self, verdict: int) -> bool:
        # DENY skips Redis; PROBE (exactly one caller) must recover it first; ALLOW with
        # keys pending (one arrived while a probe ran) writes them before Redis is read.
        if verdict == DENY:
            return False
        if verdict == ALLOW:
            return await self._drain_closed()
        return await self._recover()

    async def _drain_closed(self) -> bool:
        try:
            async with asyncio.timeout(max(self.timeout or 1.0, 1.0) * 10):
                written, overflowed = await self._write_pending(self.rc.any_client())
        except _RECOVER_ERRORS as exc:
            self.failed(exc)
            self.breaker.trip()
            self._open_gauge.set(1)
            return False
        self._pending_gauge.set(len(self.pending))
        _log.warning(
            "cache %s: %d pending invalidations written%s",
            self.table,
            written,
            " and the namespace flushed (pending set had overflowed)" if overflowed else "",
        )
        return True

    async def _write_pending(self, client: AnyRedis) -> tuple[int, bool]:
        # Until nothing is pending: keys added while we wrote (writers skip Redis during a
        # probe) must be written too before the cache is trusted. Bounded by the caller's
        # timeout.
        written = 0
        flushed = False
        while True:
            items, overflowed = self.pending.snapshot()
            if not items and not overflowed:
                return written, flushed
            if overflowed:
                await self._drop_namespace(client)
                flushed = True
            if items:
                await _fenced_many(
                    client,
                    [(k, e, v, r, 60_000) for k, (v, r, e) in items.items()],
                )
            self.pending.done(items, overflow_handled=overflowed)
            written += len(items)

    def failed(self, exc: BaseException) -> None:
        """Count a failed Redis call and tell the breaker."""
        self._errors.inc()
        was = self.breaker.state
        self.breaker.failure()
        if self.breaker.state != "closed":
            self._open_gauge.set(1)
            if was == "closed":
                _log.warning(
                    "cache %s: Redis unreachable (%s: %s); reads go to PostgreSQL until it is back",
                    self.table,
                    type(exc).__name__,
                    exc,
                )

    async def _recover(self) -> bool:
        # We are the single probe. Nothing may read the cache before every key written while
        # Redis was away is invalidated, so the breaker closes only after that succeeded.
        try:
            async with asyncio.timeout(max(self.timeout or 1.0, 1.0) * 10):
                client = self.rc.any_client()
                await client.ping()
                written, overflowed = await self._write_pending(client)
        except _RECOVER_ERRORS as exc:
            self.breaker.failure()
            _log.info("cache %s: Redis still unreachable (%s)", self.table, exc)
            return False
        self.breaker.success()
        self._open_gauge.set(0)
        self._pending_gauge.set(len(self.pending))
        _log.warning(
            "cache %s: Redis is back; %d pending invalidations written%s",
            self.table,
            written,
            " and the namespace flushed (pending set had overflowed)" if overflowed else "",
        )
        return True

    async def _drop_namespace(self, client: AnyRedis) -> None:
        # The pending set overflowed: we no longer know which keys went stale, so every
        # entry of this store goes. Readers of this process do not use Redis meanwhile.
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{self.namespace}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                await client.unlink(*batch)
                batch.clear()
        if batch:
            await client.unlink(*batch)

    # -- one Redis call -----------------------------------------------------------------

    def _call(self, op: Callable[..., Awaitable[Any]], *args: Any) -> Awaitable[Any]:
        """``await op(rc, *args)`` behind the breaker: the result, or :data:`DOWN`.

        The first call of an operation goes through here: while the breaker is open it
        skips Redis; the probe (and a closed breaker with keys pending) writes the pending
        invalidations before anything is read. A failure is counted, the breaker is told,
        and the caller gets :data:`DOWN`.

        Not a coroutine itself: with the breaker closed and nothing pending (the hot path:
        one method call and one attribute read) it returns the admitted call's coroutine,
        so a Redis call of the store costs no frame of its own here.
        """
        verdict = self.breaker.check()
        if verdict != ALLOW or self.pending.dirty:
            return self._call_checked(verdict, op, args)
        return self._call_admitted(op, *args)

    async def _call_checked(
        self, verdict: int, op: Callable[..., Awaitable[Any]], args: tuple[Any, ...]
    ) -> Any:
        # Open (DENY): Redis is skipped; a probe, or keys pending, must recover it first.
        if verdict == DENY or not await self._admit(verdict):
            return DOWN
        return await self._call_admitted(op, *args)

    async def _call_admitted(self, op: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """:meth:`_call` without the breaker check: for the later steps of an operation
        whose first call was admitted (a lease, a peek, the backfill that releases it), so
        that a breaker opened meanwhile by another caller does not leave them half done."""
        rc = self.rc
        try:
            if self.timeout is None:
                result = await op(rc, *args)
            else:
                async with asyncio.timeout(self.timeout):
                    result = await op(rc, *args)
        except NoScriptError:
            result = await self._after_noscript(op, args)
        except REDIS_DOWN_ERRORS as exc:
            self.failed(exc)
            return DOWN
        self.breaker.note_success()
        return result

    async def _after_noscript(
        self, op: Callable[..., Awaitable[Any]], args: tuple[Any, ...]
    ) -> Any:
        # The server lost its scripts (restart, SCRIPT FLUSH): register them all again (they
        # are lost together) and run the call once more.
        try:
            async with asyncio.timeout(max(self.timeout or 1.0, 1.0) * 10):
                client = self.rc.any_client()
                for script in SCRIPTS:
                    _SCRIPT_RELOADS.labels(script.name).inc()
                    await script.load(client)
                return await op(self.rc, *args)
        except REDIS_DOWN_ERRORS as exc:
            self.failed(exc)
            return DOWN

    # -- reads -------------------------------------------------------------------------

    def skipping(self) -> bool:
        """True while the breaker denies Redis (see :meth:`CircuitBreaker.denies`): the
        caller may go to PostgreSQL at once, without awaiting a call that returns
        :data:`DOWN`. False does not promise Redis: the call itself checks again."""
        return self.breaker.denies()

    def get(self, rkey: str) -> Awaitable[bytes | _Down | None]:
        """GET, or :data:`DOWN` when Redis is skipped or failed (an awaitable: no
        coroutine of its own on the hit path)."""
        return self._call(_get, rkey)

    def get_or_lease(
        self, rkey: str, lease_key: str, token: str, ttl_ms: int
    ) -> Awaitable[bytes | int | _Down]:
        """The entry, or (when there is none) 1 if we took the lease, 0 if another holds it
        (the script's integer reply; an awaitable, as :meth:`get`)."""
        return self._call(_get_or_lease, rkey, lease_key, token, ttl_ms)

    async def fenced_set_release(
        self, item: FencedItem, lease_key: str, token: str, deadline_ms: int = 0
    ) -> bool | _Down:
        """Fenced set of a backfill and release of our lease, in one call; the set is
        refused past ``deadline_ms`` (Unix ms by the server's clock; 0: no deadline)."""
        res = await self._call_admitted(_fenced_set_release, item, lease_key, token, deadline_ms)
        if isinstance(res, _Down):
            return res
        if not res:
            self._refused.inc()
        return bool(res)

    async def mget(self, rkeys: Sequence[str]) -> list[bytes | None] | _Down:
        """MGET, or :data:`DOWN`."""
        return cast(list[bytes | None] | _Down, await self._call(_mget, rkeys))

    # -- fenced writes -----------------------------------------------------------------

    async def fenced_set(self, item: FencedItem, deadline_ms: int = 0) -> bool | _Down:
        """Write one entry unless Redis holds a newer one (or, with ``deadline_ms``, Unix ms,
        the server's clock is past it); False when refused."""
        res = await self._call(_fenced_set, item, deadline_ms)
        if isinstance(res, _Down):
            return res
        if not res:
            self._refused.inc()
        return bool(res)

    async def fenced_set_many(self, items: Sequence[FencedItem]) -> list[bool] | _Down:
        """Write many entries with the fence in one round trip (a pipeline)."""
        if not items:
            return []
        results = await self._call(_fenced_many_op, items)
        if isinstance(results, _Down):
            return results
        refused = results.count(False)
        if refused:
            self._refused.inc(refused)
        return cast(list[bool], results)

    # -- many keys at once (get_many) ----------------------------------------------------

    async def get_or_lease_many(
        self, rkeys: Sequence[str], token: str, ttl_ms: int, *, first: bool
    ) -> list[bytes | int] | _Down:
        """Per key, the entry, or (when there is none) 1 if we took its lease (``<key>:lease``)
        now, 0 if another holds it: one call on a single server.

        On a cluster the keys span slots: the leases are taken with a ``SET NX`` pipeline
        (redis-py splits it by node) and no entry is read again. ``first``: the first Redis
        call of the operation (checked against the breaker).
        """
        lease_keys = [r + ":lease" for r in rkeys]
        call = self._call if first else self._call_admitted
        if self.rc.cluster:
            res = await call(_set_nx_many, lease_keys, token, ttl_ms)
            return res if isinstance(res, _Down) else [1 if r else 0 for r in res]
        return cast(
            list[bytes | int] | _Down,
            await call(_get_or_lease_many, rkeys, lease_keys, token, ttl_ms),
        )

    async def backfill_many(
        self, items: Sequence[FencedItem], token: str | None, deadline_ms: int
    ) -> list[bool] | _Down:
        """The fenced sets of many backfills, refused past ``deadline_ms`` (Unix ms, by the
        server's clock); with ``token``, each releases its lease (``<key>:lease``) if ours.
        One call on a single server; on a cluster, a script per key (the keys span slots)."""
        if not items:
            return []
        if self.rc.cluster:
            calls: list[tuple[tuple[str, ...], tuple[Any, ...]]]
            if token is None:
                calls = [
                    ((rkey,), (entry, version, rank, ttl, deadline_ms))
                    for rkey, entry, version, rank, ttl in items
                ]
                res = await self._call_admitted(_scripts_many_op, FENCED_SET, calls)
            else:
                calls = [
                    ((rkey, rkey + ":lease"), (entry, version, rank, ttl, token, deadline_ms))
                    for rkey, entry, version, rank, ttl in items
                ]
                res = await self._call_admitted(_scripts_many_op, FENCED_SET_RELEASE, calls)
        else:
            res = await self._call_admitted(_fenced_set_release_many, items, token, deadline_ms)
        if isinstance(res, _Down):
            return res
        results = [bool(r) for r in res]
        refused = results.count(False)
        if refused:
            self._refused.inc(refused)
        return results

    async def acquire_leases(
        self, lease_keys: Sequence[str], token: str, ttl_ms: int
    ) -> list[bool] | _Down:
        """``SET NX PX`` of many leases in one round trip: which ones we hold now."""
        res = await self._call_admitted(_set_nx_many, lease_keys, token, ttl_ms)
        return res if isinstance(res, _Down) else [bool(r) for r in res]

    async def release_leases(self, lease_keys: Sequence[str], token: str) -> None:
        """Release many leases that are still ours (they expire on their own otherwise)."""
        await self._call_admitted(
            _scripts_many_op, LEASE_RELEASE, [((lk,), (token,)) for lk in lease_keys]
        )

    async def peek_many(
        self, rkeys: Sequence[str], lease_keys: Sequence[str]
    ) -> tuple[list[bytes | None], list[bool]] | _Down:
        """The entries, and whether each lease is still held, in one round trip."""
        return cast(
            tuple[list[bytes | None], list[bool]] | _Down,
            await self._call_admitted(_peek_many, rkeys, lease_keys),
        )

    async def after_write(self, items: Sequence[FencedItem]) -> None:
        """After a commit: fenced-set the new entries, or remember them for the recovery."""
        result = await (
            self.fenced_set(items[0]) if len(items) == 1 else self.fenced_set_many(items)
        )
        if result is DOWN:
            self.not_written(items)

    def not_written(self, items: Sequence[FencedItem]) -> None:
        """After a commit, these entries may not have reached Redis: remember them, open.

        Also for a cancelled or refused (``ResponseError``) update after the commit.
        """
        for rkey, entry, version, rank, _ttl in items:
            if rank == RANK[KIND_VALUE]:
                # Remember "older than `version` is stale", not the value: the pending
                # set stays small (no payloads) and the next reader loads the row.
                entry = build(KIND_INVALID, version, 0, 0)
                rank = RANK[KIND_INVALID]
            self.pending.add(rkey, version, rank, entry)
        self._pending_gauge.set(len(self.pending))
        # Open now, even below the failure threshold: until the pending keys are
        # written, Redis may hold the old entry and must not be read.
        self.breaker.trip()
        self._open_gauge.set(1)
        self._recover_soon()

    def _recover_soon(self) -> None:
        # Other processes never saw the outage: they read Redis as soon as it answers, and
        # only this process knows which entries went stale. So the pending keys must not
        # wait for this process's next cache call (an idle writer may make none): probe as
        # soon as the breaker allows it.
        if self._recovery is not None and not self._recovery.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not in a loop: the next call of the store probes
            return
        self._recovery = loop.create_task(
            _recover_when_allowed(weakref.ref(self)),
            name=f"sheetanchor-cache-recover[{self.table}]",
        )

    def stop_recovery(self) -> None:
        """Stop probing Redis on our own (the store closes). Pending keys stay pending."""
        if self._recovery is not None:
            self._recovery.cancel()
            self._recovery = None

    async def delete_if_equal(self, rkey: str, data: bytes) -> bool | _Down:
        """Remove an entry unless it changed meanwhile: True when it was deleted, False when
        it had changed (or was gone), :data:`DOWN` when Redis failed."""
        res = await self._call_admitted(_delete_if_equal, rkey, data)
        return DOWN if res is DOWN else bool(res)

    # -- leases ------------------------------------------------------------------------

    async def acquire_lease(self, lease_key: str, token: str, ttl_ms: int) -> bool | _Down:
        """``SET lease token NX PX ttl``: True when we hold it now."""
        res = await self._call_admitted(_set_nx, lease_key, token, ttl_ms)
        return DOWN if res is DOWN else bool(res)

    async def release_lease(self, lease_key: str, token: str) -> None:
        """Delete the lease if it is still ours (a Lua compare-and-delete).

        When Redis fails, the lease expires on its own (PX); only the breaker is told.
        """
        await self._call_admitted(_lease_release, lease_key, token)

    async def peek(self, rkey: str, lease_key: str) -> tuple[bytes | None, bool] | _Down:
        """The entry and whether the lease is still held, in one round trip."""
        return cast(
            tuple[bytes | None, bool] | _Down, await self._call_admitted(_peek, rkey, lease_key)
        )


async def _recover_when_allowed(ref: weakref.ref[CacheSide]) -> None:
    """Probe Redis whenever the breaker allows it, until nothing is pending.

    Holds only a weak reference to its cache side: a store that goes away stops it.
    """
    while True:
        side = ref()
        if side is None or not side.pending.dirty:
            return
        wait = min(max(side.breaker.probe_in(), _MIN_RECOVERY_WAIT), _MAX_RECOVERY_WAIT)
        del side
        await asyncio.sleep(wait)
        side = ref()
        if side is None:
            return
        try:
            await side.usable()  # the probe, when it is our turn; it writes what is pending
        except Exception as exc:  # noqa: BLE001  logged; the store's next call probes again
            _log.warning(
                "cache %s: background recovery stopped (%s: %s); the next call probes Redis",
                side.table,
                type(exc).__name__,
                exc,
            )
            return
        del side


async def _fenced_many(client: AnyRedis, items: Sequence[FencedItem]) -> list[bool]:
    calls = [((rkey,), (entry, version, rank, ttl)) for rkey, entry, version, rank, ttl in items]
    return [bool(r) for r in await _scripts_many(client, FENCED_SET, calls)]


def _fenced_many_op(rc: RedisClient, items: Sequence[FencedItem]) -> Awaitable[list[bool]]:
    return _fenced_many(rc.any_client(), items)


def _scripts_many_op(
    rc: RedisClient,
    script: LuaScript,
    calls: Sequence[tuple[tuple[str, ...], tuple[Any, ...]]],
) -> Awaitable[list[Any]]:
    return _scripts_many(rc.any_client(), script, calls)


async def _scripts_many(
    client: AnyRedis,
    script: LuaScript,
    calls: Sequence[tuple[tuple[str, ...], tuple[Any, ...]]],
) -> list[Any]:
    """Run ``script`` once per (keys, args), in one round trip where the client allows it."""
    if isinstance(client, aioredis.RedisCluster):
        # redis-py refuses EVALSHA in cluster pipelines: run the scripts concurrently
        # instead (bounded, so a big batch cannot exhaust the per-node pools).
        gate = asyncio.Semaphore(_CLUSTER_CONCURRENCY)

        async def one(keys: tuple[str, ...], args: tuple[Any, ...]) -> Any:
            async with gate:
                return await script(client, keys=keys, args=args)

        return list(await asyncio.gather(*(one(k, a) for k, a in calls)))
    results = await _pipeline(client, script, calls)
    if any(isinstance(r, NoScriptError) for r in results):
        # The server lost its scripts (restart, flush): load once, run the pipeline again.
        await script.load(client)
        results = await _pipeline(client, script, calls)
    for r in results:
        if isinstance(r, ResponseError):
            raise r
    return results


async def _pipeline(
    client: AnyRedis, script: LuaScript, calls: Iterable[tuple[tuple[str, ...], tuple[Any, ...]]]
) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for keys, args in calls:
        pipe.evalsha(script.sha, len(keys), *keys, *args)
    results: list[Any] = await pipe.execute(raise_on_error=False)
    return results


async def _set_nx_many(
    rc: RedisClient, lease_keys: Sequence[str], token: str, ttl_ms: int
) -> list[Any]:
    pipe = rc.any_client().pipeline(transaction=False)
    for lk in lease_keys:
        pipe.set(lk, token, nx=True, px=ttl_ms)
    results: list[Any] = await pipe.execute()
    return results


async def _peek_many(
    rc: RedisClient, rkeys: Sequence[str], lease_keys: Sequence[str]
) -> tuple[list[bytes | None], list[bool]]:
    client = rc.any_client()
    if isinstance(client, aioredis.RedisCluster):
        datas, leases = await mget(client, rkeys), await mget(client, lease_keys)
    else:
        pipe = client.pipeline(transaction=False)
        pipe.mget(rkeys)
        pipe.mget(lease_keys)
        datas, leases = await pipe.execute()
    return datas, [lease is not None for lease in leases]


# The operations, as plain functions of the RedisClient that return the awaitable (no extra
# coroutine frame per call). Single commands take the client's lean path
# (RedisClient.execute_command: redis-py's own path on a cluster). Scripts run by SHA;
# ``_call`` reloads them on NOSCRIPT.


def _get(rc: RedisClient, rkey: str) -> Awaitable[Any]:
    return rc.execute_command("GET", rkey)


def _get_or_lease(
    rc: RedisClient, rkey: str, lease_key: str, token: str, ttl_ms: int
) -> Awaitable[Any]:
    return rc.execute_command("EVALSHA", GET_OR_LEASE.sha, 2, rkey, lease_key, token, ttl_ms)


def _fenced_set(rc: RedisClient, item: FencedItem, deadline_ms: int) -> Awaitable[Any]:
    rkey, entry, version, rank, ttl_ms = item
    if not deadline_ms:
        return rc.execute_command("EVALSHA", FENCED_SET.sha, 1, rkey, entry, version, rank, ttl_ms)
    return rc.execute_command(
        "EVALSHA", FENCED_SET.sha, 1, rkey, entry, version, rank, ttl_ms, deadline_ms
    )


def _fenced_set_release(
    rc: RedisClient, item: FencedItem, lease_key: str, token: str, deadline_ms: int
) -> Awaitable[Any]:
    rkey, entry, version, rank, ttl_ms = item
    return rc.execute_command(
        "EVALSHA",
        FENCED_SET_RELEASE.sha,
        2,
        rkey,
        lease_key,
        entry,
        version,
        rank,
        ttl_ms,
        token,
        deadline_ms,
    )


def _get_or_lease_many(
    rc: RedisClient, rkeys: Sequence[str], lease_keys: Sequence[str], token: str, ttl_ms: int
) -> Awaitable[Any]:
    return rc.execute_command(
        "EVALSHA", GET_OR_LEASE_MANY.sha, 2 * len(rkeys), *rkeys, *lease_keys, token, ttl_ms
    )


def _fenced_set_release_many(
    rc: RedisClient, items: Sequence[FencedItem], token: str | None, deadline_ms: int
) -> Awaitable[Any]:
    rkeys = [item[0] for item in items]
    keys = rkeys if token is None else [*rkeys, *(r + ":lease" for r in rkeys)]
    args: list[Any] = [len(items), token or "", deadline_ms]
    for _rkey, entry, version, rank, ttl_ms in items:
        args += (entry, version, rank, ttl_ms)
    return rc.execute_command("EVALSHA", FENCED_SET_RELEASE_MANY.sha, len(keys), *keys, *args)


def _delete_if_equal(rc: RedisClient, rkey: str, data: bytes) -> Awaitable[Any]:
    return rc.execute_command("EVALSHA", DELETE_IF_EQUAL.sha, 1, rkey, data)


def _lease_release(rc: RedisClient, lease_key: str, token: str) -> Awaitable[Any]:
    return rc.execute_command("EVALSHA", LEASE_RELEASE.sha, 1, lease_key, token)


def _set_nx(rc: RedisClient, lease_key: str, token: str, ttl_ms: int) -> Awaitable[Any]:
    return rc.execute_command("SET", lease_key, token, "NX", "PX", ttl_ms)


async def _peek(rc: RedisClient, rkey: str, lease_key: str) -> tuple[bytes | None, bool]:
    pipe = rc.any_client().pipeline(transaction=False)
    pipe.get(rkey)
    pipe.exists(lease_key)
    data, held = await pipe.execute()
    return data, bool(held)
