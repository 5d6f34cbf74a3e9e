"""Run with the *engines'* Python (never the appliance's), offline: what vLLM can serve, and GGUF conversion.

    ENGINE_PYTHON probe.py facts [MODEL_DIR]   -> JSON: the platform, quantization methods, parsers, and for
                                                   MODEL_DIR whether vLLM has its architecture
    ENGINE_PYTHON probe.py convert GGUF OUT    -> a Hugging Face folder (bf16 safetensors), as the bundled model is

It imports nothing of the appliance: the engines' environment does not have it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")


def facts(model_dir: Path | None) -> dict[str, Any]:
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS  # type: ignore[import-not-found]
    from vllm.model_executor.models import ModelRegistry  # type: ignore[import-not-found]
    from vllm.platforms import current_platform  # type: ignore[import-not-found]
    from vllm.reasoning import ReasoningParserManager  # type: ignore[import-not-found]
    from vllm.tool_parsers import ToolParserManager  # type: ignore[import-not-found]

    result: dict[str, Any] = {
        "platform": str(current_platform.device_type),
        "quantization_methods": sorted(QUANTIZATION_METHODS),
        "supported_quantization": sorted(current_platform.supported_quantization or []),
        "tool_parsers": sorted(ToolParserManager.list_registered()),
        "reasoning_parsers": sorted(ReasoningParserManager.list_registered()),
    }
    if model_dir is not None:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        architectures = config.get("architectures") or []
        supported = set(ModelRegistry.get_supported_archs())
        served = [arch for arch in architectures if arch in supported]
        result["architectures"] = architectures
        result["supported_architecture"] = served[0] if served else None
    return result


def convert(gguf: Path, out: Path) -> None:
    prepare = Path(sys.argv[0]).resolve().parents[2] / "models" / "prepare.py"
    spec = importlib.util.spec_from_file_location("appliance_models_prepare", prepare)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {prepare}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.convert_gguf(gguf, out)


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "facts":
        print(json.dumps(facts(Path(sys.argv[2]) if len(sys.argv) > 2 else None)))
    elif len(sys.argv) == 4 and sys.argv[1] == "convert":
        convert(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
