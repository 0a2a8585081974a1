"""A PostgreSQL transaction begun ahead: the next batch's new rows claimed while the batch before it commits.

While a batch's transaction waits for the server (its audit entries' ``COPY``, its ``COMMIT``), the event loop and the
server's second backend would otherwise idle. The writer hands over the records that follow the batch
(:meth:`Repositories.begin_ahead <persistence.tables.repositories.Repositories.begin_ahead>`): once the committing
batch's rows are written, they get a transaction of their own, on a second pooled connection, in which each table's
first versions are claimed (:meth:`VersionedTable.claim <persistence.tables.versioned.VersionedTable.claim>`: ids
drawn, rows copied, their canonical JSON made). Nothing stored is read, nothing is audited, nothing is committed.
When the writer next commits exactly those records, their transaction is this one, continued: the chain lock, the
rest of the version rule, the audit entries, the commit. Anything else rolls it back.

What keeps it safe:

* Only records none of whose keys is in the committing batch are begun ahead, so the two transactions never wait for
  each other's rows.
* It begins only once the committing batch's rows are written, and it is given up as soon as that batch's
  transaction fails or is cancelled: a retry of the committing batch runs alone, and a stop never waits for it.
* It reads at ``READ COMMITTED`` whatever the server's default, and takes the chain lock only when it continues,
  after the batch before it has committed: the chain grows in commit order and its head is read under the lock, as
  for any transaction.
* It is rolled back when the batch committed next is another one (a split, more records), when the batch before it
  is not wholly handled, and at close. Until it commits nothing of it is visible, and its records are still in the
  backlog and the journal, so a crash loses nothing.
* It needs a second connection of the pool's own: with ``DATABASE_POOL_SIZE`` under 2 nothing is begun ahead. Nor
  while a fault of the fault kit is installed (:mod:`persistence.testing`): every batch's statements meet the faults.

One case is resolved by the server rather than avoided: a second process with the same instance id that writes the
same new keys may take the chain lock and then wait for a key the held transaction claimed, which then waits for the
chain lock. PostgreSQL detects the deadlock (``deadlock_timeout``, 1 s by default) and fails one of the two, which
its writer retries as a transient error; nothing is lost or written twice.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from persistence.db.engine import Database
from persistence.db.pgcopy import AHEAD_INFO
from persistence.tables.versioned import Claimed

BEGIN_SQL = "SELECT 1"
"""The statement that has a transaction begun ahead sent its ``BEGIN`` (the claims' driver calls run inside it)."""
Parts = tuple[Sequence[Any], ...]
"""A batch as the repositories write it: its records grouped by kind, each group in batch order."""
Claim = Callable[[AsyncConnection, Parts], Awaitable[list[Claimed | None]]]


def same_records(first: Parts, second: Parts) -> bool:
    """Whether two batches hold the same record objects, group by group, in the same order."""
    return len(first) == len(second) and all(
        len(one) == len(other) and all(a is b for a, b in zip(one, other, strict=True))
        for one, other in zip(first, second, strict=True)
    )


@dataclass(slots=True)
class Held:
    """A transaction begun ahead: the batch it is for, its connection, and each table's claim (``None``: the table has
    nothing in the batch)."""

    parts: Parts
    connection: AsyncConnection
    claims: list[Claimed | None]

    def continued(self) -> None:
        """The batch's own transaction goes on in it: no longer a speculation (the fault kit sees it again). A
        connection already invalidated or closed has nothing to clear."""
        with contextlib.suppress(Exception):
            self.connection.info.pop(AHEAD_INFO, None)

    async def commit(self) -> None:
        """Commit it and give its connection back."""
        try:
            await self.connection.commit()
        finally:
            await self.connection.close()

    async def discard(self) -> None:
        """Roll it back and give its connection back, even if the caller is cancelled meanwhile; an error doing so
        only invalidates the connection."""
        self.continued()
        await asyncio.shield(self._rollback_and_close())

    async def _rollback_and_close(self) -> None:
        try:
            with contextlib.suppress(Exception):
                await self.connection.rollback()
        finally:
            with contextlib.suppress(Exception):
                await self.connection.close()


@dataclass(slots=True)
class _Beginning:
    """One transaction being begun ahead: the task, the batch committing meanwhile, the gate its rows open."""

    after: Parts
    gate: asyncio.Future[None]
    task: asyncio.Task[Held | None] | None = None
    claiming: bool = False  # past the gate: a connection is taken, the claims are under way

    def stop_waiting(self) -> None:
        """Cancel it if it is still waiting for its gate (nothing begun yet); one claiming is let finish."""
        if self.task is not None and not self.claiming and not self.task.done():
            self.task.cancel()


class AheadTransactions:
    """At most one transaction begun ahead over one database, and the task that begins it."""

    def __init__(self, database: Database) -> None:
        self._db = database
        # A second transaction needs a second connection of the pool's own: with fewer, the held one would take an
        # overflow connection each batch, or wait for the only one.
        self.enabled = not database.is_sqlite and database.settings.pool_size >= 2
        self._current: _Beginning | None = None
        self._cleanups: set[asyncio.Future[None]] = set()

    @property
    def allowed(self) -> bool:
        """Whether a transaction may be begun ahead now: PostgreSQL, a pool of two or more, and no fault of the
        fault kit installed (:attr:`Database.faults_installed <persistence.db.engine.Database.faults_installed>`:
        every batch's statements must meet the faults)."""
        return self.enabled and not self._db.faults_installed

    def start(self, parts: Parts, after: Parts, claim: Claim) -> asyncio.Task[Held | None]:
        """Begin ``parts`` ahead once the rows of ``after`` (the committing batch) are written (:meth:`written`); a
        beginning registered from before and not taken is abandoned (:meth:`abandon`)."""
        self.abandon()
        beginning = _Beginning(after, asyncio.get_running_loop().create_future())
        beginning.task = asyncio.ensure_future(self._begin(beginning, parts, claim))
        self._current = beginning
        return beginning.task

    def written(self, parts: Parts) -> None:
        """The rows of ``parts`` are written, in a transaction that goes on to commit: a batch begun ahead of them
        may start."""
        current = self._current
        if current is not None and not current.gate.done() and same_records(current.after, parts):
            current.gate.set_result(None)

    def abandon(self) -> None:
        """Give up what is registered, without waiting: one still waiting for its gate is cancelled, one claiming is
        rolled back once its claims are done, by a task :meth:`discard` awaits."""
        current, self._current = self._current, None
        if current is not None and current.task is not None:
            current.stop_waiting()
            self._clean_up(current.task)

    async def take(self, parts: Parts) -> Held | None:
        """The transaction held for ``parts``, if that is what is held. One begun ahead of ``parts`` (while they
        commit) is the next batch's and stays. Any other is rolled back; with a fault of the kit installed, so is
        the one held for ``parts`` (its claims never met the faults)."""
        current = self._current
        if current is None or (same_records(current.after, parts) and self.allowed):
            return None
        self._current = None
        task = current.task
        if task is None:
            return None
        current.stop_waiting()
        try:
            held = await _outcome(task)
        except asyncio.CancelledError:
            self._clean_up(task)  # the caller is cancelled: the connection still goes back
            raise
        if held is not None and same_records(held.parts, parts) and self.allowed:
            return held
        if held is not None:
            await held.discard()
        return None

    async def discard(self) -> None:
        """Roll back whatever is held or being begun, and wait until every connection taken for one is back (the
        batch before it was not wholly handled; close)."""
        self.abandon()
        while self._cleanups:
            await asyncio.wait(set(self._cleanups))

    def _clean_up(self, task: asyncio.Task[Held | None]) -> None:
        cleanup = asyncio.ensure_future(_discard_when_done(task))
        self._cleanups.add(cleanup)
        cleanup.add_done_callback(self._cleanups.discard)

    async def _begin(self, beginning: _Beginning, parts: Parts, claim: Claim) -> Held | None:
        await beginning.gate
        beginning.claiming = True
        connection = await self._db.engine.connect()
        connection.info[AHEAD_INFO] = True
        try:
            # Its snapshot must not predate the commit it continues after: READ COMMITTED whatever the server's
            # default (under REPEATABLE READ the chain's head read later would be the one before that commit).
            await connection.execution_options(isolation_level="READ COMMITTED")
            await connection.begin()
            await connection.exec_driver_sql(BEGIN_SQL)
            claims = await claim(connection, parts)
        except BaseException:
            await Held(parts, connection, []).discard()
            raise
        return Held(parts, connection, claims)


async def _discard_when_done(task: asyncio.Task[Held | None]) -> None:
    held = await _outcome(task)
    if held is not None:
        await held.discard()


async def _outcome(task: asyncio.Task[Held | None]) -> Held | None:
    """What a beginning came to: the held transaction, or ``None`` if it failed or was cancelled (the transaction
    that writes those records meets any error again). The caller's own cancellation always comes through."""
    await asyncio.wait({task})
    if task.cancelled() or task.exception() is not None:
        return None
    return task.result()
