"""Per-minute rate limits as OpenAI reports them: ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``.

The figures are those of the tightest `minute` budget of each kind on the request's chain (key, agent,
workflow, tenant), after this request's reservation. The reset is a duration in the form OpenAI (and Go's
``time.Duration``) writes it: ``850ms``, ``12s``, ``1m0s``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.budgets.store import Grant


@dataclass(frozen=True)
class RateWindow:
    """One minute budget as the client sees it: its limit, what is left, seconds until the window resets."""

    limit: int
    remaining: int
    reset_s: float


def reset_duration(seconds: float) -> str:
    """``seconds`` as OpenAI writes a reset: milliseconds under a second, else ``[Nh][Nm]N[.fff]s``."""
    millis = max(0, math.ceil(seconds * 1000))
    if millis < 1000:
        return f"{millis}ms"
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, fraction = divmod(rest, 1000)
    text = f"{whole}.{fraction:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    return f"{minutes}m{text}" if minutes else text


def keep_tightest(rates: dict[str, RateWindow], kind: str, window: RateWindow) -> None:
    """Keep in ``rates`` the minute budget of ``kind`` with the least left (what the headers report)."""
    if kind not in rates or window.remaining < rates[kind].remaining:
        rates[kind] = window


def window_headers(kind: str, window: RateWindow) -> dict[str, str]:
    """The three headers of one kind (``requests`` or ``tokens``)."""
    return {
        f"x-ratelimit-limit-{kind}": str(window.limit),
        f"x-ratelimit-remaining-{kind}": str(max(window.remaining, 0)),
        f"x-ratelimit-reset-{kind}": reset_duration(window.reset_s),
    }


def ratelimit_headers(grant: Grant) -> dict[str, str]:
    """The rate-limit headers of an admitted request: none where no minute budget applies."""
    headers: dict[str, str] = {}
    if grant.minute_requests is not None:
        headers.update(window_headers("requests", grant.minute_requests))
    if grant.minute_tokens is not None:
        headers.update(window_headers("tokens", grant.minute_tokens))
    return headers
