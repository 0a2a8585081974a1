"""PostgreSQL batch writes: binary ``COPY`` into a staging table, then one ``INSERT … SELECT … ON CONFLICT``.

``executemany`` of an upsert makes the server plan and run one ``INSERT`` per row; for a batch of 500 trades that
was about six times the time of asyncpg's binary ``COPY`` of the same rows. Here a batch is copied into a temporary
table of the same columns (one per connection, emptied by the statement that reads it, and at commit) and moved
into the real table by one statement that keeps the repositories' rules: upserts keyed by the natural id, and the
same ``WHERE`` that lets no older version overwrite a newer one. Everything runs inside the caller's transaction,
on the asyncpg connection under SQLAlchemy's; driver errors come out as SQLAlchemy's ``DBAPIError`` carrying the
SQLSTATE, so :func:`persistence.write.faults.classify` sorts them as it sorts every other error.

Small batches (the steady trickle of one or two records per transaction) take ``executemany``: three round trips
instead of one or two would cost more than the ``COPY`` saves.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping, Sequence
from operator import itemgetter
from typing import Any

from sqlalchemy import Table
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from persistence.db.engine import driver_of
from persistence.errors import QueryTimeoutError

COPY_MIN_ROWS = 16
"""Batches smaller than this take ``executemany``; measured in ``make bench`` (PostgreSQL burst and steady)."""
AHEAD_INFO = "persistence.begun_ahead"
"""Key in a pooled connection's ``info``, present while it holds a transaction begun ahead
(:mod:`persistence.tables.ahead`): a speculation the writer may throw away, which the fault kit's hooks leave alone."""
COPY_HOOKS = "persistence.copy_hooks"
"""Key in a pooled connection's ``info`` of the callables that see each ``COPY`` before it is sent.

Each is called as ``hook(statement, rows, True)`` (the shape of a ``before_cursor_execute`` listener's statement,
parameters and ``executemany``) and returns seconds to wait first, or raises to fail the batch. The fault kit
(:mod:`persistence.testing`) registers here: the rows never pass through SQLAlchemy's cursor events.
"""


class CopyUpsert:
    """One table's ``COPY`` + ``INSERT … SELECT`` statements, built once per repository.

    ``conflict`` is the ``ON CONFLICT`` clause, written against the target table's name and ``excluded``; without one
    (``None``, for a table that is only ever appended to) the rows are copied straight into the table.
    """

    def __init__(
        self,
        table: Table,
        columns: Sequence[str],
        conflict: str | None,
        timeout_ms: int,
        *,
        returning: str | None = None,
    ) -> None:
        self.table = table.name
        self.columns = list(columns)
        # Named after its columns too: two statements of one table with different columns (the claim's carries the
        # drawn ids, the overwrite's does not) must not share one temporary table, created by whichever came first.
        self.stage = f"stage_{table.name}_{hashlib.sha256(','.join(self.columns).encode()).hexdigest()[:8]}"
        names = ", ".join(self.columns)
        # Table and column names come from the schema, never from input; values go by COPY.
        # Each staged row carries its position in the batch (staged_order): new rows take their surrogate ids in the
        # order they were recorded, which the order a DELETE … RETURNING happens to give does not promise.
        self.prepare_sql = (
            f"CREATE TEMPORARY TABLE IF NOT EXISTS {self.stage} ON COMMIT DELETE ROWS AS "  # noqa: S608
            f"SELECT {names}, 0::integer AS staged_order FROM {table.name} WITH NO DATA"
        )
        # The staged rows are read and deleted in one statement, so a second batch in the same transaction starts
        # from an empty stage. Each key comes once, as ON CONFLICT requires. ``returning`` names the column
        # whose values of the rows really written come back.
        returned = f" RETURNING {returning}" if returning else ""
        self.move_sql = (
            f"WITH staged AS (DELETE FROM pg_temp.{self.stage} RETURNING {names}, staged_order) "  # noqa: S608
            f"INSERT INTO {table.name} ({names}) SELECT {names} FROM staged ORDER BY staged_order {conflict}{returned}"
        )
        self._returning = returning
        self._direct = conflict is None
        self.announced_sql = f"INSERT INTO {table.name} ({names}) VALUES (COPY through pg_temp.{self.stage})"  # noqa: S608
        """What :data:`COPY_HOOKS` are told is being sent: the rows' target table, as an ``INSERT`` would say."""
        self._row = itemgetter(*self.columns)
        self._timeout_ms = timeout_ms

    def rows(self, values: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
        """The driver rows of ``values`` (column → value mappings), in the copy's column order."""
        row = self._row
        if len(self.columns) == 1:
            return [(row(value),) for value in values]
        return [row(value) for value in values]

    async def _driver(self, connection: AsyncConnection, rows: list[tuple[Any, ...]]) -> Any:
        """The asyncpg connection under ``connection``, once the :data:`COPY_HOOKS` have seen ``rows``."""
        driver = await driver_of(connection)
        raw = await connection.get_raw_connection()
        try:
            for hook in () if raw.info.get(AHEAD_INFO) else tuple(raw.info.get(COPY_HOOKS, ())):
                delay = hook(self.announced_sql, rows, True)
                if delay > 0:
                    await asyncio.sleep(delay)
        except Exception as error:
            raise self._translate(self.announced_sql, error) from error
        return driver

    async def warm(self, connection: AsyncConnection) -> None:
        """Have asyncpg look this copy's table up on ``connection`` now, inside the caller's begun transaction (which
        is rolled back): it does so at a connection's first ``COPY`` into a table (a catalog query and a round trip),
        which would otherwise land in the first batch after a start. An empty ``COPY``; the stage is left alone."""
        driver = await driver_of(connection)
        await driver.copy_records_to_table(self.table, records=[], columns=self.columns)

    async def write_new(self, connection: AsyncConnection, values: Sequence[Mapping[str, Any]]) -> bool:
        """Copy ``values`` straight into the table if none of their keys is there yet; ``False`` (nothing written) if
        one is.

        The common case of a batch of new records, at the cost of a plain ``COPY``: no stage, no second statement.
        A savepoint keeps the caller's transaction when a key is already there (a replay, another process's row);
        the caller then takes :meth:`write`. A savepoint that is not rolled back stays open until the commit (a later
        one of the same name, for the next table, is the one a rollback goes back to). The transaction must have
        begun (a statement through SQLAlchemy).
        """
        from asyncpg import UniqueViolationError  # here: SQLite-only processes never load the PostgreSQL driver

        rows = self.rows(values)
        driver = await self._driver(connection, rows)
        try:
            await driver.execute("SAVEPOINT persistence_copy")
            try:
                await driver.copy_records_to_table(self.table, records=rows, columns=self.columns)
            except UniqueViolationError:
                await driver.execute("ROLLBACK TO SAVEPOINT persistence_copy")
                return False
            # Not released: the commit ends it with the transaction, and a RELEASE is one more round trip a batch.
            return True
        except Exception as error:
            raise self._translate(self.announced_sql, error) from error

    async def write(self, connection: AsyncConnection, values: Sequence[Mapping[str, Any]]) -> list[Any]:
        """Copy ``values`` into the stage and move them into the table, inside ``connection``'s transaction.

        Returns the ``returning`` column's value of each row written (an empty list without ``returning``).
        """
        # Through SQLAlchemy, so that its transaction on this connection has begun before the driver is used (a direct
        # copy is only ever made after the caller's own statements in the transaction).
        if not self._direct:
            await connection.exec_driver_sql(self.prepare_sql)
        statement = self.announced_sql
        rows = self.rows(values)
        driver = await self._driver(connection, rows)
        try:
            if self._direct:
                await driver.copy_records_to_table(self.table, records=rows, columns=self.columns)
                return []
            ordered = [(*row, position) for position, row in enumerate(rows)]
            columns = [*self.columns, "staged_order"]
            await driver.copy_records_to_table(self.stage, records=ordered, columns=columns, schema_name="pg_temp")
            statement = self.move_sql
            if self._returning is None:
                await driver.execute(self.move_sql)
                return []
            return [record[0] for record in await driver.fetch(self.move_sql)]
        except Exception as error:
            raise self._translate(statement, error) from error

    def _translate(self, statement: str, error: Exception) -> Exception:
        if isinstance(error, OSError | TimeoutError | DBAPIError):
            return error
        if "canceling statement due to statement timeout" in str(error):
            return QueryTimeoutError(self._timeout_ms, statement)
        translated = DBAPIError.instance(statement, None, error, Exception)
        return translated if isinstance(translated, Exception) else error
