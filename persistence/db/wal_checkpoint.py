"""WAL checkpoints in the background, for SQLite files, so that commits seldom pay for them.

By default SQLite checkpoints inside the ``COMMIT`` that takes the write-ahead log past 1000 pages: that commit
copies the log back into the database file and syncs it, a stall of several milliseconds every hundred or so
small transactions, and every record queued behind it waits too. Here a commit checkpoints only past
:data:`~persistence.db.engine.WAL_AUTOCHECKPOINT_PAGES`; the writer starts a ``PASSIVE`` checkpoint on another pooled
connection, in the background, at most every :data:`CHECKPOINT_INTERVAL` seconds after a commit. ``PASSIVE`` never
waits for a lock and never blocks a reader or a writer. The log restarts from its beginning at the first write after
a checkpoint that copied all of it; under a steady stream of commits that may not happen before the backstop, but
by then the background has copied almost every page, so the commit that runs it has little left to do. A failed
background checkpoint costs nothing else: the first failure of a streak is logged (at INFO when it only outlasted
the query timeout, else at WARNING), and so is the recovery. The
writer waits for a running checkpoint before it closes or replaces its connections.
"""

from __future__ import annotations

import asyncio
import contextlib

from persistence.db.engine import Database
from persistence.errors import QueryTimeoutError
from persistence.observe.logger import get_logger

log = get_logger(__name__)

CHECKPOINT_INTERVAL = 0.25
"""Seconds between background checkpoints while commits keep coming."""


class WalCheckpointer:
    """Runs one background ``PASSIVE`` checkpoint at a time, started by :meth:`after_commit`."""

    def __init__(self, database: Database, *, interval: float = CHECKPOINT_INTERVAL) -> None:
        self._database = database
        self._interval = interval
        self._last: float | None = None
        self._task: asyncio.Task[None] | None = None
        self.runs = 0
        """Checkpoints that ran to the end (complete or not)."""
        self.failures = 0
        """Checkpoints that raised (the first of each streak is logged)."""
        self._streak = 0
        self.last_result: tuple[int, int, int] | None = None
        """``(busy, pages in the log, pages checkpointed)`` of the latest run, as SQLite reports them."""

    def after_commit(self, now: float) -> None:
        """A transaction committed at ``now`` (the writer's clock): start a checkpoint if one is due and none runs."""
        if self._task is not None and not self._task.done():
            return
        if self._last is not None and now - self._last < self._interval:
            return
        self._last = now
        self._task = asyncio.create_task(self._run(), name="persistence-wal-checkpoint")

    async def _run(self) -> None:
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
        """Let a running checkpoint finish within ``timeout`` seconds, else cancel it."""
        task = self._task
        if task is None or task.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
