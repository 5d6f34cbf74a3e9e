"""What retrieval asks an embedding engine and reads of its answer.

Vectors are asked for as base64 of little-endian float32 (``encoding_format: base64``, what the OpenAI SDK asks
by default and vLLM answers; ``endianness: little``, vLLM's own field, whose default is the engine host's order):
a quarter of the bytes of JSON numbers, decoded in C rather than parsed number by number. Under an upload flood,
making the vectors of JSON numbers in Python (a ``float()`` per number, 12,288 per batch of 32) took a tenth of
the gateway's event loop, and decoding them as JSON numbers still some 4 %. An engine that answers with JSON
numbers all the same (it ignores the field) is read as well.
"""

from __future__ import annotations

import base64
import math
import sys
from array import array

import msgspec

from appliance.lib.errors import UpstreamError


class _Embedding(msgspec.Struct):
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None


class _Embeddings(msgspec.Struct):
    data: list[_Embedding]
    usage: _Usage | None = None


_decode = msgspec.json.Decoder(_Embeddings).decode
_encode = msgspec.json.Encoder().encode


def embeddings_request(model: str, texts: list[str]) -> bytes:
    """The body of an embeddings request for ``texts``."""
    return _encode({"model": model, "input": texts, "encoding_format": "base64", "endianness": "little"})


def embeddings_of(body: bytes, texts: int) -> tuple[list[list[float]], int]:
    """The vectors of an embedding engine's answer for ``texts`` inputs, in input order, and the prompt tokens it
    counted (0 when it did not say); UpstreamError when the answer is not that."""
    try:
        answer = _decode(body)
        vectors = [_floats(item.embedding) for item in sorted(answer.data, key=lambda item: item.index)]
    except (msgspec.DecodeError, ValueError) as exc:
        raise UpstreamError("The embedding engine answered with something that is not embeddings.") from exc
    if len(vectors) != texts:
        raise UpstreamError(f"The embedding engine returned {len(vectors)} embeddings for {texts} texts.")
    return vectors, (answer.usage.prompt_tokens if answer.usage else None) or 0


def _floats(embedding: list[float] | str) -> list[float]:
    if isinstance(embedding, list):
        return embedding
    raw = base64.b64decode(embedding, validate=True)  # binascii.Error is a ValueError
    if len(raw) % 4:
        raise ValueError(f"{len(raw)} bytes are not float32 numbers")
    numbers = array("f", raw)
    if sys.byteorder == "big":
        numbers.byteswap()
    vector = numbers.tolist()
    if not math.isfinite(math.fsum(vector)):  # JSON cannot carry NaN or infinity; float32 bytes can
        raise ValueError("an embedding holds a number that is not finite")
    return vector
