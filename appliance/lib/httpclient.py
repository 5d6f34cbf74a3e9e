"""A lean HTTP/1.1 client for the engines: pooled keep-alive connections and httptools' parser.

The gateway calls an engine once per request. aiohttp's client cost about a fifth of the gateway's CPU at 500
requests a second (py-spy), most of it in layers this path does not need. The engines are the node's own servers
speaking plain HTTP/1.1 (uvicorn), so this client does what they need and no more: one request at a time on a
connection, ``Content-Length`` bodies out, answers framed by length, by chunks or by the connection's end, and
back-pressure (a reader slower than the engine stops the connection being read, so nothing piles up here).

Who holds an :class:`Answer` must :meth:`~Answer.release` it once, whatever happened: a complete answer's connection
goes back to the pool; an unfinished one's is closed, which is how an engine learns that its client left.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import httptools

from appliance.lib.tasks import acquire_within

HIGH_WATER = 256 * 1024  # bytes of an answer buffered here before its connection stops being read
IDLE_S = 4.0  # a kept-alive connection idle longer is closed, not reused (uvicorn closes them after 5 s)
RETRY_WITHIN_S = 0.5  # a reused connection closed this soon after a request went out on it was closing already
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")  # no header or path may carry these (CR / LF would split the request)
_NO_BODY = (204, 304)


class HTTPClientError(Exception):
    """The engine could not be reached, or its answer broke off or was not HTTP."""


class ConnectFailed(HTTPClientError):
    """No connection: refused, unreachable, or not accepted in time."""


class AnswerBroken(HTTPClientError):
    """The connection closed, or the answer stopped being HTTP, before the answer's end."""


class PoolBusy(HTTPClientError):
    """Every connection the pool allows to the engine stayed in use for the connect timeout."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where an engine listens, from its URL (``http://host:port/prefix``)."""

    host: str
    port: int
    tls: bool
    prefix: str
    host_header: str

    @classmethod
    def of(cls, url: str) -> Origin:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        return cls(host, port, tls, parts.path.rstrip("/"), f"{shown}:{port}")


class Answer:
    """One engine answer: its status once its head has arrived, then its body, read whole or chunk by chunk."""

    __slots__ = (
        "_begun",
        "_buffered",
        "_chunks",
        "_connection",
        "_done",
        "_error",
        "_interim",
        "_keep_alive",
        "_loop",
        "_paused",
        "_pool",
        "_released",
        "_slotted",
        "_timeout_s",
        "_timer",
        "_until_close",
        "_waiter",
        "last_data",
        "received",
        "status",
    )

    def __init__(self, pool: _Pool, connection: _Connection, timeout_s: float, slotted: bool) -> None:
        self._pool, self._connection, self._timeout_s, self._slotted = pool, connection, timeout_s, slotted
        self._loop = connection.loop
        self.status = 0
        self.received = False  # any byte of the answer arrived
        self.last_data = self._loop.time()
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._released = False
        self._keep_alive = False
        self._until_close = True  # framed by the connection's end, until a length or chunking says otherwise
        self._interim = False
        self._begun = False
        self._timer: asyncio.TimerHandle | None = self._loop.call_at(self.last_data + timeout_s, self._check_silence)

    async def head(self) -> None:
        """Wait for the answer's status line and headers."""
        while not self.status:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def read(self) -> bytes:
        """The whole body."""
        parts: list[bytes] = []
        while True:
            if self._chunks:
                parts.extend(self._chunks)
                self._drained()
            if self._error is not None:
                raise self._error
            if self._done:
                return b"".join(parts)
            await self._wait()

    async def next_chunk(self) -> bytes:
        """What arrived of the body since the last call, once something has; ``b""`` at its end."""
        while True:
            if self._chunks:
                data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
                self._drained()
                return data
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            await self._wait()

    def release(self) -> None:
        """Done with the answer, read or not (idempotent, synchronous: safe while being cancelled). A complete answer's
        connection is kept for the next request; an unfinished one's is closed, and its engine aborts the request."""
        if self._released:
            return
        self._released = True
        self._stop_timer()
        connection = self._connection
        connection.answer = None
        try:
            if self._done and self._keep_alive and self._error is None and not connection.closed:
                if self._paused:  # its end arrived with more than the high water mark unread: read on from here
                    self._paused = False
                    connection.resume()
                self._pool.put_back(connection)
            else:
                self.fail(AnswerBroken("the answer was released before its end"))  # wakes a reader still waiting
                connection.abort()
        finally:
            if self._slotted:
                self._pool.slots.release()

    def discard(self) -> None:
        """Given up before it was handed over (its request is retried or failed): its connection is closed, and its
        pool slot stays with the caller."""
        self.fail(AnswerBroken("the answer was given up"))
        self._released = True
        self._connection.answer = None
        self._connection.abort()

    # --- fed by the connection ---

    def on_message_begin(self) -> None:
        if self._begun:  # a second answer to one request: the connection is out of step with its requests
            raise AnswerBroken("the engine sent more than one answer")
        self._begun = True

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered == b"content-length" or (lowered == b"transfer-encoding" and b"chunked" in value.lower()):
            self._until_close = False

    def on_headers_complete(self) -> None:
        status = self._connection.parser.get_status_code()
        if status < 200:  # an interim answer (100 Continue): the real one follows
            self._interim = True
            return
        if status in _NO_BODY:
            self._until_close = False
        self.status = status
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused:
            self._paused = True
            self._connection.pause()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = self._begun = False
            return
        self._keep_alive = self._connection.parser.should_keep_alive()
        self._finish()

    def fail(self, error: BaseException) -> None:
        if not self._done and self._error is None:
            self._error = error
        self._stop_timer()
        self._wake()

    def connection_lost(self) -> None:
        if self._done:
            return
        if self.status and self._until_close:
            self._finish()  # framed by the connection's end: this is the end
        else:
            self.fail(AnswerBroken("the engine closed the connection before the end of its answer"))

    # --- inside ---

    def _finish(self) -> None:
        self._done = True
        self._stop_timer()
        self._wake()

    def _drained(self) -> None:
        self._chunks.clear()
        self._buffered = 0
        if self._paused:
            self._paused = False
            self.last_data = self._loop.time()  # time spent paused is not the engine's silence
            self._connection.resume()

    async def _wait(self) -> None:
        waiter = self._loop.create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _check_silence(self) -> None:
        """The read timeout, checked lazily: one timer per answer, moved on only when it fires."""
        self._timer = None
        if self._done or self._error is not None or self._released:
            return
        now = self._loop.time()
        if self._paused:
            self.last_data = now  # held back by its reader, not silent
        due = self.last_data + self._timeout_s
        if now >= due:
            self.fail(TimeoutError(f"the engine sent nothing for {self._timeout_s:g}s"))
            self._connection.abort()
            return
        self._timer = self._loop.call_at(due, self._check_silence)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _Connection(asyncio.Protocol):
    """One kept-alive connection to an engine; it carries one answer at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.answer: Answer | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio's classes

    def send(self, answer: Answer, data: bytes) -> None:
        assert self.transport is not None
        self.answer = answer
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        answer = self.answer
        if answer is None:  # bytes nobody asked for: this connection cannot be trusted with the next request
            self.abort()
            return
        answer.received = True
        answer.last_data = self.loop.time()
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            answer.fail(AnswerBroken(f"the engine's answer is not HTTP/1.1: {exc}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.answer is not None:
            self.answer.connection_lost()

    def pause(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # httptools calls these on the protocol it was given; they belong to the answer in flight
    def on_message_begin(self) -> None:
        if self.answer is not None:
            self.answer.on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.answer is not None:
            self.answer.on_header(name, value)

    def on_headers_complete(self) -> None:
        if self.answer is not None:
            self.answer.on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self.answer is not None:
            self.answer.on_body(body)

    def on_message_complete(self) -> None:
        if self.answer is not None:
            self.answer.on_message_complete()


class _Pool:
    """An origin's connections: those idle, and a slot for each one in use (at most ``size``)."""

    def __init__(self, origin: Origin, size: int) -> None:
        self.origin = origin
        self.slots = asyncio.Semaphore(size)
        self.idle: list[_Connection] = []
        self.addresses: list[tuple[int, Any]] = []  # (family, address) as resolved

    def take_idle(self, now: float) -> _Connection | None:
        while self.idle:
            connection = self.idle.pop()  # the most recently used: the least likely to be closing
            if not connection.closed and now - connection.idle_since < IDLE_S:
                connection.reused = True
                return connection
            connection.abort()
        return None

    def put_back(self, connection: _Connection) -> None:
        connection.idle_since = connection.loop.time()
        self.idle.append(connection)

    def close(self) -> None:
        while self.idle:
            self.idle.pop().abort()


class EngineClient:
    """Pooled HTTP/1.1 connections to engines, at most ``pool_size`` in use per engine (more requests wait)."""

    def __init__(self, pool_size: int, connect_timeout_s: float, read_timeout_s: float) -> None:
        self._pool_size = pool_size
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._pools: dict[str, _Pool] = {}
        self._tls: ssl.SSLContext | None = None

    async def request(
        self,
        url: str,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes | None = None,
        *,
        pooled: bool = True,
    ) -> Answer:
        """Send a request to the engine at ``url``; return its answer once the answer's head has arrived.

        A request waits for one of the engine's ``pool_size`` slots for at most the connect timeout (``PoolBusy``
        after); ``pooled=False`` (health checks, metrics scrapes) takes none, so that an engine busy with requests is
        not reported down. A kept-alive connection found closed right after the request went out on it, before any
        byte of the answer, is replaced by a new connection once (the engine closed it as it was being reused). Every
        other failure is raised: ``ConnectFailed``, ``AnswerBroken``, or ``TimeoutError`` when the engine stays
        silent for the read timeout."""
        pool = self._pools.get(url)
        if pool is None:
            pool = self._pools[url] = _Pool(Origin.of(url), self._pool_size)
        data = _request_bytes(method, pool.origin, path, headers, body)
        if pooled and not await acquire_within(pool.slots, self._connect_timeout_s):
            raise PoolBusy(f"all {self._pool_size} connections to {pool.origin.host_header} stayed in use")
        try:
            loop = asyncio.get_running_loop()
            retried = False
            while True:
                connection = (None if retried else pool.take_idle(loop.time())) or await self._connect(pool, loop)
                answer = Answer(pool, connection, self._read_timeout_s, pooled)
                sent_at = loop.time()
                connection.send(answer, data)
                try:
                    await answer.head()
                except BaseException as exc:
                    answer.discard()
                    closing = connection.reused and not answer.received and loop.time() - sent_at < RETRY_WITHIN_S
                    if isinstance(exc, AnswerBroken) and closing:
                        retried = True
                        continue
                    raise
                return answer  # it holds the slot until it is released
        except BaseException:
            if pooled:
                pool.slots.release()
            raise

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    async def _connect(self, pool: _Pool, loop: asyncio.AbstractEventLoop) -> _Connection:
        """A new connection, to the first of the engine's addresses that accepts one (resolved once, as aiohttp's
        cache without expiry did; again after a failure)."""
        origin = pool.origin
        failure: OSError | None = None
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                if not pool.addresses:
                    found = await loop.getaddrinfo(origin.host, origin.port, type=socket.SOCK_STREAM)
                    pool.addresses = [(family, address) for family, _, _, _, address in found]
                for family, address in pool.addresses:
                    sock = socket.socket(family, socket.SOCK_STREAM)
                    try:
                        sock.setblocking(False)
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        await loop.sock_connect(sock, address)
                        tls = self._tls_context() if origin.tls else None
                        _, connection = await loop.create_connection(
                            lambda: _Connection(loop), sock=sock, ssl=tls, server_hostname=origin.host if tls else None
                        )
                        return connection
                    except OSError as exc:
                        sock.close()
                        failure = exc
                    except BaseException:
                        sock.close()
                        raise
        except TimeoutError as exc:
            pool.addresses = []
            raise ConnectFailed(f"{origin.host_header} did not accept a connection in time") from exc
        except OSError as exc:
            failure = exc
        pool.addresses = []
        raise ConnectFailed(f"{origin.host_header} refused a connection: {failure}") from failure

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls


def _request_bytes(method: str, origin: Origin, path: str, headers: list[tuple[str, str]], body: bytes | None) -> bytes:
    target = origin.prefix + path
    lines = [f"{method} {target} HTTP/1.1", f"Host: {origin.host_header}"]
    for name, value in headers:
        if _UNSAFE.search(value) or _UNSAFE.search(name):
            raise ValueError(f"the header {name!r} has a control character")
        lines.append(f"{name}: {value}")
    if _UNSAFE.search(target) or " " in target:
        raise ValueError(f"the path {target!r} has a control character or a space")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + body if body else head
