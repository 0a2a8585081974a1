"""Test helpers users can run in their own CI: a fake monotonic clock with a matching ``sleep``.

``FakeClock`` is both the ``clock`` and (through :meth:`FakeClock.sleep`) the ``sleep`` a sidecar takes. Time only
moves when the test calls :meth:`FakeClock.advance`; sleepers whose deadline has passed then wake up. A sleep of
zero or less returns at once, so retry policies with no wait never block.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._ids = itertools.count()

    def __call__(self) -> float:
        return self._now

    @property
    def now(self) -> float:
        """The current fake time."""
        return self._now

    @property
    def sleepers(self) -> int:
        """How many coroutines are asleep on this clock."""
        return sum(1 for _, _, future in self._sleepers if not future.done())

    async def sleep(self, seconds: float) -> None:
        """Sleep until the clock has been advanced by ``seconds`` (returns at once for ``seconds <= 0``)."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._ids), future))
        await future

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose deadline has come."""
        if seconds < 0:
            raise ValueError("a monotonic clock never goes back")
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)
