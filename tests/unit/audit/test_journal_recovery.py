"""Audit records acknowledged to an answer survive the process being killed before its group commit (issue #16
item 3): the next writer appends what the dead process's journal holds past its mark, once, and the chain still
verifies."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from appliance.audit.setup import audit_store
from appliance.audit.store import AuditEvent, AuditStore
from appliance.audit.writer import AuditWriter
from appliance.lib.journal import Journal
from appliance.settings import Settings
from tests.support.killed import killed_writer

RECORDS = 20


def request_ids(store: AuditStore) -> list[str]:
    with store._engine.connect() as connection:
        return sorted(row[0] for row in connection.execute(text("SELECT request_id FROM audit_records")))


@pytest.mark.parametrize("committed", [0, 5])
async def test_records_of_a_killed_process_are_appended_once_and_the_chain_verifies(
    tmp_path: Path, committed: int
) -> None:
    killed_writer("audit", tmp_path, RECORDS, committed)
    store = audit_store(Settings(data_dir=tmp_path))
    assert request_ids(store) == sorted(f"req_{n}" for n in range(committed))
    writer = AuditWriter(store, checkpoint_interval_s=3600, journal=Journal(tmp_path / "journal", "audit"))
    await writer.start()
    assert request_ids(store) == sorted(f"req_{n}" for n in range(RECORDS))
    await writer.stop()
    result = store.verify()
    assert result.ok and result.records == RECORDS, result
    assert list((tmp_path / "journal").glob("*.journal")) == []
    with store._engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM journal_marks")).scalar() == 0


def test_records_appended_again_after_their_commit_landed_are_not_chained_twice(tmp_path: Path) -> None:
    store = audit_store(Settings(data_dir=tmp_path))
    events = [
        AuditEvent(event_type="inference.completions", outcome="success", request_id=f"req_{n}") for n in range(3)
    ]
    assert store.append(events[:2], "audit-x", [1, 2]) == [1, 2]
    assert store.append(events, "audit-x", [1, 2, 3]) == [0, 0, 3], "only the record not yet in the chain"
    assert request_ids(store) == ["req_0", "req_1", "req_2"]
    assert store.verify().ok
