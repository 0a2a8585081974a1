"""WAL checkpoints in the background, for SQLite files, so that commits seldom pay for them.

By default SQLite checkpoints inside the ``COMMIT`` that takes the write-ahead log past 1000 pages: that commit
copies the log back into the database file and syncs it, a stall of several milliseconds every hundred or so
small transactions, and every record queued behind it waits too. Here a commit checkpoints only past
:data:`~persistence.db.engine.WAL_AUTOCHECKPOINT_PAGES`; the writer starts a ``PASSIVE`` checkpoint on another pooled
connection, in the background, at most every :data:`CHECKPOINT_INTERVAL` seconds after a commit. ``PASSIVE`` never
waits for a lock and never blocks a reader or a writer. The log restarts from its beginning at the first write after
a checkpoint that copied all of it; under a steady stream of commits that may not happen before the backstop, but
by then the background has copied almost every page, so the commit that runs it has little left to do. A commit
that finds a checkpoint running, or the last one started less than an interval ago, is owed one: it runs as soon as
the interval is up, so every commit is followed by a checkpoint within about an interval. That is also when, with
``synchronous=NORMAL``, a commit reaches the disk itself (a checkpoint syncs the log first): the window a power cut
can take back. A failed
background checkpoint costs nothing else: the first failure of a streak is logged (at INFO when it only outlasted
the query timeout, else at WARNING), and so is the recovery. The
writer waits for a running checkpoint before it closes or replaces its connections.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from persistence.db.engine import Database
from persistence.errors import QueryTimeoutError
from persistence.observe.logger import get_logger

log = get_logger(__name__)

CHECKPOINT_INTERVAL = 0.25
"""Seconds between background checkpoints while commits keep coming."""


Sleep = Callable[[float], Awaitable[None]]


class WalCheckpointer:
    """Runs one background ``PASSIVE`` checkpoint at a time, started by :meth:`after_commit`; ``sleep`` waits on the
    clock the writer's ``now`` comes from (the injected one)."""

    def __init__(
        self, database: Database, *, interval: float = CHECKPOINT_INTERVAL, sleep: Sleep = asyncio.sleep
    ) -> None:
        self._database = database
        self._interval = interval
        self._sleep = sleep
        self._last: float | None = None
        self._owed = False
        self._waiting = False
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self.runs = 0
        """Checkpoints that ran to the end (complete or not)."""
        self.failures = 0
        """Checkpoints that raised (the first of each streak is logged)."""
        self._streak = 0
        self.last_result: tuple[int, int, int] | None = None
        """``(busy, pages in the log, pages checkpointed)`` of the latest run, as SQLite reports them."""

    def after_commit(self, now: float) -> None:
        """A transaction committed at ``now`` (the writer's clock): a checkpoint is owed. It starts now if none ran
        in the last interval; else as soon as the interval is up (after the running one, if one runs)."""
        self._owed = True
        self._closing = False  # the writer commits again (persistence switched back on)
        if self._task is not None and not self._task.done():
            return  # the running task takes it: see _run
        delay = 0.0 if self._last is None else max(self._last + self._interval - now, 0.0)
        self._last = now + delay
        self._task = asyncio.create_task(self._run(delay), name="persistence-wal-checkpoint")

    async def _run(self, delay: float) -> None:
        while self._owed and not self._closing:
            if delay > 0:
                self._waiting = True
                try:
                    await self._sleep(delay)
                finally:
                    self._waiting = False
            self._owed = False
            await self._checkpoint()
            if self._owed and self._last is not None:  # a commit came during this one
                self._last += self._interval
            delay = self._interval

    async def _checkpoint(self) -> None:
        try:
            self.last_result = await self._database.checkpoint()
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self.failures += 1
            self._streak += 1
            if self._streak == 1:  # once per streak: a full disk would otherwise log four times a second
                # Interrupted past the query timeout (a busy machine, a large log), a PASSIVE checkpoint has only
                # stopped early: the next one goes on from there. Any other error is a fault worth a warning.
                level = log.info if isinstance(error, QueryTimeoutError) else log.warning
                level("wal_checkpoint_failed", error_class=type(error).__name__, error=str(error)[:200])
        else:
            self.runs += 1
            if self._streak:
                log.info("wal_checkpoint_recovered", failed_before=self._streak)
                self._streak = 0

    async def close(self, timeout: float) -> None:
        """Let a running checkpoint finish within ``timeout`` seconds, else cancel it. One that waits for its interval
        is cancelled at once: closing the database's last connection checkpoints the log anyway."""
        self._closing = True  # a running checkpoint ends the task: no wait for another
        task = self._task
        if task is None or task.done():
            return
        if self._waiting:
            timeout = 0.0
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
