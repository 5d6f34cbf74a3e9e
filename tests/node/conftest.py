"""Fixtures of the booted-node tests: the signed media (built once per run from the cached wheelhouse), the node
(booted once per module), and its first install."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.node import nodelib


@dataclass(frozen=True)
class Media:
    path: Path
    pubkey: Path
    seconds: float


def _require_host() -> None:
    missing = [tool for tool in ("systemd-nspawn", "strace", "debootstrap", "nsenter") if shutil.which(tool) is None]
    if os.geteuid() != 0 or missing:
        pytest.fail(
            f"the node tests need root and {missing} (`make test` installs systemd-container, strace, debootstrap)"
        )


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory) -> Media:
    _require_host()
    path, pubkey, seconds = nodelib.build_media(tmp_path_factory.mktemp("node-media"))
    return Media(path, pubkey, seconds)


@pytest.fixture(scope="module")
def node() -> Iterator[nodelib.Node]:
    _require_host()
    booted = nodelib.Node(nodelib.WORK / "node", nodelib.WORK / "logs")
    shutil.rmtree(booted.logs, ignore_errors=True)
    booted.create(nodelib.rootfs_tarball())
    booted.boot()
    try:
        yield booted
    finally:
        booted.destroy()
        shutil.rmtree(booted.root, ignore_errors=True)
