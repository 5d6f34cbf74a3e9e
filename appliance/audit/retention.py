"""The running gateway's upkeep of captured content: prompts and answers older than
``audit.content_retention_days`` are deleted at start and then every hour (they sit apart from the chain, so
the chain stays whole). ``appliance audit prune`` does the same on demand."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

from appliance.audit.store import AuditStore
from appliance.lib.tasks import cancel

log = logging.getLogger(__name__)

PRUNE_INTERVAL_S = 3600.0


class ContentRetention:
    def __init__(self, store: AuditStore, days: int, interval_s: float = PRUNE_INTERVAL_S) -> None:
        self._store = store
        self._age = timedelta(days=days)
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-content-retention")

    async def stop(self) -> None:
        await cancel(self._task)
        self._task = None

    async def prune(self) -> int:
        count = await asyncio.to_thread(self._store.prune_content, datetime.now(UTC) - self._age)
        if count:
            log.info("deleted %d captured prompts and answers past their retention", count)
        return count

    async def _run(self) -> None:
        while True:
            try:
                await self.prune()
            except Exception:
                log.exception("pruning captured content failed; retrying in %.0f s", self._interval_s)
            await asyncio.sleep(self._interval_s)
