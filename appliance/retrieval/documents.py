"""An upload's extraction and chunking, in a child process of the gateway's.

Both are Python work that holds the interpreter's lock (pypdf's parsing, the chunker's loops over token offsets):
on a thread of the gateway's own process they took that lock from the event loop, and every other tenant's
requests waited for it in turn (``bench/floods.py``, uploads: py-spy counted the extraction thread at a fifth of
the time the lock was held). In a process of its own they run beside the event loop instead of taking turns
with it, and what a large or hostile document costs in memory is that process's, not the gateway's.

One process per gateway worker, started by the first upload (``spawn``: nothing of the gateway's threads or
locks is inherited) and replaced every ``tasks_per_process`` documents, which bounds what its heap can grow to.
Jobs reach it one at a time (:class:`appliance.lib.work.WorkPool` holds the rest), so a process that dies under
a document (the kernel's OOM killer, a crash in a parser) fails that document only: the next job starts a new
process. What the document is refused for (a limit, a broken PDF, the tokenizer missing) crosses back as the
same :class:`~appliance.lib.errors.ApplianceError`.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from appliance.lib.errors import ServiceUnavailableError
from appliance.retrieval.chunking import Chunk, Chunker
from appliance.retrieval.extract import ExtractionLimits, extract_text

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Chunking:
    """How documents are cut: the embedding model's tokenizer and the chunk's size and overlap, in tokens."""

    tokenizer_dir: Path
    size: int
    overlap: int


def prepare(raw: bytes, media_type: str, limits: ExtractionLimits, chunking: Chunking) -> tuple[list[Chunk], int]:
    """A document's chunks and its token count (what runs in the child)."""
    text = extract_text(raw, media_type, limits)
    return _chunker(chunking).split(text)


@lru_cache(maxsize=4)
def _chunker(chunking: Chunking) -> Chunker:
    return Chunker.from_model_dir(chunking.tokenizer_dir, chunking.size, chunking.overlap)


class DocumentProcess:
    """``prepare()`` in the child process; called from a worker thread (it waits for the child's answer)."""

    def __init__(self, tasks_per_process: int = 200) -> None:
        self._tasks_per_process = tasks_per_process
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def prepare(
        self, raw: bytes, media_type: str, limits: ExtractionLimits, chunking: Chunking
    ) -> tuple[list[Chunk], int]:
        executor = self._started()
        try:
            return executor.submit(prepare, raw, media_type, limits, chunking).result()
        except BrokenProcessPool as exc:
            self._forget(executor)
            log.error("the document process ended while it prepared a document (%d bytes, %s)", len(raw), media_type)
            raise ServiceUnavailableError(
                "The process preparing the document ended before it was done (out of memory?); nothing was stored.",
                code="retrieval_unavailable",
            ) from exc

    def _started(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=multiprocessing.get_context("spawn"),
                    max_tasks_per_child=self._tasks_per_process,
                )
            return self._executor

    def _forget(self, executor: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._executor is executor:
                self._executor = None
        executor.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:  # the child ends once its document (if any) is done
            executor.shutdown(wait=False, cancel_futures=True)
