"""Small statistics shared by reports and the health signal."""

from __future__ import annotations

import math
from collections.abc import Sequence


def nearest_rank(values: Sequence[float], *quantiles: float) -> list[float]:
    """Nearest-rank quantiles (each in 0..1) of unsorted, non-empty values, sorting them once."""
    ordered = sorted(values)
    return [ordered[max(math.ceil(q * len(ordered)), 1) - 1] for q in quantiles]
