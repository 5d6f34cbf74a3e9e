"""An upload's extraction and chunking, in a child process of the gateway's.

Both are Python work that holds the interpreter's lock (pypdf's parsing, the chunker's loops over token offsets):
on a thread of the gateway's own process they took that lock from the event loop, and every other tenant's
requests waited for it in turn (``bench/floods.py``, uploads: py-spy counted the extraction thread at a fifth of
the time the lock was held). In a process of its own they run beside the event loop instead of taking turns
with it, and what a large or hostile document costs in memory is that process's, not the gateway's.

**The child** runs this module's :func:`main`: it imports this module and what extraction and
chunking need, nothing of the gateway (about 25 MiB; ``multiprocessing``'s spawn would import the parent's whole
``appliance.cli`` again, 134 MiB). It says it is ready once imported, then reads jobs (framed pickles: only the
gateway worker that started it can write to that pipe) and writes answers as plain data (framed msgpack, checked
by the gateway before use: a child subverted by a hostile document can neither run code in the gateway nor hand
it anything but chunks or one of extraction's refusals). It ends at the EOF of its jobs, or as soon as it sees
its gateway worker gone (it looks four times a second), even in the middle of a document: it never outlives its
worker (``kill -9`` included). It ignores SIGINT and SIGTERM, which are its worker's to handle. Its
``oom_score_adj`` is 1000: under memory pressure the kernel takes it before an engine or the gateway.

**One document at a time** (a lock; :class:`appliance.lib.work.WorkPool` queues the rest), so what goes wrong
fails that document only:
- the child dies under it (the OOM killer, a crash in a parser): 503 ``retrieval_unavailable``, nothing stored;
  the next document gets a new child;
- it takes longer than ``timeout_s``: the child is killed, 413 ``extraction_timeout``;
- the child died while idle: the job is sent to a new one (once).
- its answer is not one (or not read to its end): 503, and the child is stopped. A child is given another
  document only after an exchange read to its end, so no document can get another's chunks.
A child is replaced every ``tasks_per_process`` documents, which bounds what its heap can grow to. What the
document is refused for (a limit, a broken PDF, the tokenizer missing) crosses back as the same
:class:`~appliance.lib.errors.ApplianceError` class, message, param and code.
"""

from __future__ import annotations

import contextlib
import fcntl
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
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import msgspec

from appliance.lib.errors import (
    ApplianceError,
    InvalidRequestError,
    PayloadTooLargeError,
    ServiceUnavailableError,
    UnsupportedMediaTypeError,
)
from appliance.retrieval.chunking import Chunk, Chunker
from appliance.retrieval.extract import ExtractionLimits, extract_text

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("!Q")
_MAX_FRAME = 1 << 30  # bytes: past the chunks of the largest document allowed


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


class _Refusal(msgspec.Struct):
    kind: str  # the class's name, one of _REFUSALS
    message: str
    param: str | None = None
    code: str | None = None


class _Answer(msgspec.Struct):
    """What the child answers, as plain data (msgpack): the gateway decodes it into these fields and nothing else,
    so a child subverted by a hostile document can neither make the gateway run code nor change its state."""

    chunks: list[tuple[int, str, int, int, int]] = []  # index, text, start, end, tokens
    tokens: int = 0
    refusal: _Refusal | None = None
    failed: str | None = None


# What a document can be refused for in the child, by name: extraction's and chunking's own refusals.
_REFUSALS: dict[str, type[ApplianceError]] = {
    cls.__name__: cls
    for cls in (InvalidRequestError, PayloadTooLargeError, ServiceUnavailableError, UnsupportedMediaTypeError)
}
_decode_answer = msgspec.msgpack.Decoder(_Answer).decode
_encode_answer = msgspec.msgpack.Encoder().encode


def read_answer(frame: bytes) -> _Answer:
    """The child's answer, checked: ServiceUnavailableError when it is not one (the child is then stopped)."""
    try:
        answer = _decode_answer(frame)
    except msgspec.DecodeError as exc:
        raise _unavailable("its answer could not be read") from exc
    if answer.refusal is not None and answer.refusal.kind not in _REFUSALS:
        raise _unavailable(f"it answered with an unknown refusal ({answer.refusal.kind[:80]})")
    if answer.tokens < 0 or any(index != n for n, (index, *_) in enumerate(answer.chunks)):
        raise _unavailable("its answer is not a document's chunks")
    return answer


def outcome(answer: _Answer) -> tuple[list[Chunk], int]:
    """A document's chunks and tokens, or the refusal its answer carries, raised."""
    if answer.refusal is not None:
        refusal = answer.refusal
        raise _REFUSALS[refusal.kind](refusal.message, param=refusal.param, code=refusal.code)
    if answer.failed is not None:
        log.error("preparing a document failed in the document process: %s", answer.failed[:2000])
        raise _unavailable("preparing it failed")
    return [Chunk(*chunk) for chunk in answer.chunks], answer.tokens


def _not_started(why: str) -> ServiceUnavailableError:
    return ServiceUnavailableError(
        f"The document process cannot be started: {why}", code="retrieval_unavailable", headers=_RETRY
    )


def _unavailable(why: str) -> ServiceUnavailableError:
    return ServiceUnavailableError(
        f"The document could not be prepared: {why}; nothing was stored.", code="retrieval_unavailable", headers=_RETRY
    )


def _answer_of(work: Callable[[], tuple[list[Chunk], int]]) -> bytes:
    """The child's answer for one job (see :class:`_Answer`)."""
    try:
        chunks, tokens = work()
        return _encode_answer(_Answer([(c.index, c.text, c.start, c.end, c.tokens) for c in chunks], tokens))
    except ApplianceError as exc:
        kind = type(exc).__name__ if type(exc).__name__ in _REFUSALS else "ServiceUnavailableError"
        return _encode_answer(_Answer(refusal=_Refusal(kind, exc.message, exc.param, exc.code)))
    except MemoryError:
        message = "The document needs more memory to extract than this node gives it."
        return _encode_answer(_Answer(refusal=_Refusal("PayloadTooLargeError", message, "file", "document_too_large")))
    except Exception as exc:  # reported to the parent, which answers 503
        traceback.print_exc()  # to the gateway's stderr: its journal
        return _encode_answer(_Answer(failed=f"{type(exc).__name__}: {exc}"))


def _write(fd: int, payload: bytes, stall_s: float | None = None) -> None:
    """One frame; with ``stall_s`` (``fd`` non-blocking), :class:`TimeoutError` once the reader has taken no byte
    for that long (a large frame takes as long as it takes, as long as it moves)."""
    poller = None
    for part in (_LENGTH.pack(len(payload)), memoryview(payload)):
        while part:
            try:
                part = part[os.write(fd, part) :]
            except BlockingIOError:
                assert stall_s is not None, "a blocking descriptor has no deadline"
                if poller is None:
                    poller = select.poll()
                    poller.register(fd, select.POLLOUT)
                if not poller.poll(stall_s * 1000):
                    raise TimeoutError from None


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
    if size > _MAX_FRAME:
        raise ChildGone(f"a frame of {size} bytes")
    return _read_exactly(fd, size, deadline)


class DocumentProcess:
    """``prepare()`` in the child process; called from a worker thread (it waits for the child's answer).

    A child is used again only after an exchange that ended with its whole answer read: any other end (a
    timeout, an error of any kind) stops it, so no document can ever be given another one's answer."""

    def __init__(
        self,
        *,
        timeout_s: float = 120.0,
        tasks_per_process: int = 200,
        start_timeout_s: float = 60.0,
        send_timeout_s: float = 10.0,
    ) -> None:
        self._timeout_s = timeout_s
        self._start_timeout_s = start_timeout_s
        # An idle child reads a job as it comes: one that takes no byte of it for this long is stopped or hung, and
        # is replaced; without it, one upload would wait on the pipe forever and hold every later upload of its
        # gateway worker behind it.
        self._send_timeout_s = send_timeout_s
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
        job = pickle.dumps((raw, media_type, limits, chunking), protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            child = self._send(job)
            try:
                answer = read_answer(self._answer(child, len(raw), media_type))
            except BaseException:
                self._stop(child)  # not read to its end, or not an answer: this child gets no other document
                raise
            self._done += 1
            if self._done >= self._tasks_per_process or self._closed:
                self._stop(child)
        return outcome(answer)

    def _answer(self, child: subprocess.Popen[bytes], size: int, media_type: str) -> bytes:
        assert child.stdout is not None
        try:
            return _frame(child.stdout.fileno(), time.monotonic() + self._timeout_s)
        except TimeoutError:
            log.warning("a document (%d bytes, %s) took over %g s to prepare", size, media_type, self._timeout_s)
            raise PayloadTooLargeError(
                f"The document took more than {self._timeout_s:g} s to extract and chunk; split it into smaller "
                "documents.",
                param="file",
                code="extraction_timeout",
            ) from None
        except (ChildGone, OSError) as exc:
            log.error(
                "the document process ended while it prepared a document (%d bytes, %s): %s", size, media_type, exc
            )
            raise ServiceUnavailableError(
                "The process preparing the document ended before it was done (out of memory?); nothing was stored.",
                code="retrieval_unavailable",
                headers=_RETRY,
            ) from exc

    def _send(self, job: bytes) -> subprocess.Popen[bytes]:
        """The child the job was handed to: the current one, or a new one when it is gone (one try more)."""
        for attempt in (1, 2):
            child = self._child or self._start()
            assert child.stdin is not None
            try:
                if child.poll() is not None:  # it died while idle (its exit status is there to be read)
                    raise BrokenPipeError(f"it ended with {child.returncode}")
                _write(child.stdin.fileno(), job, self._send_timeout_s)
                return child
            except TimeoutError as exc:  # (an OSError: caught first) stopped, or hung before its next job
                log.warning(
                    "the document process %d took no byte of its job for %g s; starting another",
                    child.pid,
                    self._send_timeout_s,
                )
                self._stop(child)
                if attempt == 2:
                    raise _not_started("it took no job") from exc
            except OSError as exc:
                log.warning("the document process %d is gone (%s); starting another", child.pid, exc)
                self._stop(child)
                if attempt == 2:
                    raise _not_started(str(exc)) from exc
            except BaseException:
                self._stop(child)  # half a job may be in its pipe: it gets no other
                raise
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
            raise _not_started(str(exc)) from exc
        self._child, self._done = child, 0  # known to close() from now on
        assert child.stdin is not None and child.stdout is not None
        os.set_blocking(child.stdin.fileno(), False)  # jobs are written with a deadline (_write)
        with contextlib.suppress(OSError):  # a pipe of 1 MiB: a job goes in 16 times fewer turns than in 64 KiB
            fcntl.fcntl(child.stdin.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
        try:
            ready = _frame(child.stdout.fileno(), time.monotonic() + self._start_timeout_s) == _READY
        except (TimeoutError, ChildGone, OSError) as exc:
            ready = False
            log.error("the document process did not start: %s", type(exc).__name__)
        except BaseException:
            self._stop(child)
            raise
        if not ready or self._closed:
            self._stop(child)
            raise ServiceUnavailableError(
                "The document process did not start; see the gateway's log.",
                code="retrieval_unavailable",
                headers=_RETRY,
            )
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
            child.kill()  # unblocks a prepare() waiting on it, which then stops it
            if self._lock.acquire(timeout=1.0):
                try:
                    self._stop(child)
                finally:
                    self._lock.release()


_RETRY = {"Retry-After": "5"}
_READY = b"ready"
_PIPE_BYTES = 1 << 20  # (an unprivileged process may ask up to /proc/sys/fs/pipe-max-size, 1 MiB by default)


def _serve(jobs: int, answers: int) -> None:
    while True:
        try:
            job = pickle.loads(_frame(jobs, None))  # noqa: S301 - written by the gateway worker that started it
        except ChildGone:
            return  # the gateway worker closed the pipe, or is gone
        try:
            _write(answers, _answer_of(partial(prepare, *job)))
        except BrokenPipeError:
            return


def _orphaned(parent: int) -> None:
    """End this process once its gateway worker is gone, even in the middle of a document (a busy child reads
    no EOF until it is done)."""
    while True:
        time.sleep(0.25)
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
    _write(answers, _READY)  # imports done: the parent hands it jobs
    _serve(jobs, answers)
