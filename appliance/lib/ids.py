"""Identifiers of stored things: a short type prefix and 80 random bits (``ten_4f0c...``)."""

from __future__ import annotations

import uuid


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"
