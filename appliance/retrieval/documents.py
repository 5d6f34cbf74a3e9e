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
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

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


def _write(stream: IO[bytes], message: Any) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LENGTH.pack(len(payload)) + payload)
    stream.flush()


def _read_exactly(fd: int, size: int, deadline: float | None) -> bytes:
    parts: list[bytes] = []
    while size:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError
        part = os.read(fd, min(size, 1 << 20))
        if not part:
            raise ChildGone
        parts.append(part)
        size -= len(part)
    return b"".join(parts)


def _read(fd: int, deadline: float | None = None) -> Any:
    (size,) = _LENGTH.unpack(_read_exactly(fd, _LENGTH.size, deadline))
    return pickle.loads(_read_exactly(fd, size, deadline))  # noqa: S301 - only this process and its own child write


class DocumentProcess:
    """``prepare()`` in the child process; called from a worker thread (it waits for the child's answer)."""

    def __init__(self, *, timeout_s: float = 120.0, tasks_per_process: int = 200) -> None:
        self._timeout_s = timeout_s
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
            assert child.stdout is not None
            try:
                answer = _read(child.stdout.fileno(), time.monotonic() + self._timeout_s)
            except TimeoutError:
                self._stop(child)
                log.warning(
                    "a document (%d bytes, %s) took over %g s to prepare", len(raw), media_type, self._timeout_s
                )
                raise PayloadTooLargeError(
                    f"The document took more than {self._timeout_s:g} s to extract and chunk; split it into "
                    "smaller documents.",
                    param="file",
                    code="extraction_timeout",
                ) from None
            except (ChildGone, OSError, EOFError, pickle.UnpicklingError) as exc:
                self._stop(child)
                log.error(
                    "the document process ended while it prepared a document (%d bytes, %s)", len(raw), media_type
                )
                raise ServiceUnavailableError(
                    "The process preparing the document ended before it was done (out of memory?); nothing was stored.",
                    code="retrieval_unavailable",
                    headers={"Retry-After": "5"},
                ) from exc
            self._done += 1
            if self._done >= self._tasks_per_process:
                self._stop(child)
        kind, *result = answer
        if kind == _OK:
            return result[0], result[1]
        if kind == _REFUSED:
            raise result[0]
        raise ServiceUnavailableError(f"Preparing the document failed: {result[0]}", code="retrieval_unavailable")

    def _send(self, job: tuple[Any, ...]) -> subprocess.Popen[bytes]:
        """The child the job was handed to: the current one, or a new one when it is gone (one try more)."""
        for attempt in (1, 2):
            child = self._child or self._start()
            assert child.stdin is not None
            try:
                if child.poll() is not None:  # it died while idle (its exit status is there to be read)
                    raise BrokenPipeError(f"the document process ended with {child.returncode}")
                _write(child.stdin, job)
                return child
            except OSError as exc:  # it died while idle: its stdin is a broken pipe
                self._stop(child)
                if attempt == 2:
                    raise ServiceUnavailableError(
                        f"The document process cannot be started: {exc}", code="retrieval_unavailable"
                    ) from exc
        raise AssertionError("unreachable")

    def _start(self) -> subprocess.Popen[bytes]:
        if self._closed:
            raise ServiceUnavailableError("Retrieval is shutting down.", code="retrieval_unavailable")
        self._child = subprocess.Popen(
            [sys.executable, "-c", f"from {__name__} import main; main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        self._done = 0
        return self._child

    def _stop(self, child: subprocess.Popen[bytes]) -> None:
        if self._child is child:
            self._child = None
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        child.kill()
        child.wait()

    def close(self) -> None:
        """Stop the child now (a document under way fails: 503)."""
        self._closed = True
        child = self._child
        if child is not None:
            child.kill()  # unblocks a prepare() waiting on it, which then reaps it
            if self._lock.acquire(blocking=False):
                try:
                    self._stop(child)
                finally:
                    self._lock.release()


def _serve(jobs: IO[bytes], answers: IO[bytes]) -> None:
    while True:
        try:
            job = _read(jobs.fileno())
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
        except Exception as exc:
            answer = (_FAILED, f"{type(exc).__name__}: {exc}")
        _write(answers, answer)


def main() -> None:
    """The child: jobs on stdin, answers on stdout (a duplicate of it: fd 1 then goes to stderr, so that nothing a
    library prints can cut into a frame)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a foreground Ctrl-C is the gateway's to handle
    try:
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    _serve(sys.stdin.buffer, answers)
