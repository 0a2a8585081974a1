"""The single background writer: drains the backlog into the database in batches, behind the circuit breaker.

The hot path appends to an in-RAM deque and wakes the writer; nothing else. The writer owns every piece of I/O:

* **Order.** The backlog is one FIFO: the on-disk journal holds the oldest part, RAM the newest. The writer
  always writes the journal first, so records reach the database in the order they were recorded.
* **Batches.** Up to ``PERSISTENCE_BATCH_SIZE`` records, one transaction, one statement per table. At low rates a
  record is written as soon as the writer wakes; at high rates records pile up while a commit is in flight and
  the next batch takes them all. A batch leaves memory (or the journal) only after its commit succeeded.
* **Errors.** Transient errors are retried with tenacity (exponential backoff with jitter, bounded attempts and
  time, the injected ``sleep``) and then count as one breaker failure; the batch stays queued. Data errors split
  the batch until the bad records are isolated; those go to ``dead_letters`` and the rest commit. Data errors
  neither trip nor reset the breaker.
* **Outages.** While the breaker is open no database call is made. Beyond ``PERSISTENCE_MAX_PENDING`` records the
  oldest part of the RAM backlog is spilled to the journal, which is fsynced at least every
  ``PERSISTENCE_JOURNAL_SYNC_SECONDS``. Receipts of spilled records are held weakly, so memory stays bounded
  during an outage of any length.
* **Start-up.** Migrations, then the newest ``PERSISTENCE_HISTORY_MAX`` trades into ``trade_history``, then the
  journal of an earlier run. If the database cannot be reached, the writer keeps trying (through the breaker)
  and does all three when it comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import uuid
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from sqlalchemy.exc import DBAPIError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from persistence.breaker import Admission, CircuitBreaker, Transition
from persistence.checkpoint import WalCheckpointer
from persistence.config import Settings
from persistence.context import correlation_id
from persistence.db import Database, create_database, sqlite_path
from persistence.errors import DatabaseUnavailableError, InvalidRecordError
from persistence.events import (
    BatchCommitted,
    BreakerChanged,
    DatabaseRecovered,
    DatabaseUnavailable,
    EventBus,
    JournalCorrupt,
    JournalReplayed,
    JournalSpilled,
    JournalSynced,
    RecordDeadLettered,
    RecordsDropped,
    WriteFailed,
    WriteRetried,
)
from persistence.faults import classify, needs_schema
from persistence.history import TradeHistory
from persistence.journal import Journal, JournalEntry, JournalError
from persistence.migrations import upgrade
from persistence.models import (
    Entity,
    ParameterChange,
    PerformanceSnapshot,
    Record,
    Signal,
    SignalExecution,
    Trade,
)
from persistence.receipts import Receipt
from persistence.repositories import Repositories

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

JOURNAL_FORMAT = 1
KINDS: dict[type[Record], str] = {
    Trade: "trade",
    Signal: "signal",
    SignalExecution: "signal_execution",
    PerformanceSnapshot: "snapshot",
    ParameterChange: "parameter_change",
}
MODELS: dict[str, type[Record]] = {kind: model for model, kind in KINDS.items()}
UNKNOWN_SIGNAL = "no signal with this signal_id was ever recorded"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How transient write errors are retried before they count as one breaker failure."""

    attempts: int = 3
    max_seconds: float = 10.0
    initial_wait: float = 0.05
    max_wait: float = 1.0


class _Pending:
    """One record waiting in RAM."""

    __slots__ = ("correlation_id", "receipt", "record", "recorded_at", "seq")

    def __init__(
        self,
        seq: int,
        record: Record,
        receipt: Receipt | None,
        recorded_at: float | None,
        cid: str | None,
    ) -> None:
        self.seq = seq
        self.record = record
        self.receipt = receipt
        self.recorded_at = recorded_at
        self.correlation_id = cid


@dataclass(slots=True)
class _Outcome:
    """What happened to a batch: a handled prefix (committed or dead-lettered) and maybe a transient failure."""

    committed: list[_Pending] = field(default_factory=list)
    dead: list[tuple[_Pending, str, str]] = field(default_factory=list)
    failure: BaseException | None = None
    attempts: int = 0

    @property
    def handled(self) -> int:
        return len(self.committed) + len(self.dead)


class _DataFault(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _TransientFault(Exception):
    def __init__(self, cause: BaseException, attempts: int) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.attempts = attempts


@dataclass(slots=True)
class WriterCounters:
    """Totals since the writer was created."""

    persisted: int = 0
    journaled: int = 0
    dead_lettered: int = 0
    dropped: int = 0
    replayed: int = 0


class Writer:
    """The one task that writes to the database. Created and driven by :class:`~persistence.PersistenceSidecar`."""

    def __init__(
        self,
        settings: Settings,
        *,
        bus: EventBus,
        history: TradeHistory,
        clock: Clock,
        sleep: Sleep,
        retry: RetryPolicy | None = None,
        database_factory: Callable[[Settings], Database] = create_database,
    ) -> None:
        self._settings = settings
        self._bus = bus
        self._history = history
        self._clock = clock
        self._sleep = sleep
        self._retry = retry or RetryPolicy()
        self._database_factory = database_factory
        self._breaker = CircuitBreaker(settings.breaker_failure_threshold, settings.breaker_reset_seconds)
        self._journal = Journal(settings.journal_dir)
        self._run_id = uuid.uuid4().hex
        self._ram: deque[_Pending] = deque()
        self._seq = itertools.count(1)
        self._last_seq = 0
        self._watermark = 0
        self._progress = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._database: Database | None = None
        self._repos: Repositories | None = None
        self.checkpointer: WalCheckpointer | None = None
        self._ready = False
        self._database_ok = False
        self._database_file: tuple[int, int] | None = None
        self._reset_pool = False
        self._schema_revision: str | None = None
        self._journal_receipts: weakref.WeakValueDictionary[int, Receipt] = weakref.WeakValueDictionary()
        self._unsynced: list[_Pending] = []
        self._last_sync = clock()
        self._oldest_journaled_at: float | None = None
        self.counters = WriterCounters()
        self._reported_corrupt = 0
        self._unreadable_seen: set[tuple[int, int]] = set()
        self.history_loaded = 0

    # ------------------------------------------------------------------ properties

    @property
    def breaker(self) -> CircuitBreaker:
        """The circuit breaker guarding every write."""
        return self._breaker

    @property
    def database(self) -> Database | None:
        """The database handle, once created."""
        return self._database

    @property
    def repositories(self) -> Repositories | None:
        """Repositories over the database, once created."""
        return self._repos

    @property
    def ready(self) -> bool:
        """Whether the schema is migrated and the history loaded."""
        return self._ready

    @property
    def database_ok(self) -> bool:
        """Whether the last database operation succeeded."""
        return self._database_ok

    @property
    def schema_revision(self) -> str | None:
        """The schema revision reached at start-up (or recovery)."""
        return self._schema_revision

    @property
    def queue_depth(self) -> int:
        """Records waiting in RAM."""
        return len(self._ram)

    @property
    def journal_pending(self) -> int:
        """Records waiting in the journal."""
        return self._journal.pending

    @property
    def journal_corrupt_lines(self) -> int:
        """Journal lines skipped as corrupt since start."""
        return self._journal.corrupt_lines

    def oldest_unpersisted_age(self) -> float:
        """Seconds since the oldest record still waiting (RAM or journal) was recorded; 0 when none waits."""
        now = self._clock()
        oldest: float | None = None
        if self._journal.pending and self._oldest_journaled_at is not None:
            oldest = self._oldest_journaled_at
        try:
            first = self._ram[0].recorded_at  # read from the metrics thread too: the deque may empty meanwhile
        except IndexError:
            first = None
        if first is not None and (oldest is None or first < oldest):
            oldest = first
        return max(now - oldest, 0.0) if oldest is not None else 0.0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> bool:
        """Initialise (migrate, load history, replay the journal) and start the task; ``False`` if degraded."""
        self._database = self._database_factory(self._settings)
        self._repos = Repositories(self._database)
        if self._database.is_sqlite and sqlite_path(self._settings.url) is not None:
            self.checkpointer = WalCheckpointer(self._database)
        self._report_corrupt_journal()
        if self._journal.pending:
            self._oldest_journaled_at = self._clock()
        try:
            await self._initialize()
        except Exception as error:
            self._database_ok = False
            self._bus.publish(
                DatabaseUnavailable(error_class=type(error).__name__, error=_short(error), at_startup=True)
            )
        else:
            await self._replay_journal_at_start()
        # A fresh context: the writer must not carry the correlation id of whoever happened to call start().
        self._task = asyncio.create_task(self._run(), name="persistence-writer", context=contextvars.Context())
        return self._ready

    async def stop(self, timeout: float) -> None:
        """Drain what can be drained within ``timeout``, journal the rest, release everything.

        A slice of the time (a quarter, at most half a second) is kept back for journaling and closing, so the
        whole call returns within ``timeout`` plus the time a last in-flight statement needs to notice.
        """
        self._stopping = True
        self._wake.set()
        reserve = min(timeout / 4, 0.5)
        task = self._task
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout - reserve)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            except asyncio.CancelledError:
                task.cancel()
                raise
        if self._ram:
            await self._spill(len(self._ram), reason="shutdown")
        await self._sync_journal()
        if self._ram:
            self._drop(list(self._ram), "journal_unavailable", "the journal could not take the backlog at close")
            self._ram.clear()
        with contextlib.suppress(Exception):
            self._journal.close()
        if self.checkpointer is not None:
            await self.checkpointer.close(max(reserve, 0.1))
        if self._database is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._database.dispose(), max(reserve, 0.1))

    # ------------------------------------------------------------------ hot path

    def submit(self, record: Record) -> Receipt:
        """Queue a validated record; O(1), never awaits. Returns its receipt."""
        receipt = Receipt(record.entity, record.key)
        seq = next(self._seq)
        self._last_seq = seq
        self._ram.append(_Pending(seq, record, receipt, self._clock(), correlation_id.get()))
        self._wake.set()
        return receipt

    async def flush(self, timeout: float) -> bool:
        """Wait until every record submitted so far is committed (or final); ``False`` on timeout."""
        target = self._last_seq
        try:
            async with asyncio.timeout(timeout):
                while self._watermark < target:
                    self._progress.clear()
                    await self._progress.wait()
        except TimeoutError:
            return False
        return True

    def outstanding(self) -> int:
        """Records submitted in this run that are not yet committed or final."""
        return max(self._last_seq - self._watermark, 0)

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            await self._housekeeping()
            has_work = bool(self._ram or self._journal.pending)
            if self._stopping and not has_work:
                return
            if self._ready and not has_work:
                await self._idle(self._sync_due_in())
                continue
            now = self._clock()
            admission, transition = self._breaker.admit(now)
            self._publish_transition(transition)
            if not admission.allowed:
                if self._stopping:
                    return  # nothing can be written now; close() journals the rest
                await self._idle(_min(self._breaker.seconds_until_half_open(now), self._sync_due_in()))
                continue
            try:
                if not self._ready:
                    await self._attempt_initialize(admission)
                else:
                    await self._write_next_batch(admission)
            except asyncio.CancelledError:
                self._breaker.record_cancelled(admission)
                raise
            except Exception as error:
                # The only writer must outlive any fault it did not foresee (say, the journal's folder deleted under
                # it): report it, and count it against the breaker so that a fault that persists backs off.
                self._database_ok = False
                self._bus.publish(WriteFailed(0, {}, type(error).__name__, f"writer: {_short(error)}", True, 1))
                self._publish_transition(self._breaker.record_failure(admission, self._clock()))

    async def _idle(self, timeout: float | None) -> None:
        if self._wake.is_set():
            return
        waiter = asyncio.ensure_future(self._wake.wait())
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

    def _sync_due_in(self) -> float | None:
        if not self._journal.unsynced and not self._unsynced:
            return None
        return max(self._settings.journal_sync_seconds - (self._clock() - self._last_sync), 0.0)

    async def _housekeeping(self) -> None:
        limit = self._settings.max_pending
        if len(self._ram) > limit:
            target = max(limit - max(limit // 4, 1), 0)
            await self._spill(len(self._ram) - target, reason="backlog")
        due = self._sync_due_in()
        if due is not None and due <= 0:
            await self._sync_journal()
        self._history.evict(scan_limit=1024)

    # ------------------------------------------------------------------ initialisation

    async def _initialize(self) -> None:
        database, repos = self._require_database()
        if self._reset_pool:
            # Pooled connections still point at a deleted or replaced file; open fresh ones. A background checkpoint
            # holding one must end first, or its connection would go back to the discarded pool and stay open.
            if self.checkpointer is not None:
                await self.checkpointer.close(max(self._settings.query_timeout, 1.0))
            await database.dispose()
            self._reset_pool = False
        self._schema_revision = await upgrade(database, lock_wait_seconds=max(self._settings.query_timeout, 1.0))
        trades = await repos.trades.get_latest_trades(self._settings.history_max)
        self.history_loaded = self._history.load(trades)
        self._remember_database_file()
        was_degraded = not self._database_ok and self._task is not None
        self._ready = True
        self._database_ok = True
        if was_degraded:
            self._bus.publish(DatabaseRecovered(history_loaded=self.history_loaded))

    async def _attempt_initialize(self, admission: Admission) -> None:
        try:
            await self._initialize()
        except Exception as error:
            self._database_ok = False
            self._bus.publish(
                WriteFailed(
                    records=0,
                    by_entity={},
                    error_class=type(error).__name__,
                    error=_short(error),
                    transient=True,
                    attempts=1,
                )
            )
            self._publish_transition(self._breaker.record_failure(admission, self._clock()))
        else:
            self._publish_transition(self._breaker.record_success(admission, self._clock()))

    async def _replay_journal_at_start(self) -> None:
        while self._journal.pending and self._ready and not self._stopping:
            admission, transition = self._breaker.admit(self._clock())
            self._publish_transition(transition)
            if not admission.allowed:
                return
            failures_before = self._breaker.consecutive_failures
            await self._write_next_batch(admission)
            if self._breaker.consecutive_failures > failures_before:
                return  # the database failed; the writer task carries on when it can

    def _require_database(self) -> tuple[Database, Repositories]:
        if self._database is None or self._repos is None:
            raise DatabaseUnavailableError("the writer has no database")
        return self._database, self._repos

    def _remember_database_file(self) -> None:
        path = sqlite_path(self._settings.url) if self._settings.is_sqlite else None
        if path is None:
            self._database_file = None
            return
        with contextlib.suppress(OSError):
            stat = path.stat()
            self._database_file = (stat.st_dev, stat.st_ino)

    def _check_database_file(self) -> None:
        """A SQLite file deleted or replaced under us would swallow writes into an unlinked inode."""
        if self._reset_pool:
            raise DatabaseUnavailableError("the database file vanished; reconnecting before the next write")
        if self._database_file is None:
            return
        path = sqlite_path(self._settings.url)
        assert path is not None
        try:
            stat = path.stat()
            current: tuple[int, int] | None = (stat.st_dev, stat.st_ino)
        except OSError:
            current = None
        if current != self._database_file:
            self._ready = False
            self._reset_pool = True
            self._database_file = None
            raise DatabaseUnavailableError(f"the database file {path} vanished or was replaced")

    # ------------------------------------------------------------------ batches

    def _take_batch(self) -> tuple[list[_Pending | None], list[JournalEntry]]:
        """The next batch, oldest first, without taking it out; ``None`` marks an unreadable journal line."""
        size = self._settings.batch_size
        if self._journal.pending:
            entries = self._journal.peek(size)
            self._report_corrupt_journal()
            return [self._from_journal(entry) for entry in entries], entries
        return list(itertools.islice(self._ram, size)), []

    def _from_journal(self, entry: JournalEntry) -> _Pending | None:
        payload = entry.record
        seq = int(payload.get("seq", 0)) if payload.get("run") == self._run_id else 0
        try:
            record = MODELS[str(payload["kind"])].parse(payload["data"])
        except (KeyError, TypeError, ValueError, InvalidRecordError) as error:
            position = (entry.segment, entry.end_offset)
            if position not in self._unreadable_seen:
                self._unreadable_seen.add(position)
                self.counters.dropped += 1
                self._bus.publish(
                    RecordsDropped(entity=_entity_of(payload), count=1, reason="corrupt_journal", error=str(error))
                )
            return None
        receipt = self._journal_receipts.get(seq) if seq else None
        # Monotonic times only mean something within the run that wrote them.
        recorded_at = payload.get("at") if seq else None
        return _Pending(
            seq, record, receipt, recorded_at if isinstance(recorded_at, float) else None, payload.get("cid")
        )

    async def _write_next_batch(self, admission: Admission) -> None:
        batch, entries = self._take_batch()
        if not batch:
            self._breaker.record_cancelled(admission)
            return
        started = self._clock()
        outcome = await self._commit_isolating([item for item in batch if item is not None])
        now = self._clock()
        self._settle(outcome, batch, entries, started, now)
        if outcome.failure is not None:
            self._database_ok = False
            self._publish_transition(self._breaker.record_failure(admission, now))
            if needs_schema(outcome.failure):
                self._ready = False
        elif outcome.dead:
            self._database_ok = True
            self._breaker.record_cancelled(admission)
        else:
            self._database_ok = True
            self._publish_transition(self._breaker.record_success(admission, now))
            if self.checkpointer is not None:
                self.checkpointer.after_commit(now)

    def _settle(
        self, outcome: _Outcome, batch: list[_Pending | None], entries: list[JournalEntry], started: float, now: float
    ) -> None:
        """Take the handled prefix out of RAM or the journal, resolve receipts, publish events."""
        handled_ids = {id(item) for item in outcome.committed} | {id(item) for item, _, _ in outcome.dead}
        prefix = 0
        for slot in batch:
            if slot is None or id(slot) in handled_ids:
                prefix += 1
            else:
                break
        from_journal = bool(entries)
        if prefix:
            if from_journal:
                try:
                    self._journal.acknowledge(entries[prefix - 1])
                except JournalError as error:
                    # The records are committed; a replay after restart is idempotent, so nothing is lost.
                    self._bus.publish(WriteFailed(0, {}, type(error).__name__, f"journal checkpoint: {error}", True, 1))
            else:
                for _ in range(prefix):
                    self._ram.popleft()
            last = max((slot.seq for slot in batch[:prefix] if slot is not None), default=0)
            if last > self._watermark:
                self._watermark = last
            if from_journal and not self._journal.pending:
                self._unreadable_seen.clear()
            self._progress.set()
        if from_journal:
            for item in itertools.chain(outcome.committed, (dead for dead, _, _ in outcome.dead)):
                self._journal_receipts.pop(item.seq, None)
        for item in outcome.committed:
            if item.receipt is not None:
                item.receipt.mark_persisted()
            if not from_journal and isinstance(item.record, Trade):
                self._history.mark_safe(item.record.trade_id)
        for item, error_class, message in outcome.dead:
            if item.receipt is not None:
                item.receipt.mark_dead_lettered(message)
            if not from_journal and isinstance(item.record, Trade):
                self._history.mark_safe(item.record.trade_id)
            self._bus.publish(
                RecordDeadLettered(
                    entity=item.record.entity,
                    key=item.record.key,
                    error_class=error_class,
                    error=message,
                    correlation_id=item.correlation_id,
                )
            )
        self.counters.persisted += len(outcome.committed)
        self.counters.dead_lettered += len(outcome.dead)
        if outcome.committed:
            self._bus.publish(
                BatchCommitted(
                    records=len(outcome.committed),
                    by_entity=_by_entity(outcome.committed),
                    duration=now - started,
                    from_journal=from_journal,
                    latencies=tuple(
                        (item.record.entity, now - item.recorded_at)
                        for item in outcome.committed
                        if item.recorded_at is not None
                    ),
                    correlation_ids=_correlation_ids(outcome.committed),
                )
            )
            if from_journal:
                self.counters.replayed += len(outcome.committed)
                self._bus.publish(
                    JournalReplayed(records=len(outcome.committed), journal_pending=self._journal.pending)
                )
        if outcome.failure is not None:
            failed = [slot for slot in batch[prefix:] if slot is not None]
            self._bus.publish(
                WriteFailed(
                    records=len(failed),
                    by_entity=_by_entity(failed),
                    error_class=type(outcome.failure).__name__,
                    error=_short(outcome.failure),
                    transient=True,
                    attempts=outcome.attempts,
                    correlation_ids=_correlation_ids(failed),
                )
            )
        if from_journal and not self._journal.pending:
            self._oldest_journaled_at = None

    async def _commit_isolating(self, batch: list[_Pending]) -> _Outcome:
        """Commit ``batch``; on a data error split it until the bad records are isolated and dead-lettered."""
        outcome = _Outcome()
        segments: deque[list[_Pending]] = deque([batch] if batch else [])
        while segments:
            segment = segments.popleft()
            try:
                unknown: list[_Pending] = await self._with_retries(partial(self._commit, segment), outcome)
            except _DataFault as fault:
                if len(segment) > 1:
                    middle = len(segment) // 2
                    segments.appendleft(segment[middle:])
                    segments.appendleft(segment[:middle])
                    continue
                [item] = segment
                try:
                    await self._with_retries(partial(self._dead_letter, item, fault.cause), outcome)
                except (_TransientFault, _DataFault) as failure:
                    outcome.failure = failure.cause
                    return outcome
                outcome.dead.append((item, type(fault.cause).__name__, _short(fault.cause)))
                continue
            except _TransientFault as failure:
                outcome.failure = failure.cause
                return outcome
            unknown_ids = {id(item) for item in unknown}
            for item in segment:
                if id(item) in unknown_ids:
                    outcome.dead.append((item, "UnknownSignal", UNKNOWN_SIGNAL))
                else:
                    outcome.committed.append(item)
        return outcome

    async def _with_retries(self, operation: Callable[[], Awaitable[Any]], outcome: _Outcome) -> Any:
        policy = self._retry
        attempts = 0
        try:
            async for attempt in AsyncRetrying(
                # Only real errors are retried: a cancellation (shutdown) must go through at once.
                retry=retry_if_exception(lambda error: isinstance(error, Exception) and classify(error) == "transient"),
                stop=stop_after_attempt(policy.attempts) | stop_after_delay(policy.max_seconds),
                wait=wait_random_exponential(multiplier=policy.initial_wait, max=policy.max_wait),
                sleep=self._sleep,
                before_sleep=self._on_retry,
                reraise=True,
            ):
                with attempt:
                    attempts += 1
                    return await operation()
        except asyncio.CancelledError:
            raise
        except Exception as error:
            outcome.attempts = max(outcome.attempts, attempts)
            if classify(error) == "data":
                raise _DataFault(error) from error
            raise _TransientFault(error, attempts) from error
        raise AssertionError("unreachable")  # pragma: no cover

    def _on_retry(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        self._bus.publish(
            WriteRetried(
                attempt=state.attempt_number,
                delay=delay,
                error_class=type(error).__name__ if error else "",
                error=_short(error) if error else "",
            )
        )

    async def _commit(self, segment: Sequence[_Pending]) -> list[_Pending]:
        """One transaction for a segment; returns execution updates whose signal does not exist."""
        self._check_database_file()
        database, repos = self._require_database()
        trades: dict[str, Trade] = {}
        signals: dict[str, Signal] = {}
        executions: list[tuple[_Pending, SignalExecution]] = []
        snapshots: list[PerformanceSnapshot] = []
        changes: list[ParameterChange] = []
        for item in segment:
            record = item.record
            if isinstance(record, Trade):
                trades[record.trade_id] = record
            elif isinstance(record, Signal):
                signals[record.signal_id] = record
            elif isinstance(record, SignalExecution):
                executions.append((item, record))
            elif isinstance(record, PerformanceSnapshot):
                snapshots.append(record)
            elif isinstance(record, ParameterChange):
                changes.append(record)
        async with database.write() as connection:
            await repos.trades.upsert(connection, list(trades.values()))
            await repos.signals.upsert(connection, list(signals.values()))
            missing = await repos.signals.apply_executions(connection, [change for _, change in executions])
            await repos.snapshots.insert(connection, snapshots)
            await repos.parameters.insert(connection, changes)
            unknown = [item for item, change in executions if change in missing]
            if unknown:
                await repos.dead_letters.insert(connection, [(item.record, UNKNOWN_SIGNAL) for item in unknown])
        return unknown

    async def _dead_letter(self, item: _Pending, error: BaseException) -> None:
        database, repos = self._require_database()
        async with database.write() as connection:
            await repos.dead_letters.insert(connection, [(item.record, error)])

    # ------------------------------------------------------------------ the journal

    async def _spill(self, count: int, *, reason: str) -> None:
        """Move the ``count`` oldest RAM records to the end of the journal."""
        if count <= 0:
            return
        moving = list(itertools.islice(self._ram, count))
        payloads = [self._journal_payload(item) for item in moving]
        try:
            await asyncio.to_thread(self._journal.append, payloads)
        except (JournalError, OSError) as error:
            hard_cap = self._settings.max_pending * 2
            if reason == "shutdown" or len(self._ram) > hard_cap:
                excess = len(self._ram) if reason == "shutdown" else len(self._ram) - hard_cap
                victims = [self._ram.popleft() for _ in range(excess)]
                self._drop(victims, "journal_unavailable", str(error))
            return
        for _ in moving:
            self._ram.popleft()
        if self._oldest_journaled_at is None and moving and moving[0].recorded_at is not None:
            self._oldest_journaled_at = moving[0].recorded_at
        for item in moving:
            if item.receipt is not None:
                self._journal_receipts[item.seq] = item.receipt
        self._unsynced.extend(moving)
        self.counters.journaled += len(moving)
        self._bus.publish(JournalSpilled(records=len(moving), journal_pending=self._journal.pending, reason=reason))

    def _journal_payload(self, item: _Pending) -> dict[str, Any]:
        return {
            "v": JOURNAL_FORMAT,
            "run": self._run_id,
            "seq": item.seq,
            "kind": KINDS[type(item.record)],
            "cid": item.correlation_id,
            "at": item.recorded_at,
            "data": item.record.to_json(),
        }

    async def _sync_journal(self) -> None:
        if not self._journal.unsynced and not self._unsynced:
            self._last_sync = self._clock()
            return
        started = self._clock()
        try:
            await asyncio.to_thread(self._journal.sync)
        except (JournalError, OSError) as error:
            self._bus.publish(WriteFailed(0, {}, type(error).__name__, f"journal sync: {error}", True, 1))
            self._last_sync = self._clock()
            return
        self._last_sync = self._clock()
        synced, self._unsynced = self._unsynced, []
        for item in synced:
            if item.receipt is not None:
                item.receipt.mark_journaled()
            if isinstance(item.record, Trade):
                self._history.mark_safe(item.record.trade_id)
        self._bus.publish(JournalSynced(records=len(synced), duration=self._clock() - started))

    def _report_corrupt_journal(self) -> None:
        corrupt = self._journal.corrupt_lines
        if corrupt > self._reported_corrupt:
            self._bus.publish(JournalCorrupt(lines=corrupt - self._reported_corrupt))
            self._reported_corrupt = corrupt

    # ------------------------------------------------------------------ drops and events

    def _drop(self, items: Sequence[_Pending], reason: str, error: str) -> None:
        by_entity: dict[Entity, int] = {}
        for item in items:
            entity = item.record.entity
            by_entity[entity] = by_entity.get(entity, 0) + 1
            if item.receipt is not None:
                item.receipt.mark_dropped(reason)
            if isinstance(item.record, Trade) and item.recorded_at is not None:
                self._history.mark_safe(item.record.trade_id)
        self.counters.dropped += len(items)
        for entity, count in by_entity.items():
            self._bus.publish(RecordsDropped(entity=entity, count=count, reason=reason, error=error))
        if items:
            last = max(item.seq for item in items)
            if last > self._watermark and not self._ram:
                self._watermark = last
            self._progress.set()

    def _publish_transition(self, transition: Transition | None) -> None:
        if transition is not None:
            self._bus.publish(
                BreakerChanged(
                    from_state=str(transition.from_state),
                    to_state=str(transition.to_state),
                    consecutive_failures=transition.consecutive_failures,
                )
            )


def _entity_of(payload: dict[str, Any]) -> str:
    model = MODELS.get(str(payload.get("kind")))
    return model.entity if model is not None else "unknown"


def _by_entity(items: Sequence[_Pending]) -> dict[Entity, int]:
    counts: dict[Entity, int] = {}
    for item in items:
        entity = item.record.entity
        counts[entity] = counts.get(entity, 0) + 1
    return counts


def _correlation_ids(items: Sequence[_Pending], limit: int = 20) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for item in items:
        if item.correlation_id is not None:
            seen[item.correlation_id] = None
            if len(seen) >= limit:
                break
    return tuple(seen)


def _short(error: BaseException | None, limit: int = 500) -> str:
    """The driver's own message, without SQLAlchemy's statement echo and documentation link."""
    if error is None:
        return ""
    original = getattr(error, "orig", None)
    text = str(original) if isinstance(error, DBAPIError) and original is not None else str(error)
    text = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _min(*values: float | None) -> float | None:
    present = [value for value in values if value is not None]
    return min(present) if present else None
