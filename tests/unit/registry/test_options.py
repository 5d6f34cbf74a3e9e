"""Serving options: validation against what the engine environment reports, and their vLLM arguments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.registry.importer import engine_facts
from appliance.registry.options import (
    EngineFacts,
    ServingOptionsError,
    check_options,
    parse_options,
    vllm_args,
)
from appliance.settings import Settings


@pytest.fixture(scope="module")
def facts() -> EngineFacts:
    """What the real engine environment (.venv-engine) supports, asked offline with its own Python."""
    return engine_facts(Settings())[0]


def test_every_option_becomes_its_vllm_argument() -> None:
    options = parse_options(
        {
            "prefix_caching": True,
            "speculative": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3},
            "max_num_batched_tokens": 2048,
            "dtype": "bfloat16",
            "tool_call_parser": "hermes",
            "reasoning_parser": "qwen3",
            "kv_cache_gib": 3,
        }
    )
    cpu = vllm_args(options, gpu=False)
    args = list(cpu.args)
    assert "--enable-prefix-caching" in args
    spec = json.loads(args[args.index("--speculative-config") + 1])
    assert spec == {"num_speculative_tokens": 4, "method": "ngram", "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    assert args[args.index("--max-num-batched-tokens") + 1] == "2048"
    assert args[args.index("--dtype") + 1] == "bfloat16"
    assert args[args.index("--tool-call-parser") + 1] == "hermes" and "--enable-auto-tool-choice" in args
    assert args[args.index("--reasoning-parser") + 1] == "qwen3"
    assert cpu.env == {"VLLM_CPU_KVCACHE_SPACE": "3"}  # a CPU engine sizes its KV cache from the environment
    gpu = list(vllm_args(options, gpu=True).args)
    assert gpu[gpu.index("--kv-cache-memory-bytes") + 1] == str(3 << 30)
    off = vllm_args(parse_options({"prefix_caching": False}), gpu=False)
    assert off.args == ("--no-enable-prefix-caching",)
    assert vllm_args(parse_options({}), gpu=False).args == ()


def test_draft_model_speculation_points_at_the_draft_versions_folder() -> None:
    options = parse_options({"speculative": {"method": "draft_model", "draft_version_id": 7}})
    args = list(vllm_args(options, gpu=False, draft_dir=Path("/srv/registry/draft/v1")).args)
    assert json.loads(args[args.index("--speculative-config") + 1]) == {
        "num_speculative_tokens": 3,
        "model": "/srv/registry/draft/v1",
    }


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"speculative": {"method": "draft_model"}}, "draft_version_id"),
        ({"speculative": {"method": "ngram", "draft_version_id": 3}}, "no draft model"),
        ({"replicas": 0}, "replicas"),
        ({"dtype": "int3"}, "dtype"),
        ({"prefix_cache": True}, "prefix_cache"),
        ({"tool_call_parser": "a b"}, "tool_call_parser"),
    ],
)
def test_malformed_options_are_refused_with_the_field(data: dict[str, object], reason: str) -> None:
    with pytest.raises(ServingOptionsError, match=reason):
        parse_options(data)


def test_options_the_engine_cannot_serve_are_refused(facts: EngineFacts) -> None:
    assert "hermes" in facts.tool_parsers and facts.quantization_methods
    check_options(parse_options({"tool_call_parser": "hermes", "context_length": 2048}), facts, 8192)
    with pytest.raises(ServingOptionsError, match="longer than the model's own"):
        check_options(parse_options({"context_length": 9000}), facts, 8192)
    with pytest.raises(ServingOptionsError, match="no tool call parser 'nonesuch'"):
        check_options(parse_options({"tool_call_parser": "nonesuch"}), facts, 8192)
    with pytest.raises(ServingOptionsError, match="no reasoning parser"):
        check_options(parse_options({"reasoning_parser": "nonesuch"}), facts, 8192)
    with pytest.raises(ServingOptionsError, match="unknown quantization method"):
        check_options(parse_options({"quantization": "int3-magic"}), facts, 8192)


def test_quantization_outside_the_platforms_list_is_refused() -> None:
    gpu_only = EngineFacts(platform="tpu", quantization_methods=("awq", "fp8"), supported_quantization=("fp8",))
    check_options(parse_options({"quantization": "fp8"}), gpu_only, 4096)
    with pytest.raises(ServingOptionsError, match="not supported on this node's platform"):
        check_options(parse_options({"quantization": "awq"}), gpu_only, 4096)
