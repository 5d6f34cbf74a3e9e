"""Schemathesis against the published contract (/openapi.json), on a gateway of its own in front of the real
engines: a bounded number of generated requests per /v1 and /admin operation, as a tenant user and as a platform
admin, and no answer may be a 5xx or contradict the contract (status, media type, schema).

The gateway has its own data folder (its own database), so what the admin run creates or deletes touches no
other test; the tenant's token budget bounds what the engine is asked to generate. CONTRACT_DETAIL=1 prints the
answers by operation, mode and status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.conftest import (
    CHAT_MODEL,
    EMBED_MODEL,
    TEST_DATA_DIR,
    Appliance,
    gateway_env,
    run_cli,
    start_gateway,
    stop_gateway,
)

pytestmark = pytest.mark.integration

PORT = 18095
EXAMPLES = 10  # valid and as many invalid requests per operation and role
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


_MODEL_OF = {
    "/v1/chat/completions": CHAT_MODEL,
    "/v1/completions": CHAT_MODEL,
    "/v1/rag/chat": CHAT_MODEL,
    "/v1/embeddings": EMBED_MODEL,
    "/v1/responses": CHAT_MODEL,
    "/v1/tokenize": CHAT_MODEL,
    "/v1/detokenize": CHAT_MODEL,
    "/v1/score": EMBED_MODEL,
    "/v1/rerank": EMBED_MODEL,
}


def served_model(case: Any) -> Any:
    """A generated body names a model the engines serve, so that valid requests reach the engine (a random name
    only ever meets the 404 of an unknown model)."""
    model = _MODEL_OF.get(case.operation.path)
    if model is not None and isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = model
    return case


def run(contract: Contract, role: str) -> list[str]:
    """Every /v1 and /admin operation, ``EXAMPLES`` valid and ``EXAMPLES`` invalid requests each (hypothesis,
    derandomized: the same requests on every run); the failures, one line each."""
    schema = schemathesis.openapi.from_url(contract.url + "/openapi.json").include(path_regex=r"^/(v1|admin)/")
    failures: list[str] = []
    statuses: Counter[int] = Counter()
    detail: Counter[tuple[str, str, str, int]] = Counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 50
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode).map(served_model))
            @_SETTINGS
            def check(case: Any) -> None:
                response = case.call_and_validate(headers=contract.headers[role], checks=CHECKS, timeout=120)
                statuses[response.status_code] += 1
                detail[(operation.method.upper(), operation.path, str(mode), response.status_code)] += 1

            try:
                check()
            except Exception as exc:  # each failure of each operation is reported, not only the first
                failures.append(f"{operation.method.upper()} {operation.path} ({mode}): {str(exc)[:1500]}")
    print(
        f"\n{role}: {len(operations)} operations, answers by status {dict(sorted(statuses.items()))}", file=sys.stderr
    )
    if os.environ.get("CONTRACT_DETAIL"):
        for key, count in sorted(detail.items()):
            print(role, *key, count, file=sys.stderr)
    return failures


_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate],  # no shrinking: the first failing request is reported as it is
)


def test_contract_as_a_tenant_user(contract_gateway: Contract) -> None:
    failures = run(contract_gateway, "tenant_user")
    assert not failures, "\n\n".join(failures)


def test_contract_as_a_platform_admin(contract_gateway: Contract) -> None:
    failures = run(contract_gateway, "platform_admin")
    assert not failures, "\n\n".join(failures)
