"""Datetimes in UTC."""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime


def as_utc(moment: datetime) -> datetime:
    """``moment`` as an aware datetime: a naive one is taken to be UTC (SQLite hands stored datetimes back without
    their zone, and ISO text may leave it out)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


_DURATION = re.compile(r"^(?P<n>[0-9]+)(?P<unit>[smhd]?)$")


def duration_s(text: str) -> int:
    """A command-line duration (``90s``, ``10m``, ``2h``, ``7d``; a bare number is seconds) in seconds."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 10m, 2h)")
    return int(match["n"]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match["unit"]]
