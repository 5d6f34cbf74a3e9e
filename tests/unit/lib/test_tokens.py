"""Tokenizing in a worker thread leaves the interpreter to the event loop (appliance.lib.tokens): the thread
that tokenizes a document lets the other threads run meanwhile, as ``Tokenizer.encode`` does not."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors

from appliance.lib.tokens import PieceCounts, encode

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


SMOLLM = Path(__file__).resolve().parents[3] / "var" / "models" / "smollm2-135m-instruct"  # prepared by make setup
FRAGMENTS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|im_start",
    "im_end|>",
    "<",
    "|",
    ">",
    "system",
    "user",
    "assistant",
    "\n",
    " ",
    "  ",
    "\t",
    "hello",
    " world",
    "naïve",
    "東京",
    "🙂",
    "1234",
    "'s",
    "--",
    "\r\n",
]


@pytest.fixture(scope="module")
def smollm() -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(SMOLLM / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=12), max_size=30))
def test_a_text_counts_the_same_by_pieces_as_whole(smollm: Tokenizer, parts: list[str]) -> None:
    """The model's own tokenizer: any text, its added tokens anywhere (adjacent, at the ends, half-written),
    counts the same piece by piece, remembered or not, as tokenized whole."""
    pieces = PieceCounts.for_tokenizer(smollm)
    assert pieces is not None
    text = "".join(parts)
    whole = len(smollm.encode(text, add_special_tokens=False).ids)
    assert pieces.count(text, "t") == whole
    assert pieces.count(text, "t") == whole  # its pieces remembered now
    assert pieces.count(text, "t", in_thread=True) == whole


class _Spied(PieceCounts):
    """The real counts, and the texts actually tokenized (a spy)."""

    tokenized: list[str]

    def _whole(self, text: str, *, in_thread: bool) -> int:
        self.tokenized.append(text)
        return super()._whole(text, in_thread=in_thread)


def test_pieces_are_remembered_per_partition_within_their_memory_bound_and_never_as_text(smollm: Tokenizer) -> None:
    pieces = _Spied(smollm, max_entries=50)
    pieces.tokenized = []
    system = "You are the finance team's agent. " * 20
    first = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    second = first + "<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n"
    pieces.count(first, "acme")
    pieces.tokenized.clear()
    assert pieces.count(second, "acme") == len(smollm.encode(second, add_special_tokens=False).ids)
    assert pieces.tokenized == ["assistant\nhello", "user\nmore"], "only the new turn's pieces are tokenized"
    pieces.tokenized.clear()
    pieces.count(first, "globex")  # another tenant: nothing of acme's is reused (it cannot time acme's prompts)
    assert f"system\n{system}" in pieces.tokenized
    kept = list(pieces._known)  # what memory holds of the prompts: 16-byte digests, no text
    assert kept and all(isinstance(key, bytes) and len(key) == 16 for key in kept)
    assert not any(b"finance" in key for key in kept)
    pieces.count("<|im_end|>".join(str(n) for n in range(500)), "acme")  # many pieces: the oldest forgotten
    assert len(pieces._known) == 50
    pieces.tokenized.clear()
    pieces.count(first, "acme")
    assert f"system\n{system}" in pieces.tokenized, "forgotten, so counted again"


def test_only_tokenizers_whose_added_tokens_match_as_plain_text_count_by_pieces(tokenizer: Tokenizer) -> None:
    assert PieceCounts.for_tokenizer(tokenizer) is None, "no added tokens"
    for flag in ("lstrip", "rstrip", "single_word", "normalized"):
        stripping = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
        stripping.add_special_tokens([AddedToken("<s>", special=True, **{flag: True})])
        assert PieceCounts.for_tokenizer(stripping) is None, flag
    first = pre_tokenizers.Metaspace(prepend_scheme="first")  # marks a text's start only: pieces would differ
    for pre_tokenizer in (first, pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), first])):
        marking = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
        marking.pre_tokenizer = pre_tokenizer
        marking.add_special_tokens([AddedToken("<s>", special=True)])
        assert PieceCounts.for_tokenizer(marking) is None
    marking.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    assert PieceCounts.for_tokenizer(marking) is not None


class _Disagreeing(PieceCounts):
    """A fake tokenizer behaviour that no real one was seen to have: a text counts one more whole than by its
    pieces once ``drift`` is set (as a tokenizer that treats a text's first piece apart could)."""

    drift = False

    def _whole(self, text: str, *, in_thread: bool) -> int:
        extra = 1 if self.drift and "<|im_start|>" in text else 0
        return super()._whole(text, in_thread=in_thread) + extra


def test_counting_by_pieces_turns_itself_off_when_a_count_disagrees(smollm: Tokenizer) -> None:
    text = "<|im_start|>user\nhi<|im_end|>\n"
    whole = len(smollm.encode(text, add_special_tokens=False).ids)
    refused = _Disagreeing(smollm)
    refused.drift = True
    assert not refused.agrees([text]) and not refused.usable
    assert refused.count(text, "t") == whole + 1, "counted whole"
    checked = _Disagreeing(smollm, check_every=3)
    assert checked.agrees([text])
    checked.drift = True
    assert [checked.count(text, "t") for _ in range(3)] == [whole, whole, whole + 1]
    assert not checked.usable, "the periodic check found the disagreement"
