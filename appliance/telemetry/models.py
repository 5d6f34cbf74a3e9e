"""Telemetry roll-ups: one row per engine, gateway process and minute, for the console's history charts."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import UniqueConstraint
from sqlmodel import Field, SQLModel


class EngineRollup(SQLModel, table=True):
    __tablename__ = "engine_rollups"
    __table_args__ = (UniqueConstraint("engine", "gateway", "minute"),)

    id: int | None = Field(default=None, primary_key=True)
    minute: datetime = Field(index=True, description="start of the minute (UTC)")
    engine: str = Field(max_length=200)
    model: str = Field(max_length=128)
    gateway: str = Field(max_length=200, description="the gateway process that scraped it (host:pid)")
    samples: int = 0
    running_avg: float = 0.0
    running_max: float = 0.0
    waiting_avg: float = 0.0
    waiting_max: float = 0.0
    kv_cache_usage_avg: float = 0.0
    kv_cache_usage_max: float = 0.0
    preemptions: int = Field(default=0, description="added during the minute")
    prompt_tokens: int = Field(default=0, description="processed by the engine during the minute")
    generation_tokens: int = 0
    requests: int = Field(default=0, description="requests the gateway finished on this engine")
    errors: int = Field(default=0, description="... of which failed on the server side (5xx)")
    ttft_count: int = Field(default=0, description="streamed answers whose first token the gateway timed")
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    state: str = Field(default="healthy", max_length=16, description="the worst health state seen in the minute")
    busy_fraction: float | None = Field(
        default=None, description="share of the minute's samples with a request running (None: rows before 0009)"
    )
    gpu_utilization: float | None = Field(
        default=None, description="mean utilisation (0..1) of the node's GPUs over the minute, where nvidia-smi is"
    )
