"""``PersistenceSidecar``: the facade a trading orchestrator embeds in its event loop.

It keeps the authoritative in-memory ``trade_history`` and hands every validated record to the backlog
(:class:`~persistence.write.backlog.Backlog`), which exists whenever persistence is enabled, from construction on: a
record made before :meth:`~PersistenceSidecar.start` is kept, persisted by ``start()``, or journaled by a
``close()`` without it. ``start()`` builds the :class:`~persistence.write.runtime.Runtime` (database, repositories,
writer). ``record_*`` are synchronous and O(1): they validate, update the history, append to the backlog and
return a :class:`~persistence.records.receipts.Receipt`; they never await, never touch the database and never raise
because of its state. With ``ENABLE_DATABASE_PERSISTENCE=false`` there is no engine,
no file, no journal and no thread; the history still works and receipts resolve as ``disabled``. The flag can be
flipped at run time with :meth:`PersistenceSidecar.set_enabled` (turning it off flushes first).
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

from prometheus_client import CollectorRegistry

from persistence.config import Settings
from persistence.db.engine import Database
from persistence.errors import (
    DatabaseUnavailableError,
    FlushTimeoutError,
    SidecarClosedError,
)
from persistence.observe.event_log import EventLogger
from persistence.observe.events import (
    EventBus,
    PersistenceToggled,
    ShutdownComplete,
    SidecarStarted,
)
from persistence.observe.metrics import SidecarMetrics
from persistence.observe.metrics_http import MetricsExporter, start_exporter
from persistence.records.history import TradeHistory
from persistence.records.models import ParameterChange, PerformanceSnapshot, Record, Signal, SignalExecution, Trade
from persistence.records.receipts import Receipt, disabled_receipt
from persistence.tables.repositories import (
    DeadLetterRepository,
    ParameterHistoryRepository,
    PerformanceSnapshotRepository,
    Repositories,
    SignalRepository,
    TradeRepository,
)
from persistence.write.backlog import Backlog, Clock, ReceiptBook, Sleep
from persistence.write.committer import RetryPolicy
from persistence.write.runtime import Counts, DatabaseState, HealthReport, Runtime
from persistence.write.writer import Writer


class PersistenceSidecar:
    """Persist trades, signals, snapshots and parameter changes in the background; see the module docstring.

    ``clock`` (monotonic seconds) and ``sleep`` are injectable; tests pass a
    :class:`~persistence.testing.FakeClock` and never really wait.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        retry: RetryPolicy | None = None,
        bus: EventBus | None = None,
        log_events: bool = True,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings if settings is not None else Settings()
        self._clock = clock
        self._sleep = sleep
        self._retry = retry
        self.events = bus if bus is not None else EventBus()
        if log_events:
            self.events.subscribe(EventLogger(secrets=self.settings.secrets))
        self._history = TradeHistory(self.settings.history_max)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = SidecarMetrics(self.registry, self)
        self.events.subscribe(self.metrics)
        self._enabled = self.settings.enabled
        self._book = ReceiptBook()
        self._backlog: Backlog | None = self._new_backlog() if self._enabled else None
        self._runtime: Runtime | None = None
        self._started = False
        self._closed = False
        self._closing: asyncio.Task[None] | None = None
        self._starting: asyncio.Task[None] | None = None
        self._toggle_lock = asyncio.Lock()
        self._exporter: MetricsExporter | None = None

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Migrate, load ``trade_history``, replay any journal left behind, start the writer.

        A database that cannot be reached does not stop start-up: it is logged as critical and the sidecar runs
        in memory-only mode until the database comes back.
        """
        if self._closed:
            raise SidecarClosedError("this sidecar was closed; create a new one")
        if self._started:
            return
        started = time.perf_counter()
        self._started = True
        # PERSISTENCE_METRICS_PORT: served from before the start-up replay, so a long backfill can be watched.
        self._exporter = start_exporter(self.settings.metrics_port, self.registry, enabled=self._enabled)
        if self._enabled:
            try:
                await self._start_writer_tracked()
            except BaseException:
                self._started = False  # nothing of the failed start is left running (_start_writer): may start again
                await self._stop_exporter()
                raise
        runtime = self._runtime
        self.events.publish(
            SidecarStarted(
                database_ready=runtime.ready if runtime else False,
                history_loaded=runtime.history_loaded if runtime else 0,
                journal_pending=self._backlog.journal_pending if self._backlog else 0,
                schema_revision=runtime.schema_revision if runtime else None,
                duration=time.perf_counter() - started,
            )
        )

    async def close(self, timeout: float | None = None) -> None:
        """Stop intake, drain within ``timeout`` (default ``PERSISTENCE_SHUTDOWN_TIMEOUT``), journal the rest.

        Idempotent: a second call waits for the first to finish. Logs one ``shutdown_complete`` summary. A
        ``start()`` still under way is stopped first (it raises :class:`SidecarClosedError`).
        """
        if self._closing is None:
            self._closed = True
            self._closing = asyncio.ensure_future(
                self._close(self.settings.shutdown_timeout if timeout is None else timeout)
            )
        await asyncio.shield(self._closing)

    async def _close(self, timeout: float) -> None:
        try:
            await self._stop_writer_and_report(timeout)
        finally:
            await self._stop_exporter()  # last, so a final scrape still sees the shutdown

    async def _stop_writer_and_report(self, timeout: float) -> None:
        started = time.perf_counter()
        journal_pending = await self._stop_persistence(timeout)
        tally = self._book.tally
        self.events.publish(
            ShutdownComplete(
                persisted=tally.persisted,
                journaled=tally.journaled,
                dead_lettered=tally.dead_lettered,
                dropped=tally.dropped,
                duration=time.perf_counter() - started,
                journal_pending=journal_pending,
            )
        )

    async def _stop_persistence(self, timeout: float) -> int:
        """Stop the runtime (or, never started, journal what was recorded); returns what waits in the journal.

        A start under way is cancelled and waited for first: stopped under it, the runtime's pool would be disposed
        of while the start still held connections, left open on the server for as long as the process lives.
        """
        starting = self._starting
        if starting is not None and not starting.done():
            starting.cancel()
            await asyncio.wait([starting])
        runtime, self._runtime = self._runtime, None
        backlog, self._backlog = self._backlog, None
        if runtime is not None:
            await runtime.stop(timeout)
        elif backlog is not None:
            await backlog.close()
        return backlog.journal_pending if backlog is not None else 0

    async def _stop_exporter(self) -> None:
        exporter, self._exporter = self._exporter, None
        if exporter is not None:
            await asyncio.to_thread(exporter.close)

    def __del__(self) -> None:
        if getattr(self, "_started", False) and not getattr(self, "_closed", True):
            warnings.warn(
                "PersistenceSidecar was started but never closed; records may be left unwritten",
                ResourceWarning,
                stacklevel=1,
            )

    def _new_backlog(self) -> Backlog:
        return Backlog(
            self.settings, bus=self.events, history=self._history, clock=self._clock, sleep=self._sleep, book=self._book
        )

    async def _start_writer_tracked(self) -> None:
        """:meth:`_start_writer` as a task of its own, which a ``close()`` (or ``set_enabled(False)``) coming meanwhile
        cancels and waits for. Then ``start()`` raises :class:`SidecarClosedError` after a close, and returns after a
        switch-off (the sidecar runs with persistence off); a cancellation of the caller itself comes out as such."""
        starting = self._starting = asyncio.ensure_future(self._start_writer())
        try:
            await asyncio.shield(starting)
        except asyncio.CancelledError:
            if not starting.done():  # the caller was cancelled: so is the start under way
                starting.cancel()
                await asyncio.wait([starting])
            current = asyncio.current_task()
            if not starting.cancelled() or (current is not None and current.cancelling()):
                raise
            if self._closed:
                raise SidecarClosedError("the sidecar was closed while it started") from None
        finally:
            if self._starting is starting:
                self._starting = None

    async def _start_writer(self) -> None:
        if self._backlog is None:
            self._backlog = self._new_backlog()
        await self._backlog.open()  # the journal directory: this sidecar's own and writable, or a clear error
        # Built on a worker thread: the repositories compile their statements and generate their row codecs (15-30
        # ms of CPU), which on the loop would stall the host for as long in one piece; on a thread the loop gets the
        # GIL back at every switch interval. Nothing in the construction touches the loop.
        build = asyncio.ensure_future(
            asyncio.to_thread(
                Runtime,
                self.settings,
                backlog=self._backlog,
                book=self._book,
                bus=self.events,
                history=self._history,
                clock=self._clock,
                sleep=self._sleep,
                retry=self._retry,
            )
        )
        try:
            runtime = await asyncio.shield(build)
        except asyncio.CancelledError:
            # Built all the same on its thread (15-30 ms): wait for it, so that nothing of this start outlives the
            # cancellation (a close() returns only then), and let it go.
            await asyncio.wait([build])
            if not build.cancelled() and build.exception() is None:
                await build.result().abandon()
            raise
        self._runtime = runtime
        try:
            await runtime.start()
        except BaseException:
            # Its writer never ran: let the runtime go, keep the backlog (the sidecar's, open, holding what was
            # recorded), and a start() called again builds a new runtime on it instead of finding a half-started one.
            self._runtime = None
            await runtime.abandon()
            raise

    # ------------------------------------------------------------------ the run-time flag

    @property
    def enabled(self) -> bool:
        """Whether records are being persisted."""
        return self._enabled

    async def set_enabled(self, enabled: bool) -> None:
        """Switch persistence on or off at run time. Turning it off flushes first (journaling what cannot be)."""
        async with self._toggle_lock:
            if self._closed:
                raise SidecarClosedError("the sidecar is closed")
            if enabled == self._enabled:
                return
            self._enabled = enabled
            if enabled:
                self._backlog = self._new_backlog()
                if self._started:
                    await self._start_writer_tracked()
            else:
                backlog = self._backlog
                if backlog is not None and self._runtime is not None:
                    await backlog.wait_for(self.settings.shutdown_timeout)
                await self._stop_persistence(0.0)
            self.events.publish(PersistenceToggled(enabled=enabled))

    # ------------------------------------------------------------------ the hot path

    def _submit(self, record: Record) -> Receipt:
        backlog = self._backlog
        if backlog is None:
            return disabled_receipt(record.entity, record.key)
        return backlog.submit(record)

    def _check_open(self) -> None:
        if self._closed:
            raise SidecarClosedError("the sidecar is closed; records are no longer accepted")

    def record_trade(self, trade: Trade | Mapping[str, Any]) -> Receipt:
        """Add or update a trade in ``trade_history`` and queue it; raises ``InvalidRecordError`` on bad input."""
        self._check_open()
        backlog = self._backlog
        stored = self._history.record(Trade.parse(trade), unsafe=backlog is not None)
        if backlog is None:
            return disabled_receipt("trade", stored.trade_id)
        return backlog.submit(stored)

    def record_signal(self, signal: Signal | Mapping[str, Any]) -> Receipt:
        """Queue a signal; raises ``InvalidRecordError`` on bad input."""
        self._check_open()
        return self._submit(Signal.parse(signal))

    def update_signal_execution(
        self, signal_id: str, executed: bool = True, execution_status: str | None = None
    ) -> Receipt:
        """Queue a change of a recorded signal's execution fields."""
        self._check_open()
        change = SignalExecution.parse(
            {"signal_id": signal_id, "executed": executed, "execution_status": execution_status}
        )
        return self._submit(change)

    def record_snapshot(self, snapshot: PerformanceSnapshot | Mapping[str, Any]) -> Receipt:
        """Queue a performance snapshot; raises ``InvalidRecordError`` on bad input."""
        self._check_open()
        return self._submit(PerformanceSnapshot.parse(snapshot))

    def record_parameter_change(self, change: ParameterChange | Mapping[str, Any]) -> Receipt:
        """Queue a parameter change; raises ``InvalidRecordError`` on bad input."""
        self._check_open()
        return self._submit(ParameterChange.parse(change))

    async def flush(self, timeout: float = 5.0) -> None:
        """Return once every record recorded so far is committed (or final); else raise ``FlushTimeoutError``."""
        backlog = self._backlog
        if backlog is None:
            return
        if not await backlog.wait_for(timeout):
            raise FlushTimeoutError(timeout, backlog.outstanding())

    # ------------------------------------------------------------------ state

    @property
    def trade_history(self) -> TradeHistory:
        """The authoritative trades, oldest first (a read-only sequence; ``.get(trade_id)`` for lookups)."""
        return self._history

    @property
    def breaker_state(self) -> str:
        """``closed``, ``open`` or ``half_open``."""
        runtime = self._runtime
        return "closed" if runtime is None else str(runtime.writer.breaker.state)

    def queue_depth(self) -> int:
        """Records waiting in RAM."""
        return self._backlog.queue_depth if self._backlog is not None else 0

    def journal_depth(self) -> int:
        """Records waiting in the on-disk journal."""
        return self._backlog.journal_pending if self._backlog is not None else 0

    def oldest_unpersisted_age(self) -> float:
        """Seconds the oldest record not yet committed has been waiting: the live loss window."""
        return self._backlog.oldest_age() if self._backlog is not None else 0.0

    @property
    def runtime(self) -> Runtime | None:
        """Database, repositories, backlog and writer, while persistence is enabled and started."""
        return self._runtime

    @property
    def writer(self) -> Writer | None:
        """The background writer while persistence is enabled and started."""
        return self._runtime.writer if self._runtime is not None else None

    @property
    def backlog(self) -> Backlog | None:
        """Records not yet committed (RAM and journal) while persistence is enabled."""
        return self._backlog

    @property
    def database(self) -> Database | None:
        """The database handle while persistence is enabled and started."""
        return self._runtime.database if self._runtime is not None else None

    def health(self) -> HealthReport:
        """Enabled flag, breaker, queue and journal depth, database reachability and schema revision."""
        runtime = self._runtime
        return HealthReport(
            enabled=self._enabled,
            started=self._started,
            closed=self._closed,
            breaker=self.breaker_state,
            queue=self.queue_depth(),
            journal=self.journal_depth(),
            db=DatabaseState(
                runtime.writer.database_ok if runtime is not None else None, self.settings.safe_database_url
            ),
            schema_revision=runtime.schema_revision if runtime is not None else None,
            history=len(self._history),
            oldest_unpersisted_age_seconds=round(self.oldest_unpersisted_age(), 6),
            counts=Counts.of(self._book.tally),
            journal_error=self._backlog.journal_error if self._backlog is not None else None,
        )

    # ------------------------------------------------------------------ the read side

    def _repositories(self) -> Repositories:
        repos = self._runtime.repositories if self._runtime is not None else None
        if repos is None:
            raise DatabaseUnavailableError("persistence is disabled or not started: there is no database to read")
        return repos

    @property
    def trades(self) -> TradeRepository:
        """Trade reads and writes straight against the database."""
        return self._repositories().trades

    @property
    def signals(self) -> SignalRepository:
        """Signal reads and writes straight against the database."""
        return self._repositories().signals

    @property
    def snapshots(self) -> PerformanceSnapshotRepository:
        """Performance snapshot reads."""
        return self._repositories().snapshots

    @property
    def parameters(self) -> ParameterHistoryRepository:
        """Parameter history reads."""
        return self._repositories().parameters

    @property
    def dead_letters(self) -> DeadLetterRepository:
        """Records that could never be written."""
        return self._repositories().dead_letters
