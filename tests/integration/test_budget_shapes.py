"""Budgets are an upper bound for every request shape the official SDK can send, against the real engine
(#15): both caps at once, ``n``, lists of prompts, token-id prompts, a field of another endpoint, no cap at all,
embedding batches, and a streamed ``n > 1`` answer the client leaves. Each asserts that what the engine
generated never exceeds a budget of the chain and that the budget records exactly what the ledger does."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from openai import BadRequestError, OpenAI, RateLimitError

from tests.integration.conftest import CHAT_MODEL, EMBED_MODEL, Appliance

pytestmark = pytest.mark.integration

STORY = "Tell me a long story about the sea and the ships on it."


@dataclass
class Tenant:
    appliance: Appliance
    ids: dict[str, str]
    admin: str

    @property
    def client(self) -> OpenAI:
        return OpenAI(base_url=self.appliance.gateway_url + "/v1", api_key=self.ids["key"], max_retries=0, timeout=300)

    def budget(self, scope: str, kind: str, limit: int, period: str = "day") -> str:
        body = {
            "scope_type": scope,
            "scope_id": self.ids[f"{scope}_id"],
            "kind": kind,
            "limit": limit,
            "period": period,
        }
        response = httpx.post(self.appliance.gateway_url + "/admin/budgets/", json=body, headers=self._auth)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def used(self, budget_id: str) -> tuple[int, int]:
        response = httpx.get(self.appliance.gateway_url + "/admin/budgets/", headers=self._auth)
        row = next(r for r in response.json()["data"] if r["id"] == budget_id)
        return int(row["used"]), int(row["reserved"])

    def settled(self, budget_id: str, timeout: float = 15.0) -> int:
        """What the budget used once nothing is reserved any more (a left stream settles off the hot path)."""
        deadline = time.monotonic() + timeout
        while True:
            used, reserved = self.used(budget_id)
            if reserved == 0 or time.monotonic() > deadline:
                assert reserved == 0, "a reservation was left"
                return used
            time.sleep(0.1)

    @property
    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin}"}


@pytest.fixture
def tenant(appliance: Appliance) -> Tenant:
    name = f"shapes-{uuid.uuid4().hex[:8]}"
    ids = json.loads(appliance.cli("admin", "create-key", "--tenant", name, "--workflow", "w", "--create").stdout)
    return Tenant(appliance, ids, appliance.cli("admin", "token", "--role", "admin").stdout.strip())


def messages(text: str = STORY) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_max_completion_tokens_beside_max_tokens_is_capped_by_a_per_request_budget(tenant: Tenant) -> None:
    tenant.budget("workflow", "max_tokens", 40, period="none")
    answer = tenant.client.chat.completions.create(
        model=CHAT_MODEL, messages=messages(), max_tokens=1, max_completion_tokens=300, extra_body={"ignore_eos": True}
    )
    assert answer.usage is not None and answer.usage.completion_tokens == 40  # not 300, not 1


def test_n_choices_stay_within_the_tenant_budget(tenant: Tenant) -> None:
    budget = tenant.budget("tenant", "tokens", 300)
    raw = tenant.client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=messages(), n=8, max_tokens=100, extra_body={"ignore_eos": True}
    )
    answer = raw.parse()
    assert answer.usage is not None and len(answer.choices) == 8
    cap = int(raw.headers["x-budget-max-tokens"])
    assert cap == (300 - answer.usage.prompt_tokens) // 8, "the prompt was counted exactly, every choice reserved"
    assert answer.usage.completion_tokens == 8 * cap and answer.usage.total_tokens <= 300
    assert tenant.settled(budget) == answer.usage.total_tokens


def test_a_list_of_prompts_is_counted_and_reserved_per_prompt(tenant: Tenant) -> None:
    budget = tenant.budget("tenant", "tokens", 300)
    prompts = [f"Story number {i}: once upon a time" for i in range(16)]
    raw = tenant.client.completions.with_raw_response.create(
        model=CHAT_MODEL, prompt=prompts, max_tokens=64, extra_body={"ignore_eos": True}
    )
    answer = raw.parse()
    assert answer.usage is not None and len(answer.choices) == 16
    cap = int(raw.headers["x-budget-max-tokens"])
    assert cap == (300 - answer.usage.prompt_tokens) // 16, "every prompt counted as the engine counts it"
    assert answer.usage.total_tokens <= 300 and tenant.settled(budget) == answer.usage.total_tokens


def test_token_id_prompts_and_n_are_reserved(tenant: Tenant) -> None:
    budget = tenant.budget("tenant", "tokens", 120)
    ids = [[1, 422, 3303, 314, 253, 1730], [1, 422, 3303]]
    answer = tenant.client.completions.create(
        model=CHAT_MODEL, prompt=ids, n=3, max_tokens=50, extra_body={"ignore_eos": True}
    )
    assert answer.usage is not None and answer.usage.prompt_tokens == 9
    assert answer.usage.completion_tokens == 6 * ((120 - 9) // 6)
    assert tenant.settled(budget) == answer.usage.total_tokens <= 120


def test_a_field_of_another_endpoint_is_refused_not_counted(tenant: Tenant) -> None:
    budget = tenant.budget("tenant", "tokens", 300)
    with pytest.raises(BadRequestError) as info:
        tenant.client.completions.create(
            model=CHAT_MODEL, prompt="word " * 900, max_tokens=5, extra_body={"messages": messages("hi")}
        )
    assert info.value.response.json()["error"]["param"] == "messages"
    assert tenant.used(budget) == (0, 0)


def test_a_request_without_a_cap_is_served_with_the_default(tenant: Tenant) -> None:
    tenant.budget("tenant", "tokens", 1_000_000)
    raw = tenant.client.chat.completions.with_raw_response.create(model=CHAT_MODEL, messages=messages("Say hi."))
    assert raw.http_response.status_code == 200 and "x-budget-max-tokens" not in raw.headers
    answer = raw.parse()
    assert answer.usage is not None and answer.usage.completion_tokens <= 1024


def test_a_cap_past_the_context_is_refused_by_the_gateway(tenant: Tenant) -> None:
    with pytest.raises(BadRequestError) as info:
        tenant.client.chat.completions.create(model=CHAT_MODEL, messages=messages(), max_completion_tokens=9000)
    error = info.value.response.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "max_completion_tokens")


def test_every_input_of_an_embedding_batch_is_counted(tenant: Tenant) -> None:
    inputs = ["the sea", "ships on the sea at night", "a lighthouse", "harbour"] * 4
    first = tenant.client.embeddings.create(model=EMBED_MODEL, input=inputs)
    exact = first.usage.prompt_tokens
    tight = tenant.budget("workflow", "tokens", 2 * exact - 1)
    tenant.client.embeddings.create(model=EMBED_MODEL, input=inputs)  # the first batch, on the budget now
    assert tenant.settled(tight) == exact
    with pytest.raises(RateLimitError):
        tenant.client.embeddings.create(model=EMBED_MODEL, input=inputs)  # exact - 1 left: not every input fits
    assert tenant.used(tight) == (exact, 0)


def test_a_streamed_n_answer_left_mid_way_is_charged_across_all_choices(tenant: Tenant, appliance: Appliance) -> None:
    budget = tenant.budget("tenant", "tokens", 5000)
    stream = tenant.client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=messages(), n=4, max_tokens=400, stream=True, extra_body={"ignore_eos": True}
    )
    request_id = stream.headers["x-request-id"]
    content_chunks = 0
    chunks: Any = stream.parse()
    for chunk in chunks:
        content_chunks += sum(1 for choice in chunk.choices if choice.delta.content)
        if content_chunks >= 40:
            break
    chunks.close()  # the client leaves; the gateway closes the engine's connection
    row = appliance.usage_row(request_id)
    assert row["client_disconnected"] and row["completion_tokens"] >= 40 - 4, "every choice's tokens are charged"
    assert row["completion_tokens"] < 4 * 400, "the engine stopped when the client left"
    assert tenant.settled(budget) == row["total_tokens"]
