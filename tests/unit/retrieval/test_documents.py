"""An upload's extraction and chunking run in a child process (issue #21, uploads flood): the same chunks and the
same refusals as in the gateway's own process, and a child that dies under a document fails that document only."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.lib.errors import PayloadTooLargeError, ServiceUnavailableError
from appliance.retrieval.chunking import Chunker
from appliance.retrieval.documents import Chunking, DocumentProcess
from appliance.retrieval.extract import ExtractionLimits
from tests.support.pdf import many_pages_pdf
from tests.unit.retrieval.test_chunking import word_tokenizer

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon"]


@pytest.fixture
def chunking(tmp_path: Path) -> Chunking:
    word_tokenizer(WORDS).save(str(tmp_path / "tokenizer.json"))
    return Chunking(tmp_path, 16, 4)


@pytest.fixture
def documents() -> Iterator[DocumentProcess]:
    process = DocumentProcess()
    yield process
    process.close()


def children(name: str = "spawn_main") -> list[int]:
    """This process's child processes whose command line names ``name``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == os.getpid() and name.encode() in cmdline:
            found.append(int(entry.name))
    return found


def test_the_child_cuts_as_the_gateway_would_and_refuses_alike(
    chunking: Chunking, documents: DocumentProcess, tmp_path: Path
) -> None:
    text = " ".join(WORDS[n % 5] for n in range(200)) + ".\n\n" + " ".join(WORDS[::-1] * 9)
    chunks, tokens = documents.prepare(text.encode(), "text/plain", ExtractionLimits(), chunking)
    here = Chunker.from_model_dir(tmp_path, 16, 4).split(text)
    assert (chunks, tokens) == here and len(chunks) > 10
    assert children(), "it ran in a child process"
    with pytest.raises(PayloadTooLargeError) as refused:
        documents.prepare(many_pages_pdf(4), "application/pdf", ExtractionLimits(max_pages=3), chunking)
    assert (refused.value.status_code, refused.value.code, refused.value.param) == (413, "too_many_pages", "file")
    with pytest.raises(ServiceUnavailableError) as missing:
        documents.prepare(b"alpha", "text/plain", ExtractionLimits(), Chunking(tmp_path / "none", 16, 4))
    assert missing.value.code == "retrieval_unavailable" and "tokenizer" in missing.value.message


@pytest.mark.timeout(120)
def test_a_child_killed_under_a_document_fails_that_document_and_the_next_one_is_prepared(
    chunking: Chunking, documents: DocumentProcess
) -> None:
    documents.prepare(b"alpha beta", "text/plain", ExtractionLimits(), chunking)  # started
    (child,) = children()
    large = ("alpha beta gamma delta epsilon. " * 250_000).encode()  # 8 MB: seconds of chunking
    outcome: list[BaseException | None] = []

    def prepare_large() -> None:
        try:
            documents.prepare(large, "text/plain", ExtractionLimits(max_characters=10_000_000), chunking)
            outcome.append(None)
        except BaseException as exc:  # what the caller gets is the point
            outcome.append(exc)

    worker = threading.Thread(target=prepare_large)
    worker.start()
    time.sleep(1.0)  # under way in the child
    os.kill(child, signal.SIGKILL)
    worker.join(60)
    assert len(outcome) == 1 and isinstance(outcome[0], ServiceUnavailableError), outcome
    assert outcome[0].code == "retrieval_unavailable" and "nothing was stored" in outcome[0].message
    chunks, tokens = documents.prepare(b"gamma delta epsilon", "text/plain", ExtractionLimits(), chunking)
    assert tokens == 3 and [chunk.text for chunk in chunks] == ["gamma delta epsilon"]
    assert child not in children(), "a new process"
