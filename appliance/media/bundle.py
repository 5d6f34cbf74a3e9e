"""Offline install media: a directory of everything a node needs, with a signed manifest.

Layout::

    wheels/                 every Python wheel the node installs (the appliance itself, its dependencies,
                            the engines' vLLM and torch, ansible-core ...)
    models/<name>/          prepared bundled models with their model.yaml
    playbooks/              the provisioning playbooks
    components/<name>/      optional components given as local files (Qdrant server, Keycloak, a JDK)
    manifest.json           every file: path, sha256, size, component, version, origin
    manifest.json.sig       Ed25519 signature of manifest.json's bytes

Building is the only step allowed to use the network (``--download``: pip fetches wheels from the package
index); everything else is copied from local files. Verifying refuses any difference, naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from appliance.engines.manifest import MANIFEST_FILE, load_manifest
from appliance.media import signing

MANIFEST = "manifest.json"
SIGNATURE = "manifest.json.sig"
FORMAT = 1
_WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")


class MediaError(Exception):
    """The media cannot be built or is not what its signed manifest says."""


@dataclass(frozen=True, slots=True)
class Entry:
    path: str  # relative, with forward slashes
    sha256: str
    size: int
    component: str
    version: str
    origin: str


@dataclass(frozen=True, slots=True)
class Component:
    name: str
    path: Path
    version: str


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def parse_component(text: str) -> Component:
    """``NAME=PATH[@VERSION]`` from the command line."""
    name, sep, rest = text.partition("=")
    if not sep or not re.fullmatch(r"[a-z][a-z0-9\-]{0,40}", name):
        raise MediaError(f"a component is NAME=PATH[@VERSION], e.g. qdrant=/srv/qdrant@1.15.0; got {text!r}")
    path_text, _, version = rest.partition("@")
    path = Path(path_text)
    if not path.exists():
        raise MediaError(f"component {name}: {path} does not exist")
    return Component(name, path, version or "unversioned")


class MediaBuilder:
    def __init__(self, out: Path, profile: str) -> None:
        if out.exists() and any(out.iterdir()):
            raise MediaError(f"{out} is not empty: build media into a new directory")
        self.out, self.profile = out, profile
        self.entries: list[Entry] = []
        out.mkdir(parents=True, exist_ok=True)

    def _add(self, source: Path, relative: str, component: str, version: str, origin: str) -> None:
        target = self.out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.resolve() != target.resolve():
            shutil.copy2(source, target)
        self.entries.append(Entry(relative, sha256_file(target), target.stat().st_size, component, version, origin))

    def add_wheels(self, folder: Path, origin: str) -> None:
        for wheel in sorted(folder.glob("*.whl")):
            match = _WHEEL.match(wheel.name)
            if match is None:
                raise MediaError(f"not a wheel file name: {wheel.name}")
            relative = f"wheels/{wheel.name}"
            if any(entry.path == relative for entry in self.entries):
                continue
            self._add(wheel, relative, f"wheel:{match['name'].lower()}", match["version"], origin)

    def add_own_wheel(self, project: Path) -> str:
        """The appliance itself, built here: with the build backend already installed, or else in pip's isolated
        build environment (which fetches the backend: building media is the step allowed to use the network).
        Returns the built wheel's version: the media's version is the project's, not that of whatever
        appliance happens to be installed where the build runs."""
        folder = self.out / "wheels"
        folder.mkdir(parents=True, exist_ok=True)
        before = set(folder.glob("appliance-*.whl"))
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(folder), str(project)]
        result = subprocess.run([*command, "--no-build-isolation"], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise MediaError(f"building the appliance's wheel failed:\n{result.stderr[-2000:]}")
        built = sorted(set(folder.glob("appliance-*.whl")) - before) or sorted(folder.glob("appliance-*.whl"))
        match = _WHEEL.match(built[-1].name) if built else None
        if match is None:
            raise MediaError("building the appliance's wheel left no appliance-*.whl")
        self.add_wheels(folder, "built:appliance")
        return match["version"]

    def download(self, requirements: list[Path], packages: list[Path]) -> None:
        """The one step that uses the network: wheels (binary only) from the package index, for requirement files
        and for local wheels' dependencies."""
        folder = self.out / "wheels"
        args = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "-q", "-d", str(folder)]
        for requirement in requirements:
            args += ["-r", str(requirement)]
        args += [str(package) for package in packages]
        result = subprocess.run(args, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise MediaError(f"downloading wheels failed:\n{result.stderr[-2000:]}")
        self.add_wheels(folder, "pypi")

    def add_model(self, manifest_path: Path, model_dir: Path) -> None:
        manifest = load_manifest(manifest_path)
        missing = [name for name in manifest.weights if not (model_dir / name).is_file()]
        if missing:
            raise MediaError(f"model {manifest.name} is not prepared in {model_dir} (missing {', '.join(missing)})")
        origin = f"package:{manifest.source.package}"
        self._add(manifest_path, f"models/{manifest.name}/{MANIFEST_FILE}", f"model:{manifest.name}",
                  manifest.source.version, "repository")  # fmt: skip
        for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
            relative = path.relative_to(model_dir).as_posix()
            if relative == MANIFEST_FILE:
                continue
            self._add(path, f"models/{manifest.name}/{relative}", f"model:{manifest.name}",
                      manifest.source.version, origin)  # fmt: skip
            expected = manifest.weights.get(relative)
            if expected is not None and self.entries[-1].sha256 != expected:
                raise MediaError(f"model {manifest.name}: {relative} does not match the sha256 in its model.yaml")

    def add_tree(self, folder: Path, prefix: str, component: str, version: str, origin: str) -> None:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            if "__pycache__" in path.parts:
                continue
            self._add(path, f"{prefix}/{path.relative_to(folder).as_posix()}", component, version, origin)

    def add_component(self, component: Component) -> None:
        origin = f"local:{component.path.name}"
        if component.path.is_dir():
            self.add_tree(component.path, f"components/{component.name}", component.name, component.version, origin)
        else:
            relative = f"components/{component.name}/{component.path.name}"
            self._add(component.path, relative, component.name, component.version, origin)

    def finish(self, signing_key: Path, appliance_version: str) -> dict[str, Any]:
        """Write manifest.json and its signature; the manifest is returned."""
        manifest = {
            "format": FORMAT,
            "appliance_version": appliance_version,
            "profile": self.profile,
            "created_at": datetime.now(UTC).isoformat(),
            "files": [asdict(entry) for entry in sorted(self.entries, key=lambda e: e.path)],
        }
        data = json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n"
        (self.out / MANIFEST).write_bytes(data)
        (self.out / SIGNATURE).write_bytes(signing.sign(data, signing_key))
        return manifest


def _safe(relative: str) -> bool:
    path = PurePosixPath(relative)
    return not path.is_absolute() and ".." not in path.parts and relative == path.as_posix() and relative != ""


def verify_media(folder: Path, public_key: Path) -> dict[str, Any]:
    """Check the signature, then every file's size and sha256, and that nothing is missing or added.
    Raises :class:`MediaError` naming the first problem; returns the manifest."""
    try:
        data = (folder / MANIFEST).read_bytes()
        signature = (folder / SIGNATURE).read_bytes()
    except OSError as exc:
        raise MediaError(f"{folder} is not install media: {exc}") from exc
    try:
        signing.verify(data, signature, public_key)
    except signing.SignatureError as exc:
        raise MediaError(f"refused: {exc}") from exc
    manifest: dict[str, Any] = json.loads(data)
    listed: set[str] = set()
    for item in manifest["files"]:
        relative = item["path"]
        if not _safe(relative):
            raise MediaError(f"refused: the manifest names an unsafe path {relative!r}")
        listed.add(relative)
        path = folder / relative
        if not path.is_file():
            raise MediaError(f"refused: {relative} is missing")
        if path.stat().st_size != item["size"]:
            raise MediaError(f"refused: {relative} is {path.stat().st_size} bytes, the manifest says {item['size']}")
        if sha256_file(path) != item["sha256"]:
            raise MediaError(f"refused: {relative} does not match its sha256 in the manifest")
    for root, _dirs, files in os.walk(folder):
        for name in files:
            relative = (Path(root) / name).relative_to(folder).as_posix()
            if relative not in listed and relative not in (MANIFEST, SIGNATURE):
                raise MediaError(f"refused: {relative} is not in the manifest")
    return manifest
