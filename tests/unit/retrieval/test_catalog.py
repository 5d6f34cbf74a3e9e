"""The retrieval catalog on SQLite: tenant isolation, name conflicts, claims of a document's content."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import Session

from appliance.db.engine import create_schema, make_engine
from appliance.identity.models import Tenant
from appliance.lib.errors import ConflictError, InvalidRequestError, NotFoundError
from appliance.lib.principal import Principal
from appliance.retrieval.catalog import Catalog
from appliance.retrieval.models import RagDocument


def principal(tenant: str | None) -> Principal:
    return Principal(kind="token", subject="t", roles=frozenset({"admin"}), tenant_id=tenant)


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    create_schema(engine)
    with Session(engine) as session:
        session.add_all([Tenant(id="ten_a", name="a"), Tenant(id="ten_b", name="b")])
        session.commit()
    return Catalog(engine)


def create(catalog: Catalog, who: Principal, name: str, tenant: str | None = None) -> str:
    view = catalog.create_collection(who, tenant_id=tenant, name=name, description="", model="m", dims=4)
    return str(view["id"])


def test_collections_belong_to_a_tenant_and_other_tenants_cannot_see_them(catalog: Catalog) -> None:
    mine = create(catalog, principal("ten_a"), "docs")
    assert create(catalog, principal("ten_b"), "docs")  # the same name in another tenant
    with pytest.raises(ConflictError):
        create(catalog, principal("ten_a"), "docs")
    with pytest.raises(NotFoundError):
        catalog.collection(principal("ten_b"), mine)
    with pytest.raises(NotFoundError):
        create(catalog, principal("ten_b"), "x", tenant="ten_a")  # a tenant key cannot create for another
    with pytest.raises(InvalidRequestError):
        create(catalog, principal(None), "x")  # a platform principal names the tenant
    assert catalog.collection(principal(None), mine).tenant_id == "ten_a"
    assert [c["name"] for c in catalog.list_collections(principal("ten_a"), "ten_b")["data"]] == ["docs"]
    assert len(catalog.list_collections(principal(None), None)["data"]) == 2


def test_a_content_hash_is_claimed_once_and_an_abandoned_claim_is_taken_over(catalog: Catalog) -> None:
    collection = catalog.collection(principal("ten_a"), create(catalog, principal("ten_a"), "docs"))

    def document() -> RagDocument:
        return RagDocument(collection_id=collection.id, tenant_id="ten_a", name="d", media_type="text/plain",
                           content_hash="h" * 64, size_bytes=1)  # fmt: skip

    claimed, new = catalog.begin_document(collection, document())
    assert new and claimed.status == "ingesting"
    with pytest.raises(ConflictError):
        catalog.begin_document(collection, document())  # being ingested right now
    with Session(catalog._engine) as session:
        row = session.get(RagDocument, claimed.id)
        assert row is not None
        row.updated_at = row.updated_at - timedelta(hours=1)
        session.add(row)
        session.commit()
    taken, new = catalog.begin_document(collection, document())
    assert new and taken.id == claimed.id, "a claim left by a dead process is taken over"
    catalog.finish_document(collection, claimed.id)
    again, new = catalog.begin_document(collection, document())
    assert not new and again.id == claimed.id, "the same content: nothing new"
    assert catalog.collection(principal("ten_a"), collection.id).version == 1
    catalog.forget_document(collection, claimed.id)
    assert catalog.documents(collection)["data"] == []
    assert catalog.collection(principal("ten_a"), collection.id).version == 2
