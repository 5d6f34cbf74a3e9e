"""Token-aware chunking with overlap, with the embedding model's own tokenizer (its ``tokenizer.json``).

A chunk is a slice of the original text (the tokenizer's character offsets map tokens back), so what is
cited is exactly what the document said. Chunks end at a paragraph or sentence break when one falls in the
last part of the window, and neighbours share ``overlap`` tokens so a fact cut at a border is whole in one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from appliance.lib.errors import ServiceUnavailableError

_SENTENCE_ENDS = (".", "!", "?", ":", ";")
_BREAK_ZONE = 0.6  # a break is looked for after this share of the window


@dataclass(frozen=True, slots=True)
class Chunk:
    index: int
    text: str
    start: int  # character offsets in the document's text
    end: int
    tokens: int


class Chunker:
    def __init__(self, tokenizer: Tokenizer, size: int, overlap: int) -> None:
        if not 0 <= overlap < size:
            raise ValueError("overlap must be smaller than the chunk size")
        self._tokenizer = tokenizer
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.size, self.overlap = size, overlap

    @classmethod
    def from_model_dir(cls, model_dir: Path, size: int, overlap: int) -> Chunker:
        path = model_dir / "tokenizer.json"
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises plain Exception
            raise ServiceUnavailableError(
                f"The embedding model's tokenizer cannot be loaded from {path}: {exc}", code="retrieval_unavailable"
            ) from exc
        return cls(tokenizer, size, overlap)

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def split(self, text: str) -> tuple[list[Chunk], int]:
        """The text's chunks and its token count."""
        offsets = [span for span in self._tokenizer.encode(text, add_special_tokens=False).offsets if span[1] > span[0]]
        total = len(offsets)
        chunks: list[Chunk] = []
        start = 0
        while start < total:
            end = min(start + self.size, total)
            if end < total:
                end = self._break_before(text, offsets, start, end)
            first, last = offsets[start][0], offsets[end - 1][1]
            chunks.append(Chunk(len(chunks), text[first:last].strip(), first, last, end - start))
            if end >= total:
                break
            start = max(end - self.overlap, start + 1)
            while start < end and offsets[start - 1][1] == offsets[start][0]:  # begin at a word, not inside one
                start += 1
        return chunks, total

    @staticmethod
    def _break_before(text: str, offsets: list[tuple[int, int]], start: int, end: int) -> int:
        """The best end in (start + 60 % of the window, end]: after a paragraph, else after a sentence."""
        floor = start + max(1, int((end - start) * _BREAK_ZONE))
        sentence = None
        for cut in range(end, floor, -1):  # the chunk would be tokens [start, cut)
            gap = text[offsets[cut - 1][1] : offsets[cut][0]]
            if "\n" in gap:
                return cut
            if sentence is None and text[offsets[cut - 1][1] - 1] in _SENTENCE_ENDS and gap:
                sentence = cut
        return sentence or end
