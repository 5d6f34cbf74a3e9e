"""Two gateway processes sharing PostgreSQL, for the fault tests of processes that die or stall."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fake_engine import FakeEngine
from tests.support.postgres import PostgresServer
from tests.support.processes import Gateway, cli, node_env


@pytest.fixture
def pair(tmp_path: Path, fake_engine: FakeEngine, postgres: PostgresServer) -> Iterator[list[Gateway]]:
    """Two `appliance serve` processes (one worker each) on a database of their own, in front of the fake engine;
    a silent process is taken for dead within seconds (defaults: 5 s heartbeats, 30 s, 15 s sweeps)."""
    env = node_env(
        tmp_path / "data",
        fake_engine.url,
        APPLIANCE_DATABASE__URL=postgres.create_database(f"pair_{uuid.uuid4().hex[:8]}"),
        APPLIANCE_BUDGETS__HEARTBEAT_INTERVAL_S="0.3",
        APPLIANCE_BUDGETS__GATEWAY_DEAD_AFTER_S="1.5",
        APPLIANCE_BUDGETS__SWEEP_INTERVAL_S="0.3",
        APPLIANCE_SERVER__LOG_LEVEL="warning",
    )
    cli(env, "admin", "token", "--role", "admin")  # the schema and the secrets, before the processes start
    gateways = [Gateway(env, tmp_path / f"gateway-{i}.log") for i in range(2)]
    try:
        for gateway in gateways:
            gateway.start()
        yield gateways
    finally:
        for gateway in gateways:
            gateway.kill()
