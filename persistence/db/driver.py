"""SQLite statements run on aiosqlite's own thread, many to one call: a whole write transaction in one hop.

aiosqlite runs every call on the connection's thread while the event loop waits for it; a write transaction of seven
statements (begin, read the stored rows, claim, overwrite, read the chain's head, append the entries, commit) was
seven hops, each with Python work on both sides and a thread hand-off in between. Here a function of a
:class:`DriverSession` runs as one call on that thread and issues its statements straight on the ``sqlite3``
connection: the loop waits once per transaction.

What the statements went through before is kept:

* every statement is bounded by ``DATABASE_QUERY_TIMEOUT``: a :class:`StatementWatch`, armed on the event loop, reads
  when the running statement started and interrupts it (``sqlite3.Connection.interrupt()``, safe from any thread)
  once it overruns; the interrupted statement raises :class:`~persistence.errors.QueryTimeoutError`;
* a driver error is raised as SQLAlchemy's exception type of it (as the engine raises it), so
  :func:`persistence.write.faults.classify` sorts it the same;
* the callables in a pooled connection's ``info`` under :data:`DRIVER_HOOKS` see each statement first: the fault kit
  (:mod:`persistence.testing`) registers there, as it does for PostgreSQL's ``COPY``.

aiosqlite has no public call for "run this function on your thread"; its ``_execute`` queue is the one SQLAlchemy's
own adapter feeds (``AsyncAdapt_aiosqlite_connection``), and :func:`on_driver_thread` is the only place that uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError

from persistence.errors import DatabaseUnavailableError, QueryTimeoutError, StatementAbandoned

T = TypeVar("T")

DRIVER_HOOKS = "persistence.driver_hooks"
"""Key in a pooled SQLite connection's ``info`` of the callables that see each statement of a driver call first.

Each is called on the driver's thread as ``hook(statement, parameters, executemany)`` and returns seconds to wait
first (the driver's thread waits; the event loop does not), or raises to fail the statement.
"""
StatementHook = Callable[[str, Any, bool], float]


class StatementWatch:
    """Bounds each statement of one driver call by ``seconds``: armed on the loop, told by the thread what runs.

    The thread sets one attribute per statement (its number and start time, one tuple, so the loop never reads half
    of it); the loop's timer fires every ``seconds`` at most and interrupts a statement that has run that long.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.connection: sqlite3.Connection | None = None
        self._running: tuple[int, float] | None = None
        self._count = 0
        self._fired: int | None = None
        self._abandoned = False
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ the event loop's side

    def arm(self) -> None:
        """Start watching (on the event loop)."""
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_later(self.seconds, self._check)

    def disarm(self) -> None:
        """Stop watching: the call is over."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def abandon(self) -> None:
        """The caller gave up on the call (cancelled): stop its statement now and start no other."""
        self._abandoned = True
        self._interrupt()

    def _check(self) -> None:
        running = self._running
        now = time.monotonic()
        if running is not None and now - running[1] >= self.seconds:
            self._fired = running[0]
            self._interrupt()
        wait = self.seconds if running is None else max(running[1] + self.seconds - now, 0.001)
        if self._loop is not None and self._handle is not None:
            self._handle = self._loop.call_later(wait, self._check)

    def _interrupt(self) -> None:
        connection = self.connection
        if connection is not None:
            connection.interrupt()

    # ------------------------------------------------------------------ the driver thread's side

    def started(self) -> None:
        """A statement starts now (on the driver's thread)."""
        if self._abandoned:
            raise StatementAbandoned("the caller was cancelled")
        self._count += 1
        self._running = (self._count, time.monotonic())

    def finished(self) -> None:
        """The statement is over (on the driver's thread)."""
        self._running = None

    def timed_out(self, error: BaseException) -> bool:
        """Whether ``error`` is the current statement being interrupted by this watch."""
        return self._fired == self._count and "interrupted" in str(error).lower()


class DriverSession:
    """The ``sqlite3`` connection inside one driver call: statements bounded, hooks told, errors translated."""

    def __init__(
        self, connection: sqlite3.Connection, watch: StatementWatch, hooks: Sequence[StatementHook], timeout_ms: int
    ) -> None:
        self.connection = connection
        self._watch = watch
        self._hooks = tuple(hooks)
        self._timeout_ms = timeout_ms

    def execute(self, sql: str, parameters: Sequence[Any] = ()) -> list[Any]:
        """Run one statement; its rows."""
        return self._run(sql, parameters, False)  # type: ignore[no-any-return]

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        """Run one statement for each of ``rows``; how many rows it changed (triggers' changes not counted)."""
        if not rows:
            return 0
        return self._run(sql, rows, True)  # type: ignore[no-any-return]

    def _run(self, sql: str, parameters: Any, many: bool) -> Any:
        watch = self._watch
        try:
            for hook in self._hooks:
                delay = hook(sql, parameters, many)
                if delay > 0:
                    time.sleep(delay)  # the driver's thread waits, as a slow statement would; the loop goes on
            watch.started()
            try:
                if many:
                    return self.connection.executemany(sql, parameters).rowcount
                return self.connection.execute(sql, parameters).fetchall()
            finally:
                watch.finished()
        except sqlite3.Error as error:
            if watch.timed_out(error):
                raise QueryTimeoutError(self._timeout_ms, sql) from error
            raise DBAPIError.instance(sql, None, error, sqlite3.Error) from error


def transaction(begin: str, work: Callable[[DriverSession], T], session: DriverSession) -> T:
    """``begin``, ``work``, ``COMMIT`` on the driver's thread; rolled back if anything fails."""
    session.execute(begin)
    try:
        result = work(session)
        session.execute("COMMIT")
    except BaseException:
        if session.connection.in_transaction:
            # The first error says what happened; a connection that cannot roll back rolls back when it is closed.
            with contextlib.suppress(sqlite3.Error):
                session.connection.execute("ROLLBACK")
        raise
    return result


async def on_driver_thread(
    driver: Any, work: Callable[[DriverSession], T], *, hooks: Sequence[StatementHook], timeout_ms: int
) -> T:
    """Run ``work`` as one call on the thread of ``driver`` (an aiosqlite connection), each statement bounded.

    If the caller is cancelled meanwhile, the running statement is interrupted, no further one starts, and the call
    is waited for (so the connection goes back to its pool idle) before the cancellation goes on.
    """
    watch = StatementWatch(timeout_ms / 1000.0)

    def call() -> T:
        connection: sqlite3.Connection | None = driver._connection
        if connection is None:
            raise DatabaseUnavailableError("the SQLite connection is closed")
        watch.connection = connection
        return work(DriverSession(connection, watch, hooks, timeout_ms))

    hop: asyncio.Future[T] = asyncio.ensure_future(driver._execute(call))
    watch.arm()
    try:
        return await asyncio.shield(hop)
    except asyncio.CancelledError:
        if not hop.done():
            watch.abandon()
            await asyncio.wait([hop])
        if not hop.cancelled():
            hop.exception()  # retrieved: the cancellation is what the caller hears of
        raise
    finally:
        watch.disarm()
