"""Waiting for a group-commit writer to have committed everything handed to it up to now."""

from __future__ import annotations

import asyncio


class CountBarriers:
    """Futures done once a running count (records committed) reaches each one's target."""

    __slots__ = ("_waiting",)

    def __init__(self) -> None:
        self._waiting: list[tuple[int, asyncio.Future[None]]] = []

    def at(self, target: int) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((target, future))
        return future

    def reached(self, count: int) -> None:
        if not self._waiting:
            return
        waiting = []
        for target, future in self._waiting:
            if target > count:
                waiting.append((target, future))
            elif not future.done():
                future.set_result(None)
        self._waiting = waiting
