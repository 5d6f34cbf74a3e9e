"""A gateway process's background work on budgets: its heartbeat, the sweep of what dead gateways left,
and the replay of settlements the database refused.

Liveness, not age: a gateway registers a row when it starts and renews its heartbeat every
``heartbeat_interval_s``; the sweeper releases the reservations of gateways silent for
``gateway_dead_after_s`` (or without a row), never those of a live one, however long its requests run.
While a journal of this data folder holds settlements, the gateway that wrote it is kept alive too (its
heartbeat is renewed), so its reservations wait for the replay instead of being released free. Clocks of
gateway hosts are assumed synchronised to well within ``gateway_dead_after_s``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

from appliance.budgets import journal
from appliance.budgets.store import BudgetStore
from appliance.settings import BudgetSettings

log = logging.getLogger(__name__)

SETTLE_WAIT_S = 10.0  # at shutdown, for settlements still running in worker threads


def new_gateway_id() -> str:
    return f"gw_{uuid.uuid4().hex}"


class BudgetUpkeep:
    def __init__(self, store: BudgetStore, settings: BudgetSettings, run_dir: Path) -> None:
        assert store.gateway_id is not None and store.journal is not None, "a gateway store has an id and a journal"
        self._store = store
        self._journal = store.journal
        self._settings = settings
        self._run_dir = run_dir
        self._adopted: list[journal.SettlementJournal] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._replaying = threading.Lock()  # a cancelled loop's replay may still run in its thread at stop
        # ... and so may a heartbeat: once stopping, none starts, and leaving waits for one under way (else it
        # would find its row gone and register the gateway again after it deregistered).
        self._stopping = threading.Event()
        self._beating = threading.Lock()

    @property
    def gateway_id(self) -> str:
        assert self._store.gateway_id is not None
        return self._store.gateway_id

    async def start(self) -> None:
        await asyncio.to_thread(self._start)
        every = self._settings
        self._tasks = [
            asyncio.create_task(_every(every.heartbeat_interval_s, self.beat, "budget heartbeat")),
            asyncio.create_task(_every(every.sweep_interval_s, self.sweep, "sweeping budget reservations")),
            asyncio.create_task(_every(every.replay_interval_s, self.replay, "replaying budget settlements")),
        ]

    async def stop(self, *, leases_returned: bool = True) -> None:
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.to_thread(self._stop, leases_returned)

    def _start(self) -> None:
        self._journal.claim(own=True)
        self._adopted = journal.orphans(self._run_dir, self.gateway_id)
        for adopted in self._adopted:
            log.warning("replaying %d settlements left by gateway %s", len(adopted.pending()), adopted.gateway_id)
        self._store.register(socket.gethostname(), os.getpid())
        self.replay()

    def _stop(self, leases_returned: bool = True) -> None:
        """After the last requests: wait for their settlements, replay what waits, then leave. A gateway
        with settlements still journaled keeps its row (the next one on this data folder replays them), and so
        does one whose leases could not be given back (the sweep then charges them)."""
        try:
            if not self._store.wait_settled(SETTLE_WAIT_S):
                log.warning("budget settlements still running at shutdown")
            left = self._replay_all()
            if left:
                log.error(
                    "%d budget settlements still journaled in %s: replayed at the next start", left, self._run_dir
                )
            elif not leases_returned:
                log.error("budget leases not given back: the sweep charges them once this gateway is seen dead")
            else:
                with self._beating:
                    self._store.deregister(self.gateway_id)
        finally:
            self._journal.release()
            for adopted in self._adopted:
                adopted.release()

    def beat(self) -> None:
        """Renew this gateway's heartbeat (registering again if it was declared dead) and that of every
        gateway whose journal waits for replay here."""
        with self._beating:
            if self._stopping.is_set():
                return
            if not self._store.heartbeat(self.gateway_id):
                log.error("this gateway was declared dead (heartbeat too late): its reservations may be released")
                self._store.register(socket.gethostname(), os.getpid())
            for adopted in list(self._adopted):
                self._store.heartbeat(adopted.gateway_id)

    def sweep(self) -> None:
        released = self._store.sweep(self._settings.gateway_dead_after_s, self._settings.reservation_ttl_s)
        if released:
            log.warning("released %d budget reservations left by gateways that stopped before settling", released)

    def replay(self) -> None:
        self._replay_all()

    def _replay_all(self) -> int:
        with self._replaying:
            left = self._store.replay(self._journal)
            for adopted in list(self._adopted):
                waiting = self._store.replay(adopted)
                left += waiting
                if not waiting:  # all landed: the dead gateway's other reservations may now be released
                    self._store.deregister(adopted.gateway_id)
                    adopted.release()
                    self._adopted.remove(adopted)
            return left


async def _every(interval_s: float, work: Callable[[], None], what: str) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await asyncio.to_thread(work)
        except Exception:
            log.exception("%s failed", what)
