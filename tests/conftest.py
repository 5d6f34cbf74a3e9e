"""Fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.fake_engine import FakeEngine
from tests.support.postgres import PostgresServer


@pytest.fixture(scope="session")
def fake_engine() -> Iterator[FakeEngine]:
    """The fast OpenAI-shaped fake (tests/support/fake_engine.py), for failures vLLM cannot be made to
    produce and for tests of the gateway's own bookkeeping. One per test session."""
    engine = FakeEngine()
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server (Debian package), started once per test session on a port of its own."""
    server = PostgresServer().start()
    yield server
    server.stop()
