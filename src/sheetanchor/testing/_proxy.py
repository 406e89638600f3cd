"""A fault-injecting TCP proxy for tests: latency, refused connects, black holes, resets, cuts,
and held statements (client bytes that contain a pattern wait, the rest of the traffic flows).

The proxy runs in its own thread with its own event loop, so it works the same from sync
tests, from code that calls ``asyncio.run`` again and again, and from inside a running loop.
Its control methods are synchronous and thread-safe; each returns once the fault is in
effect (after ``refuse()`` a connect is refused, after ``reset_all()`` the resets are sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import socket
import struct
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from types import TracebackType
from typing import Any, NamedTuple, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

from sheetanchor.config import redact
from sheetanchor.errors import ConfigError, ResourceClosed

__all__ = ["DEFAULT_MAX_CONNECTIONS", "FaultProxy", "ProxyMode", "ProxyStats"]

_log = logging.getLogger("sheetanchor.testing.proxy")

DEFAULT_MAX_CONNECTIONS = 256
"""Connections beyond this many open ones are reset at once (the proxy stays bounded)."""

_CHUNK = 65536
_CONTROL_TIMEOUT = 10.0
_CREATED_AT_DEPTH = 8  # frames kept of where a proxy was created, for the unclosed warning
_T = TypeVar("_T")


class ProxyMode(enum.Enum):
    """What the proxy does with connections."""

    PASS = "pass"
    """Forward bytes both ways (optionally with latency or a byte budget)."""
    REFUSE = "refuse"
    """No listener: a connect fails with ``ConnectionRefusedError``."""
    BLACKHOLE = "blackhole"
    """Accept, then neither answer nor forward; held bytes flow again on ``pass_through()``."""


class ProxyStats(NamedTuple):
    """Counters of one proxy since it started."""

    accepted: int
    """Connections accepted from clients."""
    active: int
    """Connections open right now."""
    rejected: int
    """Connections reset at once because ``max_connections`` were open."""
    bytes_to_server: int
    """Bytes forwarded from clients to the server."""
    bytes_to_client: int
    """Bytes forwarded from the server to clients."""
    held: int = 0
    """Client chunks held right now by :meth:`FaultProxy.hold_matching`."""
    matched: int = 0
    """Client chunks that matched a :meth:`FaultProxy.hold_matching` pattern so far."""


class _HoldRule:
    """The pattern of :meth:`FaultProxy.hold_matching` and what releases its held chunks."""

    __slots__ = ("pattern", "released", "seconds")

    def __init__(self, pattern: bytes, seconds: float | None) -> None:
        self.pattern = pattern
        self.seconds = seconds
        # Replaced by a fresh event on each release: chunks matching later are held again.
        self.released = asyncio.Event()

    def release(self) -> None:
        self.released.set()
        self.released = asyncio.Event()


class _Cut(Exception):
    """Raised inside a pump when a connection's byte budget is spent."""


class _Conn:
    """One proxied connection: the client socket, the upstream socket, the fault state."""

    __slots__ = ("budget", "client", "reset", "seen", "task", "upstream")

    def __init__(self, client: socket.socket, budget: int | None) -> None:
        self.client = client
        self.upstream: socket.socket | None = None
        self.budget = budget
        self.reset = False  # close with RST instead of FIN
        self.task: asyncio.Task[None] | None = None
        # The last len(pattern) - 1 client bytes already forwarded: a pattern split over two
        # chunks still matches (the chunk holding its end is held).
        self.seen = b""


def _close(sock: socket.socket | None, *, reset: bool) -> None:
    if sock is None or sock.fileno() < 0:
        return
    if reset:
        # SO_LINGER with a zero timeout turns close() into an RST: the peer sees
        # "connection reset by peer" instead of an orderly end of stream.
        with contextlib.suppress(OSError):  # the socket may already be dead
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target_host:target_port``, with faults on demand.

    Args:
        target_host: the server's host (PostgreSQL, Redis, anything over TCP).
        target_port: the server's port.
        host: the interface to listen on.
        port: the port to listen on; 0 picks a free one (kept across ``refuse()``).
        max_connections: open connections allowed at once; more are reset immediately.
        connect_timeout: seconds to wait for the upstream connect.

    Example::

        with FaultProxy("127.0.0.1", 5432) as proxy:
            url = proxy.url("postgresql://postgres@127.0.0.1:5432/postgres")
            proxy.refuse()        # new connects: ConnectionRefusedError
            proxy.pass_through()  # back to normal
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        connect_timeout: float = 10.0,
    ) -> None:
        if not 1 <= target_port <= 65535:
            raise ValueError(f"target_port must be between 1 and 65535, got {target_port!r}")
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be between 0 and 65535, got {port!r}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections!r}")
        if connect_timeout <= 0:
            raise ValueError(f"connect_timeout must be > 0 seconds, got {connect_timeout!r}")
        self._target = (target_host, target_port)
        self._host = host
        self._port = port
        self._max_connections = max_connections
        self._connect_timeout = connect_timeout
        self._mode = ProxyMode.PASS
        self._latency = 0.0
        self._budget: int | None = None
        self._hold: _HoldRule | None = None
        self._held = 0
        self._matched = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._flowing: asyncio.Event | None = None
        self._conns: set[_Conn] = set()
        self._closed = False
        self._accepted = 0
        self._rejected = 0
        self._to_server = 0
        self._to_client = 0
        # Where this proxy was created, for the warning if it is never closed. Line texts
        # are not read now (lookup_lines=False): only a leaked proxy pays for them.
        self._created_at = traceback.StackSummary.extract(
            traceback.walk_stack(sys._getframe(1)), limit=_CREATED_AT_DEPTH, lookup_lines=False
        )
        self._created_at.reverse()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        """Start the proxy thread and listen; returns ``self``. Idempotent."""
        if self._closed:
            raise ResourceClosed("this FaultProxy was closed; create a new one")
        if self._loop is not None:
            return self
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=loop.run_forever, name=f"sheetanchor-proxy->{self._target[1]}", daemon=True
        )
        self._loop, self._thread = loop, thread
        thread.start()
        try:
            self._call(self._setup)
        except BaseException:
            # The port may be busy: stop the thread and close the loop now, so a failed
            # start leaks nothing and the caller gets the error, not a ResourceWarning later.
            self.close()
            raise
        _log.debug("proxy %s:%d -> %s:%d started", self._host, self._port, *self._target)
        return self

    def close(self) -> None:
        """Close every connection and the listener, then stop the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self._submit(self._shutdown)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=_CONTROL_TIMEOUT)
            if thread.is_alive():
                _log.warning("proxy thread %s did not stop; leaving it (daemon)", thread.name)
            else:
                loop.close()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # getattr: __init__ may have raised before the attributes existed.
        if getattr(self, "_loop", None) is not None and not getattr(self, "_closed", True):
            created = "".join(self._created_at.format()).rstrip()
            warnings.warn(
                f"FaultProxy on port {self._port} was not closed; use close() or `with`. "
                f"It was created at (most recent call last):\n{created}",
                ResourceWarning,
                stacklevel=1,
            )

    def __repr__(self) -> str:
        return (
            f"FaultProxy({self._host}:{self._port} -> {self._target[0]}:{self._target[1]}, "
            f"mode={self._mode.value}, latency={self._latency}, cut_after={self._budget}, "
            f"hold={self._hold.pattern if self._hold is not None else None!r})"
        )

    # ------------------------------------------------------------------ addresses

    @property
    def host(self) -> str:
        """The host the proxy listens on."""
        return self._host

    @property
    def port(self) -> int:
        """The port the proxy listens on (known after :meth:`start`)."""
        return self._port

    @property
    def mode(self) -> ProxyMode:
        """The current mode."""
        return self._mode

    def url(self, original_url: str) -> str:
        """Rewrite a PostgreSQL or Redis URL so that it connects through this proxy.

        User, password, database and query are kept; only host and port change.

        >>> proxy.url("redis://:pw@127.0.0.1:6379/2")  # doctest: +SKIP
        'redis://:pw@127.0.0.1:41234/2'
        """
        parts = urlsplit(original_url)
        if not parts.scheme or parts.scheme == "unix" or not parts.netloc:
            raise ConfigError(
                f"cannot route {redact(original_url)!r} through a TCP proxy: it needs a "
                "host:port URL (postgresql://... or redis://...)"
            )
        userinfo, at, _ = parts.netloc.rpartition("@")
        netloc = f"{userinfo}{at}{self._host}:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    @property
    def stats(self) -> ProxyStats:
        """A snapshot of the counters (safe to read from any thread)."""
        return ProxyStats(
            accepted=self._accepted,
            active=len(self._conns),
            rejected=self._rejected,
            bytes_to_server=self._to_server,
            bytes_to_client=self._to_client,
            held=self._held,
            matched=self._matched,
        )

    # ------------------------------------------------------------------ faults

    def pass_through(self) -> None:
        """Back to normal: listen, forward everything, no latency, no cut, nothing held."""
        self._call(self._set_pass)

    def add_latency(self, seconds: float) -> None:
        """Hold every chunk from the server ``seconds`` before forwarding it.

        Each request/response round trip becomes at least ``seconds`` slower. ``0`` removes
        the latency. Other faults are kept.
        """
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, got {seconds!r}")

        async def apply() -> None:
            self._latency = float(seconds)

        self._call(apply)

    def refuse(self) -> None:
        """Close the listener: new connects fail with ``ConnectionRefusedError``.

        Open connections keep working; :meth:`pass_through` listens again on the same port.
        """
        self._call(self._set_refuse)

    def blackhole(self) -> None:
        """Accept connections but never answer or forward, like a network partition.

        Connects succeed (the kernel accepts them) and then hang; open connections stop
        moving. Nothing is dropped or buffered without bound: the proxy simply stops
        reading, and :meth:`pass_through` lets the held bytes flow again.
        """
        self._call(self._set_blackhole)

    def reset_all(self) -> None:
        """Reset (RST) every open connection now; new connections are proxied as before."""
        self._call(self._reset_all)

    def cut_after(self, nbytes: int) -> None:
        """Let ``nbytes`` more bytes through each connection (both ways), then reset it.

        Applies to open connections (counting from now) and to every new one, until
        :meth:`pass_through`.
        """
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes!r}")

        async def apply() -> None:
            self._budget = nbytes
            for conn in self._conns:
                conn.budget = nbytes

        self._call(apply)

    def hold_matching(self, pattern: bytes, *, seconds: float | None = None) -> None:
        """Hold each client->server chunk that contains ``pattern``; other traffic flows.

        A held chunk is forwarded after ``seconds`` (a delay), or, with ``seconds=None``,
        when :meth:`release_held` or :meth:`pass_through` is called; either call also ends
        a delay early. ``stats.held`` counts the chunks held right now, ``stats.matched``
        every chunk that matched. A pattern split over two reads still matches.

        Scope: the matching chunk and only what its client sends after it on the same
        connection while it is held (one connection is one ordered byte stream: later bytes
        cannot overtake it). Once it is forwarded, that connection flows normally again and
        only a new match holds it; other connections and the server->client direction are
        never held. With PostgreSQL, holding the statement that names a table (``COPY
        "t" ...``, an ``INSERT INTO "t"``) holds the rest of its transaction too, because
        the client waits for the statement's reply before it sends the COPY data and the
        ``COMMIT``; a pooled connection given back afterwards is not slowed for the next
        user. Pick a pattern no other statement contains (a table named ``ticks`` also
        matches ``ticks_fast``; the quoted name ``b'"ticks"'`` does not).

        Replaces an earlier rule (releasing what it held); other faults are kept.
        """
        if not isinstance(pattern, bytes) or not pattern:
            raise ValueError(f"pattern must be non-empty bytes, got {pattern!r}")
        if seconds is not None and seconds < 0:
            raise ValueError(f"seconds must be >= 0 or None, got {seconds!r}")

        async def apply() -> None:
            if self._hold is not None:
                self._hold.release()
            self._hold = _HoldRule(pattern, seconds)
            for conn in self._conns:
                conn.seen = b""  # bytes seen under another pattern must not match this one

        self._call(apply)

    def release_held(self) -> None:
        """Forward the chunks held now; the rule stays (later matching chunks are held)."""

        async def apply() -> None:
            if self._hold is not None:
                self._hold.release()

        self._call(apply)

    # ------------------------------------------------------------------ thread plumbing

    def _submit(self, factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        loop = self._loop
        if loop is None:
            raise RuntimeError("FaultProxy is not started; call start() or use `with`")
        if threading.current_thread() is self._thread:
            raise RuntimeError("FaultProxy control methods must not be called from its own loop")
        future = asyncio.run_coroutine_threadsafe(factory(), loop)
        try:
            return future.result(timeout=_CONTROL_TIMEOUT)
        except FutureTimeout as exc:
            future.cancel()
            raise RuntimeError(
                f"FaultProxy on port {self._port} did not apply a change within "
                f"{_CONTROL_TIMEOUT} s; its thread may be blocked"
            ) from exc

    def _call(self, factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        if self._closed:
            raise ResourceClosed("this FaultProxy was closed; create a new one")
        return self._submit(factory)

    # ------------------------------------------------------------------ in the loop thread

    async def _setup(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._listen()

    def _listen(self) -> None:
        if self._listener is not None:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self._host, self._port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise OSError(
                exc.errno,
                f"FaultProxy cannot listen on {self._host}:{self._port}: {exc.strerror}; "
                "another process may have taken the port while the proxy refused connections",
            ) from exc
        self._port = sock.getsockname()[1]
        self._listener = sock
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop(sock))

    async def _unlisten(self) -> None:
        task, sock = self._accept_task, self._listener
        self._accept_task = self._listener = None
        if task is not None:
            # Cancel first: the loop must stop watching the socket before it is closed.
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if sock is not None:
            sock.close()

    async def _set_pass(self) -> None:
        assert self._flowing is not None
        self._mode = ProxyMode.PASS
        self._latency = 0.0
        self._budget = None
        for conn in self._conns:
            conn.budget = None
        if self._hold is not None:
            self._hold.release()
            self._hold = None
        self._listen()
        self._flowing.set()

    async def _set_refuse(self) -> None:
        self._mode = ProxyMode.REFUSE
        await self._unlisten()

    async def _set_blackhole(self) -> None:
        assert self._flowing is not None
        self._mode = ProxyMode.BLACKHOLE
        self._flowing.clear()
        self._listen()

    async def _reset_all(self) -> None:
        conns = list(self._conns)
        for conn in conns:
            conn.reset = True
            if conn.task is not None:
                conn.task.cancel()
        # Wait until every socket is closed, so the caller sees the resets on return.
        await asyncio.gather(*(c.task for c in conns if c.task is not None), return_exceptions=True)

    async def _shutdown(self) -> None:
        await self._unlisten()
        conns = list(self._conns)
        for conn in conns:
            if conn.task is not None:
                conn.task.cancel()
        await asyncio.gather(*(c.task for c in conns if c.task is not None), return_exceptions=True)
        # getaddrinfo ran in the loop's default executor: join its threads, leak none.
        await asyncio.get_running_loop().shutdown_default_executor()

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, _ = await loop.sock_accept(listener)
            except OSError as exc:
                # EMFILE and friends: log, back off briefly, keep serving.
                _log.warning("proxy on port %d: accept failed: %s", self._port, exc)
                await asyncio.sleep(0.1)
                continue
            client.setblocking(False)
            self._accepted += 1
            if len(self._conns) >= self._max_connections:
                self._rejected += 1
                _log.warning(
                    "proxy on port %d: %d connections open (max_connections); resetting a new one",
                    self._port,
                    len(self._conns),
                )
                _close(client, reset=True)
                continue
            conn = _Conn(client, self._budget)
            self._conns.add(conn)
            conn.task = loop.create_task(self._serve(conn))
            # A task cancelled before its first step never enters _serve's `finally`
            # (reset_all right after an accept): the callback closes the sockets then.
            conn.task.add_done_callback(functools.partial(self._on_done, conn))

    async def _serve(self, conn: _Conn) -> None:
        assert self._flowing is not None
        try:
            # A black hole accepts but never connects upstream until it heals.
            await self._flowing.wait()
            conn.upstream = await self._connect_upstream()
            async with asyncio.TaskGroup() as group:
                group.create_task(self._pump(conn, conn.client, conn.upstream, to_server=True))
                group.create_task(self._pump(conn, conn.upstream, conn.client, to_server=False))
        except* _Cut:
            conn.reset = True
            _log.debug("proxy on port %d: connection cut after its byte budget", self._port)
        except* OSError as group:
            # The client or the server dropped the connection: pass that on as a reset.
            conn.reset = True
            _log.debug("proxy on port %d: connection ended: %r", self._port, group.exceptions)
        finally:
            self._finish(conn)

    def _on_done(self, conn: _Conn, task: asyncio.Task[None]) -> None:
        self._finish(conn)

    def _finish(self, conn: _Conn) -> None:
        """Forget ``conn`` and close its sockets (idempotent)."""
        self._conns.discard(conn)
        _close(conn.client, reset=conn.reset)
        _close(conn.upstream, reset=conn.reset)

    async def _connect_upstream(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        host, port = self._target
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, type_, proto, _, address = infos[0]
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancellation
            # that arrives as the connect completes, and reset_all() would wait forever.
            async with asyncio.timeout(self._connect_timeout):
                await loop.sock_connect(sock, address)
        except BaseException:
            sock.close()  # the connect failed or was cancelled: nothing else owns the socket
            raise
        return sock

    async def _hold_if_matching(self, conn: _Conn, rule: _HoldRule, data: bytes) -> None:
        """Wait while ``rule`` holds ``data`` (it contains the pattern, maybe split)."""
        window = conn.seen + data
        keep = len(rule.pattern) - 1
        conn.seen = window[-keep:] if keep else b""
        if rule.pattern not in window:
            return
        self._matched += 1
        self._held += 1
        released = rule.released
        try:
            if rule.seconds is None:
                await released.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(rule.seconds):
                        await released.wait()
        finally:
            self._held -= 1

    async def _pump(
        self, conn: _Conn, src: socket.socket, dst: socket.socket, *, to_server: bool
    ) -> None:
        assert self._flowing is not None
        loop = asyncio.get_running_loop()
        while True:
            # In a black hole nothing is read: the peers' TCP windows fill and they wait.
            await self._flowing.wait()
            data = await loop.sock_recv(src, _CHUNK)
            if not data:
                with contextlib.suppress(OSError):  # the peer may be gone already
                    dst.shutdown(socket.SHUT_WR)
                return
            await self._flowing.wait()
            if to_server and self._hold is not None:
                await self._hold_if_matching(conn, self._hold, data)
            if self._latency and not to_server:
                await asyncio.sleep(self._latency)
            cut = False
            if conn.budget is not None:
                if len(data) >= conn.budget:
                    data, cut = data[: conn.budget], True
                conn.budget -= len(data)
            if data:
                await loop.sock_sendall(dst, data)
                if to_server:
                    self._to_server += len(data)
                else:
                    self._to_client += len(data)
            if cut:
                raise _Cut
