"""Thin HTTP routes of retrieval under /v1/rag; the work is in :mod:`appliance.retrieval.service`.

A document is uploaded as ``multipart/form-data`` (field ``file``, optional ``name``) or as the raw body with
its own Content-Type (``?name=`` names it). Its size limit is the retrieval setting, not the API's general
body limit, so the controller is made from the settings when the app is built.
"""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import UploadFile
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter
from litestar.types import ASGIApp
from msgspec import Meta, Struct

from appliance.gateway.routes import answer, call_link, source_of, unless_client_leaves
from appliance.lib.errors import InvalidRequestError
from appliance.lib.guards import (
    CHANGES_TENANT_DATA,
    READS_TENANT_CONTENT,
    READS_TENANT_DATA,
    CurrentPrincipal,
)
from appliance.lib.http import request_id
from appliance.lib.principal import Principal
from appliance.retrieval.extract import media_type_of
from appliance.retrieval.service import Caller, Retrieval, Upload
from appliance.settings import Settings

Name = Annotated[str, Meta(min_length=1, max_length=100, pattern=r"^[\w][\w .\-]*$")]
_MULTIPART_OVERHEAD = 64 * 1024


class CollectionCreate(Struct, forbid_unknown_fields=True):
    name: Name
    description: Annotated[str, Meta(max_length=1000)] = ""
    tenant_id: str | None = None  # platform principals only; a tenant's own key always means its tenant


class QueryRequest(Struct, forbid_unknown_fields=True):
    collection_id: Annotated[str, Meta(min_length=1, max_length=32)]
    query: Annotated[str, Meta(max_length=8000)]
    top_k: int | None = None


def _caller(request: Request[Any, Any, Any], principal: Principal) -> Caller:
    link = call_link(request.headers)
    return Caller(principal, request_id(request.scope), source_of(request), link)


async def _upload(request: Request[Any, Any, Any], name: str | None) -> Upload:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise InvalidRequestError("The form has no `file` field with the document.", param="file")
        raw = await file.read()
        given = form.get("name")
        filename = (given if isinstance(given, str) and given else None) or name or file.filename or "document"
        return Upload(raw, filename[:300], media_type_of(file.content_type, file.filename or filename))
    raw = await request.body()
    filename = name or "document"
    return Upload(raw, filename[:300], media_type_of(content_type, filename))


def rag_controller(settings: Settings) -> type[Controller]:
    upload_limit = settings.retrieval.max_document_bytes + _MULTIPART_OVERHEAD

    class RetrievalController(Controller):
        path = "/v1/rag"

        @post("/collections", status_code=201, guards=[CHANGES_TENANT_DATA])
        async def create_collection(
            self,
            principal: CurrentPrincipal,
            retrieval: NamedDependency[Retrieval],
            data: JSONBody[CollectionCreate],
        ) -> dict[str, Any]:
            return await retrieval.create_collection(
                principal, tenant_id=data.tenant_id, name=data.name, description=data.description
            )

        @get("/collections", guards=[READS_TENANT_DATA])
        async def list_collections(
            self,
            principal: CurrentPrincipal,
            retrieval: NamedDependency[Retrieval],
            tenant_id: Annotated[str | None, QueryParameter()] = None,
        ) -> dict[str, Any]:
            return await retrieval.list_collections(principal, tenant_id)

        @get("/collections/{collection_id:str}", guards=[READS_TENANT_DATA])
        async def get_collection(
            self, principal: CurrentPrincipal, retrieval: NamedDependency[Retrieval], collection_id: FromPath[str]
        ) -> dict[str, Any]:
            return await retrieval.view(principal, collection_id)

        @delete("/collections/{collection_id:str}", status_code=204, guards=[CHANGES_TENANT_DATA])
        async def delete_collection(
            self, principal: CurrentPrincipal, retrieval: NamedDependency[Retrieval], collection_id: FromPath[str]
        ) -> None:
            await retrieval.delete_collection(principal, collection_id)

        @post(
            "/collections/{collection_id:str}/documents",
            request_max_body_size=upload_limit,
            guards=[CHANGES_TENANT_DATA],
        )
        async def add_document(
            self,
            request: Request[Any, Any, Any],
            principal: CurrentPrincipal,
            retrieval: NamedDependency[Retrieval],
            collection_id: FromPath[str],
            name: Annotated[str | None, QueryParameter(max_length=300)] = None,
        ) -> Response[Any]:
            caller = _caller(request, principal)
            if principal.tenant_id is not None:  # a flood of uploads is refused before any lookup
                retrieval.check_ingestion_room(principal.tenant_id)
            # Before reading the body: who may write here.
            collection = await retrieval.collection(caller.principal, collection_id, write=True)
            with retrieval.ingestion_slot(collection.tenant_id):  # before the body is read
                document, created = await retrieval.ingest(caller, collection, await _upload(request, name))
            return Response(dict(document, created=created), status_code=201 if created else 200)

        @get("/collections/{collection_id:str}/documents", guards=[READS_TENANT_DATA])
        async def list_documents(
            self, principal: CurrentPrincipal, retrieval: NamedDependency[Retrieval], collection_id: FromPath[str]
        ) -> dict[str, Any]:
            return await retrieval.documents(principal, collection_id)

        @get("/collections/{collection_id:str}/documents/{document_id:str}", guards=[READS_TENANT_DATA])
        async def get_document(
            self,
            principal: CurrentPrincipal,
            retrieval: NamedDependency[Retrieval],
            collection_id: FromPath[str],
            document_id: FromPath[str],
        ) -> dict[str, Any]:
            return await retrieval.document(principal, collection_id, document_id)

        @delete(
            "/collections/{collection_id:str}/documents/{document_id:str}",
            status_code=204,
            guards=[CHANGES_TENANT_DATA],
        )
        async def delete_document(
            self,
            principal: CurrentPrincipal,
            retrieval: NamedDependency[Retrieval],
            collection_id: FromPath[str],
            document_id: FromPath[str],
        ) -> None:
            await retrieval.delete_document(principal, collection_id, document_id)

        @post("/query", status_code=200, guards=[READS_TENANT_CONTENT])
        async def query(
            self,
            request: Request[Any, Any, Any],
            principal: CurrentPrincipal,
            retrieval: NamedDependency[Retrieval],
            data: JSONBody[QueryRequest],
        ) -> dict[str, Any]:
            return await retrieval.query(_caller(request, principal), data.collection_id, data.query, data.top_k)

        @post("/chat", status_code=200, guards=[READS_TENANT_CONTENT])
        async def chat(
            self, request: Request[Any, Any, Any], principal: CurrentPrincipal, retrieval: NamedDependency[Retrieval]
        ) -> ASGIApp:
            body = await request.body()
            return answer(await unless_client_leaves(request, retrieval.chat(_caller(request, principal), body)))

    return RetrievalController
