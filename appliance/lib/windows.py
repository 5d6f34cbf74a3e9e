"""Budget periods: the window a moment falls in, with boundaries in the configured time zone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo


def window(period: str, now: datetime, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """(start, end) in UTC of the ``period`` window holding ``now``; periods reset at local boundaries."""
    local = now.astimezone(zone)
    if period == "minute":  # a rate limit: requests or tokens per minute
        start = local.replace(second=0, microsecond=0)
        end = start + timedelta(minutes=1)
    elif period == "hour":
        start = local.replace(minute=0, second=0, microsecond=0)
        end = start + timedelta(hours=1)
    elif period == "day":
        start = local.replace(hour=0, minute=0, second=0, microsecond=0)
        end = (start + timedelta(days=1, hours=2)).replace(hour=0)  # a DST day can last 23 or 25 hours
    elif period == "month":
        start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (start + timedelta(days=32)).replace(day=1)
    else:
        raise ValueError(f"unknown period {period!r}")
    # Re-attach the zone after arithmetic: the offset of the boundary itself, not of ``now``.
    start = start.replace(tzinfo=None).replace(tzinfo=zone)
    end = end.replace(tzinfo=None).replace(tzinfo=zone)
    return start.astimezone(UTC), end.astimezone(UTC)
