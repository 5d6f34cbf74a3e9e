"""Request and trace ids: unique, unpredictable, and not a read of the kernel's random source each
(``appliance.lib.ids``)."""

import multiprocessing
import os
import re
import threading

import pytest

from appliance.lib import ids
from appliance.lib.ids import _UniqueHex, unique_hex


def test_ids_are_unique_128_bit_hex_and_draw_randomness_once(monkeypatch: pytest.MonkeyPatch) -> None:
    unique_hex()  # the key drawn (if it was not already)
    here, draws = threading.get_ident(), []
    real = os.urandom

    def counted(size: int) -> bytes:
        if threading.get_ident() == here:  # another test's thread may draw too
            draws.append(size)
        return real(size)

    monkeypatch.setattr(ids.os, "urandom", counted)
    made = [unique_hex() for _ in range(20_000)]
    assert draws == []  # os.urandom gives the interpreter lock up: not once per request
    assert len(set(made)) == len(made)
    assert all(re.fullmatch(r"[0-9a-f]{32}", value) for value in made)


def test_ids_are_keyed_not_a_visible_counter() -> None:
    """Two generators at the same counter positions share nothing: what a client sees says neither how many
    requests the gateway served nor what the next id is."""
    first, second = _UniqueHex(), _UniqueHex()
    a, b = [first() for _ in range(1000)], [second() for _ in range(1000)]
    assert not set(a) & set(b)
    assert len({value[:16] for value in a}) == 1000


def _child_ids(queue: "multiprocessing.Queue[list[str]]") -> None:
    queue.put([unique_hex() for _ in range(100)])


def test_a_forked_process_draws_a_key_of_its_own() -> None:
    """Without it the child would go on from the parent's counter with the parent's key: the parent's next ids."""
    parent = [unique_hex() for _ in range(100)]
    context = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[list[str]] = context.Queue()
    child = context.Process(target=_child_ids, args=(queue,))
    child.start()
    made = queue.get(timeout=30)
    child.join(30)
    after = [unique_hex() for _ in range(100)]
    assert not set(made) & set(parent + after)
