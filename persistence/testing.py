"""Test helpers users can run in their own CI: a fake clock, real faults for the sidecar's database, breaker waits.

``FakeClock`` is both the ``clock`` and (through :meth:`FakeClock.sleep`) the ``sleep`` a sidecar takes. Time only
moves when the test calls :meth:`FakeClock.advance`; sleepers whose deadline has passed then wake up. A sleep of
zero or less returns at once, so retry policies with no wait never block.

:class:`FaultInjector` breaks a started sidecar's database for real, through SQLAlchemy engine and pool events on
``sidecar.database.engine`` (nothing in the writer is patched): the next N write statements fail with the driver's
own exception class (transient or data), chosen records are refused as poison, statements are delayed, the SQLite
file is full, or another connection holds the write lock. Every fault is a context manager and is removed on exit.
:func:`wait_for_breaker` waits for a breaker state and, given the sidecar's ``FakeClock``, moves it to the
breaker's half-open deadline as needed.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import re
import sqlite3
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

import asyncpg
from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.util import await_only

from persistence.db import schema
from persistence.db.driver import DRIVER_HOOKS
from persistence.db.engine import Database, sqlite_path
from persistence.db.pgcopy import AHEAD_INFO, COPY_HOOKS
from persistence.errors import DatabaseUnavailableError

if TYPE_CHECKING:
    from persistence.sidecar import PersistenceSidecar

__all__ = [
    "DatabaseLock",
    "DiskLimit",
    "FakeClock",
    "FaultInjector",
    "InjectedFaultKind",
    "PoisonRecords",
    "StatementLatency",
    "WriteFaults",
    "wait_for_breaker",
]

InjectedFaultKind = Literal["transient", "data"]
RECORD_TABLES = tuple(table.name for table in schema.RECORD_TABLES)
"""The tables the writer writes records to; ``dead_letters`` is left alone so isolated records can be stored."""
ALL_TABLES = (*RECORD_TABLES, "dead_letters")
SQLITE_UNLIMITED_PAGES = 1_073_741_823
_WRITE_TARGET = re.compile(
    r"^\s*(?:INSERT\s+(?:OR\s+\w+\s+)?INTO|UPDATE(?:\s+OR\s+\w+)?|DELETE\s+FROM)\s+\"?(\w+)\"?", re.IGNORECASE
)
_BREAKER_STATES = ("closed", "open", "half_open")


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._ids = itertools.count()

    def __call__(self) -> float:
        return self._now

    @property
    def now(self) -> float:
        """The current fake time."""
        return self._now

    @property
    def sleepers(self) -> int:
        """How many coroutines are asleep on this clock."""
        return sum(1 for _, _, future in self._sleepers if not future.done())

    @property
    def next_wakeup(self) -> float | None:
        """The earliest deadline of a coroutine asleep on this clock, or ``None``."""
        pending = [deadline for deadline, _, future in self._sleepers if not future.done()]
        return min(pending) if pending else None

    async def sleep(self, seconds: float) -> None:
        """Sleep until the clock has been advanced by ``seconds`` (returns at once for ``seconds <= 0``)."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._ids), future))
        await future

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose deadline has come."""
        if seconds < 0:
            raise ValueError("a monotonic clock never goes back")
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)


# ---------------------------------------------------------------------------------------------- statement faults


def written_table(statement: str) -> str | None:
    """The table an ``INSERT``/``UPDATE``/``DELETE`` writes to, or ``None`` for any other statement."""
    match = _WRITE_TARGET.match(statement)
    return match.group(1).lower() if match else None


class _StatementHook:
    """Sees every statement the sidecar sends, wherever it is sent from, and may delay it or make it fail.

    Three doors, all removed on exit: the engine's ``before_cursor_execute`` event (every statement SQLAlchemy
    executes); on SQLite, the pooled connection's driver hooks (:data:`persistence.db.driver.DRIVER_HOOKS`,
    registered at checkout), which see every statement of a transaction run on the driver's thread, the writer's
    included, and delay it there (the event loop is never blocked); on PostgreSQL, the pooled connection's ``COPY``
    hooks (:data:`persistence.db.pgcopy.COPY_HOOKS`), which see each batch sent by ``COPY`` as an ``INSERT`` into
    its table with its rows.

    While one is installed the writer begins no PostgreSQL transaction ahead (:mod:`persistence.tables.ahead`) and
    rolls back one it holds, so every batch's statements meet the faults; one still being begun when it was
    installed is left alone (it is thrown away).
    """

    def __init__(self, database: Database) -> None:
        self.database = database
        self._installed = False
        self._doors: list[list[Any]] = []

    def _check(self, statement: str, parameters: Any, executemany: bool) -> float:
        """Raise to fail the statement; return seconds to delay it (0 for none)."""
        raise NotImplementedError

    def install(self) -> None:
        """Start seeing statements."""
        if self._installed:
            return
        engine = self.database.engine.sync_engine
        event.listen(engine, "before_cursor_execute", self._before, insert=True)
        if self.database.is_sqlite or self.database.dialect_name == "postgresql":
            event.listen(engine.pool, "checkout", self._hook_driver)
        self.database.faults_installed += 1
        self._installed = True

    def remove(self) -> None:
        """Stop (idempotent)."""
        if not self._installed:
            return
        engine = self.database.engine.sync_engine
        event.remove(engine, "before_cursor_execute", self._before)
        if self.database.is_sqlite or self.database.dialect_name == "postgresql":
            event.remove(engine.pool, "checkout", self._hook_driver)
        for hooks in self._doors:
            if self._check in hooks:
                hooks.remove(self._check)
        self._doors.clear()
        self.database.faults_installed -= 1
        self._installed = False

    def __enter__(self) -> Self:
        self.install()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()

    def _before(
        self, conn: Connection, _cursor: Any, statement: str, parameters: Any, _context: Any, executemany: bool
    ) -> None:
        if conn.info.get(AHEAD_INFO):
            return  # a transaction begun ahead before this was installed: it is thrown away (see the class docstring)
        delay = self._check(statement, parameters, executemany)
        if delay > 0:
            # Runs in SQLAlchemy's greenlet on the loop thread: await through the bridge, never block the loop.
            await_only(asyncio.sleep(delay))

    def _hook_driver(self, _dbapi_connection: Any, connection_record: Any, *_: Any) -> None:
        # SQLite's write transactions run on the driver's thread (persistence.db.driver) and PostgreSQL's batches go by
        # COPY (persistence.db.pgcopy): each asks the pooled connection's hooks first.
        key = DRIVER_HOOKS if self.database.is_sqlite else COPY_HOOKS
        hooks: list[Any] = connection_record.info.setdefault(key, [])
        if self._check not in hooks:
            hooks.append(self._check)
            self._doors.append(hooks)


class WriteFaults(_StatementHook):
    """Makes the next ``count`` write statements to ``tables`` fail with the driver's own exception.

    Each failing statement aborts its transaction, so one failure is one failed write attempt (tenacity retries
    count too). ``kind="transient"`` raises what a locked SQLite database or a terminated PostgreSQL backend
    raises (an ``OperationalError``); ``kind="data"`` raises an ``IntegrityError`` as a constraint or a refusing
    trigger would. Both go through the same error wrapping as a real driver error. Use as a context manager (or
    call :meth:`install` / :meth:`remove`); statements after the ``count``-th pass untouched.
    """

    def __init__(
        self,
        database: Database,
        count: int,
        kind: InjectedFaultKind = "transient",
        *,
        tables: tuple[str, ...] = RECORD_TABLES,
    ) -> None:
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count!r}")
        if kind not in ("transient", "data"):
            raise ValueError(f"kind must be 'transient' or 'data', got {kind!r}")
        super().__init__(database)
        self.remaining = count
        self.kind: InjectedFaultKind = kind
        self.tables = frozenset(table.lower() for table in tables)
        self.failed: list[str] = []
        """The statements that were made to fail, in order."""

    def _check(self, statement: str, parameters: Any, executemany: bool) -> float:
        if self.remaining <= 0 or written_table(statement) not in self.tables:
            return 0.0
        self.remaining -= 1
        self.failed.append(statement)
        raise driver_error(self.database, self.kind)


def driver_error(database: Database, kind: InjectedFaultKind) -> Exception:
    """An exception of the database driver's own class, as a real fault of this ``kind`` raises it."""
    dbapi: Any = database.engine.dialect.loaded_dbapi
    error: Exception
    if database.is_sqlite:
        if kind == "data":
            error = dbapi.IntegrityError("CHECK constraint failed: injected by persistence.testing")
        else:
            error = dbapi.OperationalError("database is locked")
        return error
    if kind == "data":
        error = dbapi.IntegrityError("IntegrityError: injected constraint violation (persistence.testing)")
        sqlstate = "23514"  # check_violation
    else:
        error = dbapi.OperationalError(
            "AdminShutdownError: terminating connection due to administrator command (persistence.testing)"
        )
        sqlstate = "57P01"  # admin_shutdown, what pg_terminate_backend produces
    error.pgcode = error.sqlstate = sqlstate  # type: ignore[attr-defined]
    return error


class PoisonRecords(_StatementHook):
    """Makes every write statement that carries one of ``keys`` (a natural key such as a ``trade_id``) fail with a
    data error, as a constraint or a refusing trigger would for that record alone.

    Unlike :class:`WriteFaults` the fault follows the record, so the writer's batch splitting isolates exactly
    these records and dead-letters them while the rest of each batch commits. ``dead_letters`` itself is never
    refused. Use as a context manager (or :meth:`install` / :meth:`remove`).
    """

    def __init__(self, database: Database, keys: tuple[str, ...], *, tables: tuple[str, ...] = RECORD_TABLES) -> None:
        super().__init__(database)
        self.keys = frozenset(keys)
        self.tables = frozenset(table.lower() for table in tables)
        self.refused = 0
        """How many statements were refused."""

    def _check(self, statement: str, parameters: Any, executemany: bool) -> float:
        if written_table(statement) not in self.tables:
            return 0.0
        rows = parameters if executemany else [parameters]
        if rows and not isinstance(rows[0], Mapping | tuple | list):
            rows = [rows]  # one flat parameter list (a multi-row VALUES statement): one row of values
        for row in rows or ():
            values = row.values() if isinstance(row, Mapping) else row
            if any(isinstance(value, str) and value in self.keys for value in values or ()):
                self.refused += 1
                raise driver_error(self.database, "data")
        return 0.0


class StatementLatency(_StatementHook):
    """Delays statements by ``seconds`` without blocking the event loop.

    The delay is an ``await asyncio.sleep`` (from the engine's ``before_cursor_execute`` event through SQLAlchemy's
    greenlet bridge, the way the async drivers themselves are awaited), or for a statement run on SQLite's driver
    thread a wait on that thread, so other tasks, the hot path included, keep running while the writer's statement
    waits. The delay comes *before* the statement reaches the driver:
    it adds to the write latency the sidecar measures, but not to ``DATABASE_QUERY_TIMEOUT`` (that bounds the
    statement inside the database). ``writes_only`` limits it to ``INSERT``/``UPDATE``/``DELETE`` on the sidecar's
    tables; otherwise every statement, reads and ``BEGIN`` included, is delayed.
    """

    def __init__(self, database: Database, seconds: float, *, writes_only: bool = True) -> None:
        if not seconds >= 0:
            raise ValueError(f"seconds must be >= 0, got {seconds!r}")
        super().__init__(database)
        self.seconds = seconds
        self.writes_only = writes_only
        self.delayed = 0
        """How many statements were delayed."""

    def _check(self, statement: str, parameters: Any, executemany: bool) -> float:
        if self.writes_only and written_table(statement) not in ALL_TABLES:
            return 0.0
        self.delayed += 1
        return self.seconds


# ---------------------------------------------------------------------------------------------- a full disk


class DiskLimit:
    """A full disk for a SQLite database: ``PRAGMA max_page_count`` on every connection the engine hands out.

    :meth:`fill` caps the file at the pages it has now (after a WAL checkpoint), so the next write that needs a
    new page fails with SQLite's own "database or disk is full"; :meth:`free` lifts the cap. :meth:`remove`
    frees and detaches: every connection that was capped is uncapped at its next checkout, and the pool hook goes
    away once none is left capped. PostgreSQL has no per-connection size limit; there this raises.
    """

    _FLAG = "persistence_testing_disk_limited"

    def __init__(self, database: Database) -> None:
        if not database.is_sqlite:
            raise NotImplementedError("a full disk can only be simulated on SQLite (PRAGMA max_page_count)")
        self.database = database
        self.max_pages: int | None = None
        self._capped: set[int] = set()
        self._removing = False
        event.listen(database.engine.sync_engine.pool, "checkout", self._apply)

    def _apply(self, dbapi_connection: Any, record: ConnectionPoolEntry, *_: Any) -> None:
        # Runs on the loop thread (in SQLAlchemy's greenlet); the cursor call below yields to the loop.
        if self._removing and id(record) not in self._capped:
            return
        limit = self.max_pages if self.max_pages is not None and not self._removing else SQLITE_UNLIMITED_PAGES
        if limit == SQLITE_UNLIMITED_PAGES:
            self._capped.discard(id(record))
        else:
            self._capped.add(id(record))
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA max_page_count = {int(limit)}")
        finally:
            cursor.close()
        if self._removing and not self._capped:
            asyncio.get_running_loop().call_soon(self._detach)

    def fill(self, path: Path | None = None) -> None:
        """Allow no more pages than the file has now (blocking; a few milliseconds)."""
        target = path if path is not None else sqlite_path(self.database.settings.url)
        if target is None:
            raise NotImplementedError("an in-memory SQLite database has no disk to fill")
        with sqlite3.connect(target, timeout=10) as connection:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.max_pages = int(connection.execute("PRAGMA page_count").fetchone()[0])
        connection.close()

    def free(self) -> None:
        """Lift the cap: connections checked out from now on may grow the file again."""
        self.max_pages = None

    def remove(self) -> None:
        """Free, and detach once every capped connection has been uncapped (at its next checkout)."""
        self.max_pages = None
        self._removing = True
        if not self._capped:
            self._detach()

    def _detach(self) -> None:
        pool = self.database.engine.sync_engine.pool
        if event.contains(pool, "checkout", self._apply):
            event.remove(pool, "checkout", self._apply)


# ---------------------------------------------------------------------------------------------- a held lock


class DatabaseLock:
    """Another connection holding the database's write lock.

    SQLite: a separate ``sqlite3`` connection in ``BEGIN EXCLUSIVE`` (acquired in a worker thread, so the event
    loop never waits on it). PostgreSQL: an ``asyncpg`` connection holding ``LOCK TABLE … IN ACCESS EXCLUSIVE
    MODE`` on the sidecar's tables in an open transaction; the sidecar's statements wait until
    ``statement_timeout`` cancels them. Release rolls back and closes the connection.
    """

    TABLES = ", ".join(ALL_TABLES)

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self._sqlite: sqlite3.Connection | None = None
        self._pg: asyncpg.Connection | None = None

    @property
    def held(self) -> bool:
        """Whether the lock is held now."""
        return self._sqlite is not None or self._pg is not None

    async def acquire(self) -> None:
        """Take the lock (waits for the sidecar's transaction in flight, up to 10 s)."""
        if self.held:
            return
        url = make_url(self._url)
        if url.get_backend_name() == "sqlite":
            self._sqlite = await asyncio.to_thread(_exclusive_sqlite, url.database or "")
        else:
            connection = await asyncpg.connect(
                host=url.host, port=url.port or 5432, user=url.username, password=url.password, database=url.database
            )
            try:
                await connection.execute("BEGIN")
                await connection.execute(f"LOCK TABLE {self.TABLES} IN ACCESS EXCLUSIVE MODE")
            except BaseException:
                await connection.close()
                raise
            self._pg = connection

    async def release(self) -> None:
        """Give the lock back (idempotent)."""
        sqlite_connection, self._sqlite = self._sqlite, None
        if sqlite_connection is not None:
            # Off the loop, like the acquisition: the demo's chaos mode uses this lock while trading goes on.
            await asyncio.to_thread(_rollback_and_close, sqlite_connection)
        pg_connection, self._pg = self._pg, None
        if pg_connection is not None:
            try:
                await pg_connection.execute("ROLLBACK")
            finally:
                await pg_connection.close()

    async def __aenter__(self) -> Self:
        await self.acquire()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.release()


def _rollback_and_close(connection: sqlite3.Connection) -> None:
    connection.rollback()
    connection.close()


def _exclusive_sqlite(path: str) -> sqlite3.Connection:
    connection = sqlite3.connect(path, isolation_level=None, timeout=10, check_same_thread=False)
    try:
        connection.execute("BEGIN EXCLUSIVE")
    except BaseException:
        connection.close()
        raise
    return connection


# ---------------------------------------------------------------------------------------------- the injector


class FaultInjector:
    """Real faults for a started sidecar's database; every method is a context manager that cleans up on exit.

    Built on the engine of ``sidecar.database`` at construction: after the sidecar is replaced, or persistence is
    switched off and on, make a new injector.
    """

    def __init__(self, sidecar: PersistenceSidecar) -> None:
        database = sidecar.database
        if database is None:
            raise DatabaseUnavailableError("the sidecar has no database: start it first, with persistence enabled")
        self.sidecar = sidecar
        self.database = database

    @contextmanager
    def fail_writes(
        self, count: int, kind: InjectedFaultKind = "transient", *, tables: tuple[str, ...] = RECORD_TABLES
    ) -> Iterator[WriteFaults]:
        """Fail the next ``count`` write statements to ``tables`` (see :class:`WriteFaults`)."""
        with WriteFaults(self.database, count, kind, tables=tables) as faults:
            yield faults

    @contextmanager
    def poison(self, *keys: str, tables: tuple[str, ...] = RECORD_TABLES) -> Iterator[PoisonRecords]:
        """Refuse the records with these natural keys with a data error (see :class:`PoisonRecords`)."""
        with PoisonRecords(self.database, keys, tables=tables) as refusing:
            yield refusing

    @contextmanager
    def latency(self, seconds: float, *, writes_only: bool = True) -> Iterator[StatementLatency]:
        """Delay statements by ``seconds`` without blocking the loop (see :class:`StatementLatency`)."""
        with StatementLatency(self.database, seconds, writes_only=writes_only) as delay:
            yield delay

    @asynccontextmanager
    async def full_disk(self) -> AsyncIterator[DiskLimit]:
        """SQLite only: the database file cannot grow while inside; space comes back on exit."""
        limit = DiskLimit(self.database)
        try:
            await asyncio.to_thread(limit.fill)
            yield limit
        finally:
            limit.remove()

    @asynccontextmanager
    async def lock(self) -> AsyncIterator[DatabaseLock]:
        """Another connection holds the write lock while inside (see :class:`DatabaseLock`)."""
        async with DatabaseLock(self.database.settings.database_url) as held:
            yield held


# ---------------------------------------------------------------------------------------------- breaker waits


async def wait_for_breaker(
    sidecar: PersistenceSidecar,
    state: str,
    *,
    clock: FakeClock | None = None,
    timeout: float = 10.0,
    interval: float = 0.005,
) -> None:
    """Wait until ``sidecar.breaker_state == state``; raise ``TimeoutError`` after ``timeout`` real seconds.

    With the sidecar's ``FakeClock`` as ``clock``, fake time is moved on whenever the sidecar is waiting on it: an
    open breaker's clock goes to its half-open deadline when the wanted state lies beyond ``open``, and otherwise
    to the next wake-up of whatever sleeps on the clock (a retry backoff, the writer's idle sleep). So no test
    waits out a backoff or the reset period, whatever the retry policy. Without ``clock``, the real reset period
    must pass within ``timeout``.
    """
    if state not in _BREAKER_STATES:
        raise ValueError(f"state must be one of {_BREAKER_STATES}, got {state!r}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while sidecar.breaker_state != state:
        writer = sidecar.writer
        if clock is not None and writer is not None:
            for _ in range(3):
                await asyncio.sleep(0)  # let a sleep that was just scheduled start: it reads the clock then
            if sidecar.breaker_state == state:
                return
            remaining = 0.0
            if state != "open" and sidecar.breaker_state == "open":
                remaining = writer.breaker.seconds_until_half_open(clock())
            wakeup = clock.next_wakeup
            if remaining > 0:
                clock.advance(remaining)
            elif wakeup is not None:
                clock.advance(max(wakeup - clock(), 0.0))
        if loop.time() > deadline:
            raise TimeoutError(f"the breaker stayed {sidecar.breaker_state!r}, not {state!r}, for {timeout} s")
        await asyncio.sleep(interval)
