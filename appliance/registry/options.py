"""Per-version serving options: validated before an engine starts, recorded with the version, and mapped to
vLLM's command-line arguments here and nowhere else."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from appliance.lib.errors import InvalidRequestError

DTYPES = ("auto", "bfloat16", "float16", "float32")


class SpeculativeOptions(BaseModel):
    """n-gram speculation (proposals looked up in the prompt, no draft model) or a draft model, which is another
    registry version (by id)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["ngram", "draft_model"]
    num_speculative_tokens: int = Field(default=3, ge=1, le=16)
    prompt_lookup_min: int = Field(default=1, ge=1, le=16, description="ngram: shortest n-gram matched")
    prompt_lookup_max: int = Field(default=4, ge=1, le=16, description="ngram: longest n-gram matched")
    draft_version_id: int | None = Field(
        default=None, ge=1, le=2**63 - 1, description="draft_model: the registry version"
    )

    @model_validator(mode="after")
    def _coherent(self) -> SpeculativeOptions:
        if self.method == "draft_model" and self.draft_version_id is None:
            raise ValueError("speculative decoding with a draft model needs draft_version_id (a registry version)")
        if self.method == "ngram" and self.draft_version_id is not None:
            raise ValueError("n-gram speculation takes no draft model")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError("prompt_lookup_min is larger than prompt_lookup_max")
        return self


class ServingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    quantization: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$",
        description="vLLM quantization method (the platform's)",
    )
    prefix_caching: bool | None = Field(default=None, description="None: vLLM's default")
    speculative: SpeculativeOptions | None = None
    max_num_batched_tokens: int | None = Field(default=None, ge=1)
    context_length: int | None = Field(default=None, ge=1, description="--max-model-len; at most the config's")
    kv_cache_gib: int | None = Field(default=None, ge=1, description="KV-cache size of each engine")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] | None = None
    # A name, never something an argument parser could take for an option of its own.
    tool_call_parser: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
    reasoning_parser: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
    replicas: int = Field(default=1, ge=1, le=16)


@dataclass(frozen=True)
class EngineFacts:
    """What the engine environment supports, as the engine's own Python reports it (see probe.py)."""

    platform: str = "cpu"
    quantization_methods: tuple[str, ...] = ()
    supported_quantization: tuple[str, ...] = ()  # empty: the platform restricts none
    tool_parsers: tuple[str, ...] = ()
    reasoning_parsers: tuple[str, ...] = ()

    @classmethod
    def from_probe(cls, data: dict[str, Any]) -> EngineFacts:
        return cls(
            platform=str(data.get("platform", "cpu")),
            quantization_methods=tuple(data.get("quantization_methods", ())),
            supported_quantization=tuple(data.get("supported_quantization", ())),
            tool_parsers=tuple(data.get("tool_parsers", ())),
            reasoning_parsers=tuple(data.get("reasoning_parsers", ())),
        )


class ServingOptionsError(InvalidRequestError):
    code = "invalid_serving_options"


def parse_options(data: dict[str, Any] | None) -> ServingOptions:
    try:
        return ServingOptions.model_validate(data or {})
    except ValueError as exc:
        raise ServingOptionsError(f"invalid serving options: {exc}") from exc


def check_options(options: ServingOptions, facts: EngineFacts, context_length: int) -> None:
    """Refuse (raise) options this model or this engine environment cannot serve with."""
    if options.context_length is not None and options.context_length > context_length:
        raise ServingOptionsError(
            f"context_length {options.context_length} is longer than the model's own ({context_length})"
        )
    if options.quantization is not None:
        if options.quantization not in facts.quantization_methods:
            raise ServingOptionsError(f"unknown quantization method {options.quantization!r}")
        if facts.supported_quantization and options.quantization not in facts.supported_quantization:
            raise ServingOptionsError(
                f"quantization {options.quantization!r} is not supported on this node's platform ({facts.platform}): "
                f"it supports {', '.join(facts.supported_quantization)}"
            )
    if options.tool_call_parser is not None and options.tool_call_parser not in facts.tool_parsers:
        raise ServingOptionsError(f"the engine has no tool call parser {options.tool_call_parser!r}")
    if options.reasoning_parser is not None and options.reasoning_parser not in facts.reasoning_parsers:
        raise ServingOptionsError(f"the engine has no reasoning parser {options.reasoning_parser!r}")


@dataclass(frozen=True)
class EngineArgs:
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


def vllm_args(options: ServingOptions, *, gpu: bool, draft_dir: Path | None = None) -> EngineArgs:
    """The vLLM arguments (and environment) of ``options``: the one place options become a command line.

    ``--max-model-len`` comes from the version's context length (options.context_length where set), in
    :func:`appliance.engines.runner.engine_command` like every engine's; replicas are engine processes."""
    args: list[str] = []
    env: dict[str, str] = {}
    if options.quantization is not None:
        args += ["--quantization", options.quantization]
    if options.prefix_caching is True:
        args.append("--enable-prefix-caching")
    elif options.prefix_caching is False:
        args.append("--no-enable-prefix-caching")
    if options.speculative is not None:
        spec = options.speculative
        config: dict[str, Any] = {"num_speculative_tokens": spec.num_speculative_tokens}
        if spec.method == "ngram":
            config.update(
                method="ngram", prompt_lookup_min=spec.prompt_lookup_min, prompt_lookup_max=spec.prompt_lookup_max
            )
        else:
            if draft_dir is None:
                raise ServingOptionsError("the draft model's folder is not known")
            config.update(model=str(draft_dir))
        args += ["--speculative-config", json.dumps(config, separators=(",", ":"))]
    if options.max_num_batched_tokens is not None:
        args += ["--max-num-batched-tokens", str(options.max_num_batched_tokens)]
    if options.dtype is not None:
        args += ["--dtype", options.dtype]
    if options.tool_call_parser is not None:
        args += ["--enable-auto-tool-choice", "--tool-call-parser", options.tool_call_parser]
    if options.reasoning_parser is not None:
        args += ["--reasoning-parser", options.reasoning_parser]
    if options.kv_cache_gib is not None:
        if gpu:
            args += ["--kv-cache-memory-bytes", str(options.kv_cache_gib << 30)]
        else:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(options.kv_cache_gib)
    return EngineArgs(tuple(args), env)
