"""``RedisClient``: one redis-py asyncio pool per (process, running event loop).

A ``redis.asyncio.Redis`` binds its connections to the event loop that first used them.
Used from a second loop (Celery tasks, ``asyncio.run`` per job, tests) it fails with
``Event loop is closed`` or ``attached to a different loop`` and leaks sockets (incident 002).
``RedisClient`` is safe as a module global: :meth:`RedisClient.client` returns the Redis client
of the *running* loop, creating it on first use.

Rules it keeps:

* Clients are keyed by the loop object itself (never ``id(loop)``, which a new loop can reuse).
  The registry holds the loop strongly, so a key cannot be recycled while its entry lives.
* Each client is closed *inside its own loop* when that loop shuts down: a small closer task
  waits in the loop, and ``asyncio.run`` (or ``asyncio.Runner``) cancels it at the end, which
  closes the pool cleanly. A loop closed by hand (``loop.close()`` without cancelling its
  tasks) closes the client from a hook on that loop's ``close()``; a loop closed without
  either (uvloop) is swept on the next creation, its sockets closed without the loop.
* After ``fork()`` the child never touches the parent's sockets: the inherited clients are
  set aside untouched (not closed: closing a TLS socket would send bytes on the parent's
  session) and the child opens its own on first use.
* The lookup is one dictionary read; creation takes a ``threading.Lock``.
* A command is never sent twice unless that is safe: errors before it was written are
  retried for every command, errors after it may have reached the server only for idempotent
  commands; others raise ``CommandOutcomeUnknown`` (the rule is in ``_retry.py``).
* :meth:`RedisClient.execute_command` runs a single command on the same per-loop pool
  without redis-py's per-command wrapper, keeping all of the above (``_lean.py``).
* Work a caller left running in a loop that needs the client to end cleanly (a cached
  store's backfills, which hold leases) registers with :meth:`RedisClient.before_close`: it
  is awaited in that loop, bounded, while the client is still open, before the client
  closes (loop end, loop closed by hand, or :meth:`RedisClient.close`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, NamedTuple, TypeVar, cast

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.asyncio.connection import parse_url as parse_redis_url
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError

from sheetanchor.config import parse_url, redact, redis_url_from_env
from sheetanchor.errors import ConfigError, ResourceClosed, WrongEventLoop
from sheetanchor.observe import get_logger
from sheetanchor.postgres._loops import close_inherited_loop
from sheetanchor.redis import _metrics
from sheetanchor.redis._lean import LeanCommands, lean_commands_for
from sheetanchor.redis._retry import (
    SafeRedis,
    SafeRedisCluster,
    SafeRetry,
    tracked_connection_class,
)
from sheetanchor.retry import RetryPolicy

__all__ = ["DEFAULT_REDIS_RETRY", "AnyRedis", "RedisClient", "RedisStats"]

_log = get_logger("redis")
_T = TypeVar("_T")


#: Retries of transient Redis errors inside redis-py: 3 attempts, backoff from 50 ms, capped
#: at 1 s, full jitter. redis-py runs the loop itself (per command, on a fresh connection), so
#: a policy's ``max_attempts``, ``initial`` and ``maximum`` are used and its ``deadline`` is
#: not: attempts x socket timeouts bound a call. *Which* errors are retried is not the
#: policy's to say: an error before the command was written is retried for every command, one
#: after (a read timeout, a connection lost mid-command) only for an idempotent command (see
#: ``sheetanchor.redis._retry`` and :class:`~sheetanchor.redis.CommandOutcomeUnknown`).
DEFAULT_REDIS_RETRY = RetryPolicy(max_attempts=3, initial=0.05, maximum=1.0, name="redis")


class RedisStats(NamedTuple):
    """Counters of one :class:`RedisClient` in this process.

    Attributes:
        clients_alive: per-loop Redis clients open now.
        clients_created: per-loop clients created so far.
        clients_disposed: clients closed cleanly (their loop ended, or ``close()``).
        clients_abandoned: clients left behind unclosed: their loop was closed without
            cancelling its tasks, or they were inherited across ``fork()``.
        connections_in_use: connections checked out of the pools now.
        connections_idle: open connections waiting in the pools.
        max_connections: the per-loop pool limit.
    """

    clients_alive: int
    clients_created: int
    clients_disposed: int
    clients_abandoned: int
    connections_in_use: int
    connections_idle: int
    max_connections: int


AnyRedis = aioredis.Redis | aioredis.RedisCluster
"""A single-server client or a cluster client (both speak the same commands)."""


@dataclass(eq=False, slots=True, weakref_slot=True)
class _Entry:
    loop: asyncio.AbstractEventLoop
    redis: AnyRedis
    pid: int
    stop: asyncio.Future[None]
    lean: LeanCommands | None = None  # None: redis-py's normal path (cluster...)
    closer: asyncio.Task[None] | None = None
    forsaken: bool = False
    closed: bool = field(default=False)
    # Awaited in the loop before the client closes (see RedisClient.before_close).
    before_close: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


# Every live RedisClient, for the fork hook and the metrics collector.
_LIVE: weakref.WeakSet[RedisClient] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for rc in list(_LIVE):
        rc._forsake_inherited()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _to_redis_retry(policy: RetryPolicy, client: str) -> SafeRetry:
    return SafeRetry(
        ExponentialWithJitterBackoff(cap=policy.maximum, base=policy.initial),
        retries=policy.max_attempts - 1,
        client=client,
    )


class RedisClient:
    """A loop-aware, fork-safe Redis client; safe to create once as a module global.

    Args:
        url: ``redis://[:password@]host:port/db``; ``None`` reads ``SHEETANCHOR_REDIS_URL``.
        name: label for metrics and logs (low cardinality: one per logical client).
        health_check_interval: seconds a pooled connection may sit idle before it is pinged
            on checkout (catches connections killed by a restart or a proxy).
        socket_timeout: seconds to wait for a reply before the call fails (transient).
        socket_connect_timeout: seconds to wait for a TCP connect.
        retry: a :class:`~sheetanchor.retry.RetryPolicy` for transient errors (connection
            lost, timeout), run by redis-py per command (see :data:`DEFAULT_REDIS_RETRY`).
            A command is retried after an error that came before it was written (connect
            refused, handshake or health-check failure) whatever it is; after an error that
            came once it may have reached the server (read timeout, connection lost while
            awaiting the reply) only if it is idempotent (reads, ``SET``, ``DEL``,
            ``EXPIRE``..., a ``LuaScript`` declared idempotent). Any other command raises
            :class:`~sheetanchor.redis.CommandOutcomeUnknown` instead of running twice.
        max_connections: connections per (process, loop) pool.
        pool_timeout: seconds a call waits for a free pooled connection.
        decode_responses: passed to redis-py (default ``False``: bytes in, bytes out).
        cluster: the URL names one node of a Redis Cluster: use ``redis.asyncio.RedisCluster``
            (get it with :meth:`any_client` or :meth:`cluster_client`; ``max_connections``
            is then per node).

    Raises:
        ConfigError: no URL, a non-Redis URL, or an invalid number.

    Example::

        rc = RedisClient()                        # module global
        async def handler() -> bytes | None:
            return await rc.client().get("k")     # the client of the running loop
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        name: str = "default",
        health_check_interval: float = 15.0,
        socket_timeout: float = 5.0,
        socket_connect_timeout: float = 5.0,
        retry: RetryPolicy | None = None,
        max_connections: int = 50,
        pool_timeout: float = 5.0,
        decode_responses: bool = False,
        cluster: bool = False,
    ) -> None:
        resolved = url if url is not None else redis_url_from_env()
        if not resolved:
            raise ConfigError("no Redis URL: pass url=... or set SHEETANCHOR_REDIS_URL")
        parsed = parse_url(resolved)
        if parsed.kind != "redis":
            raise ConfigError(f"expected a Redis URL (redis://...), got {parsed.display!r}")
        for arg, value in (
            ("health_check_interval", health_check_interval),
            ("socket_timeout", socket_timeout),
            ("socket_connect_timeout", socket_connect_timeout),
            ("pool_timeout", pool_timeout),
        ):
            if value < 0:
                raise ConfigError(f"{arg} must be >= 0 seconds, got {value}")
        if max_connections < 1:
            raise ConfigError(f"max_connections must be >= 1, got {max_connections}")
        self._url = resolved
        self.name = name
        self._display = parsed.display
        self._health_check_interval = health_check_interval
        self._socket_timeout = socket_timeout
        self._socket_connect_timeout = socket_connect_timeout
        self._retry = retry if retry is not None else DEFAULT_REDIS_RETRY
        self._max_connections = max_connections
        self._pool_timeout = pool_timeout
        self._decode_responses = decode_responses
        self.cluster = cluster
        self._entries: dict[asyncio.AbstractEventLoop, _Entry] = {}
        # What a fork child inherited (only that): kept referenced so their sockets are never
        # closed here. Bounded: the clients alive at fork time, once per fork.
        self._inherited: list[_Entry] = []
        self._lock = threading.Lock()
        self._closed = False
        self._created = 0
        self._disposed = 0
        self._abandoned = 0
        _LIVE.add(self)

    def __repr__(self) -> str:
        return f"RedisClient({self._display!r}, name={self.name!r}, alive={len(self._entries)})"

    @property
    def url(self) -> str:
        """The configured URL, password redacted."""
        return redact(self._url)

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def client(self) -> aioredis.Redis:
        """Return the ``redis.asyncio.Redis`` of the running event loop (created on first use).

        Raises:
            WrongEventLoop: called outside a running event loop.
            ResourceClosed: after :meth:`close`.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise self._no_loop("client") from None
        if self.cluster:
            raise ConfigError(
                f"RedisClient({self.name!r}) talks to a Redis Cluster: use cluster_client() "
                "or any_client()"
            )
        entry = self._entries.get(loop)  # the fast path: one dict read, no lock
        redis = entry.redis if entry is not None else self._create(loop)
        return redis  # type: ignore[return-value]  # not a cluster: always a Redis

    def cluster_client(self) -> aioredis.RedisCluster:
        """Return the ``redis.asyncio.RedisCluster`` of the running loop (``cluster=True``)."""
        if not self.cluster:
            raise ConfigError(
                f"RedisClient({self.name!r}) is not a cluster client: use client(), or pass "
                "cluster=True"
            )
        redis = self.any_client()
        return redis  # type: ignore[return-value]  # a cluster: always a RedisCluster

    def any_client(self) -> AnyRedis:
        """The client of the running loop, single-server or cluster (what ``cluster`` says).

        Raises:
            WrongEventLoop: called outside a running event loop.
            ResourceClosed: after :meth:`close`.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise self._no_loop("any_client") from None
        entry = self._entries.get(loop)
        if entry is not None:
            return entry.redis
        return self._create(loop)

    async def call(self, fn: Callable[[AnyRedis], Awaitable[_T]]) -> _T:
        """Run ``await fn(redis)`` with the client of the running loop.

        Transient errors are retried inside redis-py with this client's retry policy, by the
        rule of the ``retry`` argument (non-idempotent commands are never sent twice).
        """
        return await fn(self.any_client())

    async def execute_command(self, *args: Any) -> Any:
        """Run one command on the running loop's pool; what ``execute_command`` returns.

        The same command as ``await rc.any_client().execute_command(*args)``, with the same
        reply (redis-py's response callback applied: ``SET`` gives ``True``), errors, retry
        rule (see the ``retry`` argument), socket timeout and pool limit, for a fraction of
        the client CPU: on a single server it takes an idle connection of the loop's pool
        directly, writes the packed command and reads the reply with the connection's
        parser (see :mod:`sheetanchor.redis._lean`). A round trip that fails or is
        cancelled disconnects its connection, so no reply is ever left pending on a pooled
        one. On a Redis Cluster (and wherever the lean path cannot be exact: RESP3, a
        custom pool) it is redis-py's ``execute_command``.

        Meant for the hot single commands of a caller (``GET``, ``MGET``, ``EVALSHA``...);
        options of redis-py's command methods (``nx=True``...) are spelled as arguments.

        Raises:
            WrongEventLoop: called outside a running event loop.
            ResourceClosed: after :meth:`close`.
            CommandOutcomeUnknown: a non-idempotent command whose reply was lost.
            redis.exceptions.RedisError: what redis-py raises for the command
                (``NoScriptError`` for an unknown script SHA, ``ResponseError``...).

        Example::

            raw = await rc.execute_command("GET", "k")
            sha_result = await rc.execute_command("EVALSHA", script.sha, 1, "k", "v")
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise self._no_loop("execute_command") from None
        entry = self._entries.get(loop)  # the fast path: one dict read, no lock
        if entry is None:
            redis = self._create(loop)
            entry = self._entries.get(loop)
            if entry is None:  # closed meanwhile from another thread
                return await redis.execute_command(*args)
        lean = entry.lean
        if lean is None:
            return await entry.redis.execute_command(*args)
        return await lean.execute(args)

    def idle_connection(self) -> bool:
        """True when the running loop's pool holds an idle connection now: a command passed
        to :meth:`execute_command` before the next ``await`` does not wait for a connection
        (its first attempt). False outside a running loop, before the loop's first command,
        on a cluster, or wherever :meth:`execute_command` takes redis-py's path."""
        try:
            entry = self._entries.get(asyncio.get_running_loop())
        except RuntimeError:
            return False
        lean = None if entry is None else entry.lean
        return lean is not None and lean.idle_connection()

    def before_close(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Have ``await fn()`` run in the running loop before that loop's client closes.

        For work left running in the background that needs Redis to end cleanly (a cached
        store's backfills release leases that other readers wait for). ``fn`` runs once, in
        its loop, while the client is still open: when the loop ends (``asyncio.run``
        cancelling its tasks), when it is closed by hand, or in :meth:`close` (for the
        running loop and loops running in other threads). Each call is bounded by
        ``socket_timeout + socket_connect_timeout`` (at least 1 s): then ``fn`` is cancelled.
        Keep a weak reference to your own object in ``fn``: the client holds ``fn`` until
        that loop's client closes.

        Raises:
            WrongEventLoop: called outside a running event loop.
            ResourceClosed: after :meth:`close`.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise self._no_loop("before_close") from None
        entry = self._entries.get(loop)
        if entry is None:
            self._create(loop)
            entry = self._entries.get(loop)
            if entry is None:  # closed meanwhile from another thread
                raise ResourceClosed(f"RedisClient({self.name!r}) is closed; create a new one")
        entry.before_close.append(fn)

    def _no_loop(self, method: str) -> WrongEventLoop:
        return WrongEventLoop(
            f"RedisClient({self.name!r}).{method}() needs a running event loop; "
            "call it from a coroutine"
        )

    async def _finish_users(self, entry: _Entry) -> None:
        # In entry's loop, the client still open: what registered with before_close, each
        # once (also what registers meanwhile). Bounded; an error is logged (the client
        # closes either way).
        bound = max(self._socket_timeout + self._socket_connect_timeout, 1.0)
        while entry.before_close:
            fn = entry.before_close.pop(0)
            try:
                async with asyncio.timeout(bound):
                    await fn()
            except Exception as exc:  # noqa: BLE001 - logged; closing must go on
                _log.warning(
                    "RedisClient %s: work to finish before closing failed or took over %.1fs "
                    "(%s: %s)",
                    self.name,
                    bound,
                    type(exc).__name__,
                    exc,
                )

    async def ping(self) -> bool:
        """``PING`` the server (every node of a cluster); True when it answers."""
        return bool(await self.any_client().ping())

    def stats(self) -> RedisStats:
        """Counters and pool occupancy for this process (see :class:`RedisStats`)."""
        in_use = idle = 0
        for entry in list(self._entries.values()):
            # Best effort: redis-py keeps these counts in private attributes.
            if isinstance(entry.redis, aioredis.RedisCluster):
                for node in entry.redis.get_nodes():
                    free = len(getattr(node, "_free", ()))
                    idle += free
                    in_use += max(0, len(getattr(node, "_connections", ())) - free)
                continue
            pool = entry.redis.connection_pool
            in_use += len(getattr(pool, "_in_use_connections", ()))
            idle += sum(1 for c in getattr(pool, "_available_connections", ()) if c.is_connected)
        return RedisStats(
            clients_alive=len(self._entries),
            clients_created=self._created,
            clients_disposed=self._disposed,
            clients_abandoned=self._abandoned,
            connections_in_use=in_use,
            connections_idle=idle,
            max_connections=self._max_connections,
        )

    async def close(self) -> None:
        """Close every client of this process; later :meth:`client` calls raise.

        The client of the running loop is closed here. Clients of loops running in other
        threads are closed in their loops (waited for up to ``socket_connect_timeout``);
        clients of idle loops close when those loops shut down. Before a client closes, the
        work registered with :meth:`before_close` in its loop runs.
        """
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if not self._closed:
            await self._finish_users_before_close(current)
        self._closed = True
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
        for entry in entries:
            if entry.loop is current:
                await self._dispose(entry, reason="closed")
            elif entry.loop.is_running() and not entry.loop.is_closed():
                fut = asyncio.run_coroutine_threadsafe(
                    self._dispose(entry, reason="closed"), entry.loop
                )
                try:
                    await asyncio.wait_for(
                        asyncio.wrap_future(fut), timeout=self._socket_connect_timeout or None
                    )
                except TimeoutError:
                    _log.warning(
                        "RedisClient %s: client of another loop did not close within %.1fs; "
                        "it closes when that loop ends",
                        self.name,
                        self._socket_connect_timeout,
                    )
            elif entry.loop.is_closed():
                self._abandon(entry, reason="loop_closed")
            # else: an idle loop; its closer task disposes of the client when the loop ends.

    async def _finish_users_before_close(self, current: asyncio.AbstractEventLoop | None) -> None:
        # While every client is still open and registered (the work may issue commands).
        for entry in list(self._entries.values()):
            if not entry.before_close:
                continue
            if entry.loop is current:
                await self._finish_users(entry)
            elif entry.loop.is_running() and not entry.loop.is_closed():
                fut = asyncio.run_coroutine_threadsafe(self._finish_users(entry), entry.loop)
                bound = max(self._socket_timeout + self._socket_connect_timeout, 1.0)
                with contextlib.suppress(TimeoutError):  # it logs on its own past its bound
                    await asyncio.wait_for(asyncio.wrap_future(fut), timeout=bound + 1.0)
            # else: an idle loop; it runs them when it ends (then without a client).

    async def __aenter__(self) -> RedisClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- internals ---------------------------------------------------------------------

    def _connect(self) -> AnyRedis:
        retry = _to_redis_retry(self._retry, self.name)
        if self.cluster:
            cluster = SafeRedisCluster.from_url(  # a classmethod: cls(...)
                self._url,
                max_connections=self._max_connections,
                socket_timeout=self._socket_timeout or None,
                socket_connect_timeout=self._socket_connect_timeout or None,
                health_check_interval=self._health_check_interval,
                retry=retry,
                decode_responses=self._decode_responses,
            )
            cast(SafeRedisCluster, cluster).sheetanchor_client = self.name
            return cluster
        options: dict[str, Any] = {
            "max_connections": self._max_connections,
            "timeout": self._pool_timeout,
            "socket_timeout": self._socket_timeout or None,
            "socket_connect_timeout": self._socket_connect_timeout or None,
            "health_check_interval": self._health_check_interval,
            "retry": retry,
            "decode_responses": self._decode_responses,
        }
        # As BlockingConnectionPool.from_url does (the URL's options win), but with the
        # connection class that marks errors raised before a command was written.
        options.update(parse_redis_url(self._url))
        options["connection_class"] = tracked_connection_class(
            options.get("connection_class", Connection)
        )
        pool = aioredis.BlockingConnectionPool(**options)
        redis = SafeRedis.from_pool(pool)
        cast(SafeRedis, redis).sheetanchor_client = self.name
        return redis

    def _create(self, loop: asyncio.AbstractEventLoop) -> AnyRedis:
        with self._lock:
            if self._closed:
                raise ResourceClosed(f"RedisClient({self.name!r}) is closed; create a new one")
            entry = self._entries.get(loop)
            if entry is not None:
                return entry.redis
            self._sweep_closed_loops()
            redis = self._connect()
            entry = _Entry(
                loop=loop,
                redis=redis,
                pid=os.getpid(),
                stop=loop.create_future(),
                lean=lean_commands_for(redis, loop, policy=self._retry, name=self.name),
            )
            # Only a task can be cancelled by asyncio.run at loop end; it closes the pool there.
            entry.closer = loop.create_task(
                self._close_at_loop_end(entry), name=f"sheetanchor-redis-closer[{self.name}]"
            )
            self._entries[loop] = entry
            self._created += 1
            self._install_close_hook(loop, entry)
        _metrics.CREATED.labels(self.name).inc()
        _log.debug("RedisClient %s: new client for loop %r (pid %d)", self.name, loop, entry.pid)
        return redis

    def _install_close_hook(self, loop: asyncio.AbstractEventLoop, entry: _Entry) -> None:
        # A loop closed by hand (new_event_loop / run_until_complete / close: the usual Celery
        # helper) never cancels the closer task: close the client from loop.close(), in the
        # loop, while it can still run. Weak references: the hook must not keep them alive.
        original_close = loop.close
        client_ref = weakref.ref(self)
        entry_ref = weakref.ref(entry)

        def close() -> None:
            rc, live = client_ref(), entry_ref()
            if live is not None and live.pid != os.getpid():
                # A fork child closing an inherited loop: never touch the parent's sockets,
                # nor its epoll registrations.
                close_inherited_loop(loop, original_close)
                return
            try:
                if (
                    rc is not None
                    and live is not None
                    and not (live.closed or live.forsaken)
                    and not loop.is_closed()
                    and not loop.is_running()  # close() raises below; the closer runs later
                ):
                    rc._close_with_loop(loop, live)
            finally:
                original_close()  # whatever the disposal did, the loop gets closed

        try:
            loop.close = close  # type: ignore[method-assign]
        except AttributeError:  # uvloop loops have no instance __dict__: swept when closed
            _log.debug("RedisClient %s: cannot hook close() of %r", self.name, loop)

    def _close_with_loop(self, loop: asyncio.AbstractEventLoop, entry: _Entry) -> None:
        def forget() -> None:
            with self._lock:
                if self._entries.get(loop) is entry:
                    del self._entries[loop]

        async def dispose_and_finish_closer() -> None:
            await self._finish_users(entry)  # the tasks left in the loop run here too
            forget()
            await self._dispose(entry, reason="loop_closed_by_hand")  # sets entry.stop
            if entry.closer is not None:
                await entry.closer  # returns now that stop is set: no pending task is left

        try:
            loop.run_until_complete(dispose_and_finish_closer())
        except Exception as exc:  # noqa: BLE001 - recorded: counted and logged with the reason
            # RuntimeError: another loop runs in this thread. Its sockets are closed without
            # the loop instead (the loop is closed right after this).
            forget()
            _metrics.CLOSE_ERRORS.labels(self.name).inc()
            _log.warning(
                "RedisClient %s: closing the client with its loop failed (%s: %s)",
                self.name,
                type(exc).__name__,
                exc,
                exc_info=exc,
            )
            if not entry.closed:
                self._abandon(entry, reason="loop_closed")

    async def _close_at_loop_end(self, entry: _Entry) -> None:
        try:
            await entry.stop
        except asyncio.CancelledError:
            # The loop is shutting down (asyncio.run cancels every task): close here, in the
            # loop that owns the sockets, then let the cancellation finish. First what must
            # end while the client is open (before_close), with the entry still registered.
            if not entry.forsaken:
                await self._finish_users(entry)
                with self._lock:
                    if self._entries.get(entry.loop) is entry:
                        del self._entries[entry.loop]
                await self._dispose(entry, reason="loop_end")
            raise

    async def _dispose(self, entry: _Entry, *, reason: str) -> None:
        if entry.closed or entry.forsaken:
            return
        entry.closed = True
        if not entry.stop.done():
            entry.stop.set_result(None)
        try:
            await entry.redis.aclose()
        except (RedisError, OSError) as exc:
            # Closing a broken connection can fail; the sockets are gone either way.
            _metrics.CLOSE_ERRORS.labels(self.name).inc()
            _log.warning("RedisClient %s: error while closing (%s): %r", self.name, reason, exc)
        self._disposed += 1
        _metrics.DISPOSED.labels(self.name, reason).inc()

    def _abandon(self, entry: _Entry, *, reason: str) -> None:
        # The entry's loop is closed (never a fork child's inherited entry: see
        # _forsake_inherited): no I/O is possible, so close its sockets directly and drop it.
        entry.forsaken = True
        _close_dead_loop_sockets(entry.redis)
        self._abandoned += 1
        _metrics.DISPOSED.labels(self.name, reason).inc()
        _log.warning(
            "RedisClient %s: client of loop %r abandoned (%s); its sockets are not reused",
            self.name,
            entry.loop,
            reason,
        )

    def _sweep_closed_loops(self) -> None:
        # Called under self._lock. A loop closed without cancelling its tasks never ran our
        # closer; its client cannot be closed any more (its loop is gone): count it, drop it.
        for loop in [lp for lp in self._entries if lp.is_closed()]:
            entry = self._entries.pop(loop)
            if not entry.closed:
                self._abandon(entry, reason="loop_closed")

    def _forsake_inherited(self) -> None:
        # In a fork child: the parent's sockets must never be used or closed here. Keep the
        # objects referenced (no finalizer runs on them) and start empty. The lock may have
        # been held by another parent thread at fork time, so replace it.
        self._lock = threading.Lock()
        inherited = list(self._entries.values())
        self._entries = {}
        for entry in inherited:
            entry.forsaken = True
        self._inherited.extend(inherited)
        self._abandoned += len(inherited)

    def _snapshot(self) -> tuple[str, RedisStats]:
        return self.name, self.stats()


def _close_dead_loop_sockets(redis: AnyRedis) -> None:
    """Close the sockets of a closed loop's client without that loop (no protocol I/O).

    Uses private attributes of redis-py connections and asyncio's selector transports; where
    they are missing (a cluster client, uvloop) the sockets are left to the garbage collector.
    """
    pool = getattr(redis, "connection_pool", None)
    connections = [
        *getattr(pool, "_available_connections", ()),
        *getattr(pool, "_in_use_connections", ()),
    ]
    for conn in connections:
        transport = getattr(getattr(conn, "_writer", None), "transport", None)
        sock = getattr(transport, "_sock", None)
        if transport is None or sock is None:
            continue
        try:
            sock.close()
        except OSError as exc:  # already closed by the peer: the fd is released either way
            _log.debug("closing an abandoned Redis socket: %r", exc)
        transport._sock = None  # nothing left for the transport's __del__
        transport._closing = True  # and the StreamWriter's __del__ sees a closed transport
        conn._writer = conn._reader = None  # redis-py: not connected, no ResourceWarning


def _iter_live() -> list[RedisClient]:
    return list(_LIVE)


_metrics.install_collector(_iter_live)
