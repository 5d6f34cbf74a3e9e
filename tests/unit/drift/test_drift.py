"""Drift findings on injected behaviour changes (real SQLite ledger): a workflow whose answers double in length,
an agent whose retry rate triples; and no finding where nothing changed."""

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlmodel import Session

from appliance.db.engine import create_schema, make_engine
from appliance.drift.report import drift_report
from appliance.drift.signals import Request, compare, psi
from appliance.ledger.models import UsageRecord

NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)
CHAT = "/v1/chat/completions"


def rows(
    rng: random.Random, count: int, start: datetime, span: timedelta, *, workflow: str, agent: str,
    completion: float, retry_rate: float,
) -> list[UsageRecord]:  # fmt: skip
    made = []
    for _ in range(count):
        created = start + span * rng.random()
        tokens = max(1, int(rng.gauss(completion, completion * 0.15)))
        made.append(
            UsageRecord(
                request_id=f"req_{rng.getrandbits(64):016x}", created_at=created, model="chat", endpoint=CHAT,
                tenant_id="t1", workflow_id=workflow, agent_id=agent, prompt_tokens=int(rng.gauss(300, 40)),
                completion_tokens=tokens, total_tokens=tokens + 300, latency_ms=rng.gauss(800, 100), status_code=200,
                retry_attempt=1 if rng.random() < retry_rate else 0,
            )
        )  # fmt: skip
    return made


@pytest.fixture
def ledger(tmp_path: Path):  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{tmp_path / 'appliance.db'}")
    create_schema(engine)
    rng = random.Random(7)
    day = timedelta(days=1)
    baseline_start = NOW - 8 * day
    with Session(engine) as session:
        # Baseline week: everyone behaves.
        for workflow, agent in (("wf-long", "ag-calm"), ("wf-agents", "ag-retry"), ("wf-steady", "ag-calm2")):
            session.add_all(
                rows(rng, 700, baseline_start, 7 * day, workflow=workflow, agent=agent, completion=100, retry_rate=0.05)
            )
        # Last day: wf-long's answers double; ag-retry retries three times as often; the rest as before.
        session.add_all(
            rows(rng, 200, NOW - day, day, workflow="wf-long", agent="ag-calm", completion=200, retry_rate=0.05)
        )
        session.add_all(
            rows(rng, 200, NOW - day, day, workflow="wf-agents", agent="ag-retry", completion=100, retry_rate=0.15)
        )
        session.add_all(
            rows(rng, 200, NOW - day, day, workflow="wf-steady", agent="ag-calm2", completion=100, retry_rate=0.05)
        )
        session.commit()
    yield engine
    engine.dispose()


def test_doubled_answers_and_tripled_retries_are_findings_and_nothing_else_is(ledger) -> None:  # type: ignore[no-untyped-def]
    report = drift_report(ledger, window="day", now=NOW)
    found = {(f["scope"], f["id"], f["signal"]) for f in report["findings"]}
    assert ("workflow", "wf-long", "completion_tokens") in found
    assert ("agent", "ag-retry", "retry_rate") in found
    # The model carries both changes (it serves everyone), so it may drift too; a workflow or agent that did not
    # change has no finding.
    unchanged = {("workflow", "wf-steady"), ("agent", "ag-calm2")}
    assert not [f for f in found if (f[0], f[1]) in unchanged and f[2] in ("completion_tokens", "retry_rate")]
    long = next(f for f in report["findings"] if f["id"] == "wf-long" and f["signal"] == "completion_tokens")
    assert long["median_change"] == pytest.approx(1.0, abs=0.15) and long["statistic"] >= 0.25
    assert "wf-long" in long["summary"] and "PSI" in long["summary"]
    retry = next(f for f in report["findings"] if f["id"] == "ag-retry" and f["signal"] == "retry_rate")
    assert retry["statistic"] >= 3 and retry["recent"] > 2 * retry["baseline"]


def test_a_tenant_sees_only_its_own_groups(ledger) -> None:  # type: ignore[no-untyped-def]
    assert drift_report(ledger, window="day", now=NOW, tenant_id="t2")["groups"] == []


def test_too_few_requests_make_no_comparison() -> None:
    few = [Request(10, 10, 1.0, None, 0, 0, False, 200)] * 5
    assert compare("completion_tokens", few, few, min_samples=30) is None


def test_psi_is_zero_for_the_same_distribution_and_large_for_a_shift() -> None:
    rng = random.Random(1)
    base = [rng.gauss(100, 10) for _ in range(2000)]
    same = [rng.gauss(100, 10) for _ in range(2000)]
    shifted = [rng.gauss(130, 10) for _ in range(2000)]
    assert psi(base, same) < 0.05
    assert psi(base, shifted) > 1.0


async def test_the_admin_api_serves_findings_within_the_tenant(tmp_path: Path) -> None:
    from litestar.testing import AsyncTestClient

    from appliance.asgi import create_app
    from appliance.identity.setup import embedded_issuer
    from appliance.settings import Settings

    settings = Settings(data_dir=tmp_path)
    issuer = embedded_issuer(settings)
    async with AsyncTestClient(app=create_app(settings)) as client:

        async def get(roles: list[str], query: str = "") -> tuple[int, dict]:
            token = issuer.mint("someone", client_id="appliance-console", roles=roles)
            response = await client.get(f"/admin/drift/{query}", headers={"Authorization": f"Bearer {token}"})
            return response.status_code, response.json()

        status, body = await get(["operator"], "?window=hour")
        assert status == 200 and body["window"] == "hour" and body["findings"] == []
        assert (await get(["user"]))[0] == 403
        assert (await get(["admin"], "?window=week"))[0] == 400


def test_a_rising_truncation_rate_is_a_finding() -> None:
    """Answers cut off by their output cap (finish reason `length`) go from 5 % to 30 %: a finding; requests with
    no finish reason (refused, embeddings) are not counted either way."""
    rng = random.Random(11)

    def requests(count: int, truncated: float) -> list[Request]:
        made = [
            Request(300, 100, 800.0, None, 0, 0, False, 200, "length" if rng.random() < truncated else "stop")
            for _ in range(count)
        ]
        return made + [Request(300, 0, 5.0, None, 0, 0, False, 429, None)] * 50

    result = compare("truncation_rate", requests(400, 0.05), requests(200, 0.30), min_samples=30)
    assert result is not None and result["finding"] and result["statistic"] >= 3
    assert result["samples"] == [400, 200], "only requests the engine finished"
    steady = compare("truncation_rate", requests(400, 0.05), requests(200, 0.05), min_samples=30)
    assert steady is not None and not steady["finding"]


def test_a_workflow_filling_more_of_its_context_is_a_finding(tmp_path: Path) -> None:
    """Context utilisation (prompt and completion tokens over the engine's context length): a workflow whose
    prompts grow from about 15 % to about 45 % of a 2048-token context is a finding; another that keeps its
    prompts is not; rows without a recorded context length are left out of the signal."""
    engine = make_engine(f"sqlite:///{tmp_path / 'appliance.db'}")
    create_schema(engine)
    rng = random.Random(5)
    day = timedelta(days=1)

    def made(count: int, start: datetime, span: timedelta, workflow: str, prompt: int, context: int | None):  # type: ignore[no-untyped-def]
        found = rows(rng, count, start, span, workflow=workflow, agent=f"ag-{workflow}", completion=60, retry_rate=0)
        for row in found:
            row.prompt_tokens = max(1, int(rng.gauss(prompt, prompt * 0.1)))
            row.context_length = context
        return found

    with Session(engine) as session:
        for workflow in ("wf-growing", "wf-same"):
            session.add_all(made(500, NOW - 8 * day, 7 * day, workflow, 250, 2048))
            session.add_all(made(100, NOW - 8 * day, 7 * day, workflow, 2000, None))  # older rows: no length
        session.add_all(made(150, NOW - day, day, "wf-growing", 850, 2048))
        session.add_all(made(150, NOW - day, day, "wf-same", 250, 2048))
        session.commit()
    try:
        report = drift_report(engine, window="day", now=NOW)
    finally:
        engine.dispose()
    findings = {(f["id"], f["signal"]): f for f in report["findings"] if f["scope"] == "workflow"}
    grown = findings[("wf-growing", "context_utilisation")]
    assert grown["test"] == "population stability index" and grown["statistic"] >= 0.25
    assert grown["samples"] == [500, 150], "rows without a context length are not counted"
    assert 0.12 < grown["baseline"] < 0.18 and 0.40 < grown["recent"] < 0.50
    assert "context_utilisation" in grown["summary"] and "wf-growing" in grown["summary"]
    assert ("wf-same", "context_utilisation") not in findings
