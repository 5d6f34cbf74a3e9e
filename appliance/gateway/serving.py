"""Serving of the OpenAI-compatible endpoints: validate, route to the engine, relay, record usage.

The serving class receives its engine router and usage writer through the constructor, so tests can
hand it a real engine or one that fails.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from appliance.audit.writer import AuditWriter
from appliance.budgets.enforce import BudgetEnforcer
from appliance.budgets.store import CallLink
from appliance.gateway.admission import Admission
from appliance.gateway.counting import TokenCounter
from appliance.gateway.isolation import CacheSalts
from appliance.gateway.metrics import GatewayMetrics
from appliance.gateway.models import StoredResponse
from appliance.gateway.owners import ResponseNotFoundError, ResponseOwners
from appliance.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    RerankRequest,
    ResponsesRequest,
    ScoreRequest,
    TokenizeRequest,
    UsageOnly,
    decode_json_object,
    validate,
)
from appliance.gateway.responses import (
    ResponsesStreamUsage,
    finish_of,
    input_text,
    new_response_id,
    output_texts,
    usage_of,
)
from appliance.gateway.settlement import Settlement, Source, settle
from appliance.gateway.shape import PromptTokens, RequestShape, output_cap, parse
from appliance.gateway.streaming import StreamRelay
from appliance.gateway.upstream import EngineRouter, read_answer
from appliance.gateway.usage import UPSTREAM_STREAM_OPTIONS, StreamUsage, choice_texts, prompt_text
from appliance.identity.tenancy import NO_POLICY, TenantPolicies, TenantPolicy
from appliance.ledger.pricing import Pricing, to_currency
from appliance.ledger.writer import RetrievalStats, UsageEvent, UsageWriter
from appliance.lib.errors import InvalidRequestError, ModelNotFoundError, PermissionDeniedError, UpstreamError
from appliance.lib.principal import Principal
from appliance.settings import EngineRoute, PricingSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Endpoint:
    path: str  # what usage rows, audit records and errors name
    schema: type[
        ChatCompletionRequest | CompletionRequest | EmbeddingRequest | ResponsesRequest | ScoreRequest | RerankRequest
    ]
    runner: str
    engine_path: str = ""  # the engine's path, when it is not ``path`` (retrieval calls the engines' own API)
    client_model: bool = True  # the client names the model (model allowlists apply)

    @property
    def upstream(self) -> str:
        return self.engine_path or self.path


CLIENT_CLOSED_REQUEST = 499  # the client went away before an answer (nginx's convention)
COST_HEADER = "x-request-cost"  # what a (non-streamed) answer cost, with the currency: "0.000123 EUR"

DEFAULT_MAX_TOKENS = 1024  # output cap per sequence of a request that names none (GatewaySettings)

CHAT = Endpoint("/v1/chat/completions", ChatCompletionRequest, "generate")
COMPLETIONS = Endpoint("/v1/completions", CompletionRequest, "generate")
EMBEDDINGS = Endpoint("/v1/embeddings", EmbeddingRequest, "pooling")
RESPONSES = Endpoint("/v1/responses", ResponsesRequest, "generate")
SCORE = Endpoint("/v1/score", ScoreRequest, "pooling", engine_path="/score")
RERANK = Endpoint("/v1/rerank", RerankRequest, "pooling", engine_path="/rerank")
TOKENIZE = "/v1/tokenize"
DETOKENIZE = "/v1/detokenize"
# What usage rows and audit records name for the calls about a stored response.
RETRIEVE_RESPONSE = "/v1/responses/{response_id}"
CANCEL_RESPONSE = "/v1/responses/{response_id}/cancel"


@dataclass(slots=True)
class JSONResult:
    body: bytes
    status_code: int = 200
    headers: dict[str, str] = field(default_factory=dict)


class _Prompt:
    """A request's prompt tokens, counted once however many stages need them (cap, budgets, admission)."""

    __slots__ = ("_counter", "_partition", "_request_id", "_route", "_shape", "_tokens")

    def __init__(
        self, counter: TokenCounter, route: EngineRoute, shape: RequestShape, request_id: str, partition: str
    ) -> None:
        self._counter, self._route, self._shape, self._request_id = counter, route, shape, request_id
        self._partition = partition  # whose counts it may reuse (the tenant's)
        self._tokens: PromptTokens | None = None

    async def tokens(self) -> PromptTokens:
        if self._tokens is None:
            self._tokens = await self._counter.count(self._route, self._shape, self._request_id, self._partition)
        return self._tokens

    async def total(self) -> int:
        return (await self.tokens()).total

    @property
    def known(self) -> int | None:
        return None if self._tokens is None else self._tokens.total


@dataclass(frozen=True, slots=True)
class RequestContext:
    """The facts of one /v1 request, fixed once it is parsed and routed; every later stage reads them."""

    endpoint: Endpoint
    request_id: str
    principal: Principal
    link: CallLink
    shape: RequestShape
    route: EngineRoute
    prompt: _Prompt
    started: float


class OpenAIServing:
    """The /v1 request path, as named stages: parse, authorise, route, reserve (budgets), admit (tiers), call the
    engine, settle. Authentication ran before (middleware); the settlement (``settlement.py``) owns what the
    request acquires and hands its outcome to the bookkeeping sinks."""

    def __init__(
        self,
        router: EngineRouter,
        usage: UsageWriter,
        audit: AuditWriter | None = None,
        tenant_policies: TenantPolicies | None = None,
        budgets: BudgetEnforcer | None = None,
        pricing: Pricing | None = None,
        metrics: GatewayMetrics | None = None,
        admission: Admission | None = None,
        counter: TokenCounter | None = None,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        model_max_tokens: dict[str, int] | None = None,
        cache_salts: CacheSalts | None = None,
        stream_stall_s: float | None = None,
        owners: ResponseOwners | None = None,
    ) -> None:
        # Without the node's key (tests that build the class alone), a key of this process: still one salt
        # per tenant, never a shared cache.
        self._salts = cache_salts or CacheSalts(secrets.token_bytes(32))
        self._counter = counter or TokenCounter(router)
        self._default_cap = default_max_tokens
        self._model_caps = model_max_tokens or {}
        self._admission = admission
        self._budgets = budgets
        self._pricing = pricing or Pricing(PricingSettings())
        self._metrics = metrics
        self._router = router
        self._usage = usage
        self._audit = audit
        self._policies = tenant_policies or NO_POLICIES  # content capture and model allowlists, per tenant
        self._created = int(time.time())
        self._stream_stall_s = stream_stall_s
        # Who created each stored response; without it (no database) nothing is stored and nothing continued.
        self._owners = owners

    async def handle(
        self,
        endpoint: Endpoint,
        body: bytes,
        request_id: str,
        principal: Principal,
        source: Source,
        link: CallLink | None = None,
        retrieval: RetrievalStats | None = None,
    ) -> JSONResult | StreamRelay:
        started = time.perf_counter()
        principal.require_inference()
        # Fail closed, and fast: while the ledger or the audit log cannot take records, nothing starts.
        self._usage.check_accepting()
        if self._audit is not None:
            self._audit.check_accepting()
        data, shape = self._parse(endpoint, body)
        policy = await self._policies.of(principal.tenant_id)
        if endpoint.client_model:
            authorise_model(principal, policy, shape.body["model"])
        route = self._route(endpoint, shape, principal, link)
        if endpoint is RESPONSES:
            route = await self._continued(shape, principal, route, request_id)
        context = RequestContext(
            endpoint,
            request_id,
            principal,
            link or CallLink(),
            shape,
            route,
            _Prompt(self._counter, route, shape, request_id, principal.tenant_id or ""),
            started,
        )
        settlement = Settlement(await self._usage.acquire(), self._audit, source, principal.kind, self._metrics)
        settlement.price = self._pricing.price(route.model)
        if policy.content_capture:
            settlement.prompt = _captured(endpoint, data, shape)
        event = _outcome(context)
        if retrieval is not None:
            retrieval.apply(event)
        try:
            headers = await self._reserve(context, settlement, event)
            await self._admit(context, settlement)
            # Known once the engine counted a prompt (the reservation did): context utilisation for drift.
            event.context_length = self._counter.context_length(context.route)
            result = await self._call(context, settlement, event)
            result.headers.update(headers)
            return result
        except asyncio.CancelledError:
            # The client went away before an answer: settle without waiting (nothing may be awaited now).
            _client_left(event, context, settlement)
            settlement.abandon(event)
            raise
        except Exception as exc:
            # The stream relay owns the settlement once it is returned; before that, the failure is settled here.
            await settle(settlement, event, started, exc)
            raise

    # -- the stages --------------------------------------------------------------------------------------

    def _parse(self, endpoint: Endpoint, body: bytes) -> tuple[dict[str, Any], RequestShape]:
        data = decode_json_object(body)
        return data, parse(data, endpoint.schema)

    def _route(
        self, endpoint: Endpoint, shape: RequestShape, principal: Principal, link: CallLink | None
    ) -> EngineRoute:
        route = self._router.route(shape.body["model"], link.session_id if link else None, principal.tenant_id)
        if route.runner != endpoint.runner:
            kind = "an embedding" if route.runner == "pooling" else "a generative"
            raise InvalidRequestError(
                f"`{route.model}` is {kind} model; it does not serve {endpoint.path}.",
                param="model",
                code="model_not_supported",
            )
        return route

    async def _reserve(self, context: RequestContext, settlement: Settlement, event: UsageEvent) -> dict[str, str]:
        """The output cap, then the budgets of the principal's chain (which may lower it); returns the headers
        the answer carries."""
        shape, prompt = context.shape, context.prompt
        cap = 0
        if shape.generates:
            default = self._model_caps.get(context.route.model, self._default_cap)
            cap = output_cap(shape, await prompt.tokens(), self._counter.context_length(context.route), default)
        headers: dict[str, str] = {}
        if self._budgets is not None:
            admission = await self._budgets.enforce(
                context.principal,
                context.request_id,
                context.link,
                settlement.price,
                prompt.total,
                cap,
                shape.sequences,
            )
            event.retry_attempt, event.depth = admission.attempt, admission.depth
            settlement.hold, headers = admission.hold, admission.headers
            cap = admission.cap or cap
        if shape.generates:
            shape.set_cap(cap)
        shape.body["cache_salt"] = self._salts.salt(context.principal.tenant_id)  # the tenant's own prefix cache
        return headers

    async def _admit(self, context: RequestContext, settlement: Settlement) -> None:
        """A slot in the engine's queue tier (generative engines), then a share of the engine's load."""
        if self._admission is not None and context.route.runner == "generate":
            principal = context.principal
            priority = self._admission.priority(principal.tenant_id, principal.workflow_id)
            settlement.admitted(await self._admission.admit(context.route.key, await context.prompt.total(), priority))
        settlement.acquire(self._router.lease(context.route))
        settlement.metering(self._pricing.meter)

    async def _continued(
        self, shape: RequestShape, principal: Principal, route: EngineRoute, request_id: str
    ) -> EngineRoute:
        """A Responses request: the new response's id, named here; for one that continues an earlier response
        (``previous_response_id``), that response's owner checked (404 for another tenant's), the engine that
        keeps it, and its context, which the engine will prepend, counted as prompt."""
        shape.body["request_id"] = new_response_id()
        if self._owners is None:
            shape.body["store"] = False
        previous = shape.body.get("previous_response_id")
        if previous is None:
            return route
        if self._owners is None:
            raise ResponseNotFoundError(previous, "previous_response_id")
        owned = await self._owners.find(previous, principal, "previous_response_id")
        if owned.model != route.model:
            raise InvalidRequestError(
                f"The response `{previous}` was made by `{owned.model}`; continue it with that model.", param="model"
            )
        route = self._keeper(owned)
        earlier = await self._engine_json(route, "GET", f"/v1/responses/{owned.response_id}", request_id)
        shape.prior_tokens = sum(usage_of(earlier))
        return route

    def _keeper(self, owned: StoredResponse) -> EngineRoute:
        """The engine that keeps a stored response in its memory."""
        route = next((route for route in self._router.routes if route.url == owned.engine_url), None)
        if route is None:
            raise ResponseNotFoundError(owned.response_id)
        return route

    async def _engine_json(self, route: EngineRoute, method: str, path: str, request_id: str) -> Any:
        raw = await read_answer(await self._router.open(route, path, None, request_id, method=method), route.model)
        try:
            return msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise UpstreamError(f"The engine serving `{route.model}` did not answer with its API.") from exc

    async def _call(
        self, context: RequestContext, settlement: Settlement, event: UsageEvent
    ) -> JSONResult | StreamRelay:
        body = context.shape.body
        if context.endpoint is RESPONSES and body.get("store") is not False and self._owners is not None:
            principal, route = context.principal, context.route
            await self._owners.record(
                StoredResponse(
                    response_id=body["request_id"],
                    tenant_id=principal.tenant_id,
                    api_key_id=principal.api_key_id,
                    subject=principal.subject,
                    model=route.model,
                    engine_url=route.url,
                    request_id=context.request_id,
                )
            )
        if context.shape.streamed:
            return await self._open_stream(context, settlement, event)
        return await self._complete(context, settlement, event)

    async def _complete(self, context: RequestContext, settlement: Settlement, event: UsageEvent) -> JSONResult:
        route, request_id = context.route, context.request_id
        body = msgspec.json.encode(context.shape.body)
        response = await self._router.open(route, context.endpoint.upstream, body, request_id)
        raw = await read_answer(response, route.model)
        try:
            if context.endpoint is RESPONSES:
                _response_usage(msgspec.json.decode(raw), settlement, event)
            else:
                _usage(raw, settlement, event)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise UpstreamError(f"The engine serving `{route.model}` answered with invalid JSON.") from exc
        event.status_code = 200
        event.latency_ms = (time.perf_counter() - context.started) * 1000.0
        await settlement.close(event)
        return JSONResult(raw, headers={COST_HEADER: f"{to_currency(event.cost_micros)} {self._pricing.currency}"})

    async def _open_stream(self, context: RequestContext, settlement: Settlement, event: UsageEvent) -> StreamRelay:
        shape = context.shape
        if context.endpoint is RESPONSES:
            events = ResponsesStreamUsage(
                started_at=context.started,
                counted_prompt=context.prompt.known,
                cap=shape.cap,
                answer=settlement.answer if settlement.capturing else None,
            )
            body = msgspec.json.encode(shape.body)
            response = await self._router.open(context.route, context.endpoint.upstream, body, context.request_id)
            return StreamRelay(context.route, response, events, settlement, event)
        usage = StreamUsage(
            client_include=shape.include_usage,
            client_continuous=shape.continuous_usage,
            started_at=context.started,
            answer=settlement.answer if settlement.capturing else None,
            choices_per_prompt=shape.choices_per_prompt,
            counted_prompt=context.prompt.known,
        )
        upstream_body = msgspec.json.encode(dict(shape.body, stream_options=UPSTREAM_STREAM_OPTIONS))
        response = await self._router.open(context.route, context.endpoint.upstream, upstream_body, context.request_id)
        return StreamRelay(context.route, response, usage, settlement, event, self._stream_stall_s)

    async def stored_response(
        self, principal: Principal, response_id: str, request_id: str, source: Source, cancel: bool = False
    ) -> JSONResult:
        """``GET /v1/responses/{id}`` (or its ``/cancel``): a stored response of the principal's own tenant, from
        the engine that keeps it; another tenant's id is not found. Recorded like every /v1 request (no tokens)."""
        started = time.perf_counter()
        principal.require_inference()
        event = UsageEvent.attributed(principal, request_id, CANCEL_RESPONSE if cancel else RETRIEVE_RESPONSE, "")
        settlement = Settlement(await self._usage.acquire(), self._audit, source, principal.kind, self._metrics)
        settlement.audited_object = ("response", response_id[:100])
        try:
            if self._owners is None:
                raise ResponseNotFoundError(response_id)
            owned = await self._owners.find(response_id, principal)
            event.model = owned.model
            authorise_model(principal, await self._policies.of(principal.tenant_id), owned.model)
            route = self._keeper(owned)
            event.engine = route.key
            path = f"/v1/responses/{owned.response_id}" + ("/cancel" if cancel else "")
            response = await self._router.open(
                route, path, b"{}" if cancel else None, request_id, method="POST" if cancel else "GET"
            )
            raw = await read_answer(response, route.model)
        except Exception as exc:
            await settle(settlement, event, started, exc)
            raise
        await settle(settlement, event, started)
        return JSONResult(raw)

    async def tokens(self, path: str, body: bytes, request_id: str, principal: Principal, source: Source) -> JSONResult:
        """``/v1/tokenize`` and ``/v1/detokenize``: the engine's own tokenizer (and chat template), for any served
        model the principal may call. Identity, allowlists, routing, a ledger row and an audit record as every /v1
        request; no budget charge and no admission tier: the engine runs no model for it."""
        started = time.perf_counter()
        principal.require_inference()
        data = decode_json_object(body)
        request: TokenizeRequest | DetokenizeRequest
        if path == DETOKENIZE:
            request = validate(data, DetokenizeRequest)
        else:
            request = validate(data, TokenizeRequest)
            if (request.prompt is None) == (request.messages is None):
                raise InvalidRequestError("Send either `prompt` or `messages`.", param="prompt", code="missing_field")
        policy = await self._policies.of(principal.tenant_id)
        authorise_model(principal, policy, request.model)
        route = self._router.route(request.model, None, principal.tenant_id)
        event = UsageEvent.attributed(principal, request_id, path, route.model, engine=route.key)
        settlement = Settlement(await self._usage.acquire(), self._audit, source, principal.kind, self._metrics)
        if policy.content_capture:
            settlement.prompt = prompt_text(data) if "tokens" not in data else str(data["tokens"])
        forwarded = {name: value for name, value in data.items() if value is not None}
        try:
            settlement.acquire(self._router.lease(route))
            response = await self._router.open(
                route, path.removeprefix("/v1"), msgspec.json.encode(forwarded), request_id
            )
            raw = await read_answer(response, route.model)
            if settlement.capturing:
                settlement.answer.append(raw.decode("utf-8", "replace"))
        except Exception as exc:
            await settle(settlement, event, started, exc)
            raise
        await settle(settlement, event, started)
        return JSONResult(raw)

    async def models(self, principal: Principal) -> dict[str, Any]:
        """The models this principal may call (what the node serves, less what its allowlists leave out)."""
        principal.require_inference()
        policy = await self._policies.of(principal.tenant_id)
        served = dict.fromkeys(route.model for route in self._router.routes)  # several engines may serve one model
        return {"object": "list", "data": [self._model(name) for name in served if allows(principal, policy, name)]}

    async def model(self, principal: Principal, model_id: str) -> dict[str, Any]:
        principal.require_inference()
        policy = await self._policies.of(principal.tenant_id)
        if not any(route.model == model_id for route in self._router.routes) or not allows(principal, policy, model_id):
            raise ModelNotFoundError(model_id)
        return self._model(model_id)

    def _model(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "owned_by": "appliance", "created": self._created}


def _usage(raw: bytes, settlement: Settlement, event: UsageEvent) -> None:
    """A chat, completion or embedding answer's usage (and, when content is captured, its text)."""
    answer = msgspec.json.decode(raw, type=UsageOnly)
    usage = answer.usage or {}
    event.finish_reason = answer.finish_reason
    if settlement.capturing:
        settlement.answer.extend(choice_texts(msgspec.json.decode(raw)))
    event.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    event.completion_tokens = int(usage.get("completion_tokens") or 0)
    event.total_tokens = int(usage.get("total_tokens") or event.prompt_tokens + event.completion_tokens)


def _response_usage(response: Any, settlement: Settlement, event: UsageEvent) -> None:
    """A Responses answer's usage (``input_tokens``, ``output_tokens``) and, when content is captured, its text."""
    if not isinstance(response, dict):
        raise msgspec.ValidationError("a response object is expected")
    event.prompt_tokens, event.completion_tokens = usage_of(response)
    event.total_tokens = event.prompt_tokens + event.completion_tokens
    event.finish_reason = finish_of(response)
    if settlement.capturing:
        settlement.answer.extend(output_texts(response))


def _captured(endpoint: Endpoint, data: dict[str, Any], shape: RequestShape) -> str:
    """A request's input as text, for content capture."""
    if endpoint is RESPONSES:
        return input_text(data)
    if endpoint is SCORE or endpoint is RERANK:
        return "\n".join(str(text) for text in shape.prompts)
    return prompt_text(data)


def _outcome(context: RequestContext) -> UsageEvent:
    """The request's outcome as the sinks receive it, filled in as it goes."""
    return UsageEvent.attributed(
        context.principal,
        context.request_id,
        context.endpoint.path,
        context.route.model,
        engine=context.route.key,
        streamed=context.shape.streamed,
    )


def _client_left(event: UsageEvent, context: RequestContext, settlement: Settlement) -> None:
    event.status_code, event.error_code = CLIENT_CLOSED_REQUEST, "client_disconnected"
    event.client_disconnected = True
    if settlement.meter is not None:
        # The engine was working on it and its count is lost with the connection (closing it makes vLLM abort):
        # charge what was reserved (or, without a budget, what would have been), an upper bound, so neither
        # budgets nor the ledger under-count.
        grant = settlement.hold.grant if settlement.hold is not None else None
        event.prompt_tokens = (grant.prompt_tokens if grant is not None else 0) or context.prompt.known or 0
        reserved = grant.max_tokens if grant is not None else None
        shape = context.shape
        event.completion_tokens = reserved or shape.cap * shape.sequences
        event.total_tokens = event.prompt_tokens + event.completion_tokens
    event.latency_ms = (time.perf_counter() - context.started) * 1000.0


def allows(principal: Principal, policy: TenantPolicy, model: str) -> bool:
    """Whether the principal's API key and its tenant both let it call ``model``."""
    return (principal.models is None or model in principal.models) and (policy.models is None or model in policy.models)


def authorise_model(principal: Principal, policy: TenantPolicy, model: object) -> None:
    if not isinstance(model, str) or allows(principal, policy, model):
        return  # a model that is not a name is refused by routing, with its own message
    whose = "this API key" if principal.models is not None and model not in principal.models else "this tenant"
    raise PermissionDeniedError(
        f"The model `{model}` is not allowed for {whose}; an administrator decides which models it may call.",
        param="model",
        code="model_not_allowed",
    )


class _NoPolicies:
    """Tenant settings where none are kept (a serving path built without a database): capture nothing, allow all."""

    async def of(self, tenant_id: str | None) -> TenantPolicy:
        return NO_POLICY


NO_POLICIES: Any = _NoPolicies()
