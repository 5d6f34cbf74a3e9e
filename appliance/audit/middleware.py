"""Auditing at the HTTP edge: every state-changing admin or console request, and every refusal (401/403)
anywhere, gets a record that is committed *before* the response leaves (the response is held until then).
Refusals of requests that name nobody (401) go through the :class:`RefusalDigest`: past a few per address, they
are counted and summarised instead of recorded one by one."""

from __future__ import annotations

import re
from typing import Any

import msgspec
from litestar.datastructures import Headers
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from appliance.audit.digest import RefusalDigest
from appliance.audit.store import AuditEvent
from appliance.audit.writer import AuditWriter
from appliance.lib.errors import ApplianceError
from appliance.lib.http import request_id
from appliance.lib.principal import Principal

AUDITED_WRITE_PREFIXES = ("/admin/", "/console/logout", "/v1/rag/collections")
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_ACTIONS = {"POST": "create", "PUT": "replace", "PATCH": "update", "DELETE": "delete"}
_PATH = re.compile(r"^/(?:v1/)?(?P<area>admin|console|rag)/(?P<resource>[a-z\-]+)(?:/(?P<id>[^/]+))?")
_DETAIL_KEY = "appliance_audit_detail"
AUDIT_ACTION_KEY = "audit_action"  # a route handler's `opt` key: its action when it is not plain CRUD


def audit_action(action: str) -> dict[str, str]:
    """``opt`` of a route whose audit records name an action that is not plain CRUD (``sign_out``, say): on
    every record of the route, the refused ones included, whether or not its handler ran."""
    return {AUDIT_ACTION_KEY: action}


def add_audit_detail(scope: Scope, **fields: Any) -> None:
    """What a handler adds to the audit record of its request (a budget's old and new limit, say); it is kept
    whether the request succeeds or is refused."""
    scope.setdefault("state", {}).setdefault(_DETAIL_KEY, {}).update(fields)


def _principal(scope: Scope) -> Principal | None:
    principal = scope.get("state", {}).get("appliance_principal")
    return principal if isinstance(principal, Principal) else None


def base_event(scope: Scope, event_type: str, outcome: str, **fields: Any) -> AuditEvent:
    """An event about this request: who (the authenticated principal, unless given), from where, its id."""
    headers = Headers.from_scope(scope)
    principal = _principal(scope)
    client = scope.get("client")
    values: dict[str, Any] = {
        "subject": principal.subject if principal else None,
        "subject_kind": principal.kind if principal else None,
        "tenant_id": principal.tenant_id if principal else None,
        "source_ip": client[0] if client else None,
        "user_agent": (headers.get("user-agent") or "")[:300] or None,
        "request_id": request_id(scope),
    }
    values.update(fields)
    return AuditEvent(event_type=event_type, outcome=outcome, **values)


def _outcome(status: int) -> str:
    if status in (401, 403, 404, 429):
        return "denied"
    return "success" if status < 400 else "failure"


def _event(scope: Scope, audited_write: bool, status: int, held: list[Message]) -> AuditEvent:
    path, method = scope["path"], str(scope.get("method", ""))
    match = _PATH.match(path)
    resource = match["resource"] if match else "unknown"
    detail = scope.get("state", {}).get(_DETAIL_KEY, {})
    if audited_write and match:
        # A route names an action that is not plain CRUD (reset_password, sign_out) in its `opt`, or a handler
        # in its audit detail.
        action = detail.get("action")
        if not isinstance(action, str):
            action = _declared_action(scope) or _ACTIONS[method]
        event_type = f"{match['area']}.{resource}.{action}"
    else:
        event_type = "access.refused"
    object_id = (match["id"] if match else None) or _created_id(held) or path[:300]
    return base_event(
        scope,
        event_type,
        _outcome(status),
        object_type=resource,
        object_id=object_id,
        detail={**detail, "method": method, "status": status, "path": path[:300]},
    )


def _declared_action(scope: Scope) -> str | None:
    handler = scope.get("route_handler")
    action = handler.opt.get(AUDIT_ACTION_KEY) if handler is not None else None
    return action if isinstance(action, str) else None


def _created_id(held: list[Message]) -> str | None:
    """The id of what a create returned (only the id: the body may hold a secret shown once)."""
    body = b"".join(m.get("body", b"") for m in held if m["type"] == "http.response.body")
    try:
        data = msgspec.json.decode(body) if body else None
    except msgspec.DecodeError:
        return None
    value = data.get("id") if isinstance(data, dict) else None
    return str(value)[:300] if value is not None else None


def audit_middleware(writer: AuditWriter, refusals: RefusalDigest) -> Any:
    async def record(scope: Scope, audited_write: bool, status: int, held: list[Message]) -> None:
        event = _event(scope, audited_write, status, held)
        if status == 401 or _principal(scope) is None:
            await refusals.refused(event)
        else:
            await writer.record(event)

    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP:
                await app(scope, receive, send)
                return
            path, method = scope["path"], scope["method"]
            audited_write = method in WRITE_METHODS and path.startswith(AUDITED_WRITE_PREFIXES)
            held: list[Message] = []
            status = 0

            async def hold(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                # Hold an audited write's answer, and any refusal, until its record is committed.
                if audited_write or status in (401, 403):
                    held.append(message)
                else:
                    await send(message)

            try:
                await app(scope, receive, hold)
            except ApplianceError as exc:  # raised past the handler: the outer exception handler answers
                if audited_write or exc.status_code in (401, 403):
                    await record(scope, audited_write, exc.status_code, held)
                raise
            if audited_write or status in (401, 403):
                await record(scope, audited_write, status, held)
                for message in held:
                    await send(message)

        return middleware

    return factory
