"""Datetimes in UTC."""

from __future__ import annotations

from datetime import UTC, datetime


def as_utc(moment: datetime) -> datetime:
    """``moment`` as an aware datetime: a naive one is taken to be UTC (SQLite hands stored datetimes back without
    their zone, and ISO text may leave it out)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
