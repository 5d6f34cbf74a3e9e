"""Fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.fake_engine import FakeEngine


@pytest.fixture(scope="session")
def fake_engine() -> Iterator[FakeEngine]:
    """The fast OpenAI-shaped fake (tests/support/fake_engine.py), for failures vLLM cannot be made to
    produce and for tests of the gateway's own bookkeeping. One per test session."""
    engine = FakeEngine()
    engine.start()
    yield engine
    engine.stop()
