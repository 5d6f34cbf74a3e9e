"""Registry fixtures: a tiny model folder vLLM's registry accepts (the bundled chat model's config and tokenizer
with a small safetensors file of our own), settings on a temporary data directory, and a migrated database."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from appliance.db.engine import create_schema, make_engine
from appliance.settings import REPO_ROOT, Settings

BUNDLED_CHAT = REPO_ROOT / "var" / "models" / "smollm2-135m-instruct"


def write_safetensors(path: Path, tensors: dict[str, list[int]]) -> int:
    """A valid safetensors file of float32 zeros with these shapes; returns the parameter count."""
    header: dict[str, object] = {}
    offset = 0
    for name, shape in tensors.items():
        size = 4
        for dim in shape:
            size *= dim
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))
    return offset // 4


def tiny_model(folder: Path, **config_changes: object) -> Path:
    folder.mkdir(parents=True)
    config = json.loads((BUNDLED_CHAT / "config.json").read_text())
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (BUNDLED_CHAT / name).exists():
            shutil.copy(BUNDLED_CHAT / name, folder / name)
    write_safetensors(folder / "model.safetensors", {"a": [4, 8], "b": [16]})
    return folder


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    if not (BUNDLED_CHAT / "config.json").exists():
        pytest.skip("the bundled chat model is not prepared (make setup / appliance up prepares it)")
    return tiny_model(tmp_path / "src")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


@pytest.fixture
def db(settings: Settings) -> Iterator[Engine]:
    engine = make_engine(settings.database_url)
    create_schema(engine)
    yield engine
    engine.dispose()
