"""A gateway process killed with ``kill -9`` under load, two processes sharing PostgreSQL (issue 21, item 2).

Two `appliance serve` processes on one PostgreSQL database take a mixed load (plain answers and streams) on one
budget; one is killed with SIGKILL part-way, and the survivor then serves until the budget refuses. Afterwards:
every request a client saw answered (a 200 with its body, or a stream up to ``[DONE]``) has its usage row and its
audit record, the audit chain verifies, and once the survivor's sweep has taken the dead process's leases the
budget is what the README promises: never above its limit, nothing left reserved, and ``used`` is the ledger's
total plus at most the unused part of the dead process's leases (they are charged in full). The engine is the fast
fake of tests/support: the engine is not what is tested."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp

from tests.support.books import assert_metered, books
from tests.support.postgres import query
from tests.support.processes import Gateway, budgeted_key, chat_outcome

LIMIT = 4_000  # tokens: about what the load spends; the survivor then spends what is left
CONCURRENCY = 24
BEFORE_KILL_S = 2.5
AFTER_KILL_S = 2.0


async def _load(gateways: list[Gateway], key: str, held: Callable[[], int]) -> tuple[list[tuple[str, str | None]], int]:
    """The load's outcomes, and what the dead process held in leases when it died (read at once: the sweep
    waits for 1.5 s of silence)."""
    outcomes: list[tuple[str, str | None]] = []
    leases: list[int] = []
    stop_at = time.monotonic() + BEFORE_KILL_S + AFTER_KILL_S

    async def worker(index: int) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            turn = index
            while time.monotonic() < stop_at:
                turn += 1
                outcomes.append(await chat_outcome(session, gateways[turn % 2].url, key, stream=turn % 3 == 0))

    async def killer() -> None:
        await asyncio.sleep(BEFORE_KILL_S)
        gateways[0].kill()
        leases.append(await asyncio.to_thread(held))

    await asyncio.gather(killer(), *(worker(i) for i in range(CONCURRENCY)))
    return outcomes, leases[0]


def test_a_gateway_killed_under_load_loses_no_answered_request_and_the_budget_stays_bounded(
    pair: list[Gateway],
) -> None:
    dead, survivor = pair
    env = survivor.env
    database_url = env["APPLIANCE_DATABASE__URL"]
    key, _ = budgeted_key(survivor, LIMIT)
    [(dead_id,)] = query(database_url, "SELECT id FROM gateway_instances WHERE pid = :pid", pid=dead.pid)

    def held() -> int:
        [(amount,)] = query(
            database_url,
            "SELECT coalesce(sum(amount), 0) FROM budget_reservations "
            "WHERE gateway_id = :g AND request_id LIKE 'lease:%'",
            g=dead_id,
        )
        return int(amount)

    outcomes, dead_leases = asyncio.run(_load(pair, key["key"], held))
    answered = {str(request_id) for outcome, request_id in outcomes if outcome == "answered"}
    kinds = {outcome for outcome, _ in outcomes}
    assert len(answered) > 20 and "broken" in kinds, f"load before and after the kill: {sorted(kinds)}"

    deadline = time.monotonic() + 20
    while query(database_url, "SELECT 1 FROM budget_reservations WHERE gateway_id = :g", g=dead_id):
        assert time.monotonic() < deadline, "the survivor never swept the dead process's leases"
        time.sleep(0.2)

    async def spend_the_rest() -> set[str]:
        """The survivor serves until the budget refuses: the limit is reached whatever the load spent."""
        async with aiohttp.ClientSession() as session:
            served: set[str] = set()
            for _ in range(LIMIT // 9 + 1):
                results = await asyncio.gather(
                    *(chat_outcome(session, survivor.url, key["key"], False) for _ in range(16))
                )
                served |= {str(request_id) for outcome, request_id in results if outcome == "answered"}
                if any(outcome == "429" for outcome, _ in results):
                    return served
        raise AssertionError("the budget never refused")

    answered |= asyncio.run(spend_the_rest())
    assert survivor.stop()  # a clean stop: its spending committed, its slices given back

    assert_metered(env, answered)

    found = books(database_url, key["workflow_id"])
    assert found.reservations == 0 and found.reserved == 0 and found.used <= LIMIT, found
    # README, budgets: a dead process's leases are charged in full, over-charging by their unused part at most.
    assert found.ledger <= found.used <= found.ledger + dead_leases, (found, dead_leases)
