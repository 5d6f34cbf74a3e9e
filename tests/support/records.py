"""Reading what a gateway in this process recorded, right after its answers."""

from __future__ import annotations

from typing import Any


async def committed(app: Any) -> None:
    """Return once the usage rows and audit records of everything ``app`` answered are in the database: they are
    durable in its journals before each answer, and committed in group commits after it."""
    await app.state.audit.flush()
    await app.state.usage.flush()
