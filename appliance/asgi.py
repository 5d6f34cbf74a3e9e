"""``create_app()``: wiring only. ``appliance serve`` runs ``create_served_app`` in each worker process."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from zoneinfo import ZoneInfo

from litestar import Litestar
from litestar.di import Provide

from appliance.audit import setup as audit_setup
from appliance.audit.digest import RefusalDigest
from appliance.audit.middleware import audit_middleware
from appliance.audit.retention import ContentRetention
from appliance.audit.routes import AuditController
from appliance.audit.writer import AuditWriter
from appliance.budgets import access as budget_access
from appliance.budgets.enforce import BudgetEnforcer
from appliance.budgets.journal import SettlementJournal
from appliance.budgets.leases import BudgetLeases
from appliance.budgets.routes import BudgetController
from appliance.budgets.store import BudgetStore
from appliance.budgets.upkeep import BudgetUpkeep, new_gateway_id
from appliance.console.auth_routes import ConsoleAuthController, console_assets
from appliance.db.engine import create_schema, make_engine
from appliance.drift.routes import DriftController
from appliance.drift.watch import DriftWatcher
from appliance.engines.runner import engine_routes
from appliance.gateway.admission import Admission
from appliance.gateway.counting import TokenCounter
from appliance.gateway.isolation import CacheSalts
from appliance.gateway.metrics import GatewayMetrics
from appliance.gateway.openapi import app_version, openapi_config
from appliance.gateway.owners import ResponseOwners
from appliance.gateway.routes import OpenAIController
from appliance.gateway.serving import OpenAIServing
from appliance.gateway.upstream import EngineRouter
from appliance.identity import setup as identity_setup
from appliance.identity.account_routes import LocalAccountController
from appliance.identity.accounts import LoginLimiter, PasswordWork
from appliance.identity.auth import authentication_middleware
from appliance.identity.oidc_routes import OidcController
from appliance.identity.removal import RemovalHooks
from appliance.identity.routes import AdminController
from appliance.identity.tenancy import TenantPolicies, check_default_tenant
from appliance.ledger.pricing import Pricing
from appliance.ledger.routes import UsageController
from appliance.ledger.writer import UsageWriter
from appliance.lib.addresses import ClientNetworks
from appliance.lib.dependencies import resolve_in_order
from appliance.lib.guards import PRINCIPAL
from appliance.lib.http import EXCEPTION_HANDLERS, add_request_id, request_context_middleware
from appliance.lib.journal import Journal
from appliance.lib.jsonbody import BoundedJsonRequest
from appliance.lib.logging import configure_logging
from appliance.lib.malloc import HeapTrimmer
from appliance.lib.pacing import RefusalPacer, refusal_pacing_middleware
from appliance.lib.tarpit import Tarpit
from appliance.placement.routes import PlacementController
from appliance.registry.routes import ModelController
from appliance.registry.routing import RegistryRoutes
from appliance.retrieval.routes import rag_controller
from appliance.retrieval.setup import retrieval_service
from appliance.settings import GatewaySettings, Settings, get_settings
from appliance.telemetry.gpu import GpuUtilization
from appliance.telemetry.health import HealthController
from appliance.telemetry.monitor import ConcurrencyMonitor, TelemetryCollector
from appliance.telemetry.otlp import SpanExporter, span_middleware
from appliance.telemetry.rollup import Rollups, gateway_name

log = logging.getLogger(__name__)


def create_served_app() -> Litestar:
    """The app of ``appliance serve``'s worker processes: :func:`create_app`, and once it has started, the objects
    start-up made moved out of the garbage collector's sight (``gc.freeze``). They live as long as the process,
    yet each full collection walked all of them again: 156-227 ms with the event loop stopped, several times a
    minute under load, where the collections of what requests leave behind take 8-32 ms (measured with
    ``gc.callbacks`` under bench/gateway_overhead.py's load). Objects made later are collected as before; a cycle
    among frozen objects that the app drops later is never freed (a bounded, one-time amount). Not in
    :func:`create_app`: a test process building many apps would keep every earlier one's garbage for good."""
    app = create_app()
    app.on_startup.append(_freeze_startup_heap)
    return app


def _freeze_startup_heap() -> None:
    gc.collect()  # start-up's own garbage first: frozen, it would never be freed
    gc.freeze()


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or get_settings()
    resolve_in_order()  # every provider below is synchronous: no task per dependency
    configure_logging(settings.server.log_level, settings.server.log_format)
    db_engine = make_engine(settings.database_url, echo=settings.database.echo)
    if not settings.gateway.routes and settings.server.service_manager == "systemd":
        routes_of_units = [route.model_dump() for route in engine_routes(settings)]
        derived = GatewaySettings.model_validate({**settings.gateway.model_dump(), "routes": routes_of_units})
        settings = settings.model_copy(update={"gateway": derived})
    router = EngineRouter(settings.gateway)
    registry_routes = RegistryRoutes(db_engine, router, settings.registry.poll_interval_s)
    routes = settings.gateway.routes
    journals = settings.journal
    usage = UsageWriter(
        db_engine,
        capacity=settings.usage.queue_size,
        batch_size=settings.usage.batch_size,
        flush_interval_s=settings.usage.flush_interval_s,
        journal=Journal(settings.journal_dir, "usage", fsync=journals.fsync) if journals.enabled else None,
        adopt_interval_s=journals.adopt_interval_s,
    )
    audit = AuditWriter(
        audit_setup.audit_store(settings),
        batch_size=settings.audit.batch_size,
        checkpoint_interval_s=settings.audit.checkpoint_interval_s,
        journal=Journal(settings.journal_dir, "audit", fsync=journals.fsync) if journals.enabled else None,
        flush_interval_s=settings.usage.flush_interval_s,
        adopt_interval_s=journals.adopt_interval_s,
    )
    refusals = RefusalDigest(  # unauthenticated refusals: a flood of them cannot flood the log
        audit,
        journal=Journal(settings.journal_dir, "refusals", fsync=journals.fsync) if journals.enabled else None,
        adopt_interval_s=journals.adopt_interval_s,
    )
    retention = ContentRetention(audit.store, settings.audit.content_retention_days)
    gateway_id = new_gateway_id()
    budgets = BudgetStore(
        make_engine(settings.database_url, serialized_writes=True),
        ZoneInfo(settings.budgets.timezone),
        gateway_id=gateway_id,
        journal=SettlementJournal(settings.run_dir, gateway_id),
    )
    upkeep = BudgetUpkeep(budgets, settings.budgets, settings.run_dir)
    pricing = Pricing(settings.pricing)
    rollups = Rollups(db_engine, gateway_name(), settings.telemetry.rollup_retention_days)
    monitor = ConcurrencyMonitor(router, settings.telemetry, rollups=rollups, gpu=GpuUtilization())
    metrics = GatewayMetrics(settings.pricing.currency, event_sink=monitor.observe_event)
    admission = Admission(settings.admission) if settings.admission.enabled else None
    metrics.registry.register(TelemetryCollector(monitor, admission))
    drift = DriftWatcher(db_engine, settings.telemetry.drift_interval_s)
    spans = SpanExporter(settings.tracing)
    metrics.registry.register(drift)
    leases = BudgetLeases(
        budgets,
        ZoneInfo(settings.budgets.timezone),
        lease_fraction=settings.budgets.lease_fraction,
        idle_s=settings.budgets.lease_idle_s,
        commit_interval_s=settings.budgets.commit_interval_s,
    )
    enforcer = BudgetEnforcer(budgets, leases)
    tenant_policies = TenantPolicies(db_engine)
    serving = OpenAIServing(
        router,
        usage,
        audit,
        tenant_policies=tenant_policies,
        budgets=enforcer,
        pricing=pricing,
        metrics=metrics,
        admission=admission,
        counter=TokenCounter(router, {route.model: settings.prepared_models_dir / route.model for route in routes}),
        default_max_tokens=settings.gateway.default_max_tokens,
        model_max_tokens=settings.gateway.model_max_tokens,
        cache_salts=CacheSalts.load_or_create(settings.secrets_dir / "cache-salt-key"),
        stream_stall_s=settings.gateway.stream_stall_s,
        owners=ResponseOwners(db_engine),
    )
    retrieval = retrieval_service(settings, db_engine, serving, router, usage=usage, audit=audit, budgets=enforcer)
    # Removing a tenant, workflow or agent: budgets may refuse it, retrieval deletes a tenant's collections.
    removal = RemovalHooks(checks=[budget_access.check_scope_removal], tenant_cleanups=[retrieval.forget_tenant])
    issuer = None if settings.identity.keycloak_url else identity_setup.embedded_issuer(settings)
    hasher = identity_setup.key_hasher(settings)
    # One tarpit for every refusal past a limit (unknown keys, sign-ins, hostile bodies): one bound on what is held.
    tarpit = Tarpit(settings.identity.refusal_delay_s)
    networks = ClientNetworks(
        settings.server.limit_ipv6_prefix, settings.server.limit_network_factor, settings.server.limit_nat64_prefixes
    )
    authenticator = identity_setup.authenticator(settings, db_engine, issuer, hasher, tarpit, networks)
    login_limiter = LoginLimiter(tarpit=tarpit, networks=networks)
    pacer = RefusalPacer(settings.server.paced_refusals_per_address, 10.0, tarpit, networks)
    password_work = PasswordWork()
    heap = HeapTrimmer(settings.server.malloc_trim_interval_s)

    @asynccontextmanager
    async def lifespan(_app: Litestar) -> AsyncIterator[None]:
        create_schema(db_engine)
        check_default_tenant(db_engine, settings.identity.default_tenant)  # refuse to start on a wrong one
        await router.start()
        await registry_routes.start()
        await monitor.start()
        await usage.start()
        await audit.start()
        await refusals.start()
        await upkeep.start()
        await leases.start()
        await drift.start()
        await retention.start()
        await spans.start()
        await heap.start()
        try:
            yield
        finally:
            await heap.stop()
            await spans.stop()
            await retention.stop()
            await drift.stop()
            # After the last requests: what they spent is committed and the slices given back, then the
            # gateway leaves (older settlements landed, or wait in the journal).
            await upkeep.stop(leases_returned=await leases.stop())
            await refusals.stop()
            await audit.stop()
            await usage.stop()
            await monitor.stop()
            await registry_routes.stop()
            await router.stop()
            await asyncio.to_thread(retrieval.close)
            password_work.close()
            db_engine.dispose()

    handlers: list[Any] = [rag_controller(settings), console_assets()]
    app = Litestar(
        route_handlers=[
            *handlers,
            OpenAIController,
            HealthController,
            AdminController,
            ConsoleAuthController,
            AuditController,
            BudgetController,
            UsageController,
            PlacementController,
            DriftController,
            ModelController,
        ]
        + ([OidcController, LocalAccountController] if issuer is not None else []),
        dependencies={
            "principal": PRINCIPAL,  # the authenticated caller; each route's role rule is a guard on it
            "serving": Provide(lambda: serving, use_cache=True, sync_to_thread=False),
            "router": Provide(lambda: router, use_cache=True, sync_to_thread=False),
            "db_engine": Provide(lambda: db_engine, use_cache=True, sync_to_thread=False),
            "key_hasher": Provide(lambda: hasher, use_cache=True, sync_to_thread=False),
            "issuer": Provide(lambda: issuer, use_cache=True, sync_to_thread=False),
            "settings": Provide(lambda: settings, use_cache=True, sync_to_thread=False),
            "login_limiter": Provide(lambda: login_limiter, use_cache=True, sync_to_thread=False),
            "password_work": Provide(lambda: password_work, use_cache=True, sync_to_thread=False),
            "authenticator": Provide(lambda: authenticator, use_cache=True, sync_to_thread=False),
            "audit": Provide(lambda: audit, use_cache=True, sync_to_thread=False),
            "refusals": Provide(lambda: refusals, use_cache=True, sync_to_thread=False),
            "budget_store": Provide(lambda: budgets, use_cache=True, sync_to_thread=False),
            "budget_leases": Provide(lambda: leases, use_cache=True, sync_to_thread=False),
            "tenant_policies": Provide(lambda: tenant_policies, use_cache=True, sync_to_thread=False),
            "removal": Provide(lambda: removal, use_cache=True, sync_to_thread=False),
            "metrics": Provide(lambda: metrics, use_cache=True, sync_to_thread=False),
            "monitor": Provide(lambda: monitor, use_cache=True, sync_to_thread=False),
            "retrieval": Provide(lambda: retrieval, use_cache=True, sync_to_thread=False),
        },
        middleware=[
            request_context_middleware,
            refusal_pacing_middleware(pacer),
            *([span_middleware(spans)] if spans.enabled else []),
            audit_middleware(audit, refusals),
            authentication_middleware(authenticator),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        before_send=[add_request_id],
        lifespan=[lifespan],
        request_max_body_size=settings.server.max_body_bytes,
        request_class=BoundedJsonRequest,
        openapi_config=openapi_config(app_version()),
        debug=False,
    )
    app.state.usage = usage
    app.state.audit = audit
    app.state.spans = spans
    return app
