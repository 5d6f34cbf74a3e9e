"""Background tasks of the gateway's components (upkeep loops started in the lifespan)."""

from __future__ import annotations

import asyncio


async def cancel(task: asyncio.Task[None] | None) -> None:
    """Cancel ``task`` (None: nothing to do) and return once it has ended. A cancellation of the caller itself,
    arriving meanwhile, is passed on."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        caller = asyncio.current_task()
        if caller is not None and caller.cancelling():
            raise
