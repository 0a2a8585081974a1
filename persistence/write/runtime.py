"""The runtime: the composition root of what exists while persistence is enabled and started, built once and torn
down once.

It builds the database (engine and pool), the repositories over it (the read side, which lives as long as the
runtime, not as long as the write task), the database link (:mod:`persistence.write.link`: preparing the database,
the background WAL checkpointer), the committer, and the writer over the backlog it was given, which it hands the
committer and the link directly; then it starts and stops them in order. It takes no part in a write.
:class:`HealthReport` is the one shape of the sidecar's health, for ``sidecar.health()`` and the API alike.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from tenacity import RetryCallState

from persistence.audit.anchors import Anchorer
from persistence.config import Settings
from persistence.db.durable import sync_committed
from persistence.db.engine import Database, create_database, sqlite_path
from persistence.db.wal_checkpoint import WalCheckpointer
from persistence.observe.events import EventBus, WriteRetried
from persistence.records.history import TradeHistory
from persistence.records.models import utc_now
from persistence.tables.repositories import Repositories
from persistence.write.backlog import Backlog, Clock, ReceiptBook, Sleep, Tally
from persistence.write.breaker import CircuitBreaker
from persistence.write.committer import Committer, RetryPolicy, short_error
from persistence.write.link import DatabaseLink
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
        self._bus = bus
        self.backlog = backlog
        self.database = database_factory(settings)
        self.repositories = Repositories(self.database)
        self.link = DatabaseLink(settings, self.database, self.repositories, bus=bus, history=history, sleep=sleep)
        self.committer = Committer(
            self.database,
            self.repositories,
            retry=retry or RetryPolicy(),
            sleep=sleep,
            dead_letter_dir=settings.journal_dir,
            on_retry=self._on_retry,
            check=self.link.check,
        )
        self.writer = Writer(
            backlog,
            self.committer,
            self.link,
            breaker=CircuitBreaker(settings.breaker_failure_threshold, settings.breaker_reset_seconds),
            book=book,
            bus=bus,
            clock=clock,
            sleep=sleep,
            batch_size=settings.batch_size,
        )
        # Subscribed from here on, so the heads of the start-up journal replay are checkpointed too.
        self.anchorer = Anchorer(
            settings.instance_id,
            settings.audit_anchor_dir,
            settings.audit_anchor_seconds,
            bus=bus,
            sleep=sleep,
            now=utc_now,
            key_path=settings.audit_signing_key,
            durable=_durability_of(settings),
        )

    @property
    def ready(self) -> bool:
        """Whether the schema is migrated and the history loaded."""
        return self.link.ready

    @property
    def schema_revision(self) -> str | None:
        """The database's schema revision, once prepared."""
        return self.link.schema_revision

    @property
    def history_loaded(self) -> int:
        """Trades the history loaded when the database was last prepared."""
        return self.link.history_loaded

    @property
    def checkpointer(self) -> WalCheckpointer | None:
        """The background WAL checkpointer (a SQLite file only)."""
        return self.link.checkpointer

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
        await self.writer.open()
        self.writer.start()
        return self.link.ready

    async def stop(self, timeout: float) -> None:
        """Drain within ``timeout`` (keeping a slice back for the journal), journal the rest, release everything."""
        reserve = min(timeout / 4, 0.5)
        await self.writer.stop(timeout - reserve)
        await self.anchorer.stop()  # the checkpoint at close(): after the last commit
        await self.backlog.close()
        await self._release(max(reserve, 0.1))

    async def abandon(self) -> None:
        """Let go of a runtime whose start failed or was cancelled (its writer never ran): its anchorer leaves the
        bus, its pool is disposed of. The backlog is left open: it is the sidecar's, and a later start takes it on."""
        await self.anchorer.stop()
        await self._release(0.5)

    async def _release(self, timeout: float) -> None:
        """Roll back a transaction begun ahead and never committed (its records are in the backlog), then dispose of
        the pool; each within ``timeout``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.committer.close(), timeout)
        await self.link.close(timeout)

    # ------------------------------------------------------------------ wiring

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


def _durability_of(settings: Settings) -> Callable[[], None] | None:
    """What makes the database's commits durable before an audit checkpoint names them: a SQLite file's log and file
    fsynced; nothing for an in-memory database or a server (whose commits are durable when they return)."""
    path = sqlite_path(settings.url) if settings.is_sqlite else None
    return None if path is None else partial(sync_committed, path)
