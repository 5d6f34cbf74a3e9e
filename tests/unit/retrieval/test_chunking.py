from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from appliance.lib.errors import ServiceUnavailableError
from appliance.retrieval.chunking import Chunker


def word_tokenizer(words: list[str]) -> Tokenizer:
    """A real `tokenizers` tokenizer with one token per word or punctuation mark."""
    vocab = {word: index for index, word in enumerate(["[UNK]", *sorted(set(words))])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    return tokenizer


def test_chunks_are_slices_of_the_text_with_overlap() -> None:
    text = " ".join(f"w{n}" for n in range(100))
    chunker = Chunker(word_tokenizer(text.split()), size=30, overlap=10)
    chunks, total = chunker.split(text)
    assert total == 100
    assert [c.tokens for c in chunks] == [30, 30, 30, 30, 20]
    assert all(text[c.start : c.end] == c.text for c in chunks)
    assert chunks[1].text.startswith("w20 ") and chunks[0].text.endswith(" w29"), "10 tokens shared"
    assert chunks[-1].text.endswith("w99")
    assert [c.index for c in chunks] == [0, 1, 2, 3, 4]


def test_a_chunk_ends_at_a_paragraph_or_sentence_when_one_is_near() -> None:
    sentence = " ".join(f"a{n}" for n in range(20)) + " ."
    text = sentence + " " + sentence.replace("a", "b") + "\n\n" + sentence.replace("a", "c")
    chunker = Chunker(word_tokenizer(text.split()), size=50, overlap=5)
    chunks, _total = chunker.split(text)
    assert chunks[0].text.endswith("b19 ."), "cut at the paragraph, not in the middle of the third sentence"
    size_only = Chunker(word_tokenizer(text.split()), size=30, overlap=0).split(text)[0]
    assert size_only[0].text.endswith("a19 ."), "else at the sentence end inside the window"


def test_every_token_is_in_some_chunk() -> None:
    text = "\n\n".join(" ".join(f"p{p}w{n}" for n in range(p % 7 + 3)) + "." for p in range(200))
    chunker = Chunker(word_tokenizer(text.replace(".", " .").split()), size=25, overlap=6)
    chunks, _total = chunker.split(text)
    covered = set()
    for chunk in chunks:
        covered.update(range(chunk.start, chunk.end))
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())


def test_overlap_must_be_below_the_size_and_a_missing_tokenizer_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Chunker(word_tokenizer(["a"]), size=10, overlap=10)
    with pytest.raises(ServiceUnavailableError, match="tokenizer"):
        Chunker.from_model_dir(tmp_path, 10, 2)


def test_a_long_text_is_chunked_in_segments_with_the_same_result() -> None:
    paragraphs = [" ".join(f"p{p}w{n}" + ("." if n % 9 == 8 else "") for n in range(37)) for p in range(60)]
    text = "\n\n".join(paragraphs)
    tokenizer = word_tokenizer(text.replace(".", " .").split())
    whole = Chunker(tokenizer, size=50, overlap=10).split(text)
    for segment in (120, 500, 3000):  # characters encoded at a time
        assert Chunker(tokenizer, size=50, overlap=10, segment_chars=segment).split(text) == whole


def test_chunking_memory_follows_the_chunks_not_the_tokens() -> None:
    import tracemalloc

    words = [f"w{n}" for n in range(1000)]
    text = "\n".join(" ".join(words[(line * 7) % 900 : (line * 7) % 900 + 80]) for line in range(6000))
    chunker = Chunker(word_tokenizer(words), size=200, overlap=40)
    tracemalloc.start()
    try:
        chunks, total = chunker.split(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == 6000 * 80
    output = sum(len(chunk.text) + 150 for chunk in chunks)  # the chunks' text and their objects
    # One tuple per token (480,000 of them, ~40 MB) is what this refuses; a segment's worth is allowed.
    assert peak < output + 8 * 1024 * 1024, (peak, output)
