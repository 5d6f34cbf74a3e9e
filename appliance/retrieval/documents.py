"""An upload's extraction and chunking, in a child process of the gateway's.

Both are Python work that holds the interpreter's lock (pypdf's parsing, the chunker's loops over token offsets):
on a thread of the gateway's own process they took that lock from the event loop, and every other tenant's
requests waited for it in turn (``bench/floods.py``, uploads: py-spy counted the extraction thread at a fifth of
the time the lock was held). In a process of its own they run beside the event loop instead of taking turns
with it, and what a large or hostile document costs in memory is that process's, not the gateway's.

**The child** runs this module's :func:`main`: it imports this module and what extraction and
chunking need, nothing of the gateway (about 25 MiB; ``multiprocessing``'s spawn would import the parent's whole
``appliance.cli`` again, 134 MiB). It reads jobs from its stdin and writes answers to its stdout, each a framed
pickle (the child is this code, started by this process: nothing else writes to those pipes), and ends at the EOF
of its stdin, so it never outlives its gateway worker, even one killed with ``kill -9``. Its ``oom_score_adj`` is
1000: under memory pressure the kernel takes it before an engine or the gateway.

**One document at a time** (a lock; :class:`appliance.lib.work.WorkPool` queues the rest), so what goes wrong
fails that document only:
- the child dies under it (the OOM killer, a crash in a parser): 503 ``retrieval_unavailable``, nothing stored;
  the next document gets a new child;
- it takes longer than ``timeout_s``: the child is killed, 413 ``extraction_timeout``;
- the child died while idle: the job is sent to a new one (once).
A child is replaced every ``tasks_per_process`` documents, which bounds what its heap can grow to. What the
document is refused for (a limit, a broken PDF, the tokenizer missing) crosses back as the same
:class:`~appliance.lib.errors.ApplianceError`.
"""

from __future__ import annotations

import fcntl
import io
import logging
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from appliance.lib.errors import ApplianceError, PayloadTooLargeError, ServiceUnavailableError
from appliance.retrieval.chunking import Chunk, Chunker
from appliance.retrieval.extract import ExtractionLimits, extract_text

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("!Q")
_OK, _REFUSED, _FAILED = "ok", "refused", "failed"


@dataclass(frozen=True, slots=True)
class Chunking:
    """How documents are cut: the embedding model's tokenizer and the chunk's size and overlap, in tokens."""

    tokenizer_dir: Path
    size: int
    overlap: int


def prepare(raw: bytes, media_type: str, limits: ExtractionLimits, chunking: Chunking) -> tuple[list[Chunk], int]:
    """A document's chunks and its token count (what the child runs)."""
    text = extract_text(raw, media_type, limits)
    return _chunker(chunking).split(text)


@lru_cache(maxsize=4)
def _chunker(chunking: Chunking) -> Chunker:
    return Chunker.from_model_dir(chunking.tokenizer_dir, chunking.size, chunking.overlap)


class ChildGone(Exception):
    """The child's pipes closed: it died (or was killed)."""


class _Answers(pickle.Unpickler):
    """What the parent accepts from the child, which parses hostile documents: chunks, and the appliance's errors
    (nothing else is looked up, so a child subverted by a document cannot make the gateway run code)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in {("appliance.retrieval.chunking", "Chunk"), ("appliance.lib.errors", "_restore")} or (
            module == "appliance.lib.errors" and name.endswith("Error")
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not an answer of the document process")


def _write(fd: int, message: Any) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    for part in (_LENGTH.pack(len(payload)), memoryview(payload)):
        while part:
            part = part[os.write(fd, part) :]


def _read_exactly(fd: int, size: int, deadline: float | None) -> bytes:
    parts: list[bytes] = []
    poller = select.poll()  # not select.select: it refuses descriptors past 1023, which a busy gateway has
    poller.register(fd, select.POLLIN)
    while size:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                raise TimeoutError
        part = os.read(fd, min(size, 1 << 20))
        if not part:
            raise ChildGone
        parts.append(part)
        size -= len(part)
    return b"".join(parts)


def _frame(fd: int, deadline: float | None) -> bytes:
    (size,) = _LENGTH.unpack(_read_exactly(fd, _LENGTH.size, deadline))
    return _read_exactly(fd, size, deadline)


class DocumentProcess:
    """``prepare()`` in the child process; called from a worker thread (it waits for the child's answer).

    A child is used again only after an exchange that ended with its whole answer read: any other end (a
    timeout, an error of any kind) stops it, so no document can ever be given another one's answer."""

    def __init__(
        self, *, timeout_s: float = 120.0, tasks_per_process: int = 200, start_timeout_s: float = 60.0
    ) -> None:
        self._timeout_s = timeout_s
        self._start_timeout_s = start_timeout_s
        self._tasks_per_process = tasks_per_process
        self._child: subprocess.Popen[bytes] | None = None
        self._done = 0  # documents the current child has prepared
        self._lock = threading.Lock()  # one document at a time
        self._closed = False

    @property
    def pid(self) -> int | None:
        """The current child's process id (None before the first document, or after one failed)."""
        child = self._child
        return child.pid if child is not None else None

    def prepare(
        self, raw: bytes, media_type: str, limits: ExtractionLimits, chunking: Chunking
    ) -> tuple[list[Chunk], int]:
        with self._lock:
            child = self._send((raw, media_type, limits, chunking))
            try:
                answer = self._answer(child, len(raw), media_type)
            except BaseException:
                self._stop(child)
                raise
            self._done += 1
            if self._done >= self._tasks_per_process or self._closed:
                self._stop(child)
        kind, *result = answer
        if kind == _OK:
            return result[0], result[1]
        if kind == _REFUSED:
            raise result[0]
        log.error(
            "preparing a document (%d bytes, %s) failed in the document process: %s", len(raw), media_type, result[0]
        )
        raise ServiceUnavailableError(
            "Preparing the document failed; nothing was stored.", code="retrieval_unavailable", headers=_RETRY
        )

    def _answer(self, child: subprocess.Popen[bytes], size: int, media_type: str) -> tuple[Any, ...]:
        assert child.stdout is not None
        try:
            frame = _frame(child.stdout.fileno(), time.monotonic() + self._timeout_s)
            return tuple(_Answers(io.BytesIO(frame)).load())
        except TimeoutError:
            log.warning("a document (%d bytes, %s) took over %g s to prepare", size, media_type, self._timeout_s)
            raise PayloadTooLargeError(
                f"The document took more than {self._timeout_s:g} s to extract and chunk; split it into smaller "
                "documents.",
                param="file",
                code="extraction_timeout",
            ) from None
        except (ChildGone, OSError, EOFError, pickle.UnpicklingError) as exc:
            log.error(
                "the document process ended while it prepared a document (%d bytes, %s): %s", size, media_type, exc
            )
            raise ServiceUnavailableError(
                "The process preparing the document ended before it was done (out of memory?); nothing was stored.",
                code="retrieval_unavailable",
                headers=_RETRY,
            ) from exc

    def _send(self, job: tuple[Any, ...]) -> subprocess.Popen[bytes]:
        """The child the job was handed to: the current one, or a new one when it is gone (one try more)."""
        for attempt in (1, 2):
            child = self._child or self._start()
            assert child.stdin is not None
            try:
                if child.poll() is not None:  # it died while idle (its exit status is there to be read)
                    raise BrokenPipeError(f"it ended with {child.returncode}")
                _write(child.stdin.fileno(), job)
                return child
            except OSError as exc:  # it died while idle: its stdin is a broken pipe
                log.warning("the document process %d is gone (%s); starting another", child.pid, exc)
                self._stop(child)
                if attempt == 2:
                    raise ServiceUnavailableError(
                        f"The document process cannot be started: {exc}", code="retrieval_unavailable", headers=_RETRY
                    ) from exc
        raise AssertionError("unreachable")

    def _start(self) -> subprocess.Popen[bytes]:
        """A new child, once it said it is ready (its imports done): one that cannot start is a clear 503."""
        if self._closed:
            raise ServiceUnavailableError("Retrieval is shutting down.", code="retrieval_unavailable", headers=_RETRY)
        try:
            child = subprocess.Popen(
                # -P: nothing from the working directory is imported
                [sys.executable, "-P", "-c", f"from {__name__} import main; main()", str(os.getpid())],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                close_fds=True,
            )
        except OSError as exc:
            log.error("the document process cannot be started: %s", exc)
            raise ServiceUnavailableError(
                f"The document process cannot be started: {exc}", code="retrieval_unavailable", headers=_RETRY
            ) from exc
        assert child.stdout is not None
        try:
            ready = _frame(child.stdout.fileno(), time.monotonic() + self._start_timeout_s) == _READY
        except (TimeoutError, ChildGone, OSError) as exc:
            ready = False
            log.error("the document process did not start: %s", type(exc).__name__)
        if not ready:
            self._stop(child)
            raise ServiceUnavailableError(
                "The document process did not start; see the gateway's log.",
                code="retrieval_unavailable",
                headers=_RETRY,
            )
        self._child, self._done = child, 0
        return child

    def _stop(self, child: subprocess.Popen[bytes]) -> None:
        if self._child is child:
            self._child = None
        child.kill()
        child.wait()
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass

    def close(self) -> None:
        """Stop the child now (a document under way fails: 503; one that has just been answered keeps its answer,
        and its child is stopped by the ``prepare`` that holds it)."""
        self._closed = True
        child = self._child
        if child is not None:
            child.kill()  # unblocks a prepare() waiting on it
            if self._lock.acquire(blocking=False):
                try:
                    self._stop(child)
                finally:
                    self._lock.release()


_RETRY = {"Retry-After": "5"}
_READY = b"ready"


def _serve(jobs: int, answers: int) -> None:
    while True:
        try:
            job = pickle.loads(_frame(jobs, None))  # noqa: S301 - written by the gateway worker that started it
        except ChildGone:
            return  # the gateway worker closed the pipe, or is gone
        try:
            answer: tuple[Any, ...] = (_OK, *prepare(*job))
        except ApplianceError as exc:
            answer = (_REFUSED, exc)
        except MemoryError:
            refusal = PayloadTooLargeError(
                "The document needs more memory to extract than this node gives it.",
                param="file",
                code="document_too_large",
            )
            answer = (_REFUSED, refusal)
        except Exception as exc:  # reported to the parent, which answers 503
            traceback.print_exc()  # to the gateway's stderr: its journal
            answer = (_FAILED, f"{type(exc).__name__}: {exc}")
        try:
            _write(answers, answer)
        except BrokenPipeError:
            return


def _orphaned(parent: int) -> None:
    """End this process once its gateway worker is gone, even in the middle of a document (a busy child reads
    no EOF until it is done)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def main() -> None:
    """The child. SIGINT and SIGTERM are the gateway's to handle (it drains its requests on SIGTERM, the uploads
    under way included): this process ends at its jobs' EOF, when its gateway worker is gone, or when it is
    killed. Jobs come on a copy of fd 0 and answers go on a copy of fd 1; fds 0 and 1 then point at /dev/null and
    stderr, so that nothing a library reads or prints can take or cut into a frame."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = int(sys.argv[1]) if len(sys.argv) > 1 else os.getppid()
    threading.Thread(target=_orphaned, args=(parent,), name="orphaned", daemon=True).start()
    try:
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass
    jobs = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3)
    answers = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(2, 1)
    os.close(null)
    os.write(answers, _LENGTH.pack(len(_READY)) + _READY)  # imports done: the parent hands it jobs
    _serve(jobs, answers)
