"""An online backup of Qdrant Edge: taken while another process (the gateway that owns the store) keeps
ingesting, each backup restores to shards that load, hold every write acknowledged before the backup began, and
hold each write whole (a document of 20 points is all there or absent)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from appliance.backup.create import create_backup
from appliance.backup.layout import Layout
from appliance.backup.restore import restore_backup
from appliance.lib.progress import Progress
from appliance.retrieval.edge import EdgeStore
from appliance.retrieval.edge_shared import SNAPSHOT
from appliance.settings import Settings
from tests.unit.backup.conftest import PASSPHRASE, populate

REPO = Path(__file__).resolve().parents[3]


async def test_a_backup_taken_while_a_gateway_ingests_restores_whole_documents_only(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "n")
    populate(settings)
    root = settings.data_dir / "qdrant"
    gateway = subprocess.Popen(
        [sys.executable, "-m", "tests.unit.retrieval.shared_child", str(root), "ingest"],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert gateway.stdout is not None
    acknowledged: list[int] = []
    lines = gateway.stdout

    def follow() -> None:
        for line in lines:
            if line.startswith("wrote "):
                acknowledged.append(int(line.split()[1]))

    assert lines.readline().strip() == "ready"
    follower = threading.Thread(target=follow)
    follower.start()
    summaries, before = [], []
    try:
        while len(acknowledged) < 20:
            threading.Event().wait(0.05)
        for attempt in range(3):
            before.append(len(acknowledged))
            summaries.append(
                create_backup(Layout.of(settings), tmp_path / f"b{attempt}", PASSPHRASE, Progress(enabled=False))
            )
    finally:
        (root / "stop").touch()
        follower.join(60)
        assert gateway.stdin is not None
        gateway.stdin.close()
        gateway.wait(60)
    assert all(summary["vector_store"]["edge_copy"] == "owner" for summary in summaries), "copied by the owner"
    assert not (root / SNAPSHOT).exists(), "the copy made beside the store is removed"
    written_during = acknowledged[-1] + 1 - before[0]
    assert written_during > 3, f"the gateway kept ingesting during the backups ({written_during} documents)"
    for attempt in range(3):
        target = Settings(data_dir=tmp_path / f"r{attempt}")
        restore_backup(Layout.of(target), tmp_path / f"b{attempt}", PASSPHRASE, Progress(enabled=False))
        assert not (target.data_dir / "qdrant" / SNAPSHOT).exists()
        store = EdgeStore(target.data_dir / "qdrant")
        total = await store.count("c")
        documents, rest = divmod(total, 20)
        assert rest == 0 and documents >= before[attempt], (total, before[attempt])
        for i in range(documents):  # the first N documents, each whole: writes are applied in order
            assert await store.count("c", f"doc{i}") == 20, f"doc{i} of backup {attempt} is torn"
        store.close()


async def test_with_no_process_on_the_store_the_backup_copies_it_under_the_stores_lock(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "n")
    populate(settings)
    store = EdgeStore(settings.data_dir / "qdrant")
    await store.create("c", 16)
    await store.upsert("c", ["00000000-0000-0000-0000-000000000001"], [[1.0] + [0.0] * 15], [{"document_id": "d"}])
    store.close()
    summary = create_backup(Layout.of(settings), tmp_path / "b", PASSPHRASE, Progress(enabled=False))
    assert summary["vector_store"]["edge_copy"] == "stopped"
    target = Settings(data_dir=tmp_path / "r")
    restore_backup(Layout.of(target), tmp_path / "b", PASSPHRASE, Progress(enabled=False))
    restored = EdgeStore(target.data_dir / "qdrant")
    assert await restored.count("c") == 1
    restored.close()
