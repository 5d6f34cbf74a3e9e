"""Thin HTTP routes of the OpenAI-compatible API; the work is in :mod:`appliance.gateway.serving`."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable
from typing import Any, TypeVar, cast

from litestar import Controller, Request, get, post
from litestar.background_tasks import BackgroundTask
from litestar.di import NamedDependency
from litestar.params import FromPath
from litestar.response import Stream
from litestar.types import ASGIApp, Receive, Scope, Send

from appliance.budgets.store import CallLink
from appliance.gateway.serving import (
    CHAT,
    COMPLETIONS,
    DETOKENIZE,
    EMBEDDINGS,
    RERANK,
    RESPONSES,
    SCORE,
    TOKENIZE,
    Endpoint,
    JSONResult,
    OpenAIServing,
)
from appliance.gateway.settlement import Source
from appliance.gateway.streaming import StreamRelay
from appliance.lib.errors import ClientDisconnectedError, InvalidRequestError, ServiceUnavailableError
from appliance.lib.guards import INFERENCE, CurrentPrincipal
from appliance.lib.http import request_id
from appliance.lib.principal import Principal

# The type is named here, not left to the Stream's media type: handlers returning answer() are annotated ASGIApp,
# which makes Litestar take JSON as the handler's media type, and the handler's wins over the Stream's.
_SSE_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


_HEADER_VALUE = re.compile(r"^[\x21-\x7e]{1,200}$")
_RETRY_COUNT = re.compile(r"^[0-9]{1,4}$")
SDK_RETRY_HEADER = "x-stainless-retry-count"  # the openai SDKs: 0 on the first try, n on the n-th retry


def call_link(headers: Any) -> CallLink:
    """How this request relates to earlier ones: retries (Idempotency-Key, X-Retry-Of, and the SDK's own
    retry count) and sub-calls (X-Parent-Request-Id)."""
    values: dict[str, Any] = {}
    retries = headers.get(SDK_RETRY_HEADER)
    if retries is not None:
        if not _RETRY_COUNT.match(retries):
            raise InvalidRequestError(f"Header {SDK_RETRY_HEADER} must be a whole number.", param=SDK_RETRY_HEADER)
        values["client_attempt"] = int(retries)
    for header, field in (
        ("idempotency-key", "idempotency_key"),
        ("x-retry-of", "retry_of"),
        ("x-parent-request-id", "parent_request_id"),
        ("x-session-id", "session_id"),
    ):
        value = headers.get(header)
        if value is not None:
            if not _HEADER_VALUE.match(value):
                raise InvalidRequestError(f"Header {header} must be 1-200 visible ASCII characters.", param=header)
            values[field] = value
    return CallLink(**values)


def source_of(request: Request[Any, Any, Any]) -> Source:
    return Source(request.client.host if request.client else None, request.headers.get("user-agent", "")[:300] or None)


class JSONAnswer:
    """A JSON answer as an ASGI app: its head and its body, nothing else (Litestar's ``Response`` builds header
    and cookie objects and looks its encoder up for a body that is already bytes: 3 % of the event loop's time at
    500 requests/s). The app's ``before_send`` hooks still stamp what every answer carries."""

    __slots__ = ("_body", "_head")

    def __init__(self, body: bytes, status_code: int, headers: dict[str, str]) -> None:
        self._body = body
        raw = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        raw.extend((name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items())
        self._head = {"type": "http.response.start", "status": status_code, "headers": raw}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(self._head)  # type: ignore[arg-type]
        await send({"type": "http.response.body", "body": self._body, "more_body": False})


def answer(result: JSONResult | StreamRelay) -> ASGIApp:
    """The HTTP response of a served request: its JSON, or its event stream. Handlers returning it are annotated
    ``ASGIApp``, so that Litestar sends a JSON answer as it is; a stream is a Litestar ``Response``, which Litestar
    recognises as one (by its class, whatever the annotation) and sends as before."""
    if isinstance(result, StreamRelay):
        stream = Stream(
            result,
            media_type="text/event-stream",
            headers={**_SSE_HEADERS, **result.headers},
            background=BackgroundTask(result.aclose),
        )
        return cast("ASGIApp", stream)
    return JSONAnswer(result.body, result.status_code, result.headers)


T = TypeVar("T")


async def _disconnect(receive: Receive) -> None:
    """Returns when the client has gone (the body has been read: the next message is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_client_leaves(request: Request[Any, Any, Any], work: Awaitable[T]) -> T:
    """``work``'s result; if the client goes away first, ``work`` is cancelled (serving then closes the engine
    connection, which makes vLLM abort the request, and records the request as the client's leaving) and
    :class:`ClientDisconnectedError` is raised. A stream is returned as soon as it opens; its relay watches
    for the client's leaving from then on.

    ``work`` runs in the request's own task; one small task waits for the client's leaving and cancels it (a
    task for the work and ``asyncio.wait`` on both cost 2.5 % of the event loop's time at 500 requests/s)."""
    current = asyncio.current_task()
    assert current is not None, "called from a request's task"
    left = False

    async def watch() -> None:
        nonlocal left
        with contextlib.suppress(Exception):  # a broken connection is a client gone too
            await _disconnect(request.receive)
        left = True
        current.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        result = await work
    except asyncio.CancelledError:
        if left and current.uncancel() == 0:  # cancelled by the watcher alone, not by the server
            raise ClientDisconnectedError("The client closed the connection before the answer.") from None
        if current.cancelling() == 0:  # not this task's cancellation: something the work awaited was cancelled
            raise ServiceUnavailableError("The request was interrupted; try again.", code="interrupted") from None
        raise
    finally:
        watcher.cancel()
    if left:  # the work swallowed the watcher's cancellation (asyncio.wait_for does when its future is done)
        current.uncancel()
    return result


async def _serve(
    serving: OpenAIServing, endpoint: Endpoint, request: Request[Any, Any, Any], principal: Principal
) -> ASGIApp:
    body = await request.body()
    link = call_link(request.headers)
    work = serving.handle(endpoint, body, request_id(request.scope), principal, source_of(request), link)
    return answer(await unless_client_leaves(request, work))


class OpenAIController(Controller):
    path = "/v1"
    guards = [INFERENCE]  # serving checks it again: retrieval's grounded chat calls it too

    @get("/models")
    async def list_models(self, principal: CurrentPrincipal, serving: NamedDependency[OpenAIServing]) -> dict[str, Any]:
        return await serving.models(principal)

    @get("/models/{model_id:str}")
    async def retrieve_model(
        self, principal: CurrentPrincipal, serving: NamedDependency[OpenAIServing], model_id: FromPath[str]
    ) -> dict[str, Any]:
        return await serving.model(principal, model_id)

    @post("/chat/completions", status_code=200)
    async def chat_completions(
        self,
        request: Request[Any, Any, Any],
        principal: CurrentPrincipal,
        serving: NamedDependency[OpenAIServing],
    ) -> ASGIApp:
        return await _serve(serving, CHAT, request, principal)

    @post("/completions", status_code=200)
    async def completions(
        self,
        request: Request[Any, Any, Any],
        principal: CurrentPrincipal,
        serving: NamedDependency[OpenAIServing],
    ) -> ASGIApp:
        return await _serve(serving, COMPLETIONS, request, principal)

    @post("/embeddings", status_code=200)
    async def embeddings(
        self,
        request: Request[Any, Any, Any],
        principal: CurrentPrincipal,
        serving: NamedDependency[OpenAIServing],
    ) -> ASGIApp:
        return await _serve(serving, EMBEDDINGS, request, principal)

    @post("/responses", status_code=200)
    async def create_response(
        self,
        request: Request[Any, Any, Any],
        principal: CurrentPrincipal,
        serving: NamedDependency[OpenAIServing],
    ) -> ASGIApp:
        return await _serve(serving, RESPONSES, request, principal)

    @get("/responses/{response_id:str}")
    async def retrieve_response(
        self,
        request: Request[Any, Any, Any],
        principal: CurrentPrincipal,
        serving: NamedDependency[OpenAIServing],
        response_id: FromPath[str],
    ) -> ASGIApp:
        result = await serving.stored_response(principal, response_id, request_id(request.scope), source_of(request))
        return answer(result)

    @post("/responses/{response_id:str}/cancel", status_code=200)
    async def cancel_response(
        self,
        request: Request[Any, Any, Any],
        principal: CurrentPrincipal,
        serving: NamedDependency[OpenAIServing],
        response_id: FromPath[str],
    ) -> ASGIApp:
        result = await serving.stored_response(
            principal, response_id, request_id(request.scope), source_of(request), cancel=True
        )
        return answer(result)

    @post("/score", status_code=200)
    async def score(
        self,
        request: Request[Any, Any, Any],
        principal: CurrentPrincipal,
        serving: NamedDependency[OpenAIServing],
    ) -> ASGIApp:
        return await _serve(serving, SCORE, request, principal)

    @post("/rerank", status_code=200)
    async def rerank(
        self,
        request: Request[Any, Any, Any],
        principal: CurrentPrincipal,
        serving: NamedDependency[OpenAIServing],
    ) -> ASGIApp:
        return await _serve(serving, RERANK, request, principal)

    @post("/tokenize", status_code=200)
    async def tokenize(
        self,
        request: Request[Any, Any, Any],
        principal: CurrentPrincipal,
        serving: NamedDependency[OpenAIServing],
    ) -> ASGIApp:
        return await _tokens(serving, TOKENIZE, request, principal)

    @post("/detokenize", status_code=200)
    async def detokenize(
        self,
        request: Request[Any, Any, Any],
        principal: CurrentPrincipal,
        serving: NamedDependency[OpenAIServing],
    ) -> ASGIApp:
        return await _tokens(serving, DETOKENIZE, request, principal)


async def _tokens(serving: OpenAIServing, path: str, request: Request[Any, Any, Any], principal: Principal) -> ASGIApp:
    body = await request.body()
    work = serving.tokens(path, body, request_id(request.scope), principal, source_of(request))
    return answer(await unless_client_leaves(request, work))
