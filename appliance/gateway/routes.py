"""Thin HTTP routes of the OpenAI-compatible API; the work is in :mod:`appliance.gateway.serving`."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.background_tasks import BackgroundTask
from litestar.di import NamedDependency
from litestar.response import Stream

from appliance.gateway.recording import Source
from appliance.gateway.serving import CHAT, COMPLETIONS, EMBEDDINGS, Endpoint, OpenAIServing
from appliance.gateway.streaming import StreamRelay
from appliance.identity.auth import principal_of
from appliance.lib.http import request_id

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _serve(serving: OpenAIServing, endpoint: Endpoint, request: Request[Any, Any, Any]) -> Response[Any]:
    body = await request.body()
    source = Source(
        request.client.host if request.client else None, request.headers.get("user-agent", "")[:300] or None
    )
    result = await serving.handle(endpoint, body, request_id(request.scope), principal_of(request.scope), source)
    if isinstance(result, StreamRelay):
        return Stream(
            result,
            media_type="text/event-stream",
            headers={**_SSE_HEADERS, **result.headers},
            background=BackgroundTask(result.aclose),
        )
    return Response(
        content=result.body, status_code=result.status_code, media_type="application/json", headers=result.headers
    )


class OpenAIController(Controller):
    path = "/v1"

    @get("/models")
    async def list_models(
        self, request: Request[Any, Any, Any], serving: NamedDependency[OpenAIServing]
    ) -> dict[str, Any]:
        return await serving.models(principal_of(request.scope))

    @post("/chat/completions", status_code=200)
    async def chat_completions(
        self, request: Request[Any, Any, Any], serving: NamedDependency[OpenAIServing]
    ) -> Response[Any]:
        return await _serve(serving, CHAT, request)

    @post("/completions", status_code=200)
    async def completions(
        self, request: Request[Any, Any, Any], serving: NamedDependency[OpenAIServing]
    ) -> Response[Any]:
        return await _serve(serving, COMPLETIONS, request)

    @post("/embeddings", status_code=200)
    async def embeddings(
        self, request: Request[Any, Any, Any], serving: NamedDependency[OpenAIServing]
    ) -> Response[Any]:
        return await _serve(serving, EMBEDDINGS, request)
