"""An upload's extraction and chunking run in a child process (issue #21, uploads flood): the same chunks and the
same refusals as in the gateway's own process, and whatever happens to the child fails one document at most."""

from __future__ import annotations

import os
import pickle
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from appliance.lib.errors import PayloadTooLargeError, ServiceUnavailableError
from appliance.retrieval.chunking import Chunk, Chunker
from appliance.retrieval.documents import Chunking, DocumentProcess, outcome, read_answer
from appliance.retrieval.extract import ExtractionLimits
from tests.support.pdf import many_pages_pdf
from tests.unit.retrieval.test_chunking import word_tokenizer

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon"]
LARGE = ("alpha beta gamma delta epsilon. " * 250_000).encode()  # 8 MB: seconds of chunking
ROOMY = ExtractionLimits(max_characters=10_000_000)


@pytest.fixture
def chunking(tmp_path: Path) -> Chunking:
    word_tokenizer(WORDS).save(str(tmp_path / "tokenizer.json"))
    return Chunking(tmp_path, 16, 4)


@pytest.fixture
def documents() -> Iterator[DocumentProcess]:
    process = DocumentProcess()
    yield process
    process.close()


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs or holds files (a process being killed shows as a zombie a moment before its
    files are closed)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        files = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    return state != "Z" or bool(files)


def small(documents: DocumentProcess, chunking: Chunking) -> list[str]:
    chunks, _ = documents.prepare(b"gamma delta epsilon", "text/plain", ExtractionLimits(), chunking)
    return [chunk.text for chunk in chunks]


def started(documents: DocumentProcess, chunking: Chunking) -> int:
    """The child's pid, once it has prepared a document."""
    assert small(documents, chunking) == ["gamma delta epsilon"]
    assert documents.pid is not None
    return documents.pid


def in_thread(work: Callable[[], object]) -> tuple[threading.Thread, list[BaseException | None]]:
    """``work`` under way in a thread; the list gets what it raised (None when it returned)."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            work()
            outcome.append(None)
        except BaseException as exc:  # what the caller gets is the point
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_the_child_cuts_as_the_gateway_would_and_refuses_alike(
    chunking: Chunking, documents: DocumentProcess, tmp_path: Path
) -> None:
    text = " ".join(WORDS[n % 5] for n in range(200)) + ".\n\n" + " ".join(WORDS[::-1] * 9)
    chunks, tokens = documents.prepare(text.encode(), "text/plain", ExtractionLimits(), chunking)
    here = Chunker.from_model_dir(tmp_path, 16, 4).split(text)
    assert (chunks, tokens) == here and len(chunks) > 10
    assert documents.pid is not None and documents.pid != os.getpid()
    with pytest.raises(PayloadTooLargeError) as refused:
        documents.prepare(many_pages_pdf(4), "application/pdf", ExtractionLimits(max_pages=3), chunking)
    assert (refused.value.status_code, refused.value.code, refused.value.param) == (413, "too_many_pages", "file")
    with pytest.raises(ServiceUnavailableError) as missing:
        documents.prepare(b"alpha", "text/plain", ExtractionLimits(), Chunking(tmp_path / "none", 16, 4))
    assert missing.value.code == "retrieval_unavailable" and "tokenizer" in missing.value.message
    child = documents.pid
    assert small(documents, chunking) == ["gamma delta epsilon"] and documents.pid == child, "refusals keep it"


@pytest.mark.timeout(120)
def test_a_child_killed_under_a_document_fails_that_document_and_the_next_one_is_prepared(
    chunking: Chunking, documents: DocumentProcess
) -> None:
    child = started(documents, chunking)
    worker, outcome = in_thread(lambda: documents.prepare(LARGE, "text/plain", ROOMY, chunking))
    time.sleep(1.0)  # under way in the child
    os.kill(child, signal.SIGKILL)
    worker.join(60)
    assert len(outcome) == 1 and isinstance(outcome[0], ServiceUnavailableError), outcome
    assert outcome[0].code == "retrieval_unavailable" and "nothing was stored" in outcome[0].message
    assert outcome[0].headers == {"Retry-After": "5"}
    assert small(documents, chunking) == ["gamma delta epsilon"]
    assert documents.pid not in (None, child), "a new process"


def test_a_child_that_died_idle_is_replaced_without_failing_the_next_document(
    chunking: Chunking, documents: DocumentProcess
) -> None:
    child = started(documents, chunking)
    os.kill(child, signal.SIGKILL)
    exited = os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT)  # dead, not reaped: its status is to be read
    assert exited is not None and exited.si_status == signal.SIGKILL
    assert small(documents, chunking) == ["gamma delta epsilon"], "an innocent document is not failed"
    assert documents.pid not in (None, child)


@pytest.mark.timeout(120)
def test_a_child_that_takes_no_job_is_replaced_and_the_document_prepared(chunking: Chunking) -> None:
    """A stopped (or hung) idle child does not read its next job: a job larger than the pipe would wait on it
    forever, and every later upload of the gateway worker behind it."""
    documents = DocumentProcess(send_timeout_s=2.0)  # (a new child under load still reads within it)
    try:
        child = started(documents, chunking)
        os.kill(child, signal.SIGSTOP)
        text = b"alpha beta gamma. " * 150_000  # 2.7 MB: more than its pipe holds (1 MiB)
        result: list[object] = []
        worker = threading.Thread(
            target=lambda: result.append(documents.prepare(text, "text/plain", ROOMY, chunking)), daemon=True
        )
        worker.start()
        worker.join(30)
        assert not worker.is_alive(), "the upload waits on a child that takes no job"
        chunks, _ = result[0]  # type: ignore[misc]
        assert "".join(chunk.text for chunk in chunks).startswith("alpha beta gamma.")
        assert documents.pid not in (None, child)
        assert not alive(child), "the stopped child is killed"
    finally:
        documents.close()


@pytest.mark.timeout(120)
def test_a_document_past_its_time_is_refused_and_its_child_killed(chunking: Chunking) -> None:
    documents = DocumentProcess(timeout_s=0.5)
    try:
        small(documents, chunking)  # started, so that the time is the document's
        child = documents.pid
        assert child is not None
        started = time.monotonic()
        with pytest.raises(PayloadTooLargeError) as refused:
            documents.prepare(LARGE, "text/plain", ROOMY, chunking)
        assert time.monotonic() - started < 5
        assert (refused.value.status_code, refused.value.code, refused.value.param) == (
            413,
            "extraction_timeout",
            "file",
        )
        assert not alive(child), "killed, not left working"
        assert small(documents, chunking) == ["gamma delta epsilon"]
    finally:
        documents.close()


def test_children_are_replaced_after_their_share_of_documents(chunking: Chunking) -> None:
    documents = DocumentProcess(tasks_per_process=2)
    try:
        pids = []
        for _ in range(5):
            small(documents, chunking)
            pids.append(documents.pid)
        first, gone, second, gone_too, third = pids
        assert gone is None and gone_too is None, "stopped after its second document"
        assert None not in (first, second, third) and len({first, second, third}) == 3, pids
        assert not alive(first) and not alive(second)  # type: ignore[arg-type]
    finally:
        documents.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("busy", [False, True], ids=["idle", "mid-document"])
def test_the_child_does_not_outlive_a_gateway_killed_with_sigkill(chunking: Chunking, busy: bool) -> None:
    """A gateway worker killed (kill -9, the OOM killer) leaves no child behind: an idle child ends at its jobs'
    EOF; a busy one reads no EOF until its document is done, so it watches for its gateway's death itself."""
    tokenizer = str(chunking.tokenizer_dir)
    script = (
        "import sys, threading\n"
        "from pathlib import Path\n"
        "from appliance.retrieval.documents import Chunking, DocumentProcess\n"
        "from appliance.retrieval.extract import ExtractionLimits\n"
        "documents = DocumentProcess()\n"
        f"chunking = Chunking(Path({tokenizer!r}), 16, 4)\n"
        "documents.prepare(b'alpha beta', 'text/plain', ExtractionLimits(), chunking)\n"
    )
    if busy:  # about 10 s of chunking here: past the 6 s it is given below
        script += (
            "large = b'alpha beta gamma delta epsilon. ' * 1_000_000\n"
            "limits = ExtractionLimits(max_characters=40_000_000)\n"
            "threading.Thread(target=documents.prepare, args=(large, 'text/plain', limits, chunking)).start()\n"
        )
    script += "print(documents.pid, flush=True)\nsys.stdin.read()\n"
    gateway = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert gateway.stdout is not None
        child = int(gateway.stdout.readline())
        if busy:
            time.sleep(1.0)  # the large document under way
        assert alive(child)
        gateway.kill()
        gateway.wait()
        deadline = time.monotonic() + 6  # it looks 4 times a second; a busy one's heap then takes a while to go
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child), "the child ended with its gateway"
    finally:
        gateway.kill()


def test_descriptors_past_1023_do_not_put_the_child_out_of_step(chunking: Chunking) -> None:
    """A busy gateway worker has thousands of descriptors (LimitNOFILE 65536): select() refuses those past 1023,
    which once left an answer unread for the next document to take."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"this machine allows {hard} descriptors")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    documents = DocumentProcess()
    try:
        assert small(documents, chunking) == ["gamma delta epsilon"]
        chunks, _ = documents.prepare(b"alpha beta", "text/plain", ExtractionLimits(), chunking)
        assert [chunk.text for chunk in chunks] == ["alpha beta"], "each document gets its own answer"
    finally:
        documents.close()
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.timeout(120)
def test_close_fails_the_document_under_way_and_leaves_no_child(chunking: Chunking) -> None:
    documents = DocumentProcess()
    child = started(documents, chunking)
    worker, outcome = in_thread(lambda: documents.prepare(LARGE, "text/plain", ROOMY, chunking))
    time.sleep(0.5)
    documents.close()
    worker.join(60)
    assert len(outcome) == 1 and isinstance(outcome[0], ServiceUnavailableError), outcome
    assert not alive(child) and documents.pid is None
    with pytest.raises(ServiceUnavailableError, match="shutting down"):
        small(documents, chunking)


def test_a_child_that_cannot_start_is_a_clear_503(chunking: Chunking, monkeypatch: pytest.MonkeyPatch) -> None:
    documents = DocumentProcess(start_timeout_s=10)
    try:
        monkeypatch.setattr(sys, "executable", "/bin/false")  # starts, and ends before it is ready
        with pytest.raises(ServiceUnavailableError, match="did not start") as refused:
            small(documents, chunking)
        assert refused.value.headers == {"Retry-After": "5"}
        monkeypatch.setattr(sys, "executable", "/nonexistent/python")  # cannot be started at all
        with pytest.raises(ServiceUnavailableError, match="cannot be started"):
            small(documents, chunking)
        monkeypatch.undo()
        assert small(documents, chunking) == ["gamma delta epsilon"], "a working interpreter: it starts"
    finally:
        documents.close()


def test_the_gateway_takes_only_chunks_and_its_own_refusals_from_the_child() -> None:
    """The child parses hostile documents: what it answers is plain data, checked, never code or objects."""
    encode = msgspec.msgpack.encode
    assert outcome(read_answer(encode({"chunks": [[0, "alpha", 0, 5, 1]], "tokens": 1}))) == (
        [Chunk(0, "alpha", 0, 5, 1)],
        1,
    )
    refusal = {"kind": "PayloadTooLargeError", "message": "too big", "param": "file", "code": "too_many_pages"}
    with pytest.raises(PayloadTooLargeError) as refused:
        outcome(read_answer(encode({"refusal": refusal})))
    assert (refused.value.status_code, refused.value.code, refused.value.param) == (413, "too_many_pages", "file")
    for forged in (
        pickle.dumps(("ok", os.system, 0)),  # what a pickle-speaking child could have sent
        encode({"refusal": {**refusal, "kind": "SystemExit"}}),
        encode({"refusal": {**refusal, "kind": "ModelNotFoundError"}}),  # an error, but not a document's
        encode({"chunks": [[1, "alpha", 0, 5, 1]], "tokens": 1}),  # not a document's chunks in order
        encode({"chunks": [], "tokens": -5}),
        encode({"chunks": [[0, 5, 0, 5, 1]]}),
    ):
        with pytest.raises(ServiceUnavailableError) as unavailable:
            read_answer(forged)
        assert unavailable.value.code == "retrieval_unavailable"
