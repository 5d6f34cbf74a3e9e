"""The effect of two serving options on the bundled chat model, same run: prefix caching and n-gram speculative
decoding, each against the engine without it.

Three engines of the bundled chat model, one after the other, started by the registry's option mapping
(appliance.registry.options.vllm_args) and the supervisor's engine start:
  baseline   --no-enable-prefix-caching, no speculation
  prefix     --enable-prefix-caching
  ngram      --no-enable-prefix-caching, --speculative-config {"method": "ngram", ...}
Two workloads, requests one at a time (streamed, greedy):
  shared-prefix: a ~1,000-token document shared by every request, then a different short question each
                 time (16 output tokens): time to first token (TTFT) is what prefix caching should cut.
  echo:          "repeat this paragraph" (128 output tokens): the answer repeats the prompt, where n-gram
                 proposals are accepted: output tokens per second is what speculation should raise.
Prints P50 TTFT and output tokens/s per engine and workload, and the ratios against the baseline.

Usage: .venv/bin/python bench/serving_options.py [--requests 12] [--port 18401]
(CPU heavy: about 2-3 minutes per engine start on a 2-core machine; run it alone.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.engines.manifest import load_manifest  # noqa: E402
from appliance.engines.runner import (  # noqa: E402
    EngineSpec,
    engine_python,
    start_engine,
    stop_group,
    wait_healthy,
)
from appliance.registry.options import parse_options, vllm_args  # noqa: E402
from appliance.settings import Settings  # noqa: E402

MODEL = "smollm2-135m-instruct"
DOCUMENT = " ".join(f"Line {n}: the quarterly report lists shipments, delays and costs." for n in range(75))
QUESTIONS = [f"In one sentence: what does line {n} list?" for n in range(100)]
PARAGRAPH = (
    "The appliance serves language models inside the organisation's own network. Every request is counted, "
    "budgeted and recorded, and the engines never reach the internet. Operators deploy new model versions "
    "after an administrator approves them, and can roll back to the previous version at any time."
)
CONFIGS = {
    "baseline": {"prefix_caching": False},
    "prefix": {"prefix_caching": True},
    "ngram": {
        "prefix_caching": False,
        "speculative": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4},
    },
}


def stream_chat(
    client: httpx.Client, url: str, messages: list[dict[str, str]], max_tokens: int
) -> tuple[float, float, int]:
    """(TTFT s, total s, output tokens) of one streamed greedy chat."""
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = None
    tokens = 0
    with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return (first or end) - started, end - started, tokens


def measure(url: str, requests: int) -> dict[str, float]:
    with httpx.Client(timeout=300) as client:
        stream_chat(client, url, [{"role": "user", "content": "Hello"}], 4)  # warm-up
        ttfts = []
        for n in range(requests):
            messages = [{"role": "system", "content": DOCUMENT}, {"role": "user", "content": QUESTIONS[n]}]
            ttfts.append(stream_chat(client, url, messages, 16)[0])
        decode_s, decode_tokens = 0.0, 0
        for _ in range(max(2, requests // 3)):
            messages = [{"role": "user", "content": f"Repeat this paragraph exactly:\n\n{PARAGRAPH}"}]
            ttft, total, tokens = stream_chat(client, url, messages, 128)
            decode_s += total - ttft
            decode_tokens += tokens
    return {"ttft_p50_ms": 1000 * statistics.median(ttfts), "output_tok_s": decode_tokens / decode_s}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--port", type=int, default=18401)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args()
    settings = Settings(
        data_dir=Path(tempfile.mkdtemp(prefix="bench-options-")), models_cache_dir=ROOT / "var" / "models"
    )
    manifest = load_manifest(ROOT / "models" / MODEL / "model.yaml")
    python = engine_python(settings)
    results: dict[str, dict[str, float]] = {}
    for name in args.configs.split(","):
        engine_args = vllm_args(parse_options(CONFIGS[name]), gpu=False)
        spec = EngineSpec(
            manifest=manifest.model_copy(update={"context_length": 2048}),
            model_dir=settings.prepared_models_dir / MODEL,
            host="127.0.0.1",
            port=args.port,
            log_path=settings.data_dir / f"engine-{name}.log",
            name=name,
            args=engine_args.args,
            env=tuple(engine_args.env.items()),
        )
        started = time.monotonic()
        process = start_engine(spec, python, settings, 0)
        try:
            wait_healthy(spec.url + "/health", 1200, process, what=f"engine {name} (log {spec.log_path})")
            print(f"{name}: up in {time.monotonic() - started:.0f}s ({' '.join(engine_args.args)})", flush=True)
            results[name] = measure(spec.url, args.requests)
            print(f"{name}: {results[name]}", flush=True)
        finally:
            stop_group(process.pid)
    base = results.get("baseline")
    print(f"\n{'engine':<10} {'TTFT P50 (shared prefix)':>26} {'output tok/s (echo)':>21}")
    for name, row in results.items():
        ratio = ""
        if base and name != "baseline":
            ttft = row["ttft_p50_ms"] / base["ttft_p50_ms"]
            ratio = f"   TTFT x{ttft:.2f}, tok/s x{row['output_tok_s'] / base['output_tok_s']:.2f}"
        print(f"{name:<10} {row['ttft_p50_ms']:>23.0f} ms {row['output_tok_s']:>21.1f}{ratio}")


if __name__ == "__main__":
    main()
