"""The parse stage: what the engine will read of a request, and the most it may generate.

:func:`parse` turns the client's JSON object into a :class:`RequestShape`:

- the body the engine gets: the endpoint's OpenAI fields that the engine obeys and an allowlist of vLLM extras.
  OpenAI fields the engine ignores are accepted and not forwarded; a field of another endpoint, an extra that
  would change cost or isolation unchecked (``cache_salt``, ``priority``, ``prompt_logprobs``, beam search...),
  and any unknown field are refused with 400 naming it, never counted as something they are not;
- the prompts the engine will tokenize (every item of a completions or embeddings list, token-id prompts too);
- how many sequences the engine may produce (``n`` for each prompt; none for embeddings);
- the one output cap it will obey (chat: ``max_completion_tokens`` over ``max_tokens``, as vLLM reads them),
  which :meth:`RequestShape.set_cap` rewrites as the only cap field forwarded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from appliance.gateway.protocol import (
    MAX_SEQUENCES,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    RerankRequest,
    ResponsesRequest,
    ScoreRequest,
    require_inputs,
    validate,
)
from appliance.lib.errors import InvalidRequestError

Kind = Literal["chat", "completions", "embeddings", "responses", "score", "rerank"]
Prompt = str | list[int]

# OpenAI fields the engine reads, per endpoint (what the SDK's request types carry).
_SAMPLING = frozenset(
    {
        "model",
        "n",
        "stream",
        "stream_options",
        "max_tokens",
        "temperature",
        "top_p",
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "logprobs",
        "seed",
        "stop",
        "response_format",
    }
)
_CHAT_OPENAI = _SAMPLING | {
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "reasoning_effort",
}
_COMPLETIONS_OPENAI = _SAMPLING | {"prompt", "echo"}
_EMBEDDINGS_OPENAI = frozenset({"model", "input", "encoding_format", "dimensions"})
_RESPONSES_OPENAI = frozenset(
    {
        "model",
        "input",
        "instructions",
        "max_output_tokens",
        "max_tool_calls",
        "parallel_tool_calls",
        "previous_response_id",
        "reasoning",
        "store",
        "stream",
        "temperature",
        "text",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "truncation",
        "include",
    }
)

# OpenAI fields the engines do not act on: accepted (the SDK sends them), not forwarded.
_IGNORED = frozenset(
    {
        "user",
        "metadata",
        "store",
        "service_tier",
        "prompt_cache_key",
        "prompt_cache_options",  # caching hints: vLLM's prefix cache is automatic (and salted per tenant)
        "prompt_cache_retention",
        "safety_identifier",
        "verbosity",
        "modalities",
    }
)

# vLLM extras that cannot make a request cost more than the prompt and the reserved output: forwarded.
# (``ignore_eos`` and ``min_tokens`` make the engine use its cap, which is reserved anyway; ``min_tokens`` is
# lowered to the cap. ``truncate_prompt_tokens`` only shortens the prompt; it is counted as it is applied.
# Grammars (``structured_outputs``, ``response_format``) constrain the output, which the cap still bounds.)
_GENERATION_EXTRAS = frozenset(
    {
        "top_k",
        "min_p",
        "repetition_penalty",
        "stop_token_ids",
        "include_stop_str_in_output",
        "ignore_eos",
        "min_tokens",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "truncate_prompt_tokens",
        "allowed_token_ids",
        "bad_words",
        "add_special_tokens",
        "structured_outputs",
        "return_tokens_as_token_ids",
        "return_token_ids",
        "repetition_detection",
    }
)
_CHAT_EXTRAS = _GENERATION_EXTRAS | {
    "echo",
    "add_generation_prompt",
    "continue_final_message",
    "chat_template_kwargs",
    "include_reasoning",
}
# Score and rerank: the texts, and options that only shorten them or shape the scores.
_SCORE_OPENAI = frozenset(
    {"model", "queries", "documents", "text_1", "text_2", "truncate_prompt_tokens", "max_tokens_per_query"}
) | {"max_tokens_per_doc", "use_activation"}
_RERANK_OPENAI = frozenset({"model", "query", "documents", "top_n", "truncate_prompt_tokens", "use_activation"}) | {
    "max_tokens_per_query",
    "max_tokens_per_doc",
}
_RESPONSES_EXTRAS = frozenset(
    {
        "top_k",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "seed",
        "stop",
        "stop_token_ids",
        "ignore_eos",
        "skip_special_tokens",
        "include_stop_str_in_output",
        "structured_outputs",
        "chat_template_kwargs",
        "include_reasoning",
    }
)
_EMBEDDINGS_EXTRAS = frozenset({"truncate_prompt_tokens", "add_special_tokens", "embed_dtype", "endianness"})

# Refused with the reason, so a client learns why rather than meeting a generic "unknown field".
_REFUSED = {
    "cache_salt": "the gateway isolates tenants' prefix caches itself; a client's salt is not accepted",
    "priority": "scheduling priority is set by the gateway's admission tiers, not by the client",
    "request_id": "the gateway names requests (x-request-id)",
    "session_id": "send the X-Session-Id header instead",
    "use_beam_search": "beam search is not served through the gateway (its cost is not bounded by the cap)",
    "prompt_logprobs": "prompt logprobs are not served through the gateway (a full-vocabulary pass per prompt token)",
    "prompt_embeds": "prompt embeddings are not served through the gateway",
    "padding": "padding to the maximum length is not served through the gateway",
    "suffix": "`suffix` (fill-in-the-middle) is not supported by the served models",
    "chat_template": "a client-supplied chat template is not accepted; the model's own template is used",
    "documents": "`documents` is not accepted; use /v1/rag/chat for grounded answers",
    "functions": "`functions` is deprecated and not served; use `tools`",
    "function_call": "`function_call` is deprecated and not served; use `tool_choice`",
    "audio": "audio output is not served",
    "prediction": "predicted outputs are not served",
    "web_search_options": "web search is not available on an air-gapped appliance",
    "moderation": "the appliance runs no moderation model; a request that asks for moderation is not served without it",
    "kv_transfer_params": "an engine-internal field",
    "ec_transfer_params": "an engine-internal field",
    "vllm_xargs": "an engine-internal field",
    "mm_processor_kwargs": "an engine-internal field",
    "media_io_kwargs": "an engine-internal field",
    "logits_processors": "an engine-internal field",
}

# Fields refused on one endpoint only (a name another endpoint serves under another meaning).
_KIND_REFUSED: dict[str, dict[str, str]] = {
    "score": {
        "data_1": "send `queries` and `documents`",
        "data_2": "send `queries` and `documents`",
        "items": "send `queries` and `documents`",
        "instruction": "scoring instructions (cross-encoder templates) are not served",
        "chat_template_kwargs": "scoring templates are not served",
    },
    "rerank": {
        "instruction": "scoring instructions (cross-encoder templates) are not served",
        "chat_template_kwargs": "scoring templates are not served",
    },
    "responses": {
        "background": "background responses are not served (a request's budget and audit record end with its "
        "connection)",
        "background_options": "background responses are not served",
        "conversation": "the Conversations API is not served; chain responses with `previous_response_id`",
        "context_management": "server-side context compaction is not served",
        "prompt": "stored prompt templates are not served; send `input` and `instructions`",
        "access_programs": "not served by the engines",
        "image": "image generation is not served",
        "previous_input_messages": "an engine-internal field (use `previous_response_id`)",
        "enable_response_messages": "an engine-internal field",
    },
}
_KIND_IGNORED: dict[str, frozenset[str]] = {
    # the SDK's only stream option asks for obfuscation padding, which the gateway's SSE does not carry
    "responses": frozenset({"stream_options"}),
}

_OTHER_ENDPOINT = {
    "messages": "/v1/chat/completions",
    "prompt": "/v1/completions",
    "input": "/v1/embeddings",
}


@dataclass(frozen=True, slots=True)
class PromptTokens:
    total: int  # every prompt together: what the engine reports as prompt_tokens
    longest: int  # the longest single prompt: what must fit in the context with its output


@dataclass(slots=True)
class RequestShape:
    kind: Kind
    body: dict[str, Any]  # what the engine gets (the cap is set by set_cap)
    prompts: list[Prompt]  # completions and embeddings: every item the engine tokenizes; chat: none
    sequences: int  # outputs the engine may produce: n for each prompt (0: embeddings generate nothing)
    asked_cap: int | None  # the client's output cap per sequence, as the engine would read it
    streamed: bool
    include_usage: bool = False
    continuous_usage: bool = False
    cap: int = 0  # the output cap per sequence forwarded to the engine (set_cap)
    chat_view: dict[str, Any] | None = None  # responses: the input as the chat template sees it (to count it)
    prior_tokens: int = 0  # responses: the context of the response it continues (previous_response_id)

    @property
    def choices_per_prompt(self) -> int:
        return max(1, self.sequences // max(1, len(self.prompts)))

    @property
    def generates(self) -> bool:
        return self.sequences > 0

    @property
    def truncation(self) -> int | None:
        value = self.body.get("truncate_prompt_tokens")
        return value if isinstance(value, int) and value != 0 else None

    def set_cap(self, per_sequence: int) -> None:
        """Forward one cap, the field the engine obeys; ``min_tokens`` cannot ask for more."""
        self.cap = per_sequence
        self.body.pop("max_tokens", None)
        self.body.pop("max_completion_tokens", None)
        self.body.pop("max_output_tokens", None)
        self.body[_CAP_FIELD[self.kind]] = per_sequence
        if isinstance(self.body.get("min_tokens"), int):
            self.body["min_tokens"] = min(self.body["min_tokens"], per_sequence)


_CAP_FIELD: dict[Kind, str] = {
    "chat": "max_completion_tokens",
    "completions": "max_tokens",
    "embeddings": "max_tokens",
    "responses": "max_output_tokens",
    "score": "max_tokens",
    "rerank": "max_tokens",
}

Schema = type[
    ChatCompletionRequest | CompletionRequest | EmbeddingRequest | ResponsesRequest | ScoreRequest | RerankRequest
]


def parse(data: dict[str, Any], schema: Schema) -> RequestShape:
    """Validate ``data`` for the endpoint whose request struct is ``schema`` and say what the engine gets."""
    if schema is ResponsesRequest:
        from appliance.gateway.responses import parse_responses  # a cycle: it builds on this module

        return parse_responses(data)
    if schema is ScoreRequest or schema is RerankRequest:
        from appliance.gateway.scoring import parse_rerank, parse_score  # a cycle: it builds on this module

        return parse_score(data) if schema is ScoreRequest else parse_rerank(data)
    if schema is ChatCompletionRequest:
        return _chat(data)
    if schema is CompletionRequest:
        return _completions(data)
    return _embeddings(data)


_ALLOWED: dict[Kind, frozenset[str]] = {
    "chat": _CHAT_OPENAI | _CHAT_EXTRAS,
    "completions": _COMPLETIONS_OPENAI | _GENERATION_EXTRAS | {"best_of"},
    "embeddings": _EMBEDDINGS_OPENAI | _EMBEDDINGS_EXTRAS,
    "responses": _RESPONSES_OPENAI | _RESPONSES_EXTRAS,
    "score": _SCORE_OPENAI,
    "rerank": _RERANK_OPENAI,
}

Verdict = Literal["forwarded", "ignored", "refused", "other_endpoint", "unknown"]


def accepted_fields(kind: Kind) -> frozenset[str]:
    """Every top-level field a request of ``kind`` may carry (forwarded or accepted and dropped)."""
    return _ALLOWED[kind] | _IGNORED | _KIND_IGNORED.get(kind, frozenset())


def field_verdict(kind: Kind, name: str) -> Verdict:
    """What the parse stage does with a top-level field of ``kind``'s request: forward it to the engine, accept and
    drop it, or refuse it with its reason (another endpoint's field, a refused one, or an unknown one)."""
    if name in _ALLOWED[kind]:
        return "forwarded"
    if name in _IGNORED or name in _KIND_IGNORED.get(kind, ()):
        return "ignored"
    if name in _REFUSED or name in _KIND_REFUSED.get(kind, {}):
        return "refused"
    return "other_endpoint" if name in _OTHER_ENDPOINT else "unknown"


def refusal(kind: Kind, name: str) -> str:
    """Why a refused field is refused on ``kind``'s endpoint."""
    return _KIND_REFUSED.get(kind, {}).get(name) or _REFUSED[name]


def vet(data: dict[str, Any], kind: Kind) -> dict[str, Any]:
    """The body the engine gets. An explicit null is the field's absence, for every field the gateway knows (frameworks
    send null for what they leave unset, refused fields included); an unknown name is refused even when null."""
    body = {}
    for name, value in data.items():
        verdict = field_verdict(kind, name)
        if verdict == "forwarded":
            if value is not None:
                body[name] = value
        elif verdict == "ignored" or (value is None and verdict != "unknown"):
            continue
        elif verdict == "refused":
            raise InvalidRequestError(
                f"`{name}` is not accepted: {refusal(kind, name)}.", param=name, code="unsupported_field"
            )
        elif verdict == "other_endpoint":
            raise InvalidRequestError(
                f"`{name}` is not a field of this endpoint (it belongs to {_OTHER_ENDPOINT[name]}).",
                param=name,
                code="unsupported_field",
            )
        else:
            raise InvalidRequestError(
                f"Unrecognized request argument supplied: `{name}`.", param=name, code="unsupported_field"
            )
    return body


def _chat(data: dict[str, Any]) -> RequestShape:
    body = vet(data, "chat")
    request = validate(data, ChatCompletionRequest)
    require_inputs(request)
    # vLLM obeys max_completion_tokens when it is set, else max_tokens.
    cap = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    return _generation(body, "chat", [], request.choices, cap, request)


def _completions(data: dict[str, Any]) -> RequestShape:
    body = vet(data, "completions")
    request = validate(data, CompletionRequest)
    require_inputs(request)
    best_of = body.pop("best_of", None)
    if best_of is not None and best_of not in (1, request.choices):
        raise InvalidRequestError(
            "`best_of` is not supported by the engines (they return every sequence they generate); use `n`.",
            param="best_of",
            code="unsupported_field",
        )
    prompts = _prompts(request.prompt, "prompt")
    if request.choices * len(prompts) > MAX_SEQUENCES:
        raise InvalidRequestError(
            f"`n` times the number of prompts is {request.choices * len(prompts)}; at most {MAX_SEQUENCES} "
            "sequences per request.",
            param="n",
        )
    return _generation(body, "completions", prompts, request.choices * len(prompts), request.max_tokens, request)


def _generation(
    body: dict[str, Any],
    kind: Kind,
    prompts: list[Prompt],
    sequences: int,
    cap: int | None,
    request: ChatCompletionRequest | CompletionRequest,
) -> RequestShape:
    options = request.stream_options
    body.pop("stream_options", None)  # the gateway asks the engine for its own (see usage.py)
    return RequestShape(
        kind=kind,
        body=body,
        prompts=prompts,
        sequences=sequences,
        asked_cap=cap,
        streamed=bool(request.stream),
        include_usage=bool(options and options.include_usage),
        continuous_usage=bool(options and options.include_usage and options.continuous_usage_stats),
    )


def _embeddings(data: dict[str, Any]) -> RequestShape:
    body = vet(data, "embeddings")
    request = validate(data, EmbeddingRequest)
    require_inputs(request)
    prompts = _prompts(request.input, "input")
    return RequestShape(kind="embeddings", body=body, prompts=prompts, sequences=0, asked_cap=None, streamed=False)


def _prompts(value: Any, param: str) -> list[Prompt]:
    """Every prompt of ``value``: a text, a list of token ids, or a list of either."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise InvalidRequestError(f"`{param}` must be a text, token ids, or a non-empty list of them.", param=param)
    if all(_is_token(item) for item in value):
        return [list(value)]
    prompts: list[Prompt] = []
    for index, item in enumerate(value):
        if isinstance(item, str):
            prompts.append(item)
        elif isinstance(item, list) and item and all(_is_token(token) for token in item):
            prompts.append(list(item))
        else:
            raise InvalidRequestError(
                f"`{param}[{index}]` must be a text or a non-empty list of token ids.", param=f"{param}[{index}]"
            )
    return prompts


def _is_token(item: Any) -> bool:
    return isinstance(item, int) and not isinstance(item, bool) and item >= 0


def output_cap(shape: RequestShape, prompt: PromptTokens, context: int | None, default: int) -> int:
    """The output cap per sequence before budgets: the client's, or the model's default for a request that names
    none; never more than the model's context leaves after the longest prompt (the engine would refuse it)."""
    room = None if context is None else context - prompt.longest
    if room is not None and room < 1:
        raise InvalidRequestError(
            f"The prompt has {prompt.longest} tokens and the model's context is {context}: there is no room to "
            "generate.",
            param=_PROMPT_FIELD[shape.kind],
            code="context_length_exceeded",
        )
    field = _CAP_FIELD[shape.kind]
    if shape.kind == "chat" and "max_completion_tokens" not in shape.body:
        field = "max_tokens"
    if shape.asked_cap is not None:
        if room is not None and shape.asked_cap > room:
            raise InvalidRequestError(
                f"`{field}` is {shape.asked_cap}, but the prompt has {prompt.longest} tokens and the model's context "
                f"is {context}: at most {room} can be generated.",
                param=field,
                code="context_length_exceeded",
            )
        return shape.asked_cap
    return default if room is None else min(default, room)


_PROMPT_FIELD: dict[Kind, str] = {
    "chat": "messages",
    "completions": "prompt",
    "embeddings": "input",
    "responses": "input",
    "score": "queries",
    "rerank": "documents",
}
