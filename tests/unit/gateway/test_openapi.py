"""The published contract (/openapi.json): served without credentials and without any page, it describes the
/v1 and /admin routes with their bodies, and every error it documents is the envelope the app answers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import schemathesis
from litestar.testing import AsyncTestClient

from appliance.asgi import create_app
from appliance.gateway.shape import accepted_fields
from appliance.settings import REPO_ROOT, EngineRoute, GatewaySettings, Settings
from tests.support.fake_engine import FakeEngine
from tests.support.gateway import add_tenant
from tests.unit.gateway.test_app import user_token


@pytest.fixture
async def client(tmp_path: Path, fake_engine: FakeEngine) -> AsyncIterator[AsyncTestClient[Any]]:
    settings = Settings(
        data_dir=tmp_path, gateway=GatewaySettings(routes=[EngineRoute(model="fake", url=fake_engine.url)])
    )
    add_tenant(settings, "t1")
    async with AsyncTestClient(app=create_app(settings)) as test_client:
        test_client.headers["Authorization"] = f"Bearer {user_token(settings)}"
        yield test_client


async def contract(client: AsyncTestClient[Any]) -> dict[str, Any]:
    response = await client.get("/openapi.json", headers={"Authorization": ""})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/vnd.oai.openapi+json")
    document: dict[str, Any] = response.json()
    return document


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with the document's components, for jsonschema."""
    return {**schema, "components": document["components"]}


async def test_the_contract_describes_v1_and_admin_and_loads_in_schemathesis(client: AsyncTestClient[Any]) -> None:
    document = await contract(client)
    paths = document["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/v1/models/{model_id}"):
        assert path in paths
    assert "/admin/tenants" in paths and "/admin/budgets" in paths and "/admin/audit" in paths
    operations = list(schemathesis.openapi.from_dict(document).get_all_operations())
    assert len(operations) >= 60
    assert all(operation.ok() for operation in operations)


async def test_every_field_the_gateway_accepts_is_in_the_request_schema_and_no_other(
    client: AsyncTestClient[Any],
) -> None:
    document = await contract(client)
    schemas = document["components"]["schemas"]
    for path, name, kind in (
        ("/v1/chat/completions", "ChatCompletionRequest", "chat"),
        ("/v1/completions", "CompletionRequest", "completions"),
        ("/v1/embeddings", "EmbeddingRequest", "embeddings"),
        ("/v1/responses", "ResponsesRequest", "responses"),
        ("/v1/score", "ScoreRequest", "score"),
        ("/v1/rerank", "RerankRequest", "rerank"),
    ):
        body = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{name}"}
        assert set(schemas[name]["properties"]) == accepted_fields(kind)  # type: ignore[arg-type]
        assert schemas[name]["additionalProperties"] is False
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert {"$ref": "#/components/schemas/NamedToolChoice"} in chat["tool_choice"]["anyOf"]
    assert schemas["ResponseFormat"]["properties"]["type"]["enum"] == [
        "json_object",
        "json_schema",
        "structural_tag",
        "text",
    ]


async def test_errors_answered_match_the_documented_envelope(client: AsyncTestClient[Any]) -> None:
    document = await contract(client)
    answers = [
        ("/v1/chat/completions", "post", await client.post("/v1/chat/completions", json={"model": "fake"})),
        ("/v1/models/{model_id}", "get", await client.get("/v1/models/nope")),
        ("/admin/tenants", "get", await client.get("/admin/tenants")),  # a tenant user is not an admin
        ("/v1/models", "get", await client.get("/v1/models", headers={"Authorization": "Bearer sk-wrong"})),
        ("/admin/tenants", "post", await client.post("/admin/tenants", content=b"{", headers={"Authorization": ""})),
    ]
    for path, method, response in answers:
        assert response.status_code >= 400
        documented = document["paths"][path][method]["responses"][str(response.status_code)]
        schema = documented["content"]["application/json"]["schema"]
        jsonschema.validate(response.json(), resolve(document, schema))


async def test_no_page_is_served_beside_the_json(client: AsyncTestClient[Any]) -> None:
    for path in ("/openapi.json/swagger", "/openapi.json/redoc", "/openapi.json/scalar", "/schema", "/schema/swagger"):
        response = await client.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "unknown_route", "the app's own 404, not a page"


async def test_the_readme_api_table_names_every_route_of_the_contract(client: AsyncTestClient[Any]) -> None:
    """A route added to the app without its line in the README's API tables fails here."""
    document = await contract(client)
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("## Gateway API") : readme.index("## Execution budgets")]
    missing = []
    for path in document["paths"]:
        if path.startswith(("/oidc/", "/console/")):
            continue  # one line for each family
        last = path.rstrip("/").rsplit("/", 1)[-1]
        if last.startswith("{"):
            shown = path.rsplit("/", 1)[0].rsplit("/", 1)[-1] + "/{"
        elif "{" in path:
            shown = "/" + last  # `POST .../reset-password`
        else:
            shown = path
        if shown not in section:
            missing.append(path)
    assert not missing
