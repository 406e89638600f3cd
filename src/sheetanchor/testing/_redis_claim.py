"""A Redis database index claimed by one test session: kept alive, and checked before a flush.

A session claims an index (1 to ``databases - 1``) by naming one connection it holds open
``sheetanchor-test-db:<index>``. Other sessions see the name in ``CLIENT LIST`` and pick
another index; the claim vanishes with the process that held it, so a killed session leaves
nothing to clean up.

An idle connection does not stay open by itself: a server with ``timeout N`` closes it after
``N`` idle seconds, and a restart, ``CLIENT KILL`` or a network drop close it at any time.
Then another session may claim the same index and flush it under this one. So the claim
connection is pinged from a daemon thread well within the server's ``timeout``, and
:meth:`RedisClaim.verify` (run before every flush) checks that the claim still holds, takes
it back if the index is still free, and raises instead of flushing a database that another
session now owns.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis

__all__ = ["CLAIM_PREFIX", "RedisClaim", "claim_redis_db"]

_log = logging.getLogger("sheetanchor.testing")

CLAIM_PREFIX = "sheetanchor-test-db:"
_UNCLAIMED = "sheetanchor-test-unclaimed"
_DEFAULT_KEEPALIVE = 30.0  # seconds between pings when the server has no idle timeout
_ATTEMPTS = 50


def _databases(client: redis.Redis) -> int:
    import redis

    try:
        return int(client.config_get("databases").get("databases") or 16)
    except redis.ResponseError:
        return 16  # CONFIG may be disabled on managed servers; 16 is the default


def _idle_timeout(client: redis.Redis) -> float:
    """The server's ``timeout`` (seconds an idle client is kept), 0 for none."""
    import redis

    try:
        return float(client.config_get("timeout").get("timeout") or 0)
    except (redis.ResponseError, ValueError):
        return 0.0  # unknown: the default keepalive interval applies


def _try_claim(client: redis.Redis, index: int) -> bool:
    """Name ``client``'s connection after ``index``; True unless an older claim exists.

    Two sessions may pick the same index at once: the older connection (lower id) wins.
    """
    my_id = client.client_id()
    name = f"{CLAIM_PREFIX}{index}"
    client.client_setname(name)
    rivals = [
        int(e["id"])
        for e in client.client_list()
        if e.get("name") == name and int(e["id"]) != my_id
    ]
    if not rivals or my_id < min(rivals):
        return True
    client.client_setname(_UNCLAIMED)
    return False


def claim_redis_db(client: redis.Redis, *, where: str = "this Redis server") -> int:
    """Claim a free database index for this session by naming ``client``'s connection.

    Raises:
        RuntimeError: the server has no database besides 0 (``databases 1``), or all of
            them are claimed by other test sessions.
        redis.ResponseError: ``CLIENT LIST`` / ``CLIENT SETNAME`` are not allowed.
    """
    databases = _databases(client)
    if databases < 2:
        raise RuntimeError(
            f"{where} has only {databases} database(s) (`databases {databases}`), and "
            "database 0 is left to applications, so there is none for the tests to claim; "
            "set `databases 16` (the default) in the Redis config"
        )
    my_id = client.client_id()
    for _ in range(_ATTEMPTS):
        taken = {
            int(name[len(CLAIM_PREFIX) :])
            for entry in client.client_list()
            if (name := entry.get("name", "")).startswith(CLAIM_PREFIX)
            and int(entry["id"]) != my_id
            and name[len(CLAIM_PREFIX) :].isdigit()
        }
        free = [i for i in range(1, databases) if i not in taken]
        if not free:
            raise RuntimeError(
                f"all {databases - 1} Redis databases of {where} (1 to {databases - 1}; 0 is "
                "left to applications) are claimed by other test sessions; wait for them to "
                "end, or raise `databases` in the Redis config"
            )
        if _try_claim(client, free[0]):
            return free[0]
    raise RuntimeError(
        f"could not claim a Redis database of {where} for the tests after {_ATTEMPTS} attempts"
    )


def _keepalive(ref: weakref.ReferenceType[RedisClaim], stop: threading.Event, every: float) -> None:
    # A weak reference: the thread must not keep a forgotten claim (and its socket) alive.
    while not stop.wait(every):
        claim = ref()
        if claim is None:
            return
        claim.ping()
        del claim


class RedisClaim:
    """This session's claim on one Redis database index.

    Args:
        url: the Redis server's URL.
        where: how to name the server in messages (redacted).

    Raises:
        RuntimeError: no database can be claimed (see :func:`claim_redis_db`).
        redis.ResponseError: the server refuses ``CLIENT`` commands (ACLs, managed Redis).
    """

    def __init__(self, url: str, *, where: str) -> None:
        import redis

        self._where = where
        # One dedicated connection: its name is the claim. The lock serialises the
        # keepalive thread and verify(), which share it.
        self._client = redis.Redis.from_url(
            url, single_connection_client=True, socket_timeout=10, socket_connect_timeout=10
        )
        self._lock = threading.Lock()
        self._stop = threading.Event()
        try:
            self.index = claim_redis_db(self._client, where=where)
            timeout = _idle_timeout(self._client)
        except BaseException:
            self._client.close()
            raise
        # Well within the server's idle timeout, and never busy-looping on a tiny one.
        every = max(0.2, timeout / 3) if timeout > 0 else _DEFAULT_KEEPALIVE
        self._thread = threading.Thread(
            target=_keepalive,
            args=(weakref.ref(self), self._stop, every),
            name=f"sheetanchor-redis-claim-{self.index}",
            daemon=True,
        )
        self._thread.start()

    def ping(self) -> None:
        """Keep the claim connection from idling out (errors are left to :meth:`verify`)."""
        import redis

        with self._lock:
            if self._stop.is_set():
                return
            try:
                self._client.ping()
            except (redis.RedisError, OSError) as exc:
                _log.debug("keepalive of the Redis claim on db %d failed: %r", self.index, exc)

    def verify(self) -> None:
        """Make sure this session still holds its index; take it back if it is free.

        Raises:
            RuntimeError: the claim was lost (its connection was closed) and another test
                session now holds the index: flushing it would destroy that session's data.
        """
        import redis

        with self._lock:
            # A dropped connection fails the first command and is replaced on the next;
            # the new connection has no name, so the claim is made again (rivals checked).
            try:
                held = _try_claim(self._client, self.index)
            except (redis.ConnectionError, redis.TimeoutError):
                held = _try_claim(self._client, self.index)
            if held:
                return
        raise RuntimeError(
            f"this test session lost its claim on Redis database {self.index} of "
            f"{self._where} (its connection was closed: a server restart, CLIENT KILL or a "
            "network drop), and another test session has claimed it since; not flushing it. "
            "Run the tests again"
        )

    def close(self) -> None:
        """Stop the keepalive thread and close the claim connection (releasing the index)."""
        self._stop.set()
        self._thread.join(timeout=30)
        with self._lock:
            self._client.close()
