"""A lean path for single commands: the pool's own connections, without the client wrapper.

``redis.asyncio.Redis.execute_command`` spends most of a short command's cost in its own
machinery, not on the wire: the pool's ``asyncio.Condition`` on every checkout and release,
the connection check (``can_read``), a ``wait_for`` task around every write, the retry
wrapper's closures, observability hooks. For a ~200-byte ``GET`` on loopback that is about
two thirds of the client CPU of the call. :class:`LeanCommands` runs one command on a
connection of the *same* pool, doing only what a command needs:

* **Checkout**: an idle connection is taken from the pool's own free list and put in its
  in-use set (no lock: asyncio runs this synchronously), so the pool's limit, its
  occupancy figures (:meth:`RedisClient.stats`) and its connections stay shared with the
  normal path. When none is idle, or a connection needs work first (not connected, a health
  check due, unexpected bytes or an end of stream waiting on it), the command takes the
  pool's normal ``get_connection()`` (connect, dirty-connection check, wait for a free one
  up to ``pool_timeout``) and the connection's health-check ``PING``.
* **Round trip**: pack with redis-py's encoder (in one join), write, read the reply with the
  connection's parser, under the connection's ``socket_timeout``. Errors are translated as
  redis-py translates them (``TimeoutError`` "Timeout reading from ...", ``ConnectionError``
  "Error while reading from ..."), a reply error is raised as the parser's exception
  (``NoScriptError``, ``ResponseError``...), and redis-py's response callback for the
  command is applied: the result is what ``execute_command`` returns.
* **Never a pending reply**: a connection whose round trip failed or was cancelled (a
  timeout, a reset, ``task.cancel()``, an outer ``asyncio.timeout``) is disconnected right
  there, synchronously, before it goes back to the pool; its late reply can never be read
  as the answer to another command.
* **Release**: back to the free list, or through the pool's ``release()`` when the pool is
  full (a caller may be waiting for a connection: it is woken) or redis-py wants the
  connection reconnected.
* **Retries**: the rule of :mod:`sheetanchor.redis._retry`, with the client's policy and
  the same metrics: an error that surely came before the command was written (connect,
  handshake, health check) is retried for any command; one after it only for an idempotent
  command (or inside :func:`assume_idempotent`), else :class:`CommandOutcomeUnknown`.

It is used only where it can be exact: a single-server client on a pool of the tracked
connection classes, RESP2, redis-py >= 5.3, and not while the pool is in a maintenance
(``MOVING``) window. Otherwise :meth:`RedisClient.execute_command` takes redis-py's normal
path. redis-py's own OpenTelemetry hooks (opt-in) do not see lean commands.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sheetanchor.redis import _metrics
from sheetanchor.redis._retry import (
    RETRYABLE_ERRORS,
    _name,
    _TrackedMixin,
    command_is_idempotent,
    guard,
    was_not_sent,
)
from sheetanchor.retry import RetryPolicy

__all__ = ["LeanCommands", "lean_commands_for"]


def _redis_py_supported() -> bool:
    # 5.3 made get_connection() take no command name; the attributes used here are older.
    try:
        major, minor = (int(p) for p in redis.__version__.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 3)


_SUPPORTED = _redis_py_supported()


def lean_commands_for(
    client: aioredis.Redis | aioredis.RedisCluster,
    loop: asyncio.AbstractEventLoop,
    *,
    policy: RetryPolicy,
    name: str,
) -> LeanCommands | None:
    """The lean path over ``client``'s pool, or ``None`` where it would not be exact.

    ``None`` for a cluster client, a single-connection client, a pool or connection class
    this module does not know, RESP3, or an unsupported redis-py.
    """
    if not _SUPPORTED or not isinstance(client, aioredis.Redis):
        return None
    if getattr(client, "single_connection_client", False):
        return None
    pool = client.connection_pool
    if not isinstance(pool, aioredis.BlockingConnectionPool):
        return None
    if not issubclass(pool.connection_class, _TrackedMixin):
        return None
    kwargs = pool.connection_kwargs
    if str(kwargs.get("protocol") or 2) != "2":
        return None  # RESP3 push messages (invalidations, maintenance) need the full reader
    if not all(
        hasattr(pool, attr)
        for attr in ("_available_connections", "_in_use_connections", "max_connections")
    ):
        return None
    return LeanCommands(client, pool, loop, policy=policy, name=name)


class LeanCommands:
    """Single commands on one per-loop pool, without redis-py's client wrapper.

    Create it with :func:`lean_commands_for`; use it only from the loop that owns the pool
    (:class:`RedisClient` keeps one per (process, loop) entry).

    Args:
        client: the ``redis.asyncio.Redis`` whose pool and response callbacks are used.
        pool: its ``BlockingConnectionPool``.
        loop: the event loop that owns the pool.
        policy: the client's retry policy (attempts and backoff).
        name: the client's metric label.
    """

    __slots__ = ("_backoff", "_callbacks", "_loop", "_name", "_pool", "_retries")

    def __init__(
        self,
        client: aioredis.Redis,
        pool: aioredis.BlockingConnectionPool,
        loop: asyncio.AbstractEventLoop,
        *,
        policy: RetryPolicy,
        name: str,
    ) -> None:
        self._pool = pool
        self._callbacks = client.response_callbacks
        self._name = name
        self._retries = policy.max_attempts - 1
        self._backoff = ExponentialWithJitterBackoff(cap=policy.maximum, base=policy.initial)
        self._loop = loop

    def idle_connection(self) -> bool:
        """True when :meth:`execute` called now takes an idle connection without waiting."""
        pool = self._pool
        return bool(pool._available_connections) and not getattr(pool, "_in_maintenance", False)

    async def execute(self, args: Sequence[Any]) -> Any:
        """Run the command ``args`` (name first); its reply, as ``execute_command`` gives it.

        Raises:
            redis.exceptions.ResponseError: the server's error reply (``NoScriptError``...).
            CommandOutcomeUnknown: a non-idempotent command whose reply was lost.
            redis.exceptions.ConnectionError, redis.exceptions.TimeoutError: the server
                could not be reached within the retry policy.
        """
        pool = self._pool
        free = pool._available_connections
        if not free or getattr(pool, "_in_maintenance", False):
            return await self._careful(args, 0, None)
        conn = free.pop()
        in_use = pool._in_use_connections
        in_use.add(conn)
        loop = self._loop
        if not _ready(conn, loop):
            # Let the pool's checkout (re)connect it, or its health check ping it: errors
            # there surely came before the command was written.
            await self._release(conn)
            return await self._careful(args, 0, None)
        try:
            response = await _roundtrip(conn, args, loop)
        except RETRYABLE_ERRORS as exc:
            await self._release(conn)  # disconnected by _roundtrip
            return await self._careful(args, 1, exc)
        except BaseException:
            await self._release(conn)  # cancelled: disconnected by _roundtrip
            raise
        # Not exhausted and nothing to reconnect: nobody can be waiting for this connection.
        # (The pool's containers are read again: they are what they are after the await.)
        in_use = pool._in_use_connections
        if len(in_use) < pool.max_connections and not conn.should_reconnect():  # type: ignore[no-untyped-call]
            in_use.discard(conn)
            pool._available_connections.append(conn)
        else:
            await self._release(conn)
        if isinstance(response, ResponseError):
            raise response
        if args[0] in self._callbacks:
            return await self._parsed(args, response)
        return response

    async def _parsed(self, args: Sequence[Any], response: Any) -> Any:
        # redis-py's parse_response: the command's response callback (SET -> bool...).
        value = self._callbacks[args[0]](response)
        return await value if inspect.isawaitable(value) else value

    async def _release(self, conn: Any) -> None:
        pool = self._pool
        in_use = pool._in_use_connections
        if len(in_use) < pool.max_connections and not conn.should_reconnect():
            in_use.discard(conn)
            pool._available_connections.append(conn)
            return
        await pool.release(conn)  # wakes a caller waiting for a free connection

    async def _careful(self, args: Sequence[Any], failures: int, exc: BaseException | None) -> Any:
        # The slow path: the pool's own checkout and health check, and the retry rule.
        pool = self._pool
        loop = self._loop
        while True:
            if exc is not None:
                raised = guard(exc, _name(args[0]), command_is_idempotent(args), self._name)
                if raised is not exc:
                    raise raised from exc
                if failures > self._retries:
                    raise exc
                reason = "not_sent" if was_not_sent(exc) else "idempotent"
                _metrics.RETRIES.labels(self._name, reason).inc()
                backoff = self._backoff.compute(failures)
                if backoff > 0:
                    await asyncio.sleep(backoff)
            try:
                conn = await pool.get_connection()  # type: ignore[no-untyped-call]
            except RETRYABLE_ERRORS as error:
                # The first checkout fails as the normal path's does (its connect has retried
                # already; no free connection within pool_timeout is not retried). A connect
                # after a failed attempt is one more attempt of the command (not sent).
                if failures == 0 or not was_not_sent(error):
                    raise
                failures += 1
                exc = error
                continue
            try:
                try:
                    await conn.check_health()  # a PING when due; its errors are "not sent"
                    response = await _roundtrip(conn, args, loop)
                finally:
                    await pool.release(conn)
            except RETRYABLE_ERRORS as error:
                failures += 1
                exc = error
                continue
            if isinstance(response, ResponseError):
                raise response
            if args[0] in self._callbacks:
                return await self._parsed(args, response)
            return response


def _ready(conn: Any, loop: asyncio.AbstractEventLoop) -> bool:
    """True when ``conn`` can take a command now: connected, clean, no health check due.

    A connection that is dead or dirty is disconnected here, so that the pool's checkout
    reconnects it: bytes nobody asked for, the end of the stream (the server closed it: a
    restart, an idle timeout, ``CLIENT KILL``) or a reset. redis-py's own check
    (``can_read``) misses the reset, and the command would then fail after it was written,
    as if it might have run.
    """
    reader = conn._reader
    if reader is None or conn._writer is None:
        return False
    if reader.at_eof() or reader.exception() is not None or reader._buffer:
        _drop(conn)
        return False
    return not conn.health_check_interval or loop.time() <= conn.next_health_check


async def _roundtrip(conn: Any, args: Sequence[Any], loop: asyncio.AbstractEventLoop) -> Any:
    """Write ``args`` on ``conn`` and read one reply; on any failure ``conn`` is dropped.

    The reply may be a ``ResponseError`` instance (an error reply): the caller raises it.
    """
    packed = _pack(conn.encoder, args)
    try:
        timeout = conn.socket_timeout
        if timeout:
            async with asyncio.timeout(timeout):
                # No drain(): the reply can only come once the server has read the whole
                # command, so waiting for the reply waits for the write buffer too.
                conn._writer.write(packed)
                response = await conn._parser.read_response(disable_decoding=False)
        else:
            conn._writer.write(packed)
            response = await conn._parser.read_response(disable_decoding=False)
    except BaseException as exc:
        # Timed out, reset, cancelled, or a reply we cannot parse: the connection may still
        # have a reply on its way. Close it now (synchronously: a cancelled task may not
        # get to run an await), so it is never reused with that reply pending.
        _drop(conn)
        if isinstance(exc, RedisConnectionError | RedisTimeoutError):
            raise
        if isinstance(exc, TimeoutError):
            raise RedisTimeoutError(f"Timeout reading from {conn._host_error()}") from None
        if isinstance(exc, OSError):
            raise RedisConnectionError(
                f"Error while reading from {conn._host_error()} : {exc.args}"
            ) from exc
        raise
    if conn.health_check_interval:
        conn.next_health_check = loop.time() + conn.health_check_interval
    return response


def _pack(encoder: Any, args: Sequence[Any]) -> bytes:
    """The command in the wire format, as redis-py's ``pack_command`` writes it.

    With redis-py's encoder for anything but the common ``str``/``bytes``/``int`` (so the
    same ``DataError`` for a ``bool`` or ``None``), and joined once: redis-py's packer
    re-joins its growing buffer per argument, which costs more than the round trip for
    an ``MGET`` of 100 keys.
    """
    name = args[0]
    # "CLIENT ID" is sent as two words, as redis-py does.
    words = name.encode().split() if isinstance(name, str) else bytes(name).split()
    out = [b"*%d\r\n" % (len(words) + len(args) - 1)]
    append = out.append
    for word in words:
        append(b"$%d\r\n%s\r\n" % (len(word), word))
    rest = args[1:]
    if len(rest) > 16 and set(map(type, rest)) == {str}:
        # Many keys (MGET, DEL...): framed as one str. Lengths count characters, so only
        # when that is the byte count (ASCII; else the loop below).
        # One %-format over every (length, argument) pair: no Python step per argument.
        fields: list[Any] = [None] * (2 * len(rest))
        fields[::2] = map(len, rest)
        fields[1::2] = rest
        text = ("$%d\r\n%s\r\n" * len(rest)) % tuple(fields)
        if text.isascii():
            out.append(text.encode())
            return b"".join(out)
    encoding, errors = encoder.encoding, encoder.encoding_errors
    for arg in rest:
        kind = type(arg)
        if kind is str:
            data = arg.encode(encoding, errors)
        elif kind is bytes:
            data = arg
        elif kind is int:
            data = b"%d" % arg
        else:
            data = encoder.encode(arg)
        if len(data) < 4096:
            append(b"$%d\r\n%s\r\n" % (len(data), data))
        else:  # a big value: copied once, by the join
            append(b"$%d\r\n" % len(data))
            append(data)
            append(b"\r\n")
    return b"".join(out)


def _drop(conn: Any) -> None:
    """Disconnect ``conn`` without awaiting (redis-py's ``disconnect(nowait=True)``, sync)."""
    try:
        conn._parser.on_disconnect()
    finally:
        writer = conn._writer
        conn._reader = conn._writer = None
        if writer is not None:
            writer.close()
