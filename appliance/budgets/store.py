"""Reservations against budgets, atomic along the chain api_key -> agent -> workflow -> tenant.

Before a request reaches the engine, :meth:`BudgetStore.reserve` takes, in one transaction holding the
write lock, the prompt plus the (possibly clamped) ``max_tokens`` from every token budget of the chain
and one call from every request budget. After the answer, :meth:`BudgetStore.settle` turns reservations
into usage with the real token count and frees the rest. Concurrent requests therefore never spend more
than a budget, whatever their number or the number of gateway processes sharing the database.
"""

from __future__ import annotations

import functools
import logging
import math
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
from sqlalchemy.exc import DBAPIError

from appliance.budgets.models import Budget, BudgetCounter, CallRecord, Reservation
from appliance.budgets.windows import window
from appliance.ledger.pricing import Price, to_currency
from appliance.lib.errors import ApplianceError, InvalidRequestError

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

BUDGETS: Table = Budget.__table__  # type: ignore[attr-defined]
COUNTERS: Table = BudgetCounter.__table__  # type: ignore[attr-defined]
RESERVATIONS: Table = Reservation.__table__  # type: ignore[attr-defined]
CALLS: Table = CallRecord.__table__  # type: ignore[attr-defined]
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


class BudgetStore:
    def __init__(self, engine: Engine, zone: ZoneInfo, clock: Callable[[], datetime] | None = None) -> None:
        self._engine = engine  # made with serialized_writes=True
        self._zone = zone
        self._clock = clock or (lambda: datetime.now(UTC))

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
        with self._engine.begin() as connection:
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

    def applicable(self, chain: dict[str, str]) -> set[str]:
        """The kinds of budget that apply to this chain (empty: nothing to enforce, nothing to count)."""
        with self._engine.connect() as connection:
            return {row["kind"] for row in _chain_budgets(connection, chain)}

    @_retrying
    def reserve(
        self,
        request_id: str,
        chain: dict[str, str],
        prompt_tokens: int,
        max_tokens: int | None,
        price: Price | None = None,
    ) -> Grant:
        """Hold what the request may spend on every periodic budget of its chain, or refuse (429): the prompt
        plus ``max_tokens`` (clamped to what the tightest token or cost budget leaves), one call, and their
        cost at ``price``."""
        price = price or Price()
        now = self._clock()
        with self._engine.begin() as connection:
            budgets = _chain_budgets(connection, chain)
            if not budgets:
                return Grant(max_tokens, clamped=False, reserved=False)
            cap = math.inf if max_tokens is None else max_tokens
            holds = []
            for budget in budgets:
                if budget["kind"] == "max_tokens":
                    cap = min(cap, budget["limit"])
                    continue
                if budget["kind"] not in PERIODIC:
                    continue  # limits on calls, checked when the request is admitted
                start, end = window(budget["period"], now, self._zone)
                used, reserved = _counter(connection, budget["id"], start)
                remaining = budget["limit"] - used - reserved
                if remaining < _amount(budget["kind"], prompt_tokens, 1, price):  # not even one token fits
                    raise _exceeded(budget, max(remaining, 0), end, now)
                if budget["kind"] == "tokens":
                    cap = min(cap, remaining - prompt_tokens)
                elif budget["kind"] == "cost":
                    affordable = price.affordable(prompt_tokens, remaining)
                    cap = cap if affordable is None else min(cap, affordable)
                holds.append((budget, start))
            granted = None if cap == math.inf else int(cap)
            for budget, start in holds:
                amount = _amount(budget["kind"], prompt_tokens, granted or 0, price)
                connection.execute(
                    update(COUNTERS)
                    .where(COUNTERS.c.budget_id == budget["id"], COUNTERS.c.window_start == start)
                    .values(reserved=COUNTERS.c.reserved + amount)
                )
                connection.execute(
                    insert(RESERVATIONS).values(
                        request_id=request_id, budget_id=budget["id"], window_start=start, amount=amount, created_at=now
                    )
                )
        clamped = granted is not None and (max_tokens is None or granted < max_tokens)
        return Grant(granted, clamped=clamped, reserved=bool(holds), prompt_tokens=prompt_tokens)

    @_retrying
    def settle(self, request_id: str, total_tokens: int, cost_micros: int = 0, *, counts_as_call: bool = True) -> None:
        """Turn the request's reservations into usage (its real tokens, its cost, one call) and free the rest."""
        with self._engine.begin() as connection:
            rows = (
                connection.execute(
                    select(RESERVATIONS, BUDGETS.c.kind)
                    .join(BUDGETS, BUDGETS.c.id == RESERVATIONS.c.budget_id)
                    .where(RESERVATIONS.c.request_id == request_id)
                    .order_by(RESERVATIONS.c.budget_id)  # the order reserve locks counters in: no deadlock
                )
                .mappings()
                .all()
            )
            for row in rows:
                spent = {"tokens": total_tokens, "cost": cost_micros}.get(row["kind"], int(counts_as_call))
                connection.execute(
                    update(COUNTERS)
                    .where(COUNTERS.c.budget_id == row["budget_id"], COUNTERS.c.window_start == row["window_start"])
                    .values(reserved=COUNTERS.c.reserved - row["amount"], used=COUNTERS.c.used + spent)
                )
            connection.execute(delete(RESERVATIONS).where(RESERVATIONS.c.request_id == request_id))

    @_retrying
    def sweep(self, older_than_s: float) -> int:
        """Release reservations older than ``older_than_s`` (their gateway died before settling: a held
        reservation would otherwise eat the budget forever). Returns how many were released."""
        cutoff = self._clock() - timedelta(seconds=older_than_s)
        with self._engine.begin() as connection:
            stale = (
                connection.execute(
                    select(RESERVATIONS)
                    .where(RESERVATIONS.c.created_at < cutoff)
                    .order_by(RESERVATIONS.c.budget_id, RESERVATIONS.c.request_id)
                )
                .mappings()
                .all()
            )
            for row in stale:
                connection.execute(
                    update(COUNTERS)
                    .where(COUNTERS.c.budget_id == row["budget_id"], COUNTERS.c.window_start == row["window_start"])
                    .values(reserved=COUNTERS.c.reserved - row["amount"])
                )
                connection.execute(
                    delete(RESERVATIONS).where(
                        RESERVATIONS.c.request_id == row["request_id"], RESERVATIONS.c.budget_id == row["budget_id"]
                    )
                )
        return len(stale)

    def status(self, tenant_id: str | None = None) -> list[dict[str, Any]]:
        now = self._clock()
        with self._engine.connect() as connection:
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
                    entry.update(
                        used=used,
                        reserved=reserved,
                        remaining=max(budget["limit"] - used - reserved, 0),
                        resets_at=end.isoformat(),
                    )
                if budget["kind"] == "cost":  # money is kept in micro-units and shown in the currency
                    for key in ("limit", "used", "reserved", "remaining"):
                        if key in entry:
                            entry[key] = to_currency(entry[key])
                out.append(entry)
        return out

    def dangling(self) -> int:
        with self._engine.connect() as connection:
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


def _limit(budget: Any, what: str, code: str) -> BudgetExceededError:
    return BudgetExceededError(
        f"Budget {budget['id']} of {budget['scope_type']} {budget['scope_id']} allows {budget['limit']}: {what}.",
        param=budget["id"],
        code=code,
    )


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
        insert_new = postgresql_insert if connection.dialect.name == "postgresql" else sqlite_insert
        connection.execute(
            insert_new(COUNTERS)
            .values(budget_id=budget_id, window_start=start, used=0, reserved=0)
            .on_conflict_do_nothing()
        )
        found = connection.execute(locked).one()
    return int(found[0]), int(found[1])


_ADVERB = {"hour": "hourly", "day": "daily", "month": "monthly"}


def _exceeded(budget: Any, remaining: int, resets_at: datetime, now: datetime) -> BudgetExceededError:
    retry_after = max(1, math.ceil((resets_at - now).total_seconds()))
    what = {"tokens": "tokens", "requests": "calls", "cost": "money"}[budget["kind"]]
    if budget["kind"] == "cost":
        left, limit = f"{to_currency(remaining)}", f"{to_currency(budget['limit'])}"
    else:
        left, limit = f"{remaining} {what}", str(budget["limit"])
    return BudgetExceededError(
        f"The {_ADVERB[budget['period']]} {what} budget {budget['id']} of {budget['scope_type']} {budget['scope_id']} "
        f"is spent: {left} remain of {limit}; it resets at {resets_at.isoformat()}.",
        param=budget["id"],
        headers={"Retry-After": str(retry_after)},
    )
