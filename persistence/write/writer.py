"""The writer: the one background task that moves the backlog into the database, behind the circuit breaker.

Each turn of the loop is admit → commit → publish → settle:

* **admit**: the breaker decides whether a database call may be made now (closed, or the one half-open probe);
  while it refuses, the writer sleeps until it may ask again, or until new work arrives.
* **commit**: before the database is ready it prepares it (migrations, the history); then it takes the head of the
  backlog (up to ``PERSISTENCE_BATCH_SIZE`` records, oldest first, from the journal or RAM) and hands it to the
  committer, which returns an outcome. Meanwhile the committer may begin the transaction of the batch after it (the
  records that follow in RAM; on PostgreSQL): a task the writer stops awaiting when the commit is done, whose
  transaction the next commit continues or rolls back.
* **publish**: receipts resolve, then events say what happened; the outcome's verdict goes to the breaker (a
  transient failure counts once, data errors never) and says whether the database is reachable: the writer is the
  one owner of :attr:`Writer.database_ok`, written in one place (:meth:`Writer._conclude`).
* **settle**: the handled prefix leaves the backlog (and the journal); the history may evict what is safe.

Everything else lives elsewhere: the backlog (RAM and journal), the committer (transactions, retries, dead letters),
which the writer calls directly, and the database link (preparing the database). Tests drive the loop with a fake
committer and link and a fake clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Sequence
from typing import Protocol

from persistence.errors import JournalError
from persistence.observe.events import (
    BatchCommitted,
    BreakerChanged,
    DatabaseRecovered,
    DatabaseUnavailable,
    EventBus,
    JournalFailed,
    JournalReplayed,
    RecordDeadLettered,
    WriteFailed,
)
from persistence.records.models import Entity
from persistence.write.backlog import Backlog, Batch, Clock, Pending, ReceiptBook, Sleep
from persistence.write.breaker import Admission, CircuitBreaker, Transition, Verdict
from persistence.write.committer import Outcome, short_error


class BatchCommitter(Protocol):
    """What writes a batch: the :class:`~persistence.write.committer.Committer` in production, a fake in tests."""

    async def commit(self, records: Sequence[Pending]) -> Outcome:
        """Write a batch; see :class:`~persistence.write.committer.Committer`."""

    async def prepare_ahead(self, records: Sequence[Pending], committing: Sequence[Pending]) -> None:
        """Prepare the next batch's transaction while ``committing`` commits (this call is cancelled when it is done;
        what it began is the committer's to finish or roll back)."""


class Preparer(Protocol):
    """What prepares the database: the :class:`~persistence.write.link.DatabaseLink` in production, a fake in tests."""

    @property
    def ready(self) -> bool:
        """Whether the database is prepared (migrated, history loaded)."""

    async def prepare(self) -> int:
        """Make the database ready and return the trades the history loaded; raises when it cannot be reached."""

    def committed(self, now: float, outcome: Outcome) -> None:
        """Told after every batch (a background checkpoint, a lost schema)."""


JOURNAL_RETRY_SECONDS = 1.0
"""How long the writer waits, on the injected clock, before reading a journal that could not be read again."""


class Writer:
    """Drains a :class:`~persistence.write.backlog.Backlog` through a committer; see the module docstring."""

    def __init__(
        self,
        backlog: Backlog,
        committer: BatchCommitter,
        database: Preparer,
        *,
        breaker: CircuitBreaker,
        book: ReceiptBook,
        bus: EventBus,
        clock: Clock,
        sleep: Sleep,
        batch_size: int,
    ) -> None:
        self._backlog = backlog
        self._committer = committer
        self._database = database
        self._breaker = breaker
        self._book = book
        self._bus = bus
        self._clock = clock
        self._sleep = sleep
        self._batch_size = batch_size
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._database_ok = False

    @property
    def database_ok(self) -> bool:
        """Whether the database took the last attempt (a data error is an answer too); ``False`` before any."""
        return self._database_ok

    @property
    def breaker(self) -> CircuitBreaker:
        """The circuit breaker guarding every write."""
        return self._breaker

    @property
    def running(self) -> bool:
        """Whether the loop's task is alive."""
        return self._task is not None and not self._task.done()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the loop's task, in a fresh context (no caller's correlation id leaks into it)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="persistence-writer", context=contextvars.Context())

    async def stop(self, timeout: float) -> None:
        """Let the loop drain what it can within ``timeout``, then cancel it."""
        self._stopping = True
        self._backlog.work.set()
        task = self._task
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), max(timeout, 0.0))
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        except asyncio.CancelledError:
            task.cancel()
            raise

    async def open(self) -> bool:
        """Start-up: prepare the database once (not asked of the breaker), then replay the records on disk.

        A database that cannot be prepared is published (:class:`DatabaseUnavailable`) and returns ``False``: the
        loop prepares it later, behind the breaker.
        """
        try:
            await self._database.prepare()
        except Exception as error:
            self._conclude(None, Verdict.FAILURE, self._clock())
            self._bus.publish(
                DatabaseUnavailable(error_class=type(error).__name__, error=short_error(error), at_startup=True)
            )
            return False
        self._conclude(None, Verdict.SUCCESS, self._clock())
        await self.drain_journal()
        return True

    async def drain_journal(self) -> None:
        """Replay the records on disk now (start-up), while the database takes them; the loop goes on later."""
        while self._backlog.on_disk_only and self._database.ready and not self._stopping:
            admission, transition = self._breaker.admit(self._clock())
            self._publish_transition(transition)
            if not admission.allowed:
                return
            failures_before = self._breaker.consecutive_failures
            if not await self._write_next_batch(admission):
                return  # the journal cannot be read now; the loop tries again later
            if self._breaker.consecutive_failures > failures_before:
                return  # the database failed; the loop carries on when it can

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        backlog, breaker = self._backlog, self._breaker
        while True:
            backlog.work.clear()
            has_work = len(backlog) > 0
            if self._stopping and not has_work:
                return
            if self._database.ready and not has_work:
                await self._idle(None)
                continue
            now = self._clock()
            admission, transition = breaker.admit(now)
            self._publish_transition(transition)
            if not admission.allowed:
                if self._stopping:
                    return  # nothing can be written now; the backlog journals the rest at close
                await self._idle(breaker.seconds_until_half_open(now))
                continue
            try:
                if self._database.ready:
                    if not await self._write_next_batch(admission):
                        if self._stopping:
                            return  # what is on disk stays there, for the next start
                        await self._pause(JOURNAL_RETRY_SECONDS)
                else:
                    await self._prepare(admission)
            except asyncio.CancelledError:
                breaker.record_cancelled(admission)
                raise
            except Exception as error:
                # The only writer must outlive any fault it did not foresee: report it, and count it against the
                # breaker so that a fault that persists backs off.
                self._bus.publish(_fault(error, f"writer: {short_error(error)}"))
                self._conclude(admission, Verdict.FAILURE, self._clock())

    async def _idle(self, timeout: float | None) -> None:
        work = self._backlog.work
        if work.is_set():
            return
        waiter = asyncio.ensure_future(work.wait())
        if timeout is None:
            try:
                await waiter
            finally:
                waiter.cancel()
            return
        # The deadline is fixed now: the sleep only starts when its task first runs, and time may move before that.
        sleeper = asyncio.ensure_future(self._sleep_until(self._clock() + max(timeout, 0.0)))
        try:
            await asyncio.wait({waiter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            sleeper.cancel()

    async def _sleep_until(self, deadline: float) -> None:
        await self._sleep(max(deadline - self._clock(), 0.0))

    async def _prepare(self, admission: Admission) -> None:
        try:
            history_loaded = await self._database.prepare()
        except Exception as error:
            self._bus.publish(_fault(error, short_error(error)))
            self._conclude(admission, Verdict.FAILURE, self._clock())
            return
        if not self._database_ok:
            self._bus.publish(DatabaseRecovered(history_loaded=history_loaded))
        self._conclude(admission, Verdict.SUCCESS, self._clock())

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds`` on the injected clock, whatever is recorded meanwhile, unless the writer is stopped."""
        deadline = self._clock() + seconds
        while not self._stopping and self._clock() < deadline:
            self._backlog.work.clear()
            await self._idle(deadline - self._clock())

    async def _write_next_batch(self, admission: Admission) -> bool:
        """Take the next batch, commit it, settle and publish it; ``False`` when the journal could not be read.

        A journal that cannot be read is the disk's fault, not the database's: published as :class:`JournalFailed`
        (``read``), the attempt is not counted against the breaker nor the database's reachability, and the records
        stay on disk, in their order, for the next attempt.
        """
        try:
            batch = await self._backlog.take(self._batch_size)
        except (OSError, JournalError) as error:
            self._breaker.record_cancelled(admission)
            waiting = self._backlog.on_disk_only
            self._bus.publish(JournalFailed("read", type(error).__name__, short_error(error), waiting))
            return False
        if not batch.slots:
            self._breaker.record_cancelled(admission)
            return True
        started = self._clock()
        upcoming = self._backlog.upcoming(batch, self._batch_size)
        ahead = asyncio.ensure_future(self._committer.prepare_ahead(upcoming, batch.records)) if upcoming else None
        try:
            outcome = await self._committer.commit(batch.records)
        finally:
            if ahead is not None:
                ahead.cancel()
        now = self._clock()
        self._settle_receipts(outcome)
        self._publish_events(batch, outcome, started, now)
        self._database.committed(now, outcome)
        self._conclude(admission, outcome.verdict, now)
        # Last, the only await: receipts, events and the breaker already say what the database holds, whatever
        # happens to this task now. A stop that cancels it here leaves committed records in the backlog; they are
        # journaled at close and replayed later, which is idempotent.
        await self._backlog.settle(batch, handled_prefix(batch, outcome))
        return True

    def _conclude(self, admission: Admission | None, verdict: Verdict, now: float) -> None:
        """The one place an attempt's verdict lands: whether the database is reachable, and the breaker (``None``:
        the start-up preparation, which the breaker was not asked for)."""
        self._database_ok = verdict is not Verdict.FAILURE
        if admission is not None:
            self._publish_transition(self._breaker.record(admission, verdict, now))

    # ------------------------------------------------------------------ settle and publish

    def _settle_receipts(self, outcome: Outcome) -> None:
        """Each handled record's receipt says what became of it; the tally counts them."""
        backlog, tally = self._backlog, self._book.tally
        for item in outcome.committed:
            receipt = backlog.resolve(item)
            if receipt is not None:
                receipt.mark_persisted()
            backlog.mark_safe(item)
        for dead in outcome.dead:
            item = dead.item
            receipt = backlog.resolve(item)
            if receipt is not None:
                receipt.mark_dead_lettered(dead.error)
            backlog.mark_safe(item)
        for item, error in outcome.lost:
            backlog.drop([item], "dead_letter_refused", error)
        tally.persisted += len(outcome.committed)
        tally.dead_lettered += len(outcome.dead)

    def _publish_events(self, batch: Batch, outcome: Outcome, started: float, now: float) -> None:
        """Say what became of the batch: dead letters, the commit (and the replay), the failure of the rest."""
        bus = self._bus
        for dead in outcome.dead:
            item = dead.item
            bus.publish(
                RecordDeadLettered(
                    entity=item.record.entity,
                    key=item.record.key,
                    error_class=dead.error_class,
                    error=dead.error if dead.kept_in == "table" else f"{dead.error} (kept in the dead-letter file)",
                    correlation_id=item.correlation_id,
                )
            )
        if outcome.committed:
            bus.publish(
                BatchCommitted(
                    records=len(outcome.committed),
                    by_entity=_by_entity(outcome.committed),
                    duration=now - started,
                    from_journal=batch.from_journal,
                    latencies=tuple(
                        (item.record.entity, now - item.recorded_at)
                        for item in outcome.committed
                        if item.recorded_at is not None
                    ),
                    correlation_ids=_correlation_ids(outcome.committed),
                    audit_seq=outcome.audit_head.seq if outcome.audit_head is not None else None,
                    audit_hash=outcome.audit_head.hash if outcome.audit_head is not None else None,
                )
            )
            if batch.from_journal:
                self._book.tally.replayed += len(outcome.committed)
                bus.publish(
                    JournalReplayed(records=len(outcome.committed), journal_pending=self._backlog.journal_pending)
                )
        if outcome.failure is not None:
            failed = [slot for slot in batch.slots[handled_prefix(batch, outcome) :] if slot is not None]
            bus.publish(
                WriteFailed(
                    records=len(failed),
                    by_entity=_by_entity(failed),
                    error_class=type(outcome.failure).__name__,
                    error=short_error(outcome.failure),
                    transient=True,
                    attempts=outcome.attempts,
                    correlation_ids=_correlation_ids(failed),
                )
            )

    def _publish_transition(self, transition: Transition | None) -> None:
        if transition is not None:
            self._bus.publish(
                BreakerChanged(
                    from_state=str(transition.from_state),
                    to_state=str(transition.to_state),
                    consecutive_failures=transition.consecutive_failures,
                )
            )


def handled_prefix(batch: Batch, outcome: Outcome) -> int:
    """How many slots, from the batch's head, are handled: committed, dead-lettered, lost, or unreadable (``None``)."""
    if outcome.handled == len(batch.slots):
        return len(batch.slots)
    handled_ids = {id(item) for item in outcome.committed}
    handled_ids.update(id(dead.item) for dead in outcome.dead)
    handled_ids.update(id(item) for item, _ in outcome.lost)
    prefix = 0
    for slot in batch.slots:
        if slot is None or id(slot) in handled_ids:
            prefix += 1
        else:
            break
    return prefix


def _fault(error: BaseException, message: str) -> WriteFailed:
    """A write attempt that failed before any batch: no records, one attempt."""
    return WriteFailed(
        records=0, by_entity={}, error_class=type(error).__name__, error=message, transient=True, attempts=1
    )


def _by_entity(items: Sequence[Pending]) -> dict[Entity, int]:
    counts: dict[Entity, int] = {}
    for item in items:
        entity = item.record.entity
        counts[entity] = counts.get(entity, 0) + 1
    return counts


def _correlation_ids(items: Sequence[Pending], limit: int = 20) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for item in items:
        if item.correlation_id is not None:
            seen[item.correlation_id] = None
            if len(seen) >= limit:
                break
    return tuple(seen)
