"""The runtime: what exists while persistence is enabled and started, built once and torn down once.

It holds the database (engine and pool), the repositories over it (the read side, which lives as long as the
runtime, not as long as the write task), the committer, the background WAL checkpointer, the backlog it was given
and the writer. It prepares the database (migrations, then this orchestrator's newest ``PERSISTENCE_HISTORY_MAX``
trades into ``trade_history``), replays a journal left behind, and notices a SQLite file deleted or replaced under it.
:class:`HealthReport` is the one shape of the sidecar's health, for ``sidecar.health()`` and the API alike.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tenacity import RetryCallState

from persistence.audit.anchors import Anchorer
from persistence.config import Settings
from persistence.db.backups import backup_dir_for
from persistence.db.engine import Database, create_database, sqlite_path
from persistence.db.inuse_lock import DatabaseInUseLock
from persistence.db.wal_checkpoint import WalCheckpointer
from persistence.errors import DatabaseUnavailableError, SchemaNewerError
from persistence.migrations import upgrade
from persistence.observe.events import (
    DatabaseRecovered,
    DatabaseUnavailable,
    EventBus,
    SchemaNewerThanRelease,
    WriteRetried,
)
from persistence.records.history import TradeHistory
from persistence.records.models import utc_now
from persistence.tables.repositories import Repositories
from persistence.write.backlog import Backlog, Clock, Pending, ReceiptBook, Sleep, Tally
from persistence.write.breaker import CircuitBreaker
from persistence.write.committer import Committer, Outcome, RetryPolicy, short_error
from persistence.write.faults import needs_schema
from persistence.write.writer import Writer


@dataclass(frozen=True, slots=True)
class Counts:
    """What became of the records so far."""

    persisted: int
    journaled: int
    dead_lettered: int
    dropped: int

    @classmethod
    def of(cls, tally: Tally) -> Counts:
        return cls(tally.persisted, tally.journaled, tally.dead_lettered, tally.dropped)


@dataclass(frozen=True, slots=True)
class DatabaseState:
    """Whether the last database operation succeeded (``None`` when there is no database), and its URL, masked."""

    reachable: bool | None
    url: str


@dataclass(frozen=True, slots=True)
class HealthReport:
    """The sidecar's state: one shape for ``sidecar.health()`` and ``GET /api/v1/health``."""

    enabled: bool
    started: bool
    closed: bool
    breaker: str
    queue: int
    journal: int
    db: DatabaseState
    schema_revision: str | None
    history: int
    oldest_unpersisted_age_seconds: float
    counts: Counts
    journal_error: str | None = None
    """Why the journal directory could not be written at start (``PERSISTENCE_JOURNAL_REQUIRED=false``)."""

    def to_dict(self) -> dict[str, Any]:
        """The same as nested plain dicts, ready for JSON."""
        return asdict(self)


class Runtime:
    """Database, repositories, committer, backlog and writer; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        *,
        backlog: Backlog,
        book: ReceiptBook,
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
        self.backlog = backlog
        self.database = database_factory(settings)
        self.repositories = Repositories(self.database)
        self.checkpointer: WalCheckpointer | None = None
        if self.database.is_sqlite and sqlite_path(settings.url) is not None:
            self.checkpointer = WalCheckpointer(self.database)
        self.committer = Committer(
            self.database,
            self.repositories,
            retry=retry or RetryPolicy(),
            sleep=sleep,
            dead_letter_dir=settings.journal_dir,
            on_retry=self._on_retry,
            check=self._check_database_file,
        )
        self.writer = Writer(
            backlog,
            self,
            breaker=CircuitBreaker(settings.breaker_failure_threshold, settings.breaker_reset_seconds),
            book=book,
            bus=bus,
            clock=clock,
            sleep=sleep,
            batch_size=settings.batch_size,
        )
        self._ready = False
        self._database_file: tuple[int, int] | None = None
        self._reset_pool = False
        self.schema_revision: str | None = None
        self.history_loaded = 0
        path = sqlite_path(settings.url) if self.database.is_sqlite else None
        self._in_use = DatabaseInUseLock(path) if path is not None else None
        self._reported_newer: SchemaNewerError | None = None
        # Subscribed from here on, so the heads of the start-up journal replay are checkpointed too.
        self.anchorer = Anchorer(
            settings.instance_id,
            settings.audit_anchor_dir,
            settings.audit_anchor_seconds,
            bus=bus,
            sleep=sleep,
            now=utc_now,
            key_path=settings.audit_signing_key,
        )

    # ------------------------------------------------------------------ the writer's target

    @property
    def ready(self) -> bool:
        """Whether the schema is migrated and the history loaded."""
        return self._ready

    async def prepare(self) -> None:
        """Migrate, load the newest trades into the history, remember the SQLite file's identity."""
        database, repos = self.database, self.repositories
        if self._reset_pool:
            # Pooled connections still point at a deleted or replaced file; open fresh ones. A background checkpoint
            # holding one must end first, or its connection would go back to the discarded pool and stay open.
            if self.checkpointer is not None:
                await self.checkpointer.close(max(self._settings.query_timeout, 1.0))
            await database.dispose()
            self._reset_pool = False
        if self._in_use is not None and not self._in_use.held:
            # While it has the file open, the sidecar holds the database's in-use lock: a restore refuses to run.
            await asyncio.to_thread(self._in_use.acquire)
        try:
            self.schema_revision = await upgrade(
                database,
                lock_wait_seconds=max(self._settings.query_timeout, 1.0),
                backup_dir=backup_dir_for(self._settings),
            )
        except SchemaNewerError as error:
            if self._reported_newer is None:  # once: the writer asks again at every breaker probe
                self._bus.publish(SchemaNewerThanRelease(error.database_revision, error.release_revision))
            self._reported_newer = error
            raise
        # Only this orchestrator's trades (and those from before instances existed): on a shared database another
        # orchestrator's trades are its own authoritative history, not this one's.
        trades = await repos.trades.get_latest_trades(self._settings.history_max, self._settings.instance_id)
        self.history_loaded = self._history.load(trades)
        self._remember_database_file()
        was_degraded = not self.writer.database_ok and self.writer.running
        self._ready = True
        if was_degraded:
            self._bus.publish(DatabaseRecovered(history_loaded=self.history_loaded))

    async def commit(self, records: Sequence[Pending]) -> Outcome:
        """Write one batch through the committer."""
        return await self.committer.commit(records)

    def committed(self, now: float, outcome: Outcome) -> None:
        """After each batch: a background checkpoint after a clean commit; a vanished schema means prepare again."""
        if outcome.failure is None:
            if self.checkpointer is not None and not outcome.dead:
                self.checkpointer.after_commit(now)
        elif needs_schema(outcome.failure):
            self._ready = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> bool:
        """Open the backlog, prepare the database, replay the journal, start the writer; ``False`` if degraded.

        A signing key that cannot be used (:class:`~persistence.errors.AuditKeyError`) fails it before anything.
        """
        try:
            await self.anchorer.load_key()
        except BaseException:
            await self.anchorer.stop()
            raise
        self.anchorer.start()
        await self.backlog.open()
        try:
            await self.prepare()
        except Exception as error:
            self.writer.database_ok = False
            self._bus.publish(
                DatabaseUnavailable(error_class=type(error).__name__, error=short_error(error), at_startup=True)
            )
        else:
            self.writer.database_ok = True
            await self.writer.drain_journal()
        self.writer.start()
        return self._ready

    async def stop(self, timeout: float) -> None:
        """Drain within ``timeout`` (keeping a slice back for the journal), journal the rest, release everything."""
        reserve = min(timeout / 4, 0.5)
        await self.writer.stop(timeout - reserve)
        await self.anchorer.stop()  # the checkpoint at close(): after the last commit
        await self.backlog.close()
        if self.checkpointer is not None:
            await self.checkpointer.close(max(reserve, 0.1))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.database.dispose(), max(reserve, 0.1))
        if self._in_use is not None:
            self._in_use.release()

    # ------------------------------------------------------------------ the SQLite file

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

    def _on_retry(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        self._bus.publish(
            WriteRetried(
                attempt=state.attempt_number,
                delay=delay,
                error_class=type(error).__name__ if error else "",
                error=short_error(error) if error else "",
            )
        )
