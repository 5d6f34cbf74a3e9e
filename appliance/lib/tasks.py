"""Background tasks of the gateway's components (upkeep loops started in the lifespan), and waiting for a slot."""

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


async def acquire_within(slots: asyncio.Semaphore, timeout_s: float) -> bool:
    """Take one of ``slots``, waiting at most ``timeout_s``; False if none came free. A free slot is taken at once,
    without a timer (the usual case, on the request path)."""
    if not slots.locked():
        await slots.acquire()
        return True
    try:
        async with asyncio.timeout(timeout_s):
            await slots.acquire()
    except TimeoutError:
        return False
    return True
