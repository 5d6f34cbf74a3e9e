"""Tokenizing in a worker thread leaves the interpreter to the event loop (appliance.lib.tokens): the thread
that tokenizes a document lets the other threads run meanwhile, as ``Tokenizer.encode`` does not."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from appliance.lib.tokens import encode

WORDS = "valve turbine coolant sensor relay breaker transformer pump filter bearing rotor winding".split()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """A real `tokenizers` tokenizer (a normaliser, a pre-tokenizer, a word-level model)."""
    vocab = {word: index for index, word in enumerate(["[UNK]", "[CLS]", "[SEP]", *WORDS, ".", "!", ";", "'"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return tokenizer


def progress_beside(work: Callable[[], object], seconds: float = 1.0) -> int:
    """How many rounds of pure Python this thread makes while another thread runs ``work`` again and again."""
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            work()

    thread = threading.Thread(target=worker)
    thread.start()
    rounds, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        rounds += 1
    stop.set()
    thread.join()
    return rounds


def test_encode_gives_what_tokenizer_encode_gives(tokenizer: Tokenizer) -> None:
    text = "The pump's bearing failed. Replace it!\n\nThen check the ROTOR winding; log the result."
    for special in (False, True):
        mine, theirs = encode(tokenizer, text, special=special), tokenizer.encode(text, add_special_tokens=special)
        assert (mine.ids, mine.offsets) == (theirs.ids, theirs.offsets)
        assert (mine.ids[0] == tokenizer.token_to_id("[CLS]")) is special  # the special tokens follow the flag


def test_a_long_text_tokenized_in_a_thread_lets_the_other_threads_run(tokenizer: Tokenizer) -> None:
    text = " ".join(random.Random(7).choice(WORDS) for _ in range(30_000))  # ~200 KB, a segment of a document or more
    holding = progress_beside(lambda: tokenizer.encode(text, add_special_tokens=False))
    releasing = progress_beside(lambda: encode(tokenizer, text))
    # Holding the lock, the tokenizer leaves this thread a few milliseconds between texts; releasing it, this
    # thread runs as if alone (several times the rounds on this project's machines).
    assert releasing >= 2 * holding, (releasing, holding)
