"""Refusals of requests that name nobody are all accounted for in the audit log, but a flood of them cannot flood
it (appliance/audit/digest.py): a few per address are recorded one by one, the rest counted and summarised when
the window ends, and the number of records a window makes is bounded whatever the number of addresses."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from appliance.asgi import create_app
from appliance.audit.chain import NoteKey
from appliance.audit.digest import RefusalDigest
from appliance.audit.store import AuditEvent, AuditStore
from appliance.audit.writer import AuditWriter
from appliance.db.engine import create_schema, make_engine
from appliance.settings import Settings


@pytest.fixture
async def writer(tmp_path: Path) -> AsyncIterator[AuditWriter]:
    engine = make_engine(f"sqlite:///{tmp_path / 'audit.db'}", serialized_writes=True)
    create_schema(engine)
    key = NoteKey.load_or_create(tmp_path / "audit-key", "test-node")
    writer = AuditWriter(AuditStore(engine, key, latest_checkpoint_file=tmp_path / "latest", node="n1"))
    await writer.start()
    yield writer
    await writer.stop()


def refusal(address: str, reason: str = "rate_limited") -> AuditEvent:
    return AuditEvent(
        event_type="auth.sign_in", outcome="denied", component="issuer", source_ip=address, detail={"reason": reason}
    )


def records(writer: AuditWriter) -> list[dict[str, Any]]:
    return list(writer.store.export())


async def test_past_a_few_per_address_refusals_are_counted_and_summarised_when_the_window_ends(
    writer: AuditWriter,
) -> None:
    digest = RefusalDigest(writer, window_s=3600, per_source=3, overall=100)
    for _ in range(500):
        await digest.refused(refusal("203.0.113.7"))
    for _ in range(2):
        await digest.refused(refusal("198.51.100.2"))
    await writer.flush()
    assert len(records(writer)) == 3 + 2, "only the first few of each address are recorded one by one"
    digest.summarise()
    await writer.flush()
    summaries = [r for r in records(writer) if "summarised" in r["detail"]]
    assert len(summaries) == 1
    summary = summaries[0]
    assert summary["source_ip"] == "203.0.113.7" and summary["detail"]["summarised"] == 497
    assert summary["event_type"] == "auth.sign_in" and summary["outcome"] == "denied"
    assert summary["detail"]["reason"] == "rate_limited" and summary["detail"]["first"] <= summary["detail"]["last"]
    # The next window starts afresh.
    await digest.refused(refusal("203.0.113.7"))
    await writer.flush()
    assert len(records(writer)) == 3 + 2 + 1 + 1
    assert writer.store.verify().ok


async def test_a_flood_from_many_addresses_makes_a_bounded_number_of_records(writer: AuditWriter) -> None:
    digest = RefusalDigest(writer, window_s=3600, per_source=5, overall=20, max_sources=50)
    for n in range(3000):
        await digest.refused(refusal(f"10.0.{n // 256}.{n % 256}"))
    digest.summarise()
    await writer.flush()
    found = records(writer)
    one_by_one = [r for r in found if "summarised" not in r["detail"]]
    summaries = [r for r in found if "summarised" in r["detail"]]
    assert len(one_by_one) == 20, "the overall bound of one-by-one records"
    assert len(summaries) == 51, "one per address up to the table's bound, then one for all the others"
    assert sum(r["detail"]["summarised"] for r in summaries) + len(one_by_one) == 3000, "every refusal accounted"
    others = [r for r in summaries if r["source_ip"] is None]
    assert len(others) == 1 and others[0]["detail"]["sources"] == 3000 - 20 - 50


async def test_kinds_of_refusal_are_counted_apart(writer: AuditWriter) -> None:
    digest = RefusalDigest(writer, window_s=3600, per_source=1)
    for _ in range(10):
        await digest.refused(refusal("203.0.113.7", "rate_limited"))
        await digest.refused(refusal("203.0.113.7", "invalid_client"))
    digest.summarise()
    await writer.flush()
    summaries = {
        r["detail"]["reason"]: r["detail"]["summarised"] for r in records(writer) if "summarised" in r["detail"]
    }
    assert summaries == {"rate_limited": 9, "invalid_client": 9}


async def test_a_flood_of_unknown_api_keys_records_a_few_and_summarises_the_rest_at_stop(tmp_path: Path) -> None:
    # Fewer unknown keys than the per-address lookup limit (20), and no tarpit: within one 10 s window.
    settings = Settings(data_dir=tmp_path, identity={"refusal_delay_s": 0})
    app = create_app(settings)
    async with AsyncTestClient(app=app) as client:
        for n in range(15):
            response = await client.get("/v1/models", headers={"Authorization": f"Bearer apk_{n:08d}_wrongsecret"})
            assert response.status_code == 401
        await app.state.audit.flush()
        refused = [r for r in app.state.audit.store.export() if r["event_type"] == "access.refused"]
        assert len(refused) == 5, "five one by one, from the test client's one address"
    # The app stopped: the window's summary was written.
    refused = [r for r in app.state.audit.store.export() if r["event_type"] == "access.refused"]
    assert len(refused) == 6 and refused[-1]["detail"]["summarised"] == 10
    assert refused[-1]["detail"]["status"] == 401
