"""A version's files: sha256 and size of each, the safetensors parameter count, and what config.json says."""

from __future__ import annotations

import json
import struct
from math import prod
from pathlib import Path
from typing import Any

from appliance.engines.manifest import sha256_file
from appliance.lib.errors import ApplianceError

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")


class RegistryIntegrityError(ApplianceError):
    code = "model_integrity"


def file_records(folder: Path) -> list[dict[str, Any]]:
    """``[{path, sha256, size}]`` of every file under ``folder`` (relative paths, sorted)."""
    return [
        {"path": path.relative_to(folder).as_posix(), "sha256": sha256_file(path), "size": path.stat().st_size}
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    ]


def verify_files(folder: Path, records: list[dict[str, Any]], what: str) -> None:
    """Refuse (raise) unless every recorded file is there with its size and sha256, and no other file is."""
    present = {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}
    recorded = {record["path"] for record in records}
    if extra := sorted(present - recorded):
        raise RegistryIntegrityError(f"{what}: files not recorded at import: {', '.join(extra[:5])}")
    for record in records:
        path = folder / record["path"]
        if not path.is_file():
            raise RegistryIntegrityError(f"{what}: {record['path']} is missing")
        if path.stat().st_size != record["size"]:
            raise RegistryIntegrityError(
                f"{what}: {record['path']} has {path.stat().st_size} bytes, {record['size']} were recorded"
            )
        actual = sha256_file(path)
        if actual != record["sha256"]:
            raise RegistryIntegrityError(
                f"{what}: {record['path']} has sha256 {actual}, {record['sha256']} was recorded"
            )


def safetensors_parameters(path: Path) -> int:
    """Parameters in one safetensors file, from its header (no tensor is read)."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > 100 << 20:
            raise RegistryIntegrityError(f"{path.name}: safetensors header of {length} bytes")
        header = json.loads(handle.read(length))
    return sum(prod(entry["shape"]) for key, entry in header.items() if key != "__metadata__")


def read_config(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RegistryIntegrityError(f"config.json is unreadable: {exc}") from exc
    if not isinstance(data, dict):
        raise RegistryIntegrityError("config.json is not an object")
    return data


def context_length_of(config: dict[str, Any]) -> int | None:
    for source in (config, config.get("text_config") or {}):
        for key in CONTEXT_KEYS:
            value = source.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


def dtype_of(config: dict[str, Any]) -> str:
    value = config.get("torch_dtype") or config.get("dtype") or ""
    return str(value)
