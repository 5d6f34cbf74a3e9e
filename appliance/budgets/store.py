"""Reservations against budgets, atomic along the chain api_key -> agent -> workflow -> tenant.

Before a request reaches the engine, :meth:`BudgetStore.reserve` takes, in one transaction holding the
write lock, the prompt plus the (possibly clamped) ``max_tokens`` from every token budget of the chain
and one call from every request budget. After the answer, :meth:`BudgetStore.settle` turns reservations
into usage with the real token count and frees the rest. Concurrent requests therefore never spend more
than a budget, whatever their number or the number of gateway processes sharing the database.

Each reservation records the gateway process holding it; :meth:`BudgetStore.sweep` releases only those of
gateways whose heartbeat stopped (liveness, not age: a stream that lasts an hour is still charged). Settle
and sweep lock the rows they take and count only the rows they delete, so a reservation is settled or
released exactly once. A settlement the database refuses goes to the gateway's journal (``journal.py``)
and is replayed until it lands.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ParamSpec, TypeVar
from zoneinfo import ZoneInfo

from sqlalchemy import Table, and_, delete, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from appliance.budgets.journal import Settlement, SettlementJournal
from appliance.budgets.models import Budget, BudgetCounter, CallRecord, GatewayInstance, Reservation, SweptLease
from appliance.budgets.ratelimit import RateWindow, keep_tightest, window_headers
from appliance.db.engine import reading, writing
from appliance.ledger.pricing import Price, to_currency
from appliance.lib.errors import ApplianceError, InvalidRequestError
from appliance.lib.windows import window

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

BUDGETS: Table = Budget.__table__  # type: ignore[attr-defined]
COUNTERS: Table = BudgetCounter.__table__  # type: ignore[attr-defined]
RESERVATIONS: Table = Reservation.__table__  # type: ignore[attr-defined]
CALLS: Table = CallRecord.__table__  # type: ignore[attr-defined]
GATEWAYS: Table = GatewayInstance.__table__  # type: ignore[attr-defined]
SWEPT: Table = SweptLease.__table__  # type: ignore[attr-defined]
LEASE_PREFIX = "lease:"  # reservation rows that are a gateway process's lease, not one request's reservation
PERIODIC = frozenset({"tokens", "requests", "cost"})  # budgets with a period, which reservations draw on


_TRANSIENT_SQLSTATES = frozenset({"40P01", "40001"})  # PostgreSQL: deadlock detected, serialization failure


def _retrying(method: Callable[P, R]) -> Callable[P, R]:
    """Run a store transaction again when the database gave it up for a transient conflict. Counters are
    locked in one order (by budget id) so deadlocks should not occur; this is the net under that rule."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        for attempt in range(4):
            try:
                return method(*args, **kwargs)
            except DBAPIError as exc:
                transient = getattr(exc.orig, "sqlstate", None) in _TRANSIENT_SQLSTATES
                if attempt == 3 or not (transient or "database is locked" in str(exc.orig)):
                    raise
                log.warning("budget transaction retried after %s", type(exc.orig).__name__)
                time.sleep(0.005 * 2**attempt)
        raise AssertionError("unreachable")

    return wrapper


class GatewaySweptError(ApplianceError):
    """This gateway process was declared dead (its heartbeat came too late) and its leases were charged in full: it
    may lease nothing until it has registered again, and then only under new lease ids."""

    status_code = 503
    error_type = "service_unavailable"
    code = "budget_unavailable"


class BudgetExceededError(ApplianceError):
    status_code = 429
    error_type = "budget_exceeded"
    code = "budget_exceeded"


@dataclass(frozen=True)
class CallLink:
    """How a request relates to earlier ones (from its headers)."""

    idempotency_key: str | None = None
    retry_of: str | None = None
    parent_request_id: str | None = None
    session_id: str | None = None  # a multi-turn chat: routed to the engine its earlier turns went to
    client_attempt: int = 0  # the SDK's own retry count (x-stainless-retry-count): raises the attempt, never lowers it

    @property
    def any(self) -> bool:
        return bool(self.idempotency_key or self.retry_of or self.parent_request_id or self.client_attempt)


@dataclass(frozen=True)
class Grant:
    max_tokens: int | None  # what the engine may generate (None: no token budget applies)
    clamped: bool  # max_tokens was lowered (or set) to fit the budgets
    reserved: bool  # something was reserved and must be settled
    prompt_tokens: int = 0  # as counted before generation
    minute_requests: RateWindow | None = None  # the tightest per-minute budgets, after this reservation
    minute_tokens: RateWindow | None = None


@dataclass(frozen=True)
class LeaseMove:
    """What one gateway's lease of one budget window hands to the database: spent (becomes `used`) and
    returned (given back unused)."""

    lease_id: str
    budget_id: str
    window_start: datetime
    spent: int
    returned: int
    final: bool = False  # no request of the lease is in flight: what a sweep charged beyond its spending goes back


class BudgetStore:
    def __init__(
        self,
        engine: Engine,
        zone: ZoneInfo,
        clock: Callable[[], datetime] | None = None,
        *,
        gateway_id: str | None = None,
        journal: SettlementJournal | None = None,
    ) -> None:
        """``gateway_id``: this process, recorded on its reservations (None: they are swept by age);
        ``journal``: where settlements the database refuses wait for replay (None: they raise)."""
        self._engine = engine  # made with serialized_writes=True
        self._zone = zone
        self._clock = clock or (lambda: datetime.now(UTC))
        self.gateway_id = gateway_id
        self.journal = journal
        self._settling = 0  # settlements under way, waited for before a clean shutdown
        self._settled = threading.Condition()
        # How many times this process registered: again after a sweep took it for dead, and a lease of an earlier
        # registration was charged in full by that sweep (see grant). 0: never (tools, tests).
        self.registration = 0

    @_retrying
    def admit(
        self,
        request_id: str,
        chain: dict[str, str],
        call: CallLink,
        *,
        strict: frozenset[str] = frozenset(("max_depth", "max_retries")),
    ) -> tuple[int, int]:
        """Record the request in the call graph; returns (retry attempt, depth). Refuses (429) a retry past
        a `max_retries` budget or a sub-call deeper than a `max_depth` budget of the chain, and (400) a
        parent or retried request this tenant does not have: depth is never the client's to claim.
        Calls are recorded only where it matters (call headers, or retry/depth budgets on the chain). Where
        no such budget applies (``strict`` lacks its kind), a parent or original that was never recorded is
        taken as a root: depth 1 for its child, attempt counted from the retries that name it."""
        tenant = chain.get("tenant")
        with writing(self._engine) as connection:
            depth = 0
            if call.parent_request_id:
                parent = _call(connection, call.parent_request_id, tenant)
                if parent is None and "max_depth" not in strict:
                    parent = {"depth": 0}
                if parent is None:
                    raise InvalidRequestError(
                        "X-Parent-Request-Id names no request of this tenant.",
                        param="X-Parent-Request-Id",
                        code="unknown_parent_request",
                    )
                depth = int(parent["depth"]) + 1
            if call.retry_of:
                original = _call(connection, call.retry_of, tenant)
                if original is None and "max_retries" not in strict:
                    original = {"logical_call": f"req:{call.retry_of}"}
                if original is None:
                    raise InvalidRequestError(
                        "X-Retry-Of names no request of this tenant.",
                        param="X-Retry-Of",
                        code="unknown_retried_request",
                    )
                logical = str(original["logical_call"])
            elif call.idempotency_key:
                logical = f"key:{call.idempotency_key}"
            else:
                logical = f"req:{request_id}"
            attempt = int(
                connection.execute(
                    select(func.count())
                    .select_from(CALLS)
                    .where(
                        CALLS.c.logical_call == logical,
                        CALLS.c.tenant_id == tenant,
                        CALLS.c.workflow_id == chain.get("workflow"),
                    )
                ).scalar_one()
            )
            # An SDK retry that names no logical call (the openai SDK sends no idempotency key) is still the
            # n-th attempt of one: the client's count can add to the gateway's, never take from it.
            attempt = max(attempt, call.client_attempt)
            for budget in _chain_budgets(connection, chain):
                if budget["kind"] == "max_retries" and attempt > budget["limit"]:
                    raise _limit(budget, f"the call was already retried {attempt - 1} times", "retry_limit_exceeded")
                if budget["kind"] == "max_depth" and depth > budget["limit"]:
                    raise _limit(budget, f"this call would be {depth} levels deep", "loop_depth_exceeded")
            connection.execute(
                insert(CALLS).values(
                    request_id=request_id,
                    tenant_id=tenant,
                    workflow_id=chain.get("workflow"),
                    agent_id=chain.get("agent"),
                    logical_call=logical,
                    attempt=attempt,
                    parent_request_id=call.parent_request_id,
                    depth=depth,
                    created_at=self._clock(),
                )
            )
        return attempt, depth

    def chain_budgets(self, chain: dict[str, str]) -> list[dict[str, Any]]:
        """Every budget of the chain, ordered by id (what enforcement keeps in memory for a second)."""
        with reading(self._engine) as connection:
            return [dict(row) for row in _chain_budgets(connection, chain)]

    @_retrying
    def grant(
        self,
        lease_id: str,
        budget_id: str,
        window_start: datetime,
        *,
        need: int,
        least: int,
        extra: int,
        registration: int = 0,
    ) -> tuple[int, int]:
        """Move ``need`` (or what is left of the budget window, if less) plus up to ``extra`` for later requests
        into the lease ``lease_id`` of this gateway (a reservation row it holds for as long as it lives),
        atomically with every other grant: nothing at all unless ``least`` fits. The extra is at most half of
        what remains beyond the need, so near the end of a budget one process does not take what the others
        may need. Returns (granted, what remains after it).

        Refused (``GatewaySweptError``) for a lease of a ``registration`` a sweep took: the swept row would come
        back under its old id, and what the process spent from the swept slice would be charged twice."""
        with writing(self._engine) as connection:
            if self._swept(connection, registration):
                raise GatewaySweptError(
                    "This gateway process is registering again after it was taken for dead; retry the request.",
                )
            limit = connection.execute(select(BUDGETS.c.limit).where(BUDGETS.c.id == budget_id)).scalar()
            if limit is None:
                return 0, 0  # deleted meanwhile
            used, reserved = _counter(connection, budget_id, window_start)
            remaining = int(limit) - used - reserved
            if remaining < max(least, 1):
                return 0, max(remaining, 0)
            base = min(need, remaining)
            granted = base + max(0, min(extra, (remaining - base) // 2))
            connection.execute(_counter_row(budget_id, window_start).values(reserved=COUNTERS.c.reserved + granted))
            held = connection.execute(
                update(RESERVATIONS)
                .where(RESERVATIONS.c.request_id == lease_id, RESERVATIONS.c.budget_id == budget_id)
                .values(amount=RESERVATIONS.c.amount + granted)
            )
            if not held.rowcount:
                connection.execute(
                    insert(RESERVATIONS).values(
                        request_id=lease_id,
                        budget_id=budget_id,
                        window_start=window_start,
                        amount=granted,
                        created_at=self._clock(),
                        gateway_id=self.gateway_id,
                    )
                )
        return granted, remaining - granted

    @_retrying
    def settle_leases(self, moves: list[LeaseMove]) -> dict[tuple[str, str], bool]:
        """In one transaction, for each lease: what its requests spent becomes `used`, and it gives back what
        it no longer holds. Returns the (lease, budget) pairs whose row was gone, True where a sweep had taken it.

        A row is gone when this process's own commit took it to 0 (requests may spend past their hold: the engine's
        count is charged), when its budget was deleted, or when a sweep took the process for dead (its heartbeat
        came too late) and charged the row's whole amount. In the last case the sweep left that amount as the
        lease's credit (``budget_swept_leases``): spending is drawn from it and charged only beyond it, and a
        ``final`` move gives the rest back. Otherwise the spending is charged; nothing is given back twice."""
        gone: dict[tuple[str, str], bool] = {}
        with writing(self._engine) as connection:
            for move in sorted(moves, key=lambda m: (m.budget_id, m.lease_id)):
                lease = (RESERVATIONS.c.request_id == move.lease_id, RESERVATIONS.c.budget_id == move.budget_id)
                amount = connection.execute(select(RESERVATIONS.c.amount).where(*lease).with_for_update()).scalar()
                counter = _counter_row(move.budget_id, move.window_start)
                if amount is None:
                    swept = (SWEPT.c.lease_id == move.lease_id, SWEPT.c.budget_id == move.budget_id)
                    credit = connection.execute(select(SWEPT.c.credit).where(*swept).with_for_update()).scalar()
                    gone[(move.lease_id, move.budget_id)] = credit is not None
                    if credit is not None:
                        drawn = min(int(credit), move.spent)
                        left = int(credit) - drawn
                        refund = left if move.final else 0
                        connection.execute(counter.values(used=COUNTERS.c.used + move.spent - drawn - refund))
                        if move.final:
                            connection.execute(delete(SWEPT).where(*swept))
                        else:
                            connection.execute(update(SWEPT).where(*swept).values(credit=left))
                        continue
                taken = min(int(amount or 0), move.spent + move.returned)
                connection.execute(
                    counter.values(reserved=COUNTERS.c.reserved - taken, used=COUNTERS.c.used + move.spent)
                )
                if amount is not None and int(amount) - taken <= 0:
                    connection.execute(delete(RESERVATIONS).where(*lease))
                elif amount is not None:
                    connection.execute(update(RESERVATIONS).where(*lease).values(amount=RESERVATIONS.c.amount - taken))
        return gone

    def _swept(self, connection: Connection, registration: int) -> bool:
        """Whether a sweep took this process's ``registration`` for dead: its gateway row is gone, or it registered
        again since. Locks the row, so a sweep under way finishes first (and one that comes after waits for this
        transaction). A store that never registered (tools, tests) has nothing to lose."""
        if self.gateway_id is None or self.registration == 0:
            return False
        row = connection.execute(
            select(GATEWAYS.c.id).where(GATEWAYS.c.id == self.gateway_id).with_for_update()
        ).first()
        return row is None or registration != self.registration

    @_retrying
    def reserve(
        self,
        request_id: str,
        chain: dict[str, str],
        prompt_tokens: int,
        max_tokens: int | None,
        price: Price | None = None,
        *,
        min_output: int = 1,
    ) -> Grant:
        """Hold what the request may spend on every periodic budget of its chain, or refuse (429): the prompt
        plus ``max_tokens`` (every sequence's output together, clamped to what the tightest token, cost or
        per-request budget leaves), one call, and their cost at ``price``. Refused unless ``min_output`` tokens
        fit beside the prompt (one per sequence the engine may produce; 0 for embeddings)."""
        price = price or Price()
        now = self._clock()
        with writing(self._engine) as connection:
            budgets = _chain_budgets(connection, chain)
            if not budgets:
                return Grant(max_tokens, clamped=False, reserved=False)
            cap = math.inf if max_tokens is None else max_tokens
            holds = []
            minute: list[tuple[str, int, int, datetime]] = []  # rate limits: kind, limit, remaining, reset
            for budget in budgets:
                if budget["kind"] == "max_tokens":
                    cap = per_request_cap(budget, min_output, cap)
                    continue
                if budget["kind"] not in PERIODIC:
                    continue  # limits on calls, checked when the request is admitted
                start, end = window(budget["period"], now, self._zone)
                used, reserved = _counter(connection, budget["id"], start)
                remaining = budget["limit"] - used - reserved
                least = _amount(budget["kind"], prompt_tokens, min_output, price)
                if remaining < least:  # not even the prompt and a token per sequence fit
                    raise _exceeded(budget, max(remaining, 0), end, now, fits_a_window=least <= budget["limit"])
                if budget["period"] == "minute" and budget["kind"] in ("tokens", "requests"):
                    minute.append((budget["kind"], budget["limit"], remaining, end))
                if budget["kind"] == "tokens":
                    cap = min(cap, remaining - prompt_tokens)
                elif budget["kind"] == "cost":
                    affordable = price.affordable(prompt_tokens, remaining)
                    cap = cap if affordable is None else min(cap, affordable)
                holds.append((budget, start))
            granted = None if cap == math.inf else int(cap)
            for budget, start in holds:
                amount = _amount(budget["kind"], prompt_tokens, granted or 0, price)
                connection.execute(_counter_row(budget["id"], start).values(reserved=COUNTERS.c.reserved + amount))
                connection.execute(
                    insert(RESERVATIONS).values(
                        request_id=request_id,
                        budget_id=budget["id"],
                        window_start=start,
                        amount=amount,
                        created_at=now,
                        gateway_id=self.gateway_id,
                    )
                )
        clamped = granted is not None and (max_tokens is None or granted < max_tokens)
        rates: dict[str, RateWindow] = {}  # the tightest minute budget of each kind, after this reservation
        for kind, limit, left, end in minute:
            rate = RateWindow(
                limit, left - _amount(kind, prompt_tokens, granted or 0, price), (end - now).total_seconds()
            )
            keep_tightest(rates, kind, rate)
        return Grant(
            granted,
            clamped=clamped,
            reserved=bool(holds),
            prompt_tokens=prompt_tokens,
            minute_requests=rates.get("requests"),
            minute_tokens=rates.get("tokens"),
        )

    @_retrying
    def settle(self, request_id: str, total_tokens: int, cost_micros: int = 0, *, counts_as_call: bool = True) -> int:
        """Turn the request's reservations into usage (its real tokens, its cost, one call) and free the rest.
        Idempotent: reservations already settled or released (rows gone) change nothing. Returns how many
        reservation rows (one per budget) it settled."""
        with writing(self._engine) as connection:
            taken = _take(connection, RESERVATIONS.c.request_id == request_id)
            kinds = _kinds(connection, {row["budget_id"] for row in taken})
            for row in taken:
                spent = {"tokens": total_tokens, "cost": cost_micros}.get(kinds[row["budget_id"]], int(counts_as_call))
                _release(connection, row, spent)
        return len(taken)

    def settle_durably(
        self,
        request_id: str,
        total_tokens: int,
        cost_micros: int = 0,
        *,
        counts_as_call: bool = True,
        announced: bool = False,
    ) -> None:
        """:meth:`settle`, or, when the database refuses it, the journal: the settlement is replayed until it
        lands, and the reservation stays held meanwhile (this gateway is alive), never released free.
        ``announced``: counted already by :meth:`announce_settlement`."""
        if not announced:
            self.announce_settlement()
        try:
            try:
                self.settle(request_id, total_tokens, cost_micros, counts_as_call=counts_as_call)
            except SQLAlchemyError as exc:
                if self.journal is None:
                    raise
                log.warning("settlement of %s journaled for replay, the database refused it: %s", request_id, exc)
                try:
                    self.journal.append(Settlement(request_id, total_tokens, cost_micros, counts_as_call))
                except OSError:
                    log.critical(
                        "settlement LOST (database and journal both failed): request %s, %d tokens, cost %d",
                        request_id,
                        total_tokens,
                        cost_micros,
                        exc_info=True,
                    )
        finally:
            with self._settled:
                self._settling -= 1
                self._settled.notify_all()

    def announce_settlement(self) -> None:
        """Count a settlement before it is handed to a worker thread, so a clean shutdown waits for it."""
        with self._settled:
            self._settling += 1

    def wait_settled(self, timeout_s: float) -> bool:
        """Wait for settlements under way (in worker threads) to finish; False if some still run."""
        with self._settled:
            return self._settled.wait_for(lambda: self._settling == 0, timeout_s)

    def replay(self, journal: SettlementJournal) -> int:
        """Apply the journal's settlements; returns how many are still waiting for the database."""
        return journal.replay(
            lambda entry: self.settle(
                entry.request_id, entry.total_tokens, entry.cost_micros, counts_as_call=entry.counts_as_call
            )
        )

    @_retrying
    def register(self, host: str, pid: int) -> None:
        """Announce this gateway process (its heartbeat starts now)."""
        assert self.gateway_id is not None, "a gateway that registers has an id"
        now = self._clock()
        with writing(self._engine) as connection:
            connection.execute(delete(GATEWAYS).where(GATEWAYS.c.id == self.gateway_id))
            connection.execute(
                insert(GATEWAYS).values(id=self.gateway_id, host=host[:200], pid=pid, started_at=now, heartbeat_at=now)
            )
            self.registration += 1  # before the row is visible to others: a transaction that sees it sees this too

    @_retrying
    def heartbeat(self, gateway_id: str) -> bool:
        """Say ``gateway_id`` is alive; False when its row is gone (declared dead: register again)."""
        with writing(self._engine) as connection:
            beat = connection.execute(
                update(GATEWAYS).where(GATEWAYS.c.id == gateway_id).values(heartbeat_at=self._clock())
            )
        return bool(beat.rowcount)

    @_retrying
    def deregister(self, gateway_id: str) -> None:
        """Remove a gateway's row: whatever it still holds is released by the next sweep."""
        with writing(self._engine) as connection:
            connection.execute(delete(GATEWAYS).where(GATEWAYS.c.id == gateway_id))

    @_retrying
    def sweep(self, dead_after_s: float, unowned_ttl_s: float) -> int:
        """Release the reservations of gateways that are gone (no heartbeat for ``dead_after_s``, or no row):
        they died before settling, and a held reservation would otherwise eat the budget forever (their leases
        are charged in full instead, and what was charged is kept as each lease's credit for ``unowned_ttl_s``, in
        case the process was alive after all: see :meth:`settle_leases`). Those of a live gateway are kept however
        old. Reservations made before gateways recorded themselves (no gateway id) are released when older than
        ``unowned_ttl_s``. Returns how many rows were released."""
        now = self._clock()
        orphaned = or_(
            and_(RESERVATIONS.c.gateway_id.is_not(None), RESERVATIONS.c.gateway_id.not_in(select(GATEWAYS.c.id))),
            and_(
                RESERVATIONS.c.gateway_id.is_(None),
                RESERVATIONS.c.created_at < now - timedelta(seconds=unowned_ttl_s),
            ),
        )
        with writing(self._engine) as connection:
            # Credits past their time first, before any counter is locked (a settlement locks a credit, then its
            # counter). Then the dead gateways' rows: a heartbeat that commits meanwhile keeps its row and its
            # leases, or finds its row gone and registers again; never a row kept while its leases are charged.
            connection.execute(delete(SWEPT).where(SWEPT.c.swept_at < now - timedelta(seconds=unowned_ttl_s)))
            connection.execute(delete(GATEWAYS).where(GATEWAYS.c.heartbeat_at < now - timedelta(seconds=dead_after_s)))
            taken = _take(connection, orphaned)
            for row in taken:
                # A dead process's lease is charged in full: what it spent since its last commit is not known,
                # and a budget is an upper bound (it over-charges by the slice's unused part, at most).
                lease = row["request_id"].startswith(LEASE_PREFIX)
                spent = row["amount"] if lease else 0
                _release(connection, row, spent)
                if lease and spent > 0:  # ... and kept as its credit, should the process be alive after all
                    _add_credit(connection, row["request_id"], row["budget_id"], row["window_start"], spent, now)
        return len(taken)

    def status(
        self, tenant_id: str | None = None, in_flight: dict[tuple[str, datetime], int] | None = None
    ) -> list[dict[str, Any]]:
        """Every budget (of ``tenant_id``) with its window's figures. ``in_flight``: what the asking process's
        requests in flight hold of its leases, by (budget, window start): shown as reserved, not leased."""
        in_flight = in_flight or {}
        now = self._clock()
        with reading(self._engine) as connection:
            query = select(BUDGETS)
            if tenant_id is not None:
                query = query.where(BUDGETS.c.tenant_id == tenant_id)
            out = []
            for budget in connection.execute(query.order_by(BUDGETS.c.created_at)).mappings():
                entry = {
                    k: budget[k]
                    for k in ("id", "tenant_id", "scope_type", "scope_id", "kind", "period", "limit", "owner")
                }
                if budget["period"] != "none":
                    start, end = window(budget["period"], now, self._zone)
                    row = connection.execute(
                        select(COUNTERS.c.used, COUNTERS.c.reserved).where(
                            COUNTERS.c.budget_id == budget["id"], COUNTERS.c.window_start == start
                        )
                    ).first()
                    used, reserved = (row[0], row[1]) if row else (0, 0)
                    leased = int(
                        connection.execute(
                            select(func.coalesce(func.sum(RESERVATIONS.c.amount), 0)).where(
                                RESERVATIONS.c.budget_id == budget["id"],
                                RESERVATIONS.c.window_start == start,
                                RESERVATIONS.c.request_id.startswith(LEASE_PREFIX),
                            )
                        ).scalar_one()
                    )
                    # Slices leased to gateway processes are spendable by their requests: part of what remains
                    # (exactly so when no request is in flight), not reserved by a request.
                    held = min(in_flight.get((budget["id"], start), 0), leased)
                    entry.update(
                        used=used,
                        reserved=reserved - leased + held,
                        leased=leased - held,
                        remaining=max(budget["limit"] - used - reserved + leased - held, 0),
                        resets_at=end.isoformat(),
                    )
                if budget["kind"] == "cost":  # money is kept in micro-units and shown in the currency
                    for key in ("limit", "used", "reserved", "leased", "remaining"):
                        if key in entry:
                            entry[key] = to_currency(entry[key])
                out.append(entry)
        return out

    def dangling(self) -> int:
        with reading(self._engine) as connection:
            return len(connection.execute(select(RESERVATIONS.c.request_id)).all())


def _call(connection: Connection, request_id: str, tenant: str | None) -> Any:
    return (
        connection.execute(
            select(CALLS.c.depth, CALLS.c.logical_call).where(
                CALLS.c.request_id == request_id, CALLS.c.tenant_id == tenant
            )
        )
        .mappings()
        .first()
    )


# Retrying the same call past a retry or depth limit never succeeds. A day is past the openai SDK's 60 s
# ceiling on Retry-After, so even a client that ignores `x-should-retry` does not retry at once.
NO_RETRY_AFTER_S = 86_400


def _limit(budget: Any, what: str, code: str) -> BudgetExceededError:
    return BudgetExceededError(
        f"Budget {budget['id']} of {budget['scope_type']} {budget['scope_id']} allows {budget['limit']}: {what}.",
        param=budget["id"],
        code=code,
        headers={"Retry-After": str(NO_RETRY_AFTER_S), "x-should-retry": "false"},
    )


def per_request_cap(budget: Any, min_output: int, cap: float) -> float:
    """``cap`` lowered to a `max_tokens` budget's limit; refused (429) when not a token per sequence fits."""
    if budget["limit"] < min_output:
        raise _limit(budget, f"this request may produce {min_output} sequences of a token each", "max_tokens_exceeded")
    return min(cap, int(budget["limit"]))


def _take(connection: Connection, which: Any) -> list[Any]:
    """Lock the reservation rows ``which`` selects (in the order reserve locks counters: no deadlock), delete
    them, and return the rows this transaction deleted: only those may change a counter, so a settlement and
    a sweep racing for one reservation never both count it. On SQLite the transaction holds the write lock."""
    order = (RESERVATIONS.c.budget_id, RESERVATIONS.c.request_id)
    if not connection.execute(select(RESERVATIONS.c.request_id).where(which).order_by(*order).with_for_update()).all():
        return []
    deleted = connection.execute(
        delete(RESERVATIONS)
        .where(which)
        .returning(
            RESERVATIONS.c.request_id, RESERVATIONS.c.budget_id, RESERVATIONS.c.window_start, RESERVATIONS.c.amount
        )
    )
    return sorted(deleted.mappings().all(), key=lambda row: row["budget_id"])


def _add_credit(
    connection: Connection, lease_id: str, budget_id: str, start: datetime, amount: int, now: datetime
) -> None:
    new = _upsert(connection)(SWEPT).values(
        lease_id=lease_id, budget_id=budget_id, window_start=start, credit=amount, swept_at=now
    )
    connection.execute(
        new.on_conflict_do_update(
            index_elements=[SWEPT.c.lease_id, SWEPT.c.budget_id],
            set_={"credit": SWEPT.c.credit + new.excluded.credit, "swept_at": now},
        )
    )


def _counter_row(budget_id: str, start: datetime) -> Any:
    """An update of one budget window's counter (what to set is the caller's)."""
    return update(COUNTERS).where(COUNTERS.c.budget_id == budget_id, COUNTERS.c.window_start == start)


def _release(connection: Connection, row: Any, spent: int) -> None:
    """A reservation row taken (by :func:`_take`): its amount is no longer reserved, and ``spent`` becomes used."""
    connection.execute(
        _counter_row(row["budget_id"], row["window_start"]).values(
            reserved=COUNTERS.c.reserved - row["amount"], used=COUNTERS.c.used + spent
        )
    )


def _upsert(connection: Connection) -> Any:
    """The dialect's insert, which has ``on_conflict_do_nothing`` / ``on_conflict_do_update``."""
    return postgresql_insert if connection.dialect.name == "postgresql" else sqlite_insert


def _kinds(connection: Connection, budget_ids: set[str]) -> dict[str, str]:
    if not budget_ids:
        return {}
    rows = connection.execute(select(BUDGETS.c.id, BUDGETS.c.kind).where(BUDGETS.c.id.in_(budget_ids)))
    return {row[0]: row[1] for row in rows}


def _chain_budgets(connection: Connection, chain: dict[str, str]) -> list[Any]:
    conditions = [and_(BUDGETS.c.scope_type == scope, BUDGETS.c.scope_id == ident) for scope, ident in chain.items()]
    if not conditions:
        return []
    # Lock in a fixed order (by id) so two requests never wait on each other's rows (no deadlock).
    return list(connection.execute(select(BUDGETS).where(or_(*conditions)).order_by(BUDGETS.c.id)).mappings())


def _amount(kind: str, prompt_tokens: int, completion_tokens: int, price: Price) -> int:
    """What a request of this size takes from a periodic budget of this kind."""
    if kind == "tokens":
        return prompt_tokens + completion_tokens
    if kind == "cost":
        return price.cost(prompt_tokens, completion_tokens)
    return 1  # requests: one call


def _counter(connection: Connection, budget_id: str, start: datetime) -> tuple[int, int]:
    """The window's (used, reserved), its row locked until the transaction ends; made when first needed.
    Two gateway processes may both find no row: the insert skips a row the other made, then both lock it."""
    locked = (
        select(COUNTERS.c.used, COUNTERS.c.reserved)
        .where(COUNTERS.c.budget_id == budget_id, COUNTERS.c.window_start == start)
        .with_for_update()
    )
    found = connection.execute(locked).first()
    if found is None:
        connection.execute(
            _upsert(connection)(COUNTERS)
            .values(budget_id=budget_id, window_start=start, used=0, reserved=0)
            .on_conflict_do_nothing()
        )
        found = connection.execute(locked).one()
    return int(found[0]), int(found[1])


_ADVERB = {"minute": "per-minute", "hour": "hourly", "day": "daily", "month": "monthly"}


def _exceeded(
    budget: Any, remaining: int, resets_at: datetime, now: datetime, *, fits_a_window: bool
) -> BudgetExceededError:
    retry_after = max(1, math.ceil((resets_at - now).total_seconds()))
    what = {"tokens": "tokens", "requests": "calls", "cost": "money"}[budget["kind"]]
    if budget["kind"] == "cost":
        left, limit = f"{to_currency(remaining)}", f"{to_currency(budget['limit'])}"
    else:
        left, limit = f"{remaining} {what}", str(budget["limit"])
    # Waiting helps only when the window is a minute and the request fits a whole one; a day, an hour or a
    # month away the client must not retry by itself (the openai SDK retries every 429 unless told not to).
    rate = budget["period"] == "minute"
    retry = rate and fits_a_window
    headers = {"Retry-After": str(retry_after), "x-should-retry": "true" if retry else "false"}
    if rate and budget["kind"] in ("tokens", "requests"):
        reset_s = (resets_at - now).total_seconds()
        headers.update(window_headers(budget["kind"], RateWindow(budget["limit"], remaining, reset_s)))
    return BudgetExceededError(
        f"The {_ADVERB[budget['period']]} {what} budget {budget['id']} of {budget['scope_type']} {budget['scope_id']} "
        f"is spent: {left} remain of {limit}; it resets at {resets_at.isoformat()}.",
        param=budget["id"],
        headers=headers,
    )
