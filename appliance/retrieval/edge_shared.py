"""Several processes on one embedded store: the process that holds the store's folder serves it to the others
over a local socket.

**Why not readers that load the shard themselves.** Qdrant Edge locks a shard's write-ahead log for the process
that loads it (a second ``EdgeShard.load`` fails with ``WouldBlock``), and it has no read-only open. A reader
could load only a *copy* of each shard, refreshed on a generation marker: at 1,000,000 points that is gigabytes
copied per refresh, a bound on staleness of seconds to minutes, and a second copy of every vector in memory
per process. Routing the calls to the one process that has the shard costs a round trip over a Unix socket
instead (tens of microseconds against a search of about a millisecond), keeps one copy in memory, and makes
every write visible to every process as soon as it returns: a write's call returns after the owner applied it
through the WAL, and every later search, from any process, goes to that same shard.

**Who owns.** Whichever process first takes ``<root>/.lock`` (the flock :class:`EdgeStore` takes) opens the
shards and listens on ``<root>/edge.sock`` (mode 0600: only the appliance's user may connect). The others
send it their calls. If the owner exits or is killed, the kernel releases its lock; the next call of any other
process finds the socket dead, takes the lock and becomes the owner (its WAL replay makes the shards whole, as
after a crash). Every operation of :class:`Store` is idempotent (point ids are derived from the document and
position), so a call whose owner died under it is sent again to the next owner.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import shutil
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from appliance.lib.errors import ApplianceError, ServiceUnavailableError
from appliance.retrieval.edge import EdgeStore
from appliance.retrieval.vectors import Hit

log = logging.getLogger(__name__)

SOCKET = "edge.sock"
SNAPSHOT = "edge.snapshot"  # where a backup's consistent copy is made, beside the store (its owner can write there)
_HEADER = struct.Struct("!I")
_MAX_FRAME = 256 * 1024 * 1024
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode
OPERATIONS = ("create", "drop", "upsert", "search", "delete_document", "count", "snapshot")


class OwnerGone(Exception):
    """The owner's socket cannot be reached or closed mid-call: the call may be sent to the next owner."""


def _send(sock: socket.socket, message: Any) -> None:
    body = _encode(message)
    sock.sendall(_HEADER.pack(len(body)) + body)


def _exactly(sock: socket.socket, size: int) -> bytes:
    parts: list[bytes] = []
    while size:
        part = sock.recv(min(size, 1 << 20))
        if not part:
            raise EOFError("the other end closed the socket")
        parts.append(part)
        size -= len(part)
    return b"".join(parts)


def _receive(sock: socket.socket) -> Any:
    (size,) = _HEADER.unpack(_exactly(sock, _HEADER.size))
    if size > _MAX_FRAME:
        raise EOFError(f"a frame of {size} bytes is refused")
    return _decode(_exactly(sock, size))


def serve_call(store: EdgeStore, operation: str, args: Sequence[Any]) -> Any:
    """One :class:`Store` operation on the owner's store, its result in wire form (hits as lists)."""
    if operation not in OPERATIONS:
        raise ServiceUnavailableError(f"unknown vector store operation {operation!r}")
    method = getattr(store, f"{operation}_now")
    result = store.call(lambda: method(*args))
    if operation == "search":
        return [[hit.point_id, hit.score, hit.payload] for hit in result]
    return result


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        while True:
            try:
                operation, args = _receive(sock)
            except (OSError, EOFError, ValueError, msgspec.DecodeError):
                return
            try:
                reply: list[Any] = [True, serve_call(self.server.store, operation, args)]
            except ApplianceError as exc:
                reply = [False, str(exc), exc.code]
            except Exception as exc:  # a bad request must not end the owner's other connections
                reply = [False, f"{type(exc).__name__}: {exc}", "retrieval_unavailable"]
            try:
                _send(sock, reply)
            except OSError:
                return


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, path: str, store: EdgeStore) -> None:
        self.store = store
        super().__init__(path, _Handler)


class EdgeServer:
    """Serves an open :class:`EdgeStore` on a Unix socket (the caller holds the store's lock, so a socket file
    already there was left by a dead owner and is replaced)."""

    def __init__(self, store: EdgeStore, path: Path) -> None:
        if len(str(path).encode()) > 107:
            raise ServiceUnavailableError(
                f"The vector store's socket path is too long for a Unix socket: {path}", code="retrieval_unavailable"
            )
        self._path = path
        path.unlink(missing_ok=True)
        umask = os.umask(0o177)  # created 0600, never briefly open to others
        try:
            self._server = _Server(str(path), store)
        finally:
            os.umask(umask)
        self._thread = threading.Thread(target=self._server.serve_forever, name="edge-socket", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._path.unlink(missing_ok=True)


class EdgeClient:
    """Calls to the owner's socket, one connection per concurrent call (kept for the next one)."""

    def __init__(self, path: Path, timeout_s: float = 60.0) -> None:
        self._path = path
        self._timeout_s = timeout_s
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()

    def call(self, operation: str, *args: Any) -> Any:
        with self._lock:
            sock = self._idle.pop() if self._idle else None
        try:
            if sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self._timeout_s)
                sock.connect(str(self._path))
            _send(sock, [operation, list(args)])
            reply = _receive(sock)
        except (OSError, EOFError) as exc:
            if sock is not None:
                sock.close()
            if isinstance(exc, TimeoutError):
                raise ServiceUnavailableError(
                    f"The vector store's owner did not answer in {self._timeout_s:.0f} s", code="retrieval_unavailable"
                ) from exc
            raise OwnerGone(str(exc)) from exc
        with self._lock:
            self._idle.append(sock)
        if not reply[0]:
            raise ServiceUnavailableError(reply[1], code=reply[2] or "retrieval_unavailable")
        return reply[1]

    def close(self) -> None:
        with self._lock:
            for sock in self._idle:
                sock.close()
            self._idle.clear()


class SharedEdgeStore:
    """The :class:`Store` a gateway process uses on an embedded store that other processes may share: the
    owner (the first to take the lock) or a client of it, decided at first use and again when the owner goes
    away (see the module's docstring)."""

    def __init__(self, root: Path, *, failover_s: float = 10.0, **options: Any) -> None:
        self._root = root
        self._options = options
        self._failover_s = failover_s
        self._lock = threading.Lock()
        self._owner: EdgeStore | None = None
        self._server: EdgeServer | None = None
        self._client: EdgeClient | None = None

    @property
    def where(self) -> str:
        return str(self._root / "edge")

    @property
    def owner(self) -> EdgeStore | None:
        """The store itself when this process owns it (index builds, the benchmark), else None."""
        return self._owner

    def _role(self) -> EdgeStore | EdgeClient:
        with self._lock:
            if self._owner is not None:
                return self._owner
            if self._client is not None:
                return self._client
            store = EdgeStore(self._root, **self._options)
            try:
                store.open()
            except ServiceUnavailableError:
                self._client = EdgeClient(self._root / SOCKET)
                return self._client
            try:
                self._server = EdgeServer(store, self._root / SOCKET)
            except (ServiceUnavailableError, OSError) as exc:  # this process still serves itself
                log.warning("vector store %s: not served to other processes: %s", self.where, exc)
            self._owner = store
            log.info("vector store %s: this process (%d) owns it and serves the others", self.where, os.getpid())
            return store

    def call_now(self, operation: str, *args: Any) -> Any:
        """One operation, in wire form, from whichever role this process has; a call the owner could not answer
        because it went away is sent again (to this process once it owns the store) for ``failover_s``."""
        deadline = time.monotonic() + self._failover_s
        while True:
            role = self._role()
            if isinstance(role, EdgeStore):
                return serve_call(role, operation, args)
            try:
                return role.call(operation, *args)
            except OwnerGone as exc:
                with self._lock:
                    if self._client is role:
                        self._client = None
                role.close()
                if time.monotonic() > deadline:
                    raise ServiceUnavailableError(
                        f"The vector store's owner process cannot be reached: {exc}", code="retrieval_unavailable"
                    ) from exc
                time.sleep(0.05)  # the owner may be starting (lock taken, socket not yet listening)

    async def _call(self, operation: str, *args: Any) -> Any:
        return await asyncio.to_thread(self.call_now, operation, *args)

    def close(self) -> None:
        with self._lock:
            if self._server is not None:
                self._server.close()  # clients fail over to whoever takes the lock next
                self._server = None
            if self._owner is not None:
                self._owner.close()
                self._owner = None
            if self._client is not None:
                self._client.close()
                self._client = None

    async def create(self, name: str, dimensions: int) -> None:
        await self._call("create", name, dimensions)

    async def drop(self, name: str) -> None:
        await self._call("drop", name)

    async def upsert(
        self, name: str, ids: Sequence[str], vectors: Sequence[list[float]], payloads: Sequence[dict[str, Any]]
    ) -> None:
        await self._call("upsert", name, list(ids), [list(v) for v in vectors], list(payloads))

    async def search(self, name: str, vector: list[float], limit: int, text: str | None = None) -> list[Hit]:
        found = await self._call("search", name, list(vector), limit, text)
        return [Hit(str(pid), float(score), dict(payload)) for pid, score, payload in found]

    async def delete_document(self, name: str, document_id: str) -> None:
        await self._call("delete_document", name, document_id)

    async def count(self, name: str, document_id: str | None = None) -> int:
        return int(await self._call("count", name, document_id))


def consistent_copy(root: Path, target: Path) -> str:
    """Copy the embedded store's shards (``root/edge``) to ``target``, each shard whole while the appliance may be
    writing to it: the owner process makes the copy between two writes (the ``snapshot`` call); with no owner, this
    process holds the store's lock while it copies, so no gateway opens it meanwhile. Returns who copied."""
    shutil.rmtree(target, ignore_errors=True)  # what a killed backup left
    handle = (root / ".lock").open("ab")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        client = EdgeClient(root / SOCKET, timeout_s=3600)
        try:
            client.call("snapshot", str(target))
        except OwnerGone as exc:
            raise ServiceUnavailableError(
                f"The vector store at {root} is open in a process that does not serve it (retrieval.shared off, or "
                "an older gateway): stop it, or back up with it stopped.",
                code="retrieval_unavailable",
            ) from exc
        finally:
            client.close()
        return "owner"
    try:
        ignore = shutil.ignore_patterns(*(f"*{suffix}" for suffix in (".build", ".trash", ".new")))
        shutil.copytree(root / "edge", target, ignore=ignore)
    finally:
        handle.close()
    return "stopped"
