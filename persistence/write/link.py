"""The writer's link to the database: preparing it, and whether it is prepared.

Before the first write, and again after the schema vanished or the SQLite file was replaced, the database is
prepared: migrated, this orchestrator's newest ``PERSISTENCE_HISTORY_MAX`` trades loaded into ``trade_history``,
the SQLite file's identity remembered (and its in-use lock held). Before each transaction :meth:`DatabaseLink.check`
notices a SQLite file deleted or replaced under the sidecar; after each batch :meth:`DatabaseLink.committed` starts
a background WAL checkpoint, or marks the database unprepared when its schema is gone. Whether the database is
*reachable* is not kept here: the writer decides it from each outcome
(:attr:`~persistence.write.writer.Writer.database_ok`).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from persistence.config import Settings
from persistence.db.backups import backup_dir_for
from persistence.db.engine import Database, sqlite_path
from persistence.db.inuse_lock import DatabaseInUseLock
from persistence.db.wal_checkpoint import Sleep, WalCheckpointer
from persistence.errors import DatabaseUnavailableError, SchemaNewerError
from persistence.migrations import upgrade
from persistence.observe.events import EventBus, SchemaNewerThanRelease
from persistence.observe.logger import get_logger
from persistence.records.history import TradeHistory
from persistence.tables.repositories import Repositories
from persistence.write.committer import Outcome
from persistence.write.faults import needs_schema

log = get_logger(__name__)


class DatabaseLink:
    """Prepares one database for the writer and says whether it is prepared; see the module docstring."""

    #: The shortest wait for another migrator's lock (and for a background checkpoint to end before the pool is
    #: replaced), in seconds, however short ``DATABASE_QUERY_TIMEOUT`` is: a migration in another process may
    #: hold the lock longer than one statement takes. Tests that start sidecars on a locked file set it shorter.
    min_lock_wait: float = 1.0
    #: The longest ``close()`` waits, past its timeout, for the pool's connections to close, in seconds.
    dispose_limit: float = 5.0

    def __init__(
        self,
        settings: Settings,
        database: Database,
        repositories: Repositories,
        *,
        bus: EventBus,
        history: TradeHistory,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._settings = settings
        self._database = database
        self._repos = repositories
        self._bus = bus
        self._history = history
        self._path: Path | None = sqlite_path(settings.url) if database.is_sqlite else None
        self.checkpointer = WalCheckpointer(database, sleep=sleep) if self._path is not None else None
        self._in_use = DatabaseInUseLock(self._path) if self._path is not None else None
        self._ready = False
        self._database_file: tuple[int, int] | None = None
        self._reset_pool = False
        self._reported_newer: SchemaNewerError | None = None
        self.schema_revision: str | None = None
        self.history_loaded = 0

    @property
    def ready(self) -> bool:
        """Whether the schema is migrated and the history loaded."""
        return self._ready

    async def prepare(self) -> int:
        """Migrate, load the newest trades into the history, remember the SQLite file's identity.

        Returns how many trades the history loaded; raises when the database cannot be reached or migrated.
        """
        database = self._database
        if self._reset_pool:
            # Pooled connections still point at a deleted or replaced file; open fresh ones. A background checkpoint
            # holding one must end first, or its connection would go back to the discarded pool and stay open.
            if self.checkpointer is not None:
                await self.checkpointer.close(self._lock_wait())
            await database.dispose()
            self._reset_pool = False
        if self._in_use is not None and not self._in_use.held:
            # While it has the file open, the sidecar holds the database's in-use lock: a restore refuses to run.
            await asyncio.to_thread(self._in_use.acquire)
        try:
            self.schema_revision = await upgrade(
                database,
                lock_wait_seconds=self._lock_wait(),
                backup_dir=backup_dir_for(self._settings),
            )
        except SchemaNewerError as error:
            if self._reported_newer is None:  # once: the writer asks again at every breaker probe
                self._bus.publish(SchemaNewerThanRelease(error.database_revision, error.release_revision))
            self._reported_newer = error
            raise
        # Only this orchestrator's trades (and those from before instances existed): on a shared database another
        # orchestrator's trades are its own authoritative history, not this one's.
        trades = await self._repos.trades.get_latest_trades(self._settings.history_max, self._settings.instance_id)
        self.history_loaded = self._history.load(trades)
        await self._repos.warm_connections()
        self._remember_database_file()
        self._ready = True
        return self.history_loaded

    def _lock_wait(self) -> float:
        return max(self._settings.query_timeout, self.min_lock_wait)

    def committed(self, now: float, outcome: Outcome) -> None:
        """After each batch: a background checkpoint after a clean commit; a vanished schema means prepare again."""
        if outcome.failure is None:
            if self.checkpointer is not None and not outcome.dead:
                self.checkpointer.after_commit(now)
        elif needs_schema(outcome.failure):
            self._ready = False

    def check(self) -> None:
        """Before each transaction: a SQLite file deleted or replaced under us would swallow writes into an unlinked
        inode (raises :class:`~persistence.errors.DatabaseUnavailableError`, and the database must be prepared
        again)."""
        if self._reset_pool:
            raise DatabaseUnavailableError("the database file vanished; reconnecting before the next write")
        if self._database_file is None:
            return
        path = self._path
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

    async def close(self, timeout: float) -> None:
        """End the background checkpoint, dispose of the pool, release the in-use lock.

        The pool's connections are closed before the lock is released and before this returns, past ``timeout`` if
        need be (closing SQLite's last connection checkpoints its write-ahead log), up to :attr:`dispose_limit`: a
        connection left closing in its thread would answer on a loop the host may have closed by then.
        """
        if self.checkpointer is not None:
            await self.checkpointer.close(timeout)
        disposal = asyncio.ensure_future(self._database.dispose())
        with contextlib.suppress(Exception):
            try:
                await asyncio.wait_for(asyncio.shield(disposal), timeout)
            except TimeoutError:
                log.warning("database_close_slow", waited_seconds=round(timeout, 3))
                await asyncio.wait_for(disposal, max(self._settings.query_timeout, self.dispose_limit))
        if self._in_use is not None:
            self._in_use.release()

    def _remember_database_file(self) -> None:
        if self._path is None:
            self._database_file = None
            return
        with contextlib.suppress(OSError):
            stat = self._path.stat()
            self._database_file = (stat.st_dev, stat.st_ino)
