"""When may a Redis command be sent again? The retry rule of :class:`RedisClient`.

A command that failed can be retried safely only if running it twice cannot differ from
running it once. What matters is whether its bytes may have reached the server:

* **Surely not sent** — the failure came before the first byte of the command was written:
  the connect failed (refused, timed out, DNS) or the connect handshake or the health-check
  ``PING`` that precedes the command failed. Nothing was applied, so **every command** is
  retried (``INCR``, ``XADD``, scripts included).
* **Possibly sent** — the failure came while writing the command or while waiting for its
  reply: a read timeout, the connection reset or closed under the command, a write error
  (part of the bytes may have left). The server may have applied it. Only an **idempotent**
  command is retried; any other raises :class:`CommandOutcomeUnknown` at once (a
  :class:`~sheetanchor.errors.OutcomeUnknown`, and still a redis-py ``ConnectionError`` /
  ``TimeoutError`` for existing handlers), with the driver error as ``__cause__``. Check the
  data before repeating such a write yourself.

Idempotent means "a second run leaves the data as one run would": every read, and writes that
set an absolute state (``SET`` without ``NX``/``GET``, ``DEL``, ``EXPIRE``, ``HSET``,
``SADD``, ``ZADD`` without ``INCR``...). :data:`IDEMPOTENT_COMMANDS` is the complete list;
anything not on it (``INCR``, ``LPUSH``, ``XADD``, ``EVALSHA``, ``PUBLISH``, unknown
commands) is treated as not idempotent. The reply of a repeated idempotent write may differ
from the first one's (a second ``DEL`` returns 0). A Lua script is not idempotent unless it is
declared so (``LuaScript(..., idempotent=True)``); other code can declare a block of its own
calls idempotent with :func:`assume_idempotent`.

A pipeline (``client.pipeline()``) is idempotent when every command in it is; a
``MULTI``/``EXEC`` transaction the same. On a Redis Cluster the same rule is applied per node
command (a connect failure is recognised by redis-py's "connecting to" message there);
**cluster pipelines keep redis-py's own retry**, which re-sends commands whose reply was lost:
put non-idempotent writes on a cluster through single commands or scripts, not a pipeline.

The mechanics: :class:`SafeRetry` is the ``Retry`` every pooled connection carries; it never
retries a :class:`CommandOutcomeUnknown`. The connection classes mark an error raised before the
write as "not sent" (:func:`was_not_sent`); the client classes turn a possibly-sent error of a
non-idempotent command into :class:`CommandOutcomeUnknown` inside redis-py's retry loop. All of
it costs nothing on a successful call: the command is classified only when it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.backoff import AbstractBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sheetanchor.errors import OutcomeUnknown
from sheetanchor.redis import _metrics

__all__ = [
    "IDEMPOTENT_COMMANDS",
    "CommandOutcomeUnknown",
    "SafeRedis",
    "SafeRedisCluster",
    "SafeRetry",
    "assume_idempotent",
    "command_is_idempotent",
    "may_retry",
    "tracked_connection_class",
    "was_not_sent",
]

_T = TypeVar("_T")

# The errors redis-py's retry loops catch (and so the ones this rule decides about).
RETRYABLE_ERRORS: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, OSError)

#: Commands that may be sent again after a reply was lost (see the module docstring). Upper
#: case; a two-word command (``CLIENT SETNAME``) is listed under both words.
IDEMPOTENT_COMMANDS: frozenset[str] = frozenset(
    {
        # strings: reads
        "GET", "MGET", "GETRANGE", "SUBSTR", "STRLEN", "GETEX", "LCS",
        # keys: reads
        "EXISTS", "TTL", "PTTL", "EXPIRETIME", "PEXPIRETIME", "TYPE", "KEYS", "SCAN",
        "RANDOMKEY", "DUMP", "OBJECT", "TOUCH", "DBSIZE", "MEMORY",
        # hashes, lists, sets, sorted sets, streams, bitmaps, hll, geo: reads
        "HGET", "HMGET", "HGETALL", "HKEYS", "HVALS", "HLEN", "HEXISTS", "HSTRLEN", "HSCAN",
        "HRANDFIELD", "HTTL", "HPTTL",
        "LRANGE", "LLEN", "LINDEX", "LPOS",
        "SMEMBERS", "SISMEMBER", "SMISMEMBER", "SCARD", "SSCAN", "SINTER", "SINTERCARD",
        "SUNION", "SDIFF", "SRANDMEMBER",
        "ZRANGE", "ZRANGEBYSCORE", "ZRANGEBYLEX", "ZREVRANGE", "ZREVRANGEBYSCORE",
        "ZREVRANGEBYLEX", "ZSCORE", "ZMSCORE", "ZCARD", "ZCOUNT", "ZLEXCOUNT", "ZRANK",
        "ZREVRANK", "ZSCAN", "ZINTER", "ZUNION", "ZDIFF", "ZINTERCARD", "ZRANDMEMBER",
        "XRANGE", "XREVRANGE", "XLEN", "XREAD", "XINFO", "XPENDING",
        "GETBIT", "BITCOUNT", "BITPOS", "BITFIELD_RO", "PFCOUNT",
        "GEOPOS", "GEODIST", "GEOHASH", "GEORADIUS_RO", "GEORADIUSBYMEMBER_RO", "GEOSEARCH",
        "EVAL_RO", "EVALSHA_RO", "FCALL_RO", "SORT_RO",
        # server and connection: reads and settings that are the same when repeated
        "PING", "ECHO", "INFO", "TIME", "LASTSAVE", "COMMAND", "CONFIG", "CLIENT", "HELLO",
        "SELECT", "AUTH", "READONLY", "READWRITE", "ROLE", "LOLWUT", "SCRIPT", "FUNCTION",
        "CLUSTER", "WAIT", "WAITAOF",
        # writes that set an absolute state: once or twice, the data ends up the same
        "SET", "SETEX", "PSETEX", "MSET", "SETRANGE", "SETBIT",
        "DEL", "UNLINK", "EXPIRE", "PEXPIRE", "EXPIREAT", "PEXPIREAT", "PERSIST",
        "HSET", "HMSET", "HDEL", "HEXPIRE", "HPEXPIRE", "HEXPIREAT", "HPEXPIREAT", "HPERSIST",
        "LSET", "LTRIM",
        "SADD", "SREM",
        "ZADD", "ZREM", "ZREMRANGEBYSCORE", "ZREMRANGEBYRANK", "ZREMRANGEBYLEX",
        "XDEL", "XACK", "XTRIM",
        "PFADD", "GEOADD",
        "FLUSHDB", "FLUSHALL",
    }
)  # fmt: skip

# Options that make an otherwise idempotent command's outcome depend on the state it found:
# SET NX (a repeat says "not set" although the first run set it), SET GET (a repeat returns
# its own value), ZADD INCR (an increment).
_UNSAFE_OPTIONS: dict[str, frozenset[bytes]] = {
    "SET": frozenset({b"NX", b"GET"}),
    "ZADD": frozenset({b"INCR"}),
}
# Container commands whose sub-command decides (CONFIG SET is not a read, but is idempotent;
# SCRIPT KILL / FUNCTION DELETE and friends are not).
_UNSAFE_SUBCOMMANDS: dict[str, frozenset[bytes]] = {
    "SCRIPT": frozenset({b"KILL"}),
    "FUNCTION": frozenset({b"DELETE", b"KILL", b"RESTORE"}),
    "CLIENT": frozenset({b"KILL", b"PAUSE", b"UNPAUSE", b"UNBLOCK"}),
    "CLUSTER": frozenset(
        {b"FAILOVER", b"RESET", b"ADDSLOTS", b"DELSLOTS", b"SETSLOT", b"MEET", b"FORGET"}
    ),
    "MEMORY": frozenset({b"PURGE"}),
}

_declared: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "sheetanchor_redis_idempotent", default=False
)


class CommandOutcomeUnknown(OutcomeUnknown, RedisConnectionError, RedisTimeoutError):
    """A non-idempotent Redis command may have run: its reply was lost, so it was not retried.

    Raised instead of retrying ``INCR``, ``LPUSH``, ``XADD``, a script not declared
    idempotent, a pipeline with such a command... after a read timeout or a connection lost
    while the command was being written or its reply awaited. The server may or may not have
    applied it. Also a redis-py ``ConnectionError`` and ``TimeoutError``, so existing
    ``except`` clauses keep catching it. The driver error is ``__cause__``.

    Attributes:
        command: the command name (``"INCR"``, ``"EVALSHA"``, ``"PIPELINE"``).
    """

    def __init__(self, message: str, *, command: str = "") -> None:
        super().__init__(message)
        self.command = command


def _name(arg: object) -> str:
    if isinstance(arg, bytes | bytearray | memoryview):
        return bytes(arg).decode("ascii", "replace").upper()
    return str(arg).upper()


def _word(arg: object) -> bytes:
    if isinstance(arg, str):
        return arg.upper().encode()
    if isinstance(arg, bytes | bytearray | memoryview):
        return bytes(arg).upper()
    return b""


def command_is_idempotent(args: Sequence[object]) -> bool:
    """True when the command ``args`` (name first) may be sent again after its reply was lost.

    Pure: looks at the command name, the options listed in :data:`_UNSAFE_OPTIONS` and the
    sub-command of container commands. Unknown commands are not idempotent.

    Example::

        command_is_idempotent(["SET", "k", "v"])        # True
        command_is_idempotent(["SET", "k", "v", "NX"])  # False: a repeat reports "not set"
        command_is_idempotent(["INCR", "k"])            # False
    """
    if not args:
        return False
    words = _name(args[0]).split()
    if not words:
        return False
    name = words[0]
    if name not in IDEMPOTENT_COMMANDS:
        return False
    unsafe = _UNSAFE_OPTIONS.get(name)
    if unsafe is not None:
        # Options come after the key and the value (SET) or the key (ZADD): never a key or a
        # value that happens to read "NX".
        start = 3 if name == "SET" else 2
        if any(_word(a) in unsafe for a in args[start:]):
            return False
    subs = _UNSAFE_SUBCOMMANDS.get(name)
    if subs is not None:
        sub = words[1].encode() if len(words) > 1 else (_word(args[1]) if len(args) > 1 else b"")
        if sub.split(b" ", 1)[0] in subs:
            return False
    return True


@contextlib.contextmanager
def assume_idempotent() -> Iterator[None]:
    """Treat every command sent from this block (this task) as idempotent.

    For calls whose safety the command name cannot show: a script or ``FCALL`` that only
    sets absolute values, a pipeline of such scripts. A wrong declaration brings back the
    double-apply this rule exists to prevent.

    Example::

        with assume_idempotent():
            await client.evalsha(SET_IF_NEWER_SHA, 1, "k", payload, version)
    """
    token = _declared.set(True)
    try:
        yield
    finally:
        _declared.reset(token)


def declared_idempotent() -> bool:
    """True inside :func:`assume_idempotent` (or a ``LuaScript(idempotent=True)`` call)."""
    return _declared.get()


_NOT_SENT = "_sheetanchor_not_sent"


def _mark_not_sent(exc: BaseException) -> None:
    with contextlib.suppress(AttributeError, TypeError):  # an exception type with __slots__
        setattr(exc, _NOT_SENT, True)


def was_not_sent(exc: BaseException) -> bool:
    """True when ``exc`` surely came before the command's first byte was written.

    Set by the connection classes of :func:`tracked_connection_class` on errors of the
    connect, the handshake and the health-check ``PING``. On a cluster, where redis-py picks
    the connection class, a redis-py connect error is recognised by its message.
    """
    if getattr(exc, _NOT_SENT, False):
        return True
    if isinstance(exc, RedisConnectionError | RedisTimeoutError) and not isinstance(
        exc, CommandOutcomeUnknown
    ):
        text = str(exc)
        return "connecting to" in text or text.startswith("Timeout connecting")
    return False


def may_retry(exc: BaseException, *, idempotent: bool) -> bool:
    """The rule: retry an error that surely came before sending, or any of an idempotent call."""
    if isinstance(exc, CommandOutcomeUnknown):
        return False
    return idempotent or was_not_sent(exc)


def _outcome_unknown(exc: BaseException, command: str) -> CommandOutcomeUnknown:
    kind = "timed out" if isinstance(exc, RedisTimeoutError | TimeoutError) else "lost"
    return CommandOutcomeUnknown(
        f"Redis {command}: the reply was {kind} after the command may have reached the server "
        f"({type(exc).__name__}: {exc}); it was not retried because it is not idempotent, so it "
        "may or may not have been applied: check before repeating it (or declare an "
        "idempotent script with LuaScript(..., idempotent=True))",
        command=command,
    )


def guard(exc: BaseException, command: str, idempotent: bool, client: str) -> BaseException:
    """What to raise for ``exc``: itself when the rule allows a retry, else the typed error."""
    if may_retry(exc, idempotent=idempotent or _declared.get()):
        return exc
    _metrics.OUTCOME_UNKNOWN.labels(client).inc()
    return _outcome_unknown(exc, command)


# -- the retry loop ---------------------------------------------------------------------------


class SafeRetry(Retry):
    """redis-py's ``Retry`` that never retries a :class:`CommandOutcomeUnknown`, and counts.

    Args:
        backoff: redis-py backoff between attempts.
        retries: retries after the first attempt.
        client: the :class:`RedisClient` name, for the metrics.
    """

    def __init__(self, backoff: AbstractBackoff, retries: int, *, client: str) -> None:
        super().__init__(backoff, retries, supported_errors=RETRYABLE_ERRORS)  # type: ignore[arg-type]
        self.client = client

    async def call_with_retry(
        self,
        do: Callable[[], Awaitable[_T]],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> _T:
        self._backoff.reset()  # type: ignore[no-untyped-call]
        failures = 0
        while True:
            try:
                return await do()
            except self._supported_errors as error:
                if is_retryable is not None and not is_retryable(error):
                    raise
                failures += 1
                final = isinstance(error, CommandOutcomeUnknown)
                try:
                    # Disconnects the connection: a late reply must never be read as the
                    # answer to the next command.
                    if with_failure_count:
                        await fail(error, failures)
                    else:
                        await fail(error)
                except Exception:
                    if final:  # e.g. redis-py's WatchError: ours says more, keep it
                        raise error  # noqa: B904 - the failure callback's error is the context
                    raise
                if final or (self._retries >= 0 and failures > self._retries):
                    raise
                reason = "not_sent" if was_not_sent(error) else "idempotent"
                _metrics.RETRIES.labels(self.client, reason).inc()
                backoff = self._backoff.compute(failures)
                if backoff > 0:
                    await asyncio.sleep(backoff)


# -- connections: mark what failed before the write -------------------------------------------


class _TrackedMixin:
    """Errors of the connect, the handshake and the health check are marked "not sent"."""

    async def connect_check_health(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().connect_check_health(*args, **kwargs)  # type: ignore[misc]
        except RETRYABLE_ERRORS as exc:
            _mark_not_sent(exc)
            raise

    async def check_health(self) -> None:
        # redis-py calls this before every command; the test below is its own, so the common
        # case (no PING due) costs no extra await.
        interval: float = getattr(self, "health_check_interval", 0)
        if not interval or asyncio.get_running_loop().time() <= getattr(
            self, "next_health_check", 0.0
        ):
            return
        try:
            await super().check_health()  # type: ignore[misc]
        except RETRYABLE_ERRORS as exc:
            # The PING before a command failed: the command itself was not written.
            _mark_not_sent(exc)
            raise


class _TrackedConnection(_TrackedMixin, Connection):
    pass


class _TrackedSSLConnection(_TrackedMixin, SSLConnection):
    pass


class _TrackedUnixConnection(_TrackedMixin, UnixDomainSocketConnection):
    pass


_TRACKED: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: _TrackedConnection,
    SSLConnection: _TrackedSSLConnection,
    UnixDomainSocketConnection: _TrackedUnixConnection,
}


def tracked_connection_class(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    """The connection class that marks not-sent errors, for redis-py's ``cls``."""
    tracked = _TRACKED.get(cls)
    if tracked is None:
        if issubclass(cls, _TrackedMixin):
            return cls
        tracked = type(f"Tracked{cls.__name__}", (_TrackedMixin, cls), {})
        _TRACKED[cls] = tracked
    return tracked


# -- clients: classify the command when it fails ----------------------------------------------


def _stack_is_idempotent(commands: Iterable[tuple[Sequence[object], Any]]) -> bool:
    return all(command_is_idempotent(args) for args, _options in commands)


class _GuardedCommands:
    """The one seam of redis-py's single-command path that knows the command and the attempt."""

    sheetanchor_client: str = "default"

    async def _send_command_parse_response(
        self, conn: Any, command_name: Any, *args: Any, **options: Any
    ) -> Any:
        try:
            return await super()._send_command_parse_response(  # type: ignore[misc]
                conn, command_name, *args, **options
            )
        except RETRYABLE_ERRORS as exc:
            raised = guard(exc, _name(command_name), command_is_idempotent(args), self._label())
            if raised is exc:
                raise
            raise raised from exc

    def _label(self) -> str:
        return self.sheetanchor_client


class SafePipeline(_GuardedCommands, Pipeline):  # type: ignore[misc]  # redis-py's stubs
    """A pipeline (or ``MULTI``/``EXEC``) retried only when every command in it is idempotent."""

    async def _execute_pipeline(self, connection: Any, commands: Any, raise_on_error: bool) -> Any:
        try:
            return await super()._execute_pipeline(connection, commands, raise_on_error)
        except RETRYABLE_ERRORS as exc:
            raised = guard(exc, "PIPELINE", _stack_is_idempotent(commands), self._label())
            if raised is exc:
                raise
            raise raised from exc

    async def _execute_transaction(
        self, connection: Any, commands: Any, raise_on_error: bool
    ) -> Any:
        try:
            return await super()._execute_transaction(connection, commands, raise_on_error)
        except RETRYABLE_ERRORS as exc:
            raised = guard(exc, "MULTI/EXEC", _stack_is_idempotent(commands), self._label())
            if raised is exc:
                raise
            raise raised from exc


class SafeRedis(_GuardedCommands, aioredis.Redis):  # type: ignore[misc]  # redis-py's stubs
    """``redis.asyncio.Redis`` that applies the retry rule of this module to every command."""

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        pipe = SafePipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.sheetanchor_client = self.sheetanchor_client
        return pipe


class SafeRedisCluster(aioredis.RedisCluster):
    """``redis.asyncio.RedisCluster`` that applies the retry rule to every node command.

    A :class:`CommandOutcomeUnknown` is not in redis-py's ``ERRORS_ALLOW_RETRY`` (checked by
    exact type), so the cluster's own loop raises it instead of trying again.
    """

    sheetanchor_client: str = "default"

    async def _execute_command(self, target_node: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super()._execute_command(target_node, *args, **kwargs)
        except RETRYABLE_ERRORS as exc:
            raised = guard(
                exc, _name(args[0]) if args else "?", command_is_idempotent(args), self._label()
            )
            if raised is exc:
                raise
            raise raised from exc

    def _label(self) -> str:
        return self.sheetanchor_client
