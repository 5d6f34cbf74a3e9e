"""Token-aware chunking with overlap, with the embedding model's own tokenizer (its ``tokenizer.json``).

A chunk is a slice of the original text (the tokenizer's character offsets map tokens back), so what is
cited is exactly what the document said. Chunks end at a paragraph or sentence break when one falls in the
last part of the window, and neighbours share ``overlap`` tokens so a fact cut at a border is whole in one.

The text is tokenized a segment at a time (cut at a line break, else at a space), so the token offsets held
are those of one segment and the window, not of the whole document: memory follows the chunks made.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from appliance.lib.errors import ServiceUnavailableError
from appliance.lib.tokens import encode

_SENTENCE_ENDS = (".", "!", "?", ":", ";")
_BREAK_ZONE = 0.6  # a break is looked for after this share of the window
SEGMENT_CHARS = 64 * 1024  # text tokenized at a time


@dataclass(frozen=True, slots=True)
class Chunk:
    index: int
    text: str
    start: int  # character offsets in the document's text
    end: int
    tokens: int


class Chunker:
    def __init__(self, tokenizer: Tokenizer, size: int, overlap: int, segment_chars: int = SEGMENT_CHARS) -> None:
        if not 0 <= overlap < size:
            raise ValueError("overlap must be smaller than the chunk size")
        self._tokenizer = tokenizer
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.size, self.overlap = size, overlap
        self._segment = max(16, segment_chars)

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
        return len(encode(self._tokenizer, text).ids)

    def split(self, text: str) -> tuple[list[Chunk], int]:
        """The text's chunks and its token count."""
        segments = self._segments(text)
        offsets: list[tuple[int, int]] = []  # the tokens from ``base`` on that have been tokenized
        base = 0
        exhausted = False
        chunks: list[Chunk] = []
        start = 0
        while True:
            while not exhausted and base + len(offsets) <= start + self.size:  # the window and one token past it
                segment = next(segments, None)
                if segment is None:
                    exhausted = True
                else:
                    offsets.extend(segment)
            known = base + len(offsets)  # every token, once exhausted
            if start >= known:
                break
            end = min(start + self.size, known)
            if end < known:
                end = base + self._break_before(text, offsets, start - base, end - base)
            first, last = offsets[start - base][0], offsets[end - 1 - base][1]
            chunks.append(Chunk(len(chunks), text[first:last].strip(), first, last, end - start))
            if end >= known:
                break
            start = max(end - self.overlap, start + 1)
            while start < end and offsets[start - 1 - base][1] == offsets[start - base][0]:  # begin at a word
                start += 1
            del offsets[: start - 1 - base]  # keep one token before ``start`` (the check above reads it)
            base = start - 1
        return chunks, base + len(offsets)

    def _segments(self, text: str) -> Iterator[list[tuple[int, int]]]:
        """Token offsets in ``text``, one segment of about ``segment_chars`` characters at a time."""
        position, length = 0, len(text)
        while position < length:
            end = min(position + self._segment, length)
            if end < length:
                floor = position + self._segment // 2
                cut = text.rfind("\n", floor, end)
                if cut < 0:
                    cut = max(text.rfind(" ", floor, end), text.rfind("\t", floor, end))
                end = cut + 1 if cut >= 0 else end  # no space in half a segment: cut inside a word
            encoding = encode(self._tokenizer, text[position:end])  # the event loop goes on meanwhile
            yield [(a + position, b + position) for a, b in encoding.offsets if b > a]
            position = end

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
