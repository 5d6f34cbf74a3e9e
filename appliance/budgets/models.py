"""Budget tables: limits per scope, their counters per period window, and in-flight reservations."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, UniqueConstraint
from sqlmodel import Field, SQLModel

from appliance.lib.ids import new_id
from appliance.lib.times import utcnow


class Budget(SQLModel, table=True):
    __tablename__ = "budgets"
    __table_args__ = (UniqueConstraint("scope_type", "scope_id", "kind", "period"),)

    id: str = Field(default_factory=lambda: new_id("bud"), primary_key=True, max_length=32)
    tenant_id: str = Field(foreign_key="tenants.id", index=True, max_length=32, ondelete="CASCADE")
    scope_type: str = Field(max_length=20, description="tenant | workflow | agent | api_key")
    scope_id: str = Field(index=True, max_length=32)
    kind: str = Field(max_length=20, description="tokens | requests")
    period: str = Field(max_length=10, description="minute (rate limits) | hour | day | month | none")
    limit: int = Field(sa_column=Column(BigInteger, nullable=False))
    created_by: str = Field(max_length=300)
    created_at: datetime = Field(default_factory=utcnow)
    owner: str = Field(
        default="platform",
        max_length=10,
        sa_column_kwargs={"server_default": "platform"},
        description="platform: set by a platform admin (a tenant's admins cannot raise or delete it) | tenant",
    )


class BudgetCounter(SQLModel, table=True):
    """What one budget has used and holds reserved in one period window."""

    __tablename__ = "budget_counters"

    budget_id: str = Field(foreign_key="budgets.id", primary_key=True, max_length=32, ondelete="CASCADE")
    window_start: datetime = Field(primary_key=True)
    used: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    reserved: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))


class Reservation(SQLModel, table=True):
    """Held by an in-flight request until it settles (or is released)."""

    __tablename__ = "budget_reservations"

    request_id: str = Field(primary_key=True, max_length=64)
    budget_id: str = Field(foreign_key="budgets.id", primary_key=True, max_length=32, ondelete="CASCADE")
    window_start: datetime
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)
    gateway_id: str | None = Field(
        default=None, max_length=64, index=True, description="the gateway process holding it (liveness, not age)"
    )


class GatewayInstance(SQLModel, table=True):
    """A running gateway process; its heartbeat says it is alive. Reservations of a gateway whose heartbeat
    stopped are released by the sweeper; those of live gateways never are, however old."""

    __tablename__ = "gateway_instances"

    id: str = Field(primary_key=True, max_length=64)
    host: str = Field(max_length=200)
    pid: int
    started_at: datetime = Field(default_factory=utcnow)
    heartbeat_at: datetime = Field(default_factory=utcnow, index=True)


class CallRecord(SQLModel, table=True):
    """Written when a request is admitted: which logical call it is an attempt of, and how deep in an
    agent's chain of calls it sits. Depth comes from the parent's record, never from the client."""

    __tablename__ = "call_records"

    request_id: str = Field(primary_key=True, max_length=64)
    tenant_id: str | None = Field(default=None, max_length=32)
    workflow_id: str | None = Field(default=None, max_length=32)
    agent_id: str | None = Field(default=None, max_length=32)
    logical_call: str = Field(index=True, max_length=300, description="idempotency key, or the first attempt's id")
    attempt: int = Field(default=0, description="0 for the first try, n for the n-th retry")
    parent_request_id: str | None = Field(default=None, max_length=64)
    depth: int = Field(default=0)
    created_at: datetime = Field(default_factory=utcnow)


class SweptLease(SQLModel, table=True):
    """What a sweep charged for a lease of a gateway it took for dead. A process that was alive after all (stalled,
    cut off from the database) draws its later spending on that lease from this credit instead of charging it again,
    and gives back what is left once none of the lease's requests is in flight (``BudgetStore.settle_leases``).
    Kept ``reservation_ttl_s`` at most: a process silent longer is charged in full."""

    __tablename__ = "budget_swept_leases"

    lease_id: str = Field(primary_key=True, max_length=64)
    budget_id: str = Field(foreign_key="budgets.id", primary_key=True, max_length=32, ondelete="CASCADE")
    window_start: datetime
    credit: int = Field(sa_column=Column(BigInteger, nullable=False))
    swept_at: datetime = Field(default_factory=utcnow, index=True)
