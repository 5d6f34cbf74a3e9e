"""What the fault tests read back from the database after gateway processes ran: every answered request metered,
and a workflow's budget against the ledger."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from tests.support.postgres import query
from tests.support.processes import cli


def assert_metered(env: dict[str, str], answered: set[str]) -> None:
    """Every answered request has its usage row (status 200) and its successful audit record, and the audit chain
    verifies (`appliance audit verify`)."""
    missing, unaudited = unmetered(env["APPLIANCE_DATABASE__URL"], answered)
    assert not missing, f"{len(missing)} of {len(answered)} answered requests have no usage row: {missing[:5]}"
    assert not unaudited, f"{len(unaudited)} answered requests have no audit record: {unaudited[:5]}"
    verified = json.loads(cli(env, "audit", "verify", "--json"))
    assert verified["ok"], verified


def unmetered(database_url: str, answered: Iterable[str]) -> tuple[list[str], list[str]]:
    """The answered requests without a usage row of status 200, and those without a successful audit record."""
    rows = dict(query(database_url, "SELECT request_id, status_code FROM usage_records"))
    audited = dict(
        query(database_url, "SELECT request_id, outcome FROM audit_records WHERE event_type LIKE 'inference.%'")
    )
    answered = sorted(answered)
    return [r for r in answered if rows.get(r) != 200], [r for r in answered if audited.get(r) != "success"]


@dataclass(frozen=True)
class Books:
    used: int  # the workflow's tokens budget, this window
    reserved: int
    ledger: int  # the workflow's tokens in the usage records
    reservations: int  # reservation rows left, of every budget


def books(database_url: str, workflow_id: str) -> Books:
    [(used, reserved)] = query(
        database_url,
        "SELECT c.used, c.reserved FROM budget_counters c JOIN budgets b ON b.id = c.budget_id WHERE b.scope_id = :w",
        w=workflow_id,
    )
    [(ledger,)] = query(
        database_url, "SELECT coalesce(sum(total_tokens), 0) FROM usage_records WHERE workflow_id = :w", w=workflow_id
    )
    [(reservations,)] = query(database_url, "SELECT count(*) FROM budget_reservations")
    return Books(int(used), int(reserved), int(ledger), int(reservations))
