"""Prometheus metrics of the gateway: what each tenant, workflow and model spends, what budgets refuse.

Every gateway process keeps its own counters in its own registry (nothing global, nothing at import);
Prometheus adds the processes up. Label values are ids, never names, and ``-`` where a request has none.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from appliance.ledger.pricing import to_currency
from appliance.ledger.writer import UsageEvent

CONTENT_TYPE = CONTENT_TYPE_LATEST
REFUSAL_CODES = frozenset({"budget_exceeded", "retry_limit_exceeded", "loop_depth_exceeded"})
_LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


def _label(value: str | None) -> str:
    return value or "-"


class GatewayMetrics:
    def __init__(self, currency: str, event_sink: Callable[[UsageEvent], None] | None = None) -> None:
        self.registry = CollectorRegistry()
        self._event_sink = event_sink  # the concurrency monitor: gateway-measured TTFT, requests per engine
        self.currency = currency
        scope = ["tenant", "workflow", "model"]
        self.requests = Counter(
            "appliance_requests", "Requests answered on /v1, by outcome.", [*scope, "status"], registry=self.registry
        )
        self.tokens = Counter(
            "appliance_tokens", "Tokens processed (prompt or completion).", [*scope, "type"], registry=self.registry
        )
        self.cost = Counter(
            "appliance_cost",
            "Cost of the requests, in the currency named by the label.",
            [*scope, "currency"],
            registry=self.registry,
        )
        self.refusals = Counter(
            "appliance_budget_refusals",
            "Requests refused by a budget, by budget and reason (budget_exceeded, retry_limit_exceeded, "
            "loop_depth_exceeded).",
            ["tenant", "budget", "reason"],
            registry=self.registry,
        )
        self.retries = Counter(
            "appliance_retries",
            "Retries of an earlier call, by agent.",
            ["tenant", "workflow", "agent"],
            registry=self.registry,
        )
        self.depth_refusals = Counter(
            "appliance_loop_depth_refusals",
            "Calls refused for going deeper than a loop-depth budget, by agent.",
            ["tenant", "workflow", "agent"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "appliance_request_duration_seconds",
            "Time from request to the end of its answer.",
            ["model", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "appliance_time_to_first_token_seconds",
            "Time to the first streamed token, at the gateway.",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )

    def observe(self, event: UsageEvent) -> None:
        tenant, workflow = _label(event.tenant_id), _label(event.workflow_id)
        scope = (tenant, workflow, event.model)
        self.requests.labels(*scope, str(event.status_code)).inc()
        if event.prompt_tokens:
            self.tokens.labels(*scope, "prompt").inc(event.prompt_tokens)
        if event.completion_tokens:
            self.tokens.labels(*scope, "completion").inc(event.completion_tokens)
        if event.cost_micros:
            self.cost.labels(*scope, self.currency).inc(to_currency(event.cost_micros))
        if event.retry_attempt > 0:
            self.retries.labels(tenant, workflow, _label(event.agent_id)).inc()
        if event.error_code in REFUSAL_CODES:
            self.refusals.labels(tenant, _label(event.budget_id), event.error_code).inc()
            if event.error_code == "loop_depth_exceeded":
                self.depth_refusals.labels(tenant, workflow, _label(event.agent_id)).inc()
        if event.status_code == 200:
            self.latency.labels(event.model, event.endpoint).observe(event.latency_ms / 1000.0)
            if event.ttft_ms is not None:
                self.ttft.labels(event.model).observe(event.ttft_ms / 1000.0)
        if self._event_sink is not None:
            self._event_sink(event)

    def render(self) -> bytes:
        return generate_latest(self.registry)
