"""Retrieval against the real embedding engine and Qdrant local mode: a corpus in which each question's answer
is in exactly one document, ingested as text, Markdown, HTML and PDF; ranking, grounded chat with citations,
tenant isolation, idempotence, deletion, the cache, bad input, and a failure part-way through ingestion."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.conftest import CHAT_MODEL, Appliance
from tests.support.pdf import text_pdf

pytestmark = pytest.mark.integration
RUN = uuid.uuid4().hex[:6]  # names of this run (a developer's reused appliance keeps earlier runs' data)

FILLER = (
    "Visitors often ask about opening hours, parking and the history of the place. "
    "The local council publishes a newsletter every season with notices for residents."
)

CORPUS: dict[str, tuple[str, bytes, str]] = {
    # name: (content type, bytes, the question only this document answers)
    "orchard.txt": (
        "text/plain",
        (
            "Pellworth Orchard\n\nThe Pellworth orchard harvests its Winter Russet apples in the third week of "
            f"October, when the fruit has turned golden brown. The orchard has 412 trees.\n\n{FILLER}"
        ).encode(),
        "When are the Winter Russet apples harvested at the Pellworth orchard?",
    ),
    "ferry.md": (
        "text/markdown",
        (
            "# Kestrel Island ferry\n\nThe ferry to **Kestrel Island** leaves the harbour at 07:15 and at 16:40 every "
            f"weekday. Bicycles travel free of charge on the car deck.\n\n- {FILLER}"
        ).encode(),
        "What time does the ferry to Kestrel Island leave the harbour?",
    ),
    "observatory.html": (
        "text/html",
        (
            "<html><head><title>Marrow Hill Observatory</title><script>var tracking = 'never shown';</script>"
            "<style>p { color: red }</style></head><body><h1>The telescope</h1><p>The main telescope of the Marrow "
            "Hill Observatory has a mirror 1.2 metres across, ground by hand in 1961.</p>"
            f"<p>{FILLER}</p></body></html>"
        ).encode(),
        "How wide is the mirror of the Marrow Hill Observatory telescope?",
    ),
    "bakery.pdf": (
        "application/pdf",
        text_pdf(
            [
                "Brindle Street Bakery",
                "The Brindle Street bakery bakes its rye sourdough bread with a starter",
                "that is 87 years old, fed every morning with stone-ground rye flour.",
                FILLER[:80],
            ]
        ),
        "How old is the sourdough starter used by the Brindle Street bakery?",
    ),
    "choir.txt": (
        "text/plain",
        (
            "Ashgrove Community Choir\n\nThe Ashgrove community choir rehearses every Thursday evening in the reading "
            f"room of the old public library on Mill Lane. New singers are welcome.\n\n{FILLER}"
        ).encode(),
        "Where does the Ashgrove community choir rehearse?",
    ),
    "glacier.md": (
        "text/markdown",
        (
            "## Tarn glacier survey\n\nThe Tarn glacier retreated 38 metres during 2024, according to the mountain "
            f"survey team that measures its snout each September.\n\n{FILLER}"
        ).encode(),
        "How far did the Tarn glacier retreat in 2024?",
    ),
}


def _key(appliance: Appliance, tenant: str, workflow: str = "rag") -> dict[str, Any]:
    out = appliance.cli("admin", "create-key", "--tenant", tenant, "--workflow", workflow, "--create")
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def _http(appliance: Appliance, key: str) -> httpx.Client:
    return httpx.Client(base_url=appliance.gateway_url, headers={"Authorization": f"Bearer {key}"}, timeout=300)


def _upload(http: httpx.Client, collection_id: str, name: str, content_type: str, raw: bytes) -> httpx.Response:
    return http.post(
        f"/v1/rag/collections/{collection_id}/documents",
        params={"name": name},
        content=raw,
        headers={"Content-Type": content_type},
    )


@pytest.fixture(scope="module")
def tenant_a(appliance: Appliance) -> Iterator[tuple[httpx.Client, str, dict[str, str]]]:
    """Tenant A's client, its corpus collection and the document id of every file in it."""
    with _http(appliance, appliance.api_key) as http:
        response = http.post("/v1/rag/collections", json={"name": f"corpus-{RUN}", "description": "one fact per file"})
        assert response.status_code == 201, response.text
        collection = response.json()["id"]
        documents = {}
        for index, (name, (content_type, raw, _question)) in enumerate(CORPUS.items()):
            if index % 2:  # half as raw bodies, half as multipart uploads
                response = _upload(http, collection, name, content_type, raw)
            else:
                response = http.post(
                    f"/v1/rag/collections/{collection}/documents", files={"file": (name, raw, content_type)}
                )
            assert response.status_code == 201, response.text
            assert response.json()["status"] == "ready"
            documents[name] = response.json()["id"]
        yield http, collection, documents


def test_each_question_ranks_its_document_first(tenant_a: tuple[httpx.Client, str, dict[str, str]]) -> None:
    http, collection, documents = tenant_a
    for name, (_type, _raw, question) in CORPUS.items():
        response = http.post("/v1/rag/query", json={"collection_id": collection, "query": question, "top_k": 3})
        assert response.status_code == 200, response.text
        hits = response.json()["data"]
        assert hits[0]["document_id"] == documents[name], (question, [h["document_name"] for h in hits])
        assert hits[0]["score"] > hits[1]["score"]
    html = http.post("/v1/rag/query", json={"collection_id": collection, "query": CORPUS["observatory.html"][2]})
    top = html.json()["data"][0]["text"]
    assert "1.2 metres" in top and "tracking" not in top and "color" not in top, "scripts and styles are not text"


def test_grounded_chat_cites_the_document_and_records_what_retrieval_cost(
    appliance: Appliance, tenant_a: tuple[httpx.Client, str, dict[str, str]]
) -> None:
    http, collection, documents = tenant_a
    question = CORPUS["ferry.md"][2]
    response = http.post(
        "/v1/rag/chat",
        json={
            "model": CHAT_MODEL,
            "collection_id": collection,
            "top_k": 2,
            "max_tokens": 24,
            "messages": [{"role": "user", "content": question}],
        },
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["choices"][0]["message"]["content"]
    assert answer["citations"][0]["document_id"] == documents["ferry.md"]
    assert answer["citations"][0]["index"] == 1 and "07:15" in answer["citations"][0]["text"]
    retrieval = answer["retrieval"]
    assert retrieval["chunks_injected"] == 2 and retrieval["injected_tokens"] > 0

    row = appliance.usage_row(response.headers["x-request-id"])
    assert row["endpoint"] == "/v1/rag/chat" and row["status_code"] == 200
    assert row["chunks_injected"] == 2 and row["injected_tokens"] == retrieval["injected_tokens"]
    assert row["embed_ms"] > 0 and row["search_ms"] > 0
    assert row["prompt_tokens"] > row["injected_tokens"], "the injected tokens are charged as prompt tokens"
    embedding = appliance.usage_row(response.headers["x-request-id"] + ".q")
    assert embedding["endpoint"] == "/v1/rag/query" and embedding["prompt_tokens"] > 0


def test_grounded_chat_streams_its_citations_first(tenant_a: tuple[httpx.Client, str, dict[str, str]]) -> None:
    http, collection, documents = tenant_a
    body = {
        "model": CHAT_MODEL,
        "collection_id": collection,
        "stream": True,
        "max_tokens": 16,
        "messages": [{"role": "user", "content": CORPUS["glacier.md"][2]}],
    }
    events = []
    with http.stream("POST", "/v1/rag/chat", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    assert events[0]["citations"][0]["document_id"] == documents["glacier.md"]
    text = "".join(choice["delta"].get("content") or "" for event in events[1:] for choice in event["choices"])
    assert text


def test_repeated_query_is_cached_until_the_collection_changes(
    tenant_a: tuple[httpx.Client, str, dict[str, str]],
) -> None:
    http, collection, _documents = tenant_a
    query = {"collection_id": collection, "query": "Which bread does the bakery make?", "top_k": 2}
    first = http.post("/v1/rag/query", json=query).json()
    second = http.post("/v1/rag/query", json=query).json()
    assert second["usage"]["cached"] is True and second["data"] == first["data"]
    added = _upload(http, collection, "extra.txt", "text/plain", b"The bakery also makes a seeded spelt loaf.")
    assert added.status_code == 201
    third = http.post("/v1/rag/query", json=query).json()
    assert third["usage"]["cached"] is False
    assert http.delete(f"/v1/rag/collections/{collection}/documents/{added.json()['id']}").status_code == 204
    assert http.post("/v1/rag/query", json=query).json()["usage"]["cached"] is False


def test_idempotent_ingestion_and_deletion_keep_the_point_count_exact(appliance: Appliance) -> None:
    key = _key(appliance, f"rag-counts-{RUN}")
    with _http(appliance, key["key"]) as http:
        collection = http.post("/v1/rag/collections", json={"name": "counts"}).json()["id"]
        long_text = "\n\n".join(f"Paragraph {n}: the lantern number {n} is painted {n * 7} shades." for n in range(300))
        first = _upload(http, collection, "long.txt", "text/plain", long_text.encode())
        assert first.status_code == 201, first.text
        chunks = first.json()["chunks"]
        assert chunks > 1 and first.json()["chunks_done"] == chunks
        again = _upload(http, collection, "same-bytes.txt", "text/plain", long_text.encode())
        assert again.status_code == 200 and again.json()["created"] is False
        assert again.json()["id"] == first.json()["id"]
        short = _upload(http, collection, "short.txt", "text/plain", b"A single short note.")
        view = http.get(f"/v1/rag/collections/{collection}").json()
        assert (view["documents"], view["chunks"], view["points"]) == (2, chunks + 1, chunks + 1)
        assert http.delete(f"/v1/rag/collections/{collection}/documents/{first.json()['id']}").status_code == 204
        view = http.get(f"/v1/rag/collections/{collection}").json()
        assert (view["documents"], view["chunks"], view["points"]) == (1, 1, 1)
        assert http.delete(f"/v1/rag/collections/{collection}/documents/{short.json()['id']}").status_code == 204
        assert http.get(f"/v1/rag/collections/{collection}").json()["points"] == 0
        assert http.delete(f"/v1/rag/collections/{collection}").status_code == 204
        assert http.get(f"/v1/rag/collections/{collection}").status_code == 404


def test_another_tenant_cannot_reach_the_collection(
    appliance: Appliance, tenant_a: tuple[httpx.Client, str, dict[str, str]]
) -> None:
    _http_a, collection, documents = tenant_a
    other = _key(appliance, f"rag-other-{RUN}")
    with _http(appliance, other["key"]) as http:
        own = http.post("/v1/rag/collections", json={"name": f"corpus-{RUN}"})  # the same name, another tenant: fine
        assert own.status_code == 201
        assert _upload(http, own.json()["id"], "note.txt", "text/plain", b"Tenant B keeps notes on tides.").is_success
        listed = [c["id"] for c in http.get("/v1/rag/collections").json()["data"]]
        assert listed == [own.json()["id"]]
        for method, path, body in (
            ("GET", f"/v1/rag/collections/{collection}", None),
            ("GET", f"/v1/rag/collections/{collection}/documents", None),
            ("GET", f"/v1/rag/collections/{collection}/documents/{documents['ferry.md']}", None),
            ("DELETE", f"/v1/rag/collections/{collection}/documents/{documents['ferry.md']}", None),
            ("DELETE", f"/v1/rag/collections/{collection}", None),
            ("POST", "/v1/rag/query", {"collection_id": collection, "query": "Kestrel Island ferry"}),
            (
                "POST",
                "/v1/rag/chat",
                {"model": CHAT_MODEL, "collection_id": collection, "messages": [{"role": "user", "content": "ferry"}]},
            ),
        ):
            response = http.request(method, path, json=body)
            assert response.status_code == 404, (method, path, response.text)
            assert response.json()["error"]["param"] == "collection_id"
        response = http.post(
            f"/v1/rag/collections/{collection}/documents", content=b"planted", headers={"Content-Type": "text/plain"}
        )
        assert response.status_code == 404
        found = http.post("/v1/rag/query", json={"collection_id": own.json()["id"], "query": CORPUS["ferry.md"][2]})
        assert all(hit["document_id"] not in documents.values() for hit in found.json()["data"])
        assert "Kestrel" not in found.text
    http_a = tenant_a[0]
    assert http_a.get(f"/v1/rag/collections/{collection}").json()["documents"] == len(CORPUS)


def test_bad_input_gets_clear_errors_and_leaves_nothing(
    appliance: Appliance, tenant_a: tuple[httpx.Client, str, dict[str, str]]
) -> None:
    http, collection, _documents = tenant_a
    before = http.get(f"/v1/rag/collections/{collection}").json()
    cases = [
        (_upload(http, collection, "x.docx", "application/msword", b"binary"), 415, "unsupported_media_type"),
        (_upload(http, collection, "empty.txt", "text/plain", b""), 400, "empty_document"),
        (_upload(http, collection, "blank.html", "text/html", b"<html><script>x()</script></html>"), 400, None),
        (_upload(http, collection, "bad.pdf", "application/pdf", b"%PDF-1.4 not really"), 400, "invalid_document"),
        (_upload(http, collection, "latin.txt", "text/plain", "caf\xe9".encode("latin-1")), 400, "invalid_encoding"),
        (_upload(http, collection, "big.txt", "text/plain", b"a" * (17 * 1024 * 1024)), 413, "request_too_large"),
        (_upload(http, "col_nosuchthing", "a.txt", "text/plain", b"text"), 404, None),
        (http.post("/v1/rag/query", json={"collection_id": collection, "query": "   "}), 400, None),
        (http.post("/v1/rag/query", json={"collection_id": collection, "query": "x", "top_k": 0}), 400, None),
        (http.post("/v1/rag/query", json={"collection_id": "col_nosuchthing", "query": "x"}), 404, None),
        (
            http.post("/v1/rag/chat", json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": "x"}]}),
            400,
            None,
        ),  # no collection named
        (http.post("/v1/rag/collections", json={"name": f"corpus-{RUN}"}), 409, None),
        (http.post("/v1/rag/collections", json={"name": ""}), 400, None),
    ]
    for response, status, code in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["message"]
        if code is not None:
            assert error["code"] == code, error
    after = http.get(f"/v1/rag/collections/{collection}").json()
    assert (after["documents"], after["chunks"], after["points"]) == (
        before["documents"],
        before["chunks"],
        before["points"],
    )


def test_a_failure_part_way_leaves_no_orphan_points(appliance: Appliance) -> None:
    """The tenant's token budget runs out after the first batch of embeddings: the upload is refused and the
    points already written are removed."""
    key = _key(appliance, f"rag-budget-{RUN}")
    admin = appliance.cli("admin", "token", "--role", "admin").stdout.strip()
    with _http(appliance, admin) as http:
        budget = {"scope_type": "tenant", "scope_id": key["tenant_id"], "kind": "tokens", "limit": 8000}
        assert http.post("/admin/budgets/", json=budget).status_code == 201
    with _http(appliance, key["key"]) as http:
        collection = http.post("/v1/rag/collections", json={"name": "budgeted"}).json()["id"]
        entries = (f"Entry {n}: the weather station {n} logged {n * 3} millimetres of rain." for n in range(600))
        text = "\n\n".join(entries)
        response = _upload(http, collection, "log.txt", "text/plain", text.encode())
        assert response.status_code == 429, response.text
        assert response.json()["error"]["type"] == "budget_exceeded"
        view = http.get(f"/v1/rag/collections/{collection}").json()
        assert (view["documents"], view["points"]) == (0, 0)
        assert http.get(f"/v1/rag/collections/{collection}/documents").json()["data"] == []


def test_a_user_token_without_a_tenant_sees_no_collection(
    appliance: Appliance, tenant_a: tuple[httpx.Client, str, dict[str, str]]
) -> None:
    """No tenant, no tenant data: a `user` token without a `tenant` claim is refused, never shown every tenant's."""
    _http_a, collection, documents = tenant_a
    user = appliance.cli("admin", "token", "--role", "user").stdout.strip()
    with _http(appliance, user) as http:
        for method, path, body in (
            ("GET", "/v1/rag/collections", None),
            ("GET", f"/v1/rag/collections/{collection}", None),
            ("GET", f"/v1/rag/collections/{collection}/documents/{documents['ferry.md']}", None),
            ("POST", "/v1/rag/query", {"collection_id": collection, "query": CORPUS["ferry.md"][2]}),
            ("POST", "/v1/rag/collections", {"name": f"squat-{RUN}"}),
            ("GET", "/v1/models", None),
        ):
            response = http.request(method, path, json=body)
            assert response.status_code == 403, (method, path, response.text)
            error = response.json()["error"]
            assert error["type"] == "permission_error" and "bound to no tenant" in error["message"]
            assert "Kestrel" not in response.text


def _audit_record(appliance: Appliance, request_id: str) -> dict[str, Any]:
    row = appliance.rows("SELECT * FROM audit_records WHERE request_id = ?", request_id)[0]
    return dict(row, detail=json.loads(row["detail"]))


def test_a_cached_query_is_metered_and_budgeted(appliance: Appliance) -> None:
    """Every call is metered: a query answered from the cache has its usage row and audit record (naming the
    collection), and counts against the key's request budget, which refuses it once spent."""
    key = _key(appliance, f"rag-cached-{RUN}")
    admin = appliance.cli("admin", "token", "--role", "admin").stdout.strip()
    with _http(appliance, key["key"]) as http:
        collection = http.post("/v1/rag/collections", json={"name": "cached"}).json()["id"]
        added = _upload(http, collection, "note.txt", "text/plain", b"The lighthouse keeper rings the bell at dusk.")
        assert added.status_code == 201, added.text
    with _http(appliance, admin) as http:
        budget = {"scope_type": "api_key", "scope_id": key["id"], "kind": "requests", "period": "day", "limit": 3}
        made = http.post("/admin/budgets/", json=budget)
        assert made.status_code == 201, made.text
    with _http(appliance, key["key"]) as http:
        query = {"collection_id": collection, "query": "When does the keeper ring the bell?", "top_k": 1}
        answers = [http.post("/v1/rag/query", json=query) for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 200], answers[-1].text
        assert [a.json()["usage"]["cached"] for a in answers] == [False, True, True]
        assert answers[2].json()["data"] == answers[0].json()["data"]
        refused = http.post("/v1/rag/query", json=query)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["param"] == made.json()["id"] and "lighthouse" not in refused.text
    first = appliance.usage_row(answers[0].headers["x-request-id"])
    cached = appliance.usage_row(answers[1].headers["x-request-id"])
    assert first["retrieval_cached"] == 0 and first["prompt_tokens"] > 0
    assert (cached["endpoint"], cached["status_code"], cached["retrieval_cached"], cached["prompt_tokens"]) == (
        "/v1/rag/query",
        200,
        1,
        0,
    )
    assert cached["api_key_id"] == key["id"]
    assert appliance.usage_row(refused.headers["x-request-id"])["status_code"] == 429
    record = _audit_record(appliance, answers[2].headers["x-request-id"])
    assert (record["event_type"], record["object_type"], record["object_id"]) == (
        "inference.rag.query",
        "rag.collection",
        collection,
    )
    assert record["detail"]["retrieval"]["cached"] is True and record["outcome"] == "success"
    assert _audit_record(appliance, refused.headers["x-request-id"])["outcome"] == "denied"
