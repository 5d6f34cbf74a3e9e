"""Schemathesis against the published contract (/openapi.json), on a gateway of its own in front of the real
engines: a bounded number of generated requests per /v1 and /admin operation, as a tenant user and as a platform
admin, and no answer may be a 5xx or contradict the contract (status, media type, schema).

The gateway has its own data folder (its own database), so what the admin run creates or deletes touches no
other test; the tenant's token budget bounds what the engine is asked to generate."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.conftest import TEST_DATA_DIR, Appliance, gateway_env, run_cli, start_gateway, stop_gateway

pytestmark = pytest.mark.integration

PORT = 18095
EXAMPLES = 12  # per operation and role
TOKEN_BUDGET = 6000  # tokens a day for the tenant: what the engine may be asked for, over the whole run
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


class Contract:
    def __init__(self, url: str, headers: dict[str, dict[str, str]]) -> None:
        self.url = url
        self.headers = headers


@pytest.fixture(scope="module")
def contract_gateway(appliance: Appliance) -> Iterator[Contract]:
    data_dir = TEST_DATA_DIR / "contract"
    env = gateway_env(appliance, data_dir, APPLIANCE_SERVER__PORT=str(PORT), APPLIANCE_GATEWAY__DEFAULT_MAX_TOKENS="16")
    process = start_gateway(env, PORT, data_dir / "gateway.log")
    try:
        url = f"http://127.0.0.1:{PORT}"
        admin = cli(env, "admin", "token", "--role", "admin").strip()
        created = json.loads(cli(env, "admin", "create-key", "--tenant", "contract", "--workflow", "w", "--create"))
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=30) as http:
            budget = {"scope_type": "workflow", "scope_id": created["workflow_id"], "kind": "tokens", "period": "day"}
            answer = http.post("/admin/budgets/", json={**budget, "limit": TOKEN_BUDGET})
            assert answer.status_code == 201, answer.text
        yield Contract(
            url,
            {
                "tenant_user": {"Authorization": f"Bearer {created['key']}"},
                "platform_admin": {"Authorization": f"Bearer {admin}"},
            },
        )
    finally:
        stop_gateway(process)


def cli(env: dict[str, str], *args: str) -> str:
    result: subprocess.CompletedProcess[str] = run_cli(env, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def contract_schema(contract_gateway: Contract) -> Any:
    return schemathesis.openapi.from_url(contract_gateway.url + "/openapi.json").include(path_regex=r"^/(v1|admin)/")


schema = schemathesis.pytest.from_fixture("contract_schema")

_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)


@schema.parametrize()
@_SETTINGS
def test_contract_as_a_tenant_user(case: Any, contract_gateway: Contract) -> None:
    case.call_and_validate(headers=contract_gateway.headers["tenant_user"], checks=CHECKS, timeout=120)


@schema.parametrize()
@_SETTINGS
def test_contract_as_a_platform_admin(case: Any, contract_gateway: Contract) -> None:
    case.call_and_validate(headers=contract_gateway.headers["platform_admin"], checks=CHECKS, timeout=120)
