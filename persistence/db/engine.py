"""The database handle: one engine built from :class:`~persistence.config.Settings`, plus its safety rails.

On SQLite every connection gets WAL (the mode that comes back is checked), ``synchronous=NORMAL``, a busy
timeout and foreign keys; the driver's own transaction handling is switched off so that writers can start with
``BEGIN IMMEDIATE`` (a deferred transaction that upgrades to a write fails at once with "database is locked"),
while readers use a plain ``BEGIN``. Pool settings are applied only where they make sense: a file SQLite
database keeps a small pool, ``:memory:`` one static connection, PostgreSQL the configured pool, whose connections
are pinged before use only after sitting idle (:mod:`persistence.db.pool_ping`).

Every statement is bounded by ``DATABASE_QUERY_TIMEOUT``. PostgreSQL enforces it on the server
(``statement_timeout``). On SQLite cancelling an ``await`` does not stop a statement that is running in the
driver's thread, so a timer calls ``sqlite3.Connection.interrupt()`` when the statement overruns; the
interrupted statement raises :class:`~persistence.errors.QueryTimeoutError`. A SQLite write transaction of the writer
runs as one call on the driver's thread (:meth:`Database.write_on_driver`, :mod:`persistence.db.driver`), its
statements bounded the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, ExceptionContext
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry, StaticPool

from persistence.config import Settings
from persistence.db.driver import DRIVER_HOOKS, DriverSession, on_driver_thread, transaction
from persistence.db.pool_ping import ping_when_idle
from persistence.errors import DatabaseUnavailableError, QueryTimeoutError
from persistence.observe.logger import get_logger

log = get_logger(__name__)
T = TypeVar("T")

_BEGIN_OPTION = "persistence_begin"
_TIMER_KEY = "persistence_timeout_timer"
SQLITE_MAX_BUSY_MS = 1000
"""Upper bound of SQLite's busy wait per statement; retries above it handle longer locks."""
WAL_AUTOCHECKPOINT_PAGES = 10_000
"""Log size at which a commit checkpoints by itself: a backstop, the writer checkpoints in the background first."""


class InterruptTimer:
    """Interrupts one SQLite statement that overruns ``DATABASE_QUERY_TIMEOUT``: the one timer every statement uses.

    Armed on the event loop when the statement starts; when it fires it calls aiosqlite's ``interrupt()``, which
    calls ``sqlite3.Connection.interrupt()`` directly (safe from another thread) instead of queueing behind the
    running statement. :meth:`timed_out` tells an "interrupted" error caused by this timer from any other.
    """

    def __init__(self, driver: Any, seconds: float) -> None:
        self._driver = driver
        self._loop = asyncio.get_running_loop()
        self.fired = False
        self._interrupt: asyncio.Task[None] | None = None  # kept so the task is not collected mid-flight
        self._handle = self._loop.call_later(seconds, self._fire)

    def _fire(self) -> None:
        self.fired = True
        self._interrupt = self._loop.create_task(self._driver.interrupt())

    def cancel(self) -> None:
        """Disarm: the statement finished (or failed) in time."""
        self._handle.cancel()

    def timed_out(self, error: BaseException) -> bool:
        """Whether ``error`` is the statement being interrupted by this timer."""
        return self.fired and "interrupted" in str(error).lower()


class Database:
    """The engine and the two ways to use it: :meth:`read` and :meth:`write` (one transaction, committed)."""

    def __init__(self, engine: AsyncEngine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self.dialect_name = engine.dialect.name
        self._writer = engine.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})
        self.faults_installed = 0
        """How many faults of the fault kit (:mod:`persistence.testing`) see this database's statements now; while
        any do, the writer begins no transaction ahead (:mod:`persistence.tables.ahead`)."""

    @property
    def is_sqlite(self) -> bool:
        """Whether this database is SQLite."""
        return self.dialect_name == "sqlite"

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reading; its implicit transaction is rolled back at the end."""
        async with self.engine.connect() as connection:
            yield connection

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reading whose statements all see one snapshot (``REPEATABLE READ`` on PostgreSQL).

        SQLite's read transaction already is one: a WAL reader sees the database as of its first read.
        """
        async with self.engine.connect() as connection:
            if self.dialect_name == "postgresql":
                await connection.execution_options(isolation_level="REPEATABLE READ")
            yield connection

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """One write transaction (``BEGIN IMMEDIATE`` on SQLite), committed on success, rolled back on error."""
        async with self._writer.begin() as connection:
            yield connection

    async def checkpoint(self) -> tuple[int, int, int]:
        """One ``PASSIVE`` WAL checkpoint of a SQLite database on a pooled connection.

        Returns SQLite's ``(busy, pages in the log, pages checkpointed)``. It never waits for a lock, and like every
        statement it is interrupted past ``DATABASE_QUERY_TIMEOUT``.
        """
        statement = "PRAGMA wal_checkpoint(PASSIVE)"
        async with self.engine.connect() as connection:
            driver = await driver_of(connection)
            rows = await self._bounded(driver, statement, lambda: driver.execute_fetchall(statement))
        busy, pages, checkpointed = rows[0]
        return int(busy), int(pages), int(checkpointed)

    async def dispose(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()

    async def on_driver(self, connection: AsyncConnection, work: Callable[[DriverSession], T]) -> T:
        """Run ``work`` as one call on SQLite's driver thread, inside ``connection``'s transaction.

        One hop into aiosqlite's thread for all of ``work``'s statements (:mod:`persistence.db.driver`); each
        statement is still bounded by ``DATABASE_QUERY_TIMEOUT`` and a driver error is raised as SQLAlchemy's type.
        """
        raw = await connection.get_raw_connection()
        return await on_driver_thread(
            _driver_of_raw(raw), work, hooks=raw.info.get(DRIVER_HOOKS, ()), timeout_ms=self.settings.query_timeout_ms
        )

    async def write_on_driver(self, work: Callable[[DriverSession], T]) -> T:
        """One SQLite write transaction as one call on the driver's thread: ``BEGIN IMMEDIATE``, ``work``, ``COMMIT``.

        Rolled back on error, like :meth:`write`; the event loop waits once for the whole transaction.
        """
        async with self.engine.connect() as connection:
            return await self.on_driver(connection, partial(transaction, "BEGIN IMMEDIATE", work))

    async def _bounded(self, driver: Any, sql: str, call: Callable[[], Awaitable[T]]) -> T:
        """Await ``call`` (one statement on the aiosqlite ``driver``), interrupting it past the query timeout.

        A caller cancelled meanwhile (a background checkpoint stopped at ``close()``) interrupts the statement and
        waits for the driver's thread to end it: no statement outlives its caller to finish on a closed loop.
        """
        timer = InterruptTimer(driver, self.settings.query_timeout)
        statement = asyncio.ensure_future(call())
        try:
            return await asyncio.shield(statement)
        except asyncio.CancelledError:
            if not statement.done():
                await driver.interrupt()  # sqlite3's interrupt(), at once: not queued behind the statement
                await asyncio.wait([statement])
            if not statement.cancelled():
                statement.exception()  # retrieved: the cancellation is what the caller hears of
            raise
        except sqlite3.Error as error:
            if timer.timed_out(error):
                raise QueryTimeoutError(self.settings.query_timeout_ms, sql) from error
            raise DBAPIError.instance(sql, None, error, sqlite3.Error) from error
        finally:
            timer.cancel()


async def driver_of(connection: AsyncConnection) -> Any:
    """The driver's own connection (aiosqlite's or asyncpg's) under ``connection``.

    Raises :class:`~persistence.errors.DatabaseUnavailableError` when the connection was invalidated.
    """
    return _driver_of_raw(await connection.get_raw_connection())


def _driver_of_raw(raw: Any) -> Any:
    driver = raw.driver_connection
    if driver is None:
        raise DatabaseUnavailableError("the connection has no driver connection (it was invalidated)")
    return driver


def create_database(settings: Settings) -> Database:
    """Build the engine for ``settings.database_url`` with pragmas, pool and timeouts, and wrap it."""
    url = settings.url
    engine = _sqlite_engine(url, settings) if url.get_backend_name() == "sqlite" else _server_engine(url, settings)
    return Database(engine, settings)


def sqlite_path(url: URL) -> Path | None:
    """The file of a SQLite URL, or ``None`` for an in-memory database."""
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file::memory:") or url.query.get("mode") == "memory":
        return None
    return Path(database)


def _sqlite_engine(url: URL, settings: Settings) -> AsyncEngine:
    path = sqlite_path(url)
    busy_ms = min(settings.query_timeout_ms, SQLITE_MAX_BUSY_MS)
    connect_args: dict[str, Any] = {"timeout": busy_ms / 1000.0, "check_same_thread": False}
    options: dict[str, Any] = {"connect_args": connect_args}
    if path is None:
        # pool_size/max_overflow are not accepted by StaticPool; an in-memory database lives on one connection.
        options["poolclass"] = StaticPool
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        options["pool_size"] = 5
        options["max_overflow"] = 5
        options["pool_timeout"] = settings.query_timeout
        # Every checkout ends its own transaction (writers commit; Connection.close() rolls an open read back), so
        # the pool's own rollback on return is one more hop into aiosqlite's thread per transaction, for nothing.
        options["pool_reset_on_return"] = None
        # Reuse the most recently returned connection: its page cache is the warm one.
        options["pool_use_lifo"] = True
    engine = create_async_engine(url, **options)
    _install_sqlite_hooks(
        engine,
        busy_ms=busy_ms,
        in_memory=path is None,
        timeout_ms=settings.query_timeout_ms,
        cache_kib=settings.sqlite_cache_mib * 1024,
    )
    return engine


def _server_engine(url: URL, settings: Settings) -> AsyncEngine:
    connect_args: dict[str, Any] = {}
    if url.get_backend_name() == "postgresql":
        connect_args = {
            "timeout": max(settings.query_timeout, 1.0),
            # The server cancels an overrunning statement; the client-side timeout is a backstop for a
            # server that stopped answering altogether.
            "server_settings": {"statement_timeout": str(settings.query_timeout_ms)},
            "command_timeout": settings.query_timeout + 5.0,
        }
    engine = create_async_engine(
        url,
        pool_size=settings.pool_size,
        max_overflow=settings.max_overflow,
        pool_timeout=settings.query_timeout,
        connect_args=connect_args,
    )
    # Not pool_pre_ping: its three round trips at every checkout were 2-3 % of the writer's throughput.
    ping_when_idle(engine)
    timeout_ms = settings.query_timeout_ms

    @event.listens_for(engine.sync_engine, "handle_error")
    def _timeout_error(context: ExceptionContext) -> BaseException | None:
        if "canceling statement due to statement timeout" in str(context.original_exception):
            return QueryTimeoutError(timeout_ms, context.statement)
        return None

    return engine


def _install_sqlite_hooks(
    engine: AsyncEngine, *, busy_ms: int, in_memory: bool, timeout_ms: int, cache_kib: int
) -> None:
    sync_engine = engine.sync_engine

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # Take transaction control away from the driver so BEGIN is ours to emit.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            mode = str(cursor.fetchone()[0]).lower()
            if mode != "wal" and not in_memory:
                log.warning("sqlite_wal_unavailable", journal_mode=mode)
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
            # SQLite's default cache is 2 MiB: a query over a table larger than that rereads pages from the OS.
            cursor.execute(f"PRAGMA cache_size=-{int(cache_kib)}")
        finally:
            cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get(_BEGIN_OPTION, "")
        connection.exec_driver_sql(f"BEGIN {mode}".strip())

    @event.listens_for(sync_engine, "before_cursor_execute")
    def _arm_timer(conn: Connection, _cursor: Any, _stmt: str, _params: Any, context: Any, _many: bool) -> None:
        driver = _driver_connection(conn)
        if driver is not None:
            conn.info[_TIMER_KEY] = InterruptTimer(driver, timeout_ms / 1000.0)

    @event.listens_for(sync_engine, "after_cursor_execute")
    def _disarm_timer(conn: Connection, *_args: Any) -> None:
        timer = conn.info.pop(_TIMER_KEY, None)
        if timer is not None:
            timer.cancel()

    @event.listens_for(sync_engine, "handle_error")
    def _timeout_error(context: ExceptionContext) -> BaseException | None:
        conn = context.connection
        if conn is None:
            return None
        timer: InterruptTimer | None = conn.info.pop(_TIMER_KEY, None)
        if timer is None:
            return None
        timer.cancel()
        if timer.timed_out(context.original_exception):
            return QueryTimeoutError(timeout_ms, context.statement)
        return None


def _driver_connection(conn: Connection) -> Any:
    try:
        return conn.connection.driver_connection
    except Exception:  # a connection being invalidated has no driver connection; nothing to arm
        return None
