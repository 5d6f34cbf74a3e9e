"""Tokenizing with a model's ``tokenizer.json`` (the ``tokenizers`` library) without stopping the event loop.

``Tokenizer.encode`` holds the interpreter's lock (the GIL) for as long as it works, so a long text tokenized in a
worker thread stops the event loop all the same: a 64 KB segment of a document being ingested took tens of
milliseconds, during which no other tenant's request moved (``bench/floods.py``, uploads). ``encode_batch``
releases the lock while it works and gives the same encoding, offsets included; one text is a batch of one.

For worker threads only: on the event loop itself, a short text is better tokenized holding the lock, since a
loop that releases it must then wait to take it back from whichever thread is running Python meanwhile."""

from __future__ import annotations

from tokenizers import Encoding, Tokenizer


def encode(tokenizer: Tokenizer, text: str, *, special: bool = False) -> Encoding:
    """``tokenizer.encode(text, add_special_tokens=special)``, without holding the GIL while it tokenizes."""
    return tokenizer.encode_batch([text], add_special_tokens=special)[0]
