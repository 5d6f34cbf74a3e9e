"""The one place where errors become HTTP responses, and where every response gets its request id."""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.datastructures import Headers, MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException, NotFoundException, ValidationException
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from sqlalchemy.exc import SQLAlchemyError

from appliance.db.faults import is_transient
from appliance.lib.errors import ApplianceError, error_envelope
from appliance.lib.ids import unique_hex
from appliance.lib.logging import bind, reset_context, restore_context
from appliance.lib.pacing import mark_paced
from appliance.lib.tracing import bind_trace

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
_STATE_KEY = "appliance_request_id"

_HTTP_ERROR_TYPES = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "unauthenticated"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    429: ("rate_limit_error", "rate_limited"),
}


def request_id(scope: Scope) -> str:
    """This request's id: made on first use, then the same for the handler, the logs and the response."""
    state = scope.setdefault("state", {})
    rid = state.get(_STATE_KEY)
    if rid is None:
        rid = f"req_{unique_hex()}"
        state[_STATE_KEY] = rid
    return str(rid)


async def add_request_id(message: Message, scope: Scope) -> None:
    """``before_send`` hook: stamp ``x-request-id`` on every HTTP response, errors and 404s included."""
    if message["type"] == "http.response.start":
        MutableScopeHeaders.from_message(message)[REQUEST_ID_HEADER] = request_id(scope)


def request_context_middleware(app: ASGIApp) -> ASGIApp:
    """The outermost middleware: every HTTP request's log lines carry its request id, route and trace id from
    here on (and its tenant and workflow once authenticated)."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == ScopeType.HTTP:
            token = reset_context()
            bind(request_id=request_id(scope), route=f"{scope['method']} {scope['path']}")
            bind_trace(Headers.from_scope(scope).get("traceparent"))
            try:
                await app(scope, receive, send)
            finally:
                restore_context(token)
            return
        await app(scope, receive, send)

    return middleware


def envelope_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response[Any]:
    return Response(content=body, status_code=status, headers=headers, media_type="application/json")


def appliance_error_handler(request: Request[Any, Any, Any], exc: ApplianceError) -> Response[Any]:
    if exc.status_code >= 500:
        log.warning("%s: %s", type(exc).__name__, exc.message)
    if exc.paced or exc.status_code == 413:
        mark_paced(request.scope)
    return envelope_response(exc.status_code, exc.envelope(), exc.headers)


def http_exception_handler(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    status = exc.status_code
    error_type, code = _HTTP_ERROR_TYPES.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None)
    )
    message = exc.detail or "Request failed."
    if status == 413:
        message = "The request body is too large."
    elif isinstance(exc, NotFoundException) and exc.detail in ("", "Not Found"):  # no route matched
        message = f"Invalid URL ({request.method} {request.url.path}): the appliance does not serve this route."
        code = "unknown_route"
    elif status == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}."
    param = None
    if isinstance(exc, ValidationException) and isinstance(exc.extra, list) and exc.extra:
        first = exc.extra[0]
        if isinstance(first, dict):
            param = first.get("key")
    headers = dict(exc.headers or {})
    if status == 413:
        # The rest of the body is still on its way: close the connection rather than read it to keep the
        # connection alive (reading megabytes only to discard them is what an oversized flood costs).
        headers["Connection"] = "close"
        mark_paced(request.scope)
    return envelope_response(status, error_envelope(message, error_type, param, code), headers)


def unexpected_error_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return envelope_response(
        500,
        error_envelope("The appliance failed to handle the request.", "server_error", None, "internal_error"),
    )


def database_error_handler(request: Request[Any, Any, Any], exc: SQLAlchemyError) -> Response[Any]:
    """The database is down, unreachable or full (wherever a request met it: a credential's look-up, a budget,
    an admin change): 503, as for any dependency that is missing, and the client may retry. Any other database
    error is the appliance's own failure (500)."""
    if not is_transient(exc):
        return unexpected_error_handler(request, exc)
    log.warning("the database is not available: %s", str(exc).partition("\n")[0])
    return envelope_response(
        503,
        error_envelope(
            "The database is not available; retry later.", "service_unavailable", None, "database_unavailable"
        ),
        {"Retry-After": "1"},
    )


EXCEPTION_HANDLERS: dict[int | type[Exception], Any] = {
    ApplianceError: appliance_error_handler,
    SQLAlchemyError: database_error_handler,
    HTTPException: http_exception_handler,
    Exception: unexpected_error_handler,
}
