"""Tokenizing with a model's ``tokenizer.json`` (the ``tokenizers`` library) without stopping the event loop.

``Tokenizer.encode`` holds the interpreter's lock (the GIL) for as long as it works, so a long text tokenized in a
worker thread stops the event loop all the same: a 64 KB segment of a document being ingested took tens of
milliseconds, during which no other tenant's request moved (``bench/floods.py``, uploads). ``encode_batch``
releases the lock while it works and gives the same encoding, offsets included; one text is a batch of one.

:func:`encode` is for worker threads only: on the event loop itself, a short text is better tokenized holding the
lock, since a loop that releases it must then wait to take it back from whichever thread is running Python
meanwhile. :class:`PieceCounts` counts texts that repeat (chats) without tokenizing again what it has seen."""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
from collections import OrderedDict
from hashlib import blake2b

from tokenizers import Encoding, Tokenizer

log = logging.getLogger(__name__)


def encode(tokenizer: Tokenizer, text: str, *, special: bool = False) -> Encoding:
    """``tokenizer.encode(text, add_special_tokens=special)``, without holding the GIL while it tokenizes."""
    return tokenizer.encode_batch([text], add_special_tokens=special)[0]


def count_tokens(tokenizer: Tokenizer, text: str, *, in_thread: bool = False) -> int:
    """``text``'s tokens (no special tokens added): in a worker thread (``in_thread``) without holding the GIL, on
    the event loop holding it (see above)."""
    if in_thread:
        return len(encode(tokenizer, text).ids)
    return len(tokenizer.encode(text, add_special_tokens=False).ids)


class PieceCounts:
    """Token counts of texts that carry a model's added tokens (a rendered chat), counted piece by piece, each
    piece's count remembered.

    ``tokenizers`` cuts a text at its added tokens (``<|im_start|>``...) before anything else, and tokenizes each
    piece between them on its own: a text's count is the sum of its pieces' plus one per added token. A chat sent
    again with one more turn (each turn of a conversation, each step of an agent loop, with its long system prompt)
    then costs the new pieces only: a chat with a 2.4 KB system prompt took about 600 us of the event loop per
    request, and 8 us with its pieces remembered (digested: see below).

    Only for a tokenizer whose added tokens match as plain text (no ``lstrip``, ``rstrip``, ``single_word`` or
    ``normalized``) and that does not treat a text's first piece apart (a Metaspace ``prepend_scheme: first``
    marks only the text's start): :meth:`for_tokenizer` returns None for any other. A tokenizer could still count
    otherwise in a way not foreseen here, so :meth:`agrees` checks texts against their whole counts before use, and
    every ``check_every`` counts one is checked again: a disagreement turns the pieces off for good
    (:attr:`usable`).

    Pieces are remembered per ``partition`` (the tenant): whether a piece is known must not be something one tenant
    can time for another's prompts. What is remembered of a piece is a keyed 128-bit BLAKE2b digest of it and its
    partition (the key random per process), never its text: no prompt is kept in memory past its request, whatever
    its tenant's ``content_capture`` says. Memory: at most ``max_entries`` pieces, about 180 bytes each, the least
    recently used forgotten first."""

    def __init__(self, tokenizer: Tokenizer, *, max_entries: int = 50_000, check_every: int = 1024) -> None:
        contents = sorted({token.content for token in tokenizer.get_added_tokens_decoder().values()}, key=len)
        if not contents:
            raise ValueError("a tokenizer without added tokens has no pieces to count apart")
        # Longest first: the alternation then matches as ``tokenizers`` does (leftmost, longest).
        self._split = re.compile("|".join(re.escape(content) for content in reversed(contents))).split
        self._tokenizer = tokenizer
        self._max_entries, self._check_every = max_entries, check_every
        self._known: OrderedDict[bytes, int] = OrderedDict()  # digest of (partition, piece) -> its tokens
        self._digest = blake2b(digest_size=16, key=secrets.token_bytes(16))  # keyed: random per process
        self._counted = 0
        self._lock = threading.Lock()  # counts run on the event loop and in worker threads
        self.usable = True

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, **options: int) -> PieceCounts | None:
        added = tokenizer.get_added_tokens_decoder().values()
        if not added or any(t.lstrip or t.rstrip or t.single_word or t.normalized for t in added):
            return None
        if _marks_first_piece(json.loads(tokenizer.to_str()).get("pre_tokenizer")):
            return None
        return cls(tokenizer, **options)

    def agrees(self, texts: list[str]) -> bool:
        """Whether each text counts the same piece by piece as whole (else :attr:`usable` turns off)."""
        for text in texts:
            if self._pieces(text, "", in_thread=False) != self._whole(text, in_thread=False):
                self.usable = False
        return self.usable

    def count(self, text: str, partition: str, *, in_thread: bool = False) -> int:
        """``text``'s tokens (no special tokens added). ``in_thread``: encoded without holding the GIL."""
        if not self.usable:
            return self._whole(text, in_thread=in_thread)
        counted = self._pieces(text, partition, in_thread=in_thread)
        self._counted += 1
        if self._counted % self._check_every == 0 and counted != self._whole(text, in_thread=in_thread):
            self.usable = False  # never seen with a tokenizer that passed agrees(); counted whole from now on
            log.warning("a text counted %d tokens by pieces, otherwise whole: counted whole from now on", counted)
            return self._whole(text, in_thread=in_thread)
        return counted

    def _whole(self, text: str, *, in_thread: bool) -> int:
        return count_tokens(self._tokenizer, text, in_thread=in_thread)

    def _pieces(self, text: str, partition: str, *, in_thread: bool) -> int:
        pieces = self._split(text)
        total = len(pieces) - 1  # the added tokens between them
        tenant = self._digest.copy()  # the tenant, then the piece, digested
        tenant.update(partition.encode("utf-8", "surrogatepass") + b"\0")
        for piece in pieces:
            if not piece:
                continue
            digest = tenant.copy()
            digest.update(piece.encode("utf-8", "surrogatepass"))
            key = digest.digest()
            with self._lock:
                known = self._known.get(key)
                if known is not None:
                    self._known.move_to_end(key)
                    total += known
                    continue
            counted = self._whole(piece, in_thread=in_thread)
            total += counted
            self._remember(key, counted)
        return total

    def _remember(self, key: bytes, counted: int) -> None:
        with self._lock:
            if key in self._known:
                return
            self._known[key] = counted
            while len(self._known) > self._max_entries:
                self._known.popitem(last=False)


def _marks_first_piece(config: object) -> bool:
    """Whether a pre-tokenizer's configuration (``tokenizer.json``'s, nested in sequences) treats a text's first
    piece apart from the others (Metaspace with ``prepend_scheme: first``)."""
    if isinstance(config, list):
        return any(_marks_first_piece(item) for item in config)
    if isinstance(config, dict):
        if config.get("type") == "Metaspace" and config.get("prepend_scheme") == "first":
            return True
        return any(_marks_first_piece(value) for value in config.values())
    return False
