"""The published contract: ``GET /openapi.json`` describes the ``/v1`` and ``/admin`` APIs.

Litestar builds the description from the route handlers (the admin routes' typed parameters and bodies). The
OpenAI routes read their body themselves (the parse stage decides what the engine gets), so their request and
answer schemas are added here from the same structs the gateway validates with, plus every other field the
parse stage accepts; every operation lists the error statuses it may answer, with the OpenAI error envelope.

Only the JSON is served: no documentation page, so nothing is ever loaded from elsewhere.
"""

from __future__ import annotations

import copy
from importlib import metadata
from typing import Any

import msgspec
from litestar import Request, Router
from litestar.handlers import HTTPRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.routes import BaseRoute
from litestar.types import ControllerRouterHandler

from appliance.gateway import shape
from appliance.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    RerankRequest,
    ResponsesRequest,
    ScoreRequest,
    TokenizeRequest,
)
from appliance.identity.auth import PUBLIC_PATHS, PUBLIC_PREFIXES

CONTRACT_PATH = "/openapi.json"
_REF = "#/components/schemas/{name}"

ERROR_RESPONSE: dict[str, Any] = {
    "type": "object",
    "description": "The OpenAI error envelope, for every error of every route.",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string", "examples": ["invalid_request_error", "authentication_error"]},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "integer", "null"]},
            },
        }
    },
}

_ERRORS = {
    "400": "The request is invalid (the message names the field).",
    "401": "No valid credentials (API key or bearer token).",
    "403": "The credentials do not allow this.",
    "404": "Not found (an unknown route, model or item).",
    "405": "The route does not take this method.",
    "409": "Conflicts with the current state.",
    "413": "The body is larger than the gateway accepts.",
    "415": "The body's media type is not JSON.",
    "429": "A budget or rate limit refuses the request (`x-should-retry` says whether a retry may pass).",
    "500": "An unexpected error (logged with the request id).",
    "502": "The engine failed or answered with something that is not its API.",
    "503": "No engine can take the request now (admission queue timeout, engine down).",
    "504": "The engine did not answer in time.",
}

_USAGE = {
    "type": ["object", "null"],
    "properties": {
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": ["integer", "null"]},
        "total_tokens": {"type": "integer"},
    },
}
_ANSWERS: dict[str, dict[str, Any]] = {
    "ChatCompletion": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "chat.completion"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "message"],
                    "properties": {
                        "index": {"type": "integer"},
                        "message": {
                            "type": "object",
                            "properties": {
                                "role": {"type": "string"},
                                "content": {"type": ["string", "null"]},
                                "tool_calls": {"type": ["array", "null"]},
                            },
                        },
                        "finish_reason": {"type": ["string", "null"]},
                    },
                },
            },
            "usage": _USAGE,
        },
    },
    "Completion": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "text_completion"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "text"],
                    "properties": {"index": {"type": "integer"}, "text": {"type": "string"}},
                },
            },
            "usage": _USAGE,
        },
    },
    "EmbeddingList": {
        "type": "object",
        "required": ["object", "data", "model"],
        "properties": {
            "object": {"const": "list"},
            "model": {"type": "string"},
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "embedding"],
                    "properties": {
                        "index": {"type": "integer"},
                        "object": {"const": "embedding"},
                        "embedding": {
                            "description": "floats, or base64 of little-endian float32 (`encoding_format: base64`)",
                            "oneOf": [{"type": "array", "items": {"type": "number"}}, {"type": "string"}],
                        },
                    },
                },
            },
            "usage": _USAGE,
        },
    },
    "Response": {
        "type": "object",
        "required": ["id", "object", "status", "output"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "response"},
            "created_at": {"type": ["integer", "number"]},
            "model": {"type": "string"},
            "status": {"type": "string"},
            "output": {"type": "array", "items": {"type": "object"}},
            "usage": {
                "type": ["object", "null"],
                "properties": {
                    "input_tokens": {"type": "integer"},
                    "output_tokens": {"type": "integer"},
                    "total_tokens": {"type": "integer"},
                },
            },
        },
    },
    "ScoreList": {
        "type": "object",
        "required": ["object", "data", "model"],
        "properties": {
            "object": {"const": "list"},
            "model": {"type": "string"},
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "score"],
                    "properties": {"index": {"type": "integer"}, "score": {"type": "number"}},
                },
            },
            "usage": _USAGE,
        },
    },
    "Rerank": {
        "type": "object",
        "required": ["results", "model"],
        "properties": {
            "model": {"type": "string"},
            "results": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "relevance_score"],
                    "properties": {
                        "index": {"type": "integer"},
                        "relevance_score": {"type": "number"},
                        "document": {"type": ["object", "null"]},
                    },
                },
            },
            "usage": _USAGE,
        },
    },
    "Tokens": {
        "type": "object",
        "required": ["count", "tokens"],
        "properties": {
            "count": {"type": "integer"},
            "max_model_len": {"type": "integer"},
            "tokens": {"type": "array", "items": {"type": "integer"}},
            "token_strs": {"type": ["array", "null"], "items": {"type": "string"}},
        },
    },
    "Text": {"type": "object", "required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
    "Model": {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "model"},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
        },
    },
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"$ref": _REF.format(name="Model")}},
        },
    },
}

_STREAM = {
    "text/event-stream": {
        "schema": {"type": "string", "description": "Server-sent events: `data: {chunk}` lines, then `data: [DONE]`."}
    }
}

# (path, method) -> (request schema, answer schema, kind of request, whether it may stream)
_OPENAI: dict[tuple[str, str], tuple[type[msgspec.Struct] | None, str, shape.Kind | None, bool]] = {
    ("/v1/chat/completions", "post"): (ChatCompletionRequest, "ChatCompletion", "chat", True),
    ("/v1/completions", "post"): (CompletionRequest, "Completion", "completions", True),
    ("/v1/embeddings", "post"): (EmbeddingRequest, "EmbeddingList", "embeddings", False),
    ("/v1/responses", "post"): (ResponsesRequest, "Response", "responses", True),
    ("/v1/responses/{response_id}", "get"): (None, "Response", None, False),
    ("/v1/responses/{response_id}/cancel", "post"): (None, "Response", None, False),
    ("/v1/score", "post"): (ScoreRequest, "ScoreList", "score", False),
    ("/v1/rerank", "post"): (RerankRequest, "Rerank", "rerank", False),
    ("/v1/tokenize", "post"): (TokenizeRequest, "Tokens", None, False),
    ("/v1/detokenize", "post"): (DetokenizeRequest, "Text", None, False),
    ("/v1/models", "get"): (None, "ModelList", None, False),
    ("/v1/models/{model_id}", "get"): (None, "Model", None, False),
}


# Answers that are not JSON beside the JSON ones: (path, method) -> media types of the 200 answer.
_ALSO = {
    ("/admin/usage", "get"): {"text/csv": {"schema": {"type": "string", "description": "with `format=csv`"}}},
    ("/admin/usage/requests", "get"): {"text/csv": {"schema": {"type": "string", "description": "with `format=csv`"}}},
}
# Answers that are only something else than JSON.
_INSTEAD = {
    ("/admin/audit/witness", "get"): {
        "text/plain": {"schema": {"type": "string", "description": "a C2SP tlog-witness add-checkpoint request body"}}
    },
}


def contract(schema: dict[str, Any]) -> dict[str, Any]:
    """Litestar's description of the app, completed: the OpenAI routes' bodies and every route's errors."""
    schema = copy.deepcopy(schema)
    schema.setdefault("components", {})["securitySchemes"] = {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key (`apk_...`) or an access token of the appliance's identity provider.",
        }
    }
    schema["security"] = [{"bearer": []}]
    components = schema["components"].setdefault("schemas", {})
    components["ErrorResponse"] = ERROR_RESPONSE
    components.update(copy.deepcopy(_ANSWERS))
    structs = [struct for struct, *_ in _OPENAI.values() if struct is not None]
    (bodies, definitions) = msgspec.json.schema_components(structs, ref_template=_REF)
    components.update(definitions)
    for (path, method), (struct, answer, kind, streams) in _OPENAI.items():
        operation = schema.get("paths", {}).get(path, {}).get(method)
        if operation is None:
            continue
        if struct is not None:
            if kind is not None:
                _complete_request(components[struct.__name__], kind)
            else:  # every field is the struct's own, and no other is accepted
                components[struct.__name__]["additionalProperties"] = False
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": _REF.format(name=struct.__name__)}}},
            }
        content: dict[str, Any] = {"application/json": {"schema": {"$ref": _REF.format(name=answer)}}}
        if streams:
            content.update(_STREAM)
        operation["responses"] = {
            "200": {"description": "The answer (streamed when `stream` is true).", "content": content}
        }
    del bodies
    for (path, method), media in _ALSO.items():
        operation = schema.get("paths", {}).get(path, {}).get(method)
        if operation is not None:
            operation["responses"]["200"].setdefault("content", {}).update(media)
    for (path, method), media in _INSTEAD.items():
        operation = schema.get("paths", {}).get(path, {}).get(method)
        if operation is not None:
            operation["responses"]["200"]["content"] = copy.deepcopy(media)
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            if isinstance(operation, dict) and method in ("get", "post", "put", "patch", "delete"):
                _add_errors(operation)
                if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
                    operation["security"] = []
    return schema


_TOKENS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
_PROMPTS = {
    "description": "a text, token ids, or a non-empty list of either",
    "oneOf": [
        {"type": "string"},
        _TOKENS,
        {"type": "array", "minItems": 1, "items": {"type": "string"}},
        {"type": "array", "minItems": 1, "items": _TOKENS},
    ],
}
# What the parse stage requires beyond the structs' own required fields (checked after conversion).
_REQUIRED: dict[shape.Kind, tuple[str, dict[str, Any] | None] | None] = {
    "chat": ("messages", None),
    "completions": ("prompt", _PROMPTS),
    "embeddings": ("input", _PROMPTS),
    "score": None,  # `queries` and `documents`, or `text_1` and `text_2`
    "rerank": None,
    "responses": (
        "input",
        {
            "description": "a text, or a non-empty list of input items (messages, function calls and their outputs)",
            "oneOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "minItems": 1, "items": {"type": "object"}},
            ],
        },
    ),
}


def _complete_request(definition: dict[str, Any], kind: shape.Kind) -> None:
    """Every field the parse stage accepts for ``kind`` is listed (typed where the struct types it); any other
    is refused with 400, which ``additionalProperties: false`` says."""
    properties = definition.setdefault("properties", {})
    required = _REQUIRED[kind]
    if required is not None:
        name, typed = required
        definition["required"] = sorted({*definition.get("required", []), name})
        if typed is not None:
            properties[name] = copy.deepcopy(typed)
        properties[name].pop("default", None)
    for name in sorted(shape.accepted_fields(kind)):
        if name not in properties:
            verdict = shape.field_verdict(kind, name)
            what = "passed to the engine" if verdict == "forwarded" else "accepted, not acted on"
            properties[name] = {"description": f"{what} (see the README's API table)"}
    definition["additionalProperties"] = False


def _add_errors(operation: dict[str, Any]) -> None:
    """Every error is the envelope (one mapper answers them all, Litestar's own validation errors included)."""
    responses = operation.setdefault("responses", {})
    for status, description in _ERRORS.items():
        responses[status] = {
            "description": description,
            "content": {"application/json": {"schema": {"$ref": _REF.format(name="ErrorResponse")}}},
        }


class ContractPlugin(JsonRenderPlugin):
    """Serves the completed description as JSON, and nothing else (no page that would load assets)."""

    def __init__(self) -> None:
        super().__init__(path="/")
        self._rendered: bytes | None = None

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        if self._rendered is None:
            self._rendered = self.render_json(request, contract(openapi_schema))
        return self._rendered


class _ContractRouter(Router):
    """Serves the contract at its one path only: Litestar would add an HTML 404 page for the paths below it and
    a second, uncompleted copy of the JSON; every other path answers the app's JSON 404."""

    def register(self, value: ControllerRouterHandler) -> list[BaseRoute]:
        if isinstance(value, HTTPRouteHandler) and set(value.paths) != {"/"}:
            return []
        return super().register(value)


def openapi_config(version: str) -> OpenAPIConfig:
    return OpenAPIConfig(
        title="Appliance API",
        version=version,
        description="OpenAI-compatible inference (/v1) and administration (/admin) of the appliance. Every error "
        'answers the OpenAI envelope `{"error": {"message", "type", "param", "code"}}`.',
        render_plugins=[ContractPlugin()],
        openapi_router=_ContractRouter(CONTRACT_PATH, route_handlers=[], include_in_schema=False),
    )


def app_version() -> str:
    try:
        return metadata.version("appliance")
    except metadata.PackageNotFoundError:
        return "0+unknown"
