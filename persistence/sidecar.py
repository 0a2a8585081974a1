"""``PersistenceSidecar``: the facade a trading orchestrator embeds in its event loop.

It keeps the authoritative in-memory ``trade_history`` and hands every validated record to the one background
:class:`~persistence.writer.Writer`. ``record_*`` are synchronous and O(1): they validate, update the history,
append to the writer's queue and return a :class:`~persistence.receipts.Receipt`; they never await, never touch
the database and never raise because of its state. With ``ENABLE_DATABASE_PERSISTENCE=false`` there is no engine,
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
from persistence.db import Database
from persistence.errors import (
    DatabaseUnavailableError,
    FlushTimeoutError,
    SidecarClosedError,
)
from persistence.events import (
    EventBus,
    PersistenceToggled,
    ShutdownComplete,
    SidecarStarted,
)
from persistence.exporter import MetricsExporter, start_exporter
from persistence.history import TradeHistory
from persistence.logs import EventLogger
from persistence.metrics import SidecarMetrics
from persistence.models import ParameterChange, PerformanceSnapshot, Record, Signal, SignalExecution, Trade
from persistence.receipts import Receipt, disabled_receipt
from persistence.repositories import (
    DeadLetterRepository,
    ParameterHistoryRepository,
    PerformanceSnapshotRepository,
    Repositories,
    SignalRepository,
    TradeRepository,
)
from persistence.writer import Clock, RetryPolicy, Sleep, Writer


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
            token = self.settings.api_token.get_secret_value() if self.settings.api_token else ""
            password = self.settings.url.password or ""
            self.events.subscribe(EventLogger(secrets=(str(password), token)))
        self._history = TradeHistory(self.settings.history_max)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = SidecarMetrics(self.registry, self)
        self.events.subscribe(self.metrics)
        self._enabled = self.settings.enabled
        self._writer: Writer | None = None
        self._started = False
        self._closed = False
        self._closing: asyncio.Task[None] | None = None
        self._toggle_lock = asyncio.Lock()
        self._dead_writer_totals = [0, 0, 0, 0]  # persisted, journaled, dead-lettered, dropped of retired writers
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
                await self._start_writer()
            except BaseException:
                await self._stop_exporter()
                raise
        writer = self._writer
        self.events.publish(
            SidecarStarted(
                database_ready=writer.ready if writer else False,
                history_loaded=writer.history_loaded if writer else 0,
                journal_pending=writer.journal_pending if writer else 0,
                schema_revision=writer.schema_revision if writer else None,
                duration=time.perf_counter() - started,
            )
        )

    async def close(self, timeout: float | None = None) -> None:
        """Stop intake, drain within ``timeout`` (default ``PERSISTENCE_SHUTDOWN_TIMEOUT``), journal the rest.

        Idempotent: a second call waits for the first to finish. Logs one ``shutdown_complete`` summary.
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
        journal_pending = 0
        if self._writer is not None:
            writer = self._writer
            await writer.stop(timeout)
            journal_pending = writer.journal_pending
            self._retire(writer)
            self._writer = None
        persisted, journaled, dead, dropped = self._dead_writer_totals
        self.events.publish(
            ShutdownComplete(
                persisted=persisted,
                journaled=journaled,
                dead_lettered=dead,
                dropped=dropped,
                duration=time.perf_counter() - started,
                journal_pending=journal_pending,
            )
        )

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

    async def _start_writer(self) -> None:
        writer = Writer(
            self.settings,
            bus=self.events,
            history=self._history,
            clock=self._clock,
            sleep=self._sleep,
            retry=self._retry,
        )
        self._writer = writer
        await writer.start()

    def _retire(self, writer: Writer) -> None:
        counters = writer.counters
        totals = self._dead_writer_totals
        totals[0] += counters.persisted
        totals[1] += counters.journaled
        totals[2] += counters.dead_lettered
        totals[3] += counters.dropped

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
            if not self._started:
                return
            if enabled:
                await self._start_writer()
            elif self._writer is not None:
                writer = self._writer
                self._writer = None
                await writer.flush(self.settings.shutdown_timeout)
                await writer.stop(0.0)
                self._retire(writer)
            self.events.publish(PersistenceToggled(enabled=enabled))

    # ------------------------------------------------------------------ the hot path

    def _submit(self, record: Record) -> Receipt:
        writer = self._writer
        if writer is None:
            return disabled_receipt(record.entity, record.key)
        return writer.submit(record)

    def _check_open(self) -> None:
        if self._closed:
            raise SidecarClosedError("the sidecar is closed; records are no longer accepted")

    def record_trade(self, trade: Trade | Mapping[str, Any]) -> Receipt:
        """Add or update a trade in ``trade_history`` and queue it; raises ``InvalidRecordError`` on bad input."""
        self._check_open()
        writer = self._writer
        stored = self._history.record(Trade.parse(trade), unsafe=writer is not None)
        if writer is None:
            return disabled_receipt("trade", stored.trade_id)
        return writer.submit(stored)

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
        writer = self._writer
        if writer is None:
            return
        if not await writer.flush(timeout):
            raise FlushTimeoutError(timeout, writer.outstanding())

    # ------------------------------------------------------------------ state

    @property
    def trade_history(self) -> TradeHistory:
        """The authoritative trades, oldest first (a read-only sequence; ``.get(trade_id)`` for lookups)."""
        return self._history

    @property
    def breaker_state(self) -> str:
        """``closed``, ``open`` or ``half_open``."""
        writer = self._writer
        return "closed" if writer is None else str(writer.breaker.state)

    def queue_depth(self) -> int:
        """Records waiting in RAM."""
        return self._writer.queue_depth if self._writer is not None else 0

    def journal_depth(self) -> int:
        """Records waiting in the on-disk journal."""
        return self._writer.journal_pending if self._writer is not None else 0

    def oldest_unpersisted_age(self) -> float:
        """Seconds the oldest record not yet committed has been waiting: the live loss window."""
        return self._writer.oldest_unpersisted_age() if self._writer is not None else 0.0

    @property
    def writer(self) -> Writer | None:
        """The background writer while persistence is enabled and started."""
        return self._writer

    @property
    def database(self) -> Database | None:
        """The database handle while persistence is enabled and started."""
        return self._writer.database if self._writer is not None else None

    def health(self) -> dict[str, Any]:
        """Enabled flag, breaker, queue and journal depth, database reachability and schema revision."""
        writer = self._writer
        if writer is None:
            return {
                "enabled": self._enabled,
                "started": self._started,
                "closed": self._closed,
                "breaker": "closed",
                "queue": 0,
                "journal": 0,
                "db": {"reachable": None, "url": self.settings.safe_database_url},
                "schema": None,
                "history": len(self._history),
                "oldest_unpersisted_age_seconds": 0.0,
                "counts": self._counts(None),
            }
        return {
            "enabled": self._enabled,
            "started": self._started,
            "closed": self._closed,
            "breaker": self.breaker_state,
            "queue": writer.queue_depth,
            "journal": writer.journal_pending,
            "db": {"reachable": writer.database_ok, "url": self.settings.safe_database_url},
            "schema": writer.schema_revision,
            "history": len(self._history),
            "oldest_unpersisted_age_seconds": round(writer.oldest_unpersisted_age(), 6),
            "counts": self._counts(writer),
        }

    def _counts(self, writer: Writer | None) -> dict[str, int]:
        persisted, journaled, dead, dropped = self._dead_writer_totals
        if writer is not None:
            persisted += writer.counters.persisted
            journaled += writer.counters.journaled
            dead += writer.counters.dead_lettered
            dropped += writer.counters.dropped
        return {"persisted": persisted, "journaled": journaled, "dead_lettered": dead, "dropped": dropped}

    # ------------------------------------------------------------------ the read side

    def _repositories(self) -> Repositories:
        writer = self._writer
        repos = writer.repositories if writer is not None else None
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
