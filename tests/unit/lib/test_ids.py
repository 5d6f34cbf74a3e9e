"""Request and trace ids: unique, unpredictable, and made without a system call each (``appliance.lib.ids``)."""

import multiprocessing
import os
import re

import pytest

from appliance.lib import ids
from appliance.lib.ids import unique_hex


def test_ids_are_unique_128_bit_hex_and_draw_randomness_once(monkeypatch: pytest.MonkeyPatch) -> None:
    unique_hex()  # the key drawn (if it was not already)
    draws = []
    real = os.urandom
    monkeypatch.setattr(ids.os, "urandom", lambda n: draws.append(n) or real(n))
    made = [unique_hex() for _ in range(20_000)]
    assert draws == []  # os.urandom gives the interpreter lock up: not once per request
    assert len(set(made)) == len(made)
    assert all(re.fullmatch(r"[0-9a-f]{32}", value) for value in made)
    # Not a visible counter: consecutive ids share no structure a client could count requests with.
    assert len({value[:8] for value in made[:1000]}) == 1000


def _child_ids(queue: "multiprocessing.Queue[list[str]]") -> None:
    queue.put([unique_hex() for _ in range(100)])


def test_a_forked_process_draws_a_key_of_its_own() -> None:
    parent = [unique_hex() for _ in range(100)]
    context = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[list[str]] = context.Queue()
    child = context.Process(target=_child_ids, args=(queue,))
    child.start()
    made = queue.get(timeout=30)
    child.join(30)
    after = [unique_hex() for _ in range(100)]
    assert not set(made) & set(parent + after)  # same counter position, other key
