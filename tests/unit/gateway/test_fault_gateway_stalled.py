"""A gateway process stalled past ``gateway_dead_after_s`` under load, two processes sharing PostgreSQL.

A stalled host (``SIGSTOP`` here), or a process cut off from the database for longer than the dead-after time: the
other process's sweep takes it for dead and charges its leases in full while requests of it are still in flight.
When it runs again (``SIGCONT``) it finishes those requests, finds its leases swept, registers again and leases
afresh. The books must end exact, as the README says: once both have stopped cleanly the budget's ``used`` is the
ledger's total (each request charged once; what the sweep charged beyond the stalled process's spending went back),
nothing is reserved, and every answered request has its usage row and its audit record. Before swept leases were
told apart, ``used`` exceeded the ledger by the swept slices. The engine is the fast fake of tests/support."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp

from tests.support.books import assert_metered, books
from tests.support.postgres import query
from tests.support.processes import Gateway, budgeted_key, chat_outcome

LIMIT = 1_000_000  # tokens; a lease is 2 % of it (20,000): a swept slice charged twice would show plainly
CONCURRENCY = 16
BEFORE_STALL_S = 1.5
AFTER_STALL_S = 3.0  # both serve again, the stalled one under a new registration
LEASES = "SELECT coalesce(sum(amount), 0) FROM budget_reservations WHERE gateway_id = :g AND request_id LIKE 'lease:%'"


async def _load(
    pair: list[Gateway], key: str, stalled_id: str, database_url: str
) -> tuple[list[tuple[str, str | None]], int]:
    """The load's outcomes, and what the stalled process held in leases when its sweep came."""
    stalled = pair[0]
    outcomes: list[tuple[str, str | None]] = []
    held: list[int] = []
    done = asyncio.Event()

    async def worker(index: int) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            turn = index
            while not done.is_set():
                turn += 1
                outcomes.append(await chat_outcome(session, pair[turn % 2].url, key, stream=turn % 3 == 0))

    async def staller() -> None:
        await asyncio.sleep(BEFORE_STALL_S)
        os.kill(stalled.pid, signal.SIGSTOP)
        try:
            [(amount,)] = await asyncio.to_thread(query, database_url, LEASES, g=stalled_id)
            held.append(int(amount))
            deadline = time.monotonic() + 20
            while (await asyncio.to_thread(query, database_url, LEASES, g=stalled_id))[0][0]:
                assert time.monotonic() < deadline, "the other process never swept the stalled one's leases"
                await asyncio.sleep(0.2)
        finally:
            os.kill(stalled.pid, signal.SIGCONT)
        await asyncio.sleep(AFTER_STALL_S)
        done.set()

    await asyncio.gather(staller(), *(worker(i) for i in range(CONCURRENCY)))
    return outcomes, held[0]


def test_a_gateway_stalled_past_the_dead_after_time_is_swept_and_its_books_end_exact(pair: list[Gateway]) -> None:
    stalled, other = pair
    env = other.env
    database_url = env["APPLIANCE_DATABASE__URL"]
    key, _ = budgeted_key(other, LIMIT)
    [(stalled_id,)] = query(database_url, "SELECT id FROM gateway_instances WHERE pid = :pid", pid=stalled.pid)

    outcomes, swept_slice = asyncio.run(_load(pair, key["key"], stalled_id, database_url))
    assert swept_slice > 0, "the stalled process held a lease when it stalled"
    answered = {str(request_id) for outcome, request_id in outcomes if outcome == "answered"}
    kinds = {outcome for outcome, _ in outcomes}
    assert len(answered) > 50 and kinds <= {"answered", "503"}, sorted(kinds)
    assert query(database_url, "SELECT 1 FROM gateway_instances WHERE id = :g", g=stalled_id), "registered again"
    assert stalled.stop() and other.stop(), "clean stops: spending committed, slices given back"

    assert_metered(env, answered)
    found = books(database_url, key["workflow_id"])
    assert found.reservations == 0 and found.reserved == 0, found
    assert found.used == found.ledger, f"{found} (the swept slice was {swept_slice})"
