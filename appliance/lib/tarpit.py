"""Refusals of a client past its limit, answered slowly.

A refusal that costs next to nothing still costs the event loop something, and a client that sends its next
request as soon as the last is answered (a brute-force tool, a script in a loop) is paced by how fast it is
refused: made cheap, refusals only let it send more. Holding a refusal for ``delay_s`` before answering paces
such a client to one request per ``delay_s`` per connection, for the price of a timer. At most ``max_held``
refusals are held at once (a client opening thousands of connections gets the rest answered at once), so what
the tarpit holds is bounded too."""

from __future__ import annotations

import asyncio


class Tarpit:
    def __init__(self, delay_s: float = 1.0, max_held: int = 1000) -> None:
        self._delay_s = delay_s
        self._max_held = max_held
        self._held = 0

    @property
    def held(self) -> int:
        return self._held

    async def hold(self) -> None:
        """Wait ``delay_s`` before the refusal is answered, unless ``max_held`` are already waiting."""
        if self._held >= self._max_held or self._delay_s <= 0:
            return
        self._held += 1
        try:
            await asyncio.sleep(self._delay_s)
        finally:
            self._held -= 1
