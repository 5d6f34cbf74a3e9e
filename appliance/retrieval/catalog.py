"""The database side of retrieval: collections and documents, always reached through the caller's tenant.

A collection of another tenant is answered as if it did not exist (404), whatever id the request names.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, SQLModel, col, select

from appliance.identity.models import Tenant
from appliance.lib.errors import ConflictError, InvalidRequestError, NotFoundError
from appliance.lib.principal import Principal
from appliance.lib.times import as_utc, utcnow
from appliance.retrieval.models import RagCollection, RagDocument

ABANDONED_AFTER = timedelta(minutes=15)  # an `ingesting` row this old was left by a process that died


def _counts(session: Session, collection_ids: list[str]) -> dict[str, tuple[int, int]]:
    if not collection_ids:
        return {}
    rows = session.exec(
        select(RagDocument.collection_id, func.count(), func.coalesce(func.sum(RagDocument.chunks), 0))
        .where(col(RagDocument.collection_id).in_(collection_ids), RagDocument.status == "ready")
        .group_by(RagDocument.collection_id)
    ).all()
    return {row[0]: (int(row[1]), int(row[2])) for row in rows}


def collection_view(collection: RagCollection, counts: tuple[int, int] = (0, 0)) -> dict[str, Any]:
    return {
        "id": collection.id,
        "object": "rag.collection",
        "name": collection.name,
        "description": collection.description,
        "tenant_id": collection.tenant_id,
        "embedding_model": collection.embedding_model,
        "dimensions": collection.dimensions,
        "documents": counts[0],
        "chunks": counts[1],
        "created_at": collection.created_at.isoformat(),
    }


def document_view(document: RagDocument) -> dict[str, Any]:
    return {
        "id": document.id,
        "object": "rag.document",
        "collection_id": document.collection_id,
        "name": document.name,
        "media_type": document.media_type,
        "content_hash": document.content_hash,
        "size_bytes": document.size_bytes,
        "status": document.status,
        "chunks": document.chunks,
        "chunks_done": document.chunks_done,
        "tokens": document.tokens,
        "created_at": document.created_at.isoformat(),
    }


class Catalog:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def create_collection(
        self, principal: Principal, *, tenant_id: str | None, name: str, description: str, model: str, dims: int
    ) -> dict[str, Any]:
        owner = principal.tenant_id or tenant_id
        if owner is None:
            raise InvalidRequestError("Name the tenant that owns the collection.", param="tenant_id")
        if principal.tenant_id is not None and tenant_id not in (None, principal.tenant_id):
            raise NotFoundError("No such tenant.", param="tenant_id")
        with Session(self._engine) as session:
            if session.get(Tenant, owner) is None:
                raise NotFoundError("No such tenant.", param="tenant_id")
            row = RagCollection(
                tenant_id=owner, name=name, description=description, embedding_model=model, dimensions=dims
            )
            _add_unique(session, row, "This tenant already has a collection of that name.", "name")
            return collection_view(row)

    def collection(self, principal: Principal, collection_id: str) -> RagCollection:
        with Session(self._engine) as session:
            row = session.get(RagCollection, collection_id)
            if row is None or (principal.tenant_id is not None and row.tenant_id != principal.tenant_id):
                raise NotFoundError(f"No collection `{collection_id}`.", param="collection_id")
            return row

    def list_collections(self, principal: Principal, tenant_id: str | None) -> dict[str, Any]:
        scope = principal.tenant_scope(tenant_id)
        with Session(self._engine) as session:
            query = select(RagCollection).order_by(col(RagCollection.created_at), col(RagCollection.id))
            if scope is not None:
                query = query.where(RagCollection.tenant_id == scope)
            rows = session.exec(query).all()
            counts = _counts(session, [row.id for row in rows])
            return {"object": "list", "data": [collection_view(row, counts.get(row.id, (0, 0))) for row in rows]}

    def view(self, collection: RagCollection) -> dict[str, Any]:
        with Session(self._engine) as session:
            return collection_view(collection, _counts(session, [collection.id]).get(collection.id, (0, 0)))

    def delete_collection(self, collection: RagCollection) -> None:
        with Session(self._engine) as session:
            session.execute(delete(RagDocument).where(col(RagDocument.collection_id) == collection.id))
            session.execute(delete(RagCollection).where(col(RagCollection.id) == collection.id))
            session.commit()

    def tenant_collection_ids(self, tenant_id: str) -> list[str]:
        with Session(self._engine) as session:
            return list(session.exec(select(RagCollection.id).where(col(RagCollection.tenant_id) == tenant_id)))

    def delete_tenant_collections(self, tenant_id: str) -> None:
        with Session(self._engine) as session:
            session.execute(delete(RagDocument).where(col(RagDocument.tenant_id) == tenant_id))
            session.execute(delete(RagCollection).where(col(RagCollection.tenant_id) == tenant_id))
            session.commit()

    # documents

    def documents(self, collection: RagCollection) -> dict[str, Any]:
        with Session(self._engine) as session:
            rows = session.exec(
                select(RagDocument)
                .where(RagDocument.collection_id == collection.id)
                .order_by(col(RagDocument.created_at), col(RagDocument.id))
            ).all()
            return {"object": "list", "data": [document_view(row) for row in rows]}

    def document(self, collection: RagCollection, document_id: str) -> RagDocument:
        with Session(self._engine) as session:
            row = session.get(RagDocument, document_id)
            if row is None or row.collection_id != collection.id:
                raise NotFoundError(f"No document `{document_id}` in this collection.", param="document_id")
            return row

    def ready_documents(self, collection_id: str, document_ids: set[str]) -> dict[str, RagDocument]:
        if not document_ids:
            return {}
        with Session(self._engine) as session:
            rows = session.exec(
                select(RagDocument).where(
                    col(RagDocument.id).in_(document_ids),
                    RagDocument.collection_id == collection_id,
                    RagDocument.status == "ready",
                )
            ).all()
            return {row.id: row for row in rows}

    def begin_document(self, collection: RagCollection, document: RagDocument) -> tuple[RagDocument, bool]:
        """Claim the document's content hash in the collection: ``(row, True)`` for a new claim, ``(row, False)``
        when the same content is already there (ready). Content being ingested right now by another request is
        a conflict; a claim abandoned by a dead process is taken over (its row is returned to be cleaned and
        reused, as a new claim)."""
        with Session(self._engine) as session:
            existing = session.exec(
                select(RagDocument).where(
                    RagDocument.collection_id == collection.id, RagDocument.content_hash == document.content_hash
                )
            ).first()
            if existing is not None:
                if existing.status == "ready":
                    return existing, False
                if utcnow() - as_utc(existing.updated_at) < ABANDONED_AFTER:
                    raise ConflictError("The same document is being ingested by another request.", param="file")
                existing.updated_at = utcnow()
                session.add(existing)
                session.commit()
                session.refresh(existing)
                return existing, True
            _add_unique(session, document, "The same document is being ingested by another request.", "file")
            return document, True

    def progress(self, document_id: str, chunks_done: int) -> None:
        with Session(self._engine) as session:
            session.execute(
                update(RagDocument)
                .where(col(RagDocument.id) == document_id)
                .values(chunks_done=chunks_done, updated_at=utcnow())
            )
            session.commit()

    def finish_document(self, collection: RagCollection, document_id: str) -> RagDocument:
        """Mark the document ready and bump the collection's version (its cached results are now stale)."""
        with Session(self._engine) as session:
            session.execute(
                update(RagDocument)
                .where(col(RagDocument.id) == document_id)
                .values(status="ready", updated_at=utcnow())
            )
            self._bump(session, collection.id)
            session.commit()
            row = session.get(RagDocument, document_id)
            assert row is not None
            return row

    def forget_document(self, collection: RagCollection, document_id: str) -> None:
        with Session(self._engine) as session:
            session.execute(delete(RagDocument).where(col(RagDocument.id) == document_id))
            self._bump(session, collection.id)
            session.commit()

    @staticmethod
    def _bump(session: Session, collection_id: str) -> None:
        session.execute(
            update(RagCollection)
            .where(col(RagCollection.id) == collection_id)
            .values(version=col(RagCollection.version) + 1)
        )


def _add_unique(session: Session, row: SQLModel, conflict: str, param: str) -> None:
    """Insert ``row``; a unique constraint it breaks is the client's conflict (409), named by ``param``."""
    session.add(row)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise ConflictError(conflict, param=param) from None
    session.refresh(row)
