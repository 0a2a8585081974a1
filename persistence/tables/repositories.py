"""Reads and batched upserts for the five tables.

Repositories take a :class:`~persistence.db.engine.Database` (the engine factory's product), never a URL. Each write
method has two forms: ``save_*`` opens its own write transaction, and ``upsert`` / ``insert`` take an open
connection so the writer can put a whole batch of mixed records into one transaction. Upserts are keyed by the
natural id, so a replay never creates a second row; a trade's ``updated_at`` guards the update, so an older version
never overwrites a newer one, and a signal that is already ``executed`` is never reset by a replay of its earlier,
unexecuted version (:mod:`persistence.tables.versioned` applies the rules). Every version written, by either form, is
appended to the audit trail in the same transaction (:mod:`persistence.audit.trail`), and every row carries the
``instance_id`` of the process that wrote it.

Sorting is only ever by a column from a fixed set; anything else raises
:class:`~persistence.errors.InvalidQueryError` before any SQL is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, Generic

from sqlalchemy import ColumnElement, Select, Table, bindparam, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from persistence.audit.chain import BASELINE_INSTANCE, AuditHead, Version
from persistence.audit.trail import AuditLog, DriverAppender
from persistence.db.driver import DriverSession
from persistence.db.engine import Database
from persistence.db.rowcodec import DriverBatch, RowReader
from persistence.db.schema import TABLE_OF, TABLES, dead_letters, signals, trades
from persistence.records.models import (
    ParameterChange,
    PerformanceSnapshot,
    Record,
    RecordT,
    Signal,
    SignalExecution,
    Trade,
    utc_now,
)
from persistence.records.registry import BY_ENTITY, RECORD_KINDS
from persistence.tables.ahead import BEGIN_SQL, AheadTransactions, Parts
from persistence.tables.queries import (
    MAX_PAGE_SIZE,
    SignalQuery,
    TradeQuery,
    check_page,
    check_session,
    date_range,
    order_by,
)
from persistence.tables.versioned import Claimed, VersionedTable, never
from persistence.tools import export as history_export
from persistence.tools.export import ExportResult


@dataclass(frozen=True, slots=True)
class Page(Generic[RecordT]):
    """One page of a query: the records, and the total number matching when it was asked for."""

    items: list[RecordT]
    limit: int
    offset: int
    total: int | None = None


@dataclass(frozen=True, slots=True)
class BatchWritten:
    """What one batch's transaction did: the execution updates whose signal does not exist (dead-lettered in the
    same transaction), and the audit chain's head after its last entry (``None``: it appended none)."""

    unknown: list[SignalExecution]
    audit_head: AuditHead | None


@dataclass(frozen=True, slots=True)
class DeadLetterRow:
    """A row of ``dead_letters`` read back: a record that can never be written, with the error that condemned it."""

    entity: str
    natural_key: str
    payload: dict[str, Any]
    error: str
    error_class: str
    created_at: datetime


WARM_LOCK_WAIT = 0.1
"""Seconds the start-up warming of the writer's connections waits for a lock before giving up on it."""
AMENDMENT_RULES: Mapping[str, Callable[[Mapping[str, Any], Mapping[str, Any]], bool]] = {
    TABLE_OF[kind.entity].name: kind.replaces for kind in RECORD_KINDS if kind.replaces is not None
}
"""The rule of each table whose rows are amended (``replaces(new, stored)``); the other tables keep the first version.
A ``copy`` applies the same rules (:func:`persistence.tools.copy.copy_database`)."""


async def _write_audited(
    audit: AuditLog,
    table: VersionedTable[Any],
    connection: AsyncConnection,
    records: Sequence[Record],
    changes: Sequence[tuple[str, Change]] = (),
) -> tuple[list[Version], list[int], AuditHead | None]:
    """Write ``records`` (then ``changes``) through ``table`` and audit every version written, in one transaction.

    The chain lock comes first (before any row lock); returns the versions, the changes whose key has no row, and the
    chain's head after the entries (``None`` when nothing was appended). On SQLite it is one call on the driver's
    thread (:func:`_write_audited_on`).
    """
    if not records and not changes:
        return [], [], None
    if audit.database.is_sqlite:
        return await audit.database.on_driver(
            connection, partial(_write_audited_on, audit, table, records=records, changes=changes)
        )
    await audit.lock(connection)
    versions, missing = await table.write(connection, table.rows(records), changes)
    return versions, missing, await audit.append(connection, versions)


def _write_audited_on(
    audit: AuditLog,
    table: VersionedTable[Any],
    session: DriverSession,
    records: Sequence[Record],
    changes: Sequence[tuple[str, Change]],
    appender: DriverAppender | None = None,
) -> tuple[list[Version], list[int], AuditHead | None]:
    """:func:`_write_audited` on SQLite's driver thread; ``appender`` carries the chain through a longer transaction."""
    appender = appender if appender is not None else audit.appender_on(session)
    if not records and not changes:
        return [], [], appender.appended
    versions, missing = table.write_on(session, table.rows(records), changes)
    appender.append(versions)
    return versions, missing, appender.appended


Change = Callable[[dict[str, Any]], dict[str, Any]]


def _executed(change: SignalExecution, stored: dict[str, Any]) -> dict[str, Any]:
    return {**stored, "executed": change.executed, "execution_status": change.execution_status}


def _versioned(database: Database, model: type[RecordT]) -> VersionedTable[RecordT]:
    """The versioned writes of ``model``'s table, under its registered rule (append-only: the first version stays)."""
    kind = BY_ENTITY[model.entity]
    (key,) = kind.natural_key
    return VersionedTable(database, TABLE_OF[kind.entity], key, model, kind.replaces or never)


def _columns(table: Table) -> list[Any]:
    return [column for column in table.c if column.name not in ("id", "instance_id")]


class TradeRepository:
    """Trades: batched upserts for the writer, and the read queries the API and users need."""

    def __init__(self, database: Database, audit: AuditLog | None = None) -> None:
        self._db = database
        self._audit = audit if audit is not None else AuditLog(database)
        self._versions = _versioned(database, Trade)
        self._reader = RowReader(_columns(trades), Trade, sqlite=database.is_sqlite)
        self._select = select(*self._reader.columns)

    async def upsert(self, connection: AsyncConnection, batch: Sequence[Trade]) -> list[Version]:
        """Insert or update ``batch``, in order, inside the caller's transaction; the versions written (and audited)."""
        versions, _, _ = await _write_audited(self._audit, self._versions, connection, batch)
        return versions

    async def save_trade(self, trade: Trade | Mapping[str, Any]) -> None:
        """Insert or update one trade in its own transaction (the writer batches instead)."""
        record = Trade.parse(trade)
        async with self._db.write() as connection:
            await self.upsert(connection, [record])

    async def get_trade_by_id(self, trade_id: str) -> Trade | None:
        """The trade with this ``trade_id``, or ``None``."""
        rows = await self._fetch(self._select.where(trades.c.trade_id == trade_id))
        return rows[0] if rows else None

    async def get_recent_trades(self, limit: int = 100) -> list[Trade]:
        """The ``limit`` most recent trades by entry time, newest first."""
        check_page(limit, 0)
        return await self._fetch(self._select.order_by(*order_by(trades, "entry_time", "desc")).limit(limit))

    async def get_latest_trades(self, limit: int, instance_id: str | None = None) -> list[Trade]:
        """The ``limit`` most recently recorded trades (by ``updated_at``), oldest first, for history loading.

        With ``instance_id``, only the trades that orchestrator wrote last, and those no orchestrator is known to
        have written: the ``pre-audit`` rows from before the audit trail and rows with no instance id (written by
        something other than the sidecar). Another orchestrator's trades on a shared database are left out.
        """
        statement = self._select
        if instance_id is not None:
            column = trades.c.instance_id
            statement = statement.where(
                or_(column == instance_id, column == BASELINE_INSTANCE, column.is_(None)),
            )
        # Walking idx_trades_updated_at backwards and reversing here avoids sorting the whole window in SQL.
        newest = await self._fetch(statement.order_by(trades.c.updated_at.desc(), trades.c.id.desc()).limit(limit))
        newest.reverse()
        return newest

    async def get_trades_by_session(
        self, session: str, start_date: datetime | None = None, end_date: datetime | None = None
    ) -> list[Trade]:
        """Trades of one trading session (TOKYO, LONDON, …), optionally within an entry-time range, oldest first."""
        conditions = [
            trades.c.session == check_session(session),
            *date_range(trades.c.entry_time, start_date, end_date),
        ]
        return await self._fetch(self._select.where(*conditions).order_by(trades.c.entry_time, trades.c.id))

    async def get_trades_by_pattern(
        self, pattern_type: str, start_date: datetime | None = None, end_date: datetime | None = None
    ) -> list[Trade]:
        """Trades of one pattern type, optionally within an entry-time range, oldest first."""
        conditions = [
            trades.c.pattern_type == pattern_type,
            *date_range(trades.c.entry_time, start_date, end_date),
        ]
        return await self._fetch(self._select.where(*conditions).order_by(trades.c.entry_time, trades.c.id))

    async def query(
        self, query: TradeQuery | None = None, /, *, with_total: bool = False, **filters: Any
    ) -> Page[Trade]:
        """Trades matching a :class:`~persistence.tables.queries.TradeQuery` (or its fields given as keywords), one
        page.

        ``with_total`` also counts every matching trade over all pages.
        """
        query = query if query is not None else TradeQuery(**filters)
        conditions = query.conditions()
        statement = self._select.where(*conditions).order_by(*query.order_by()).limit(query.limit)
        items = await self._fetch(statement.offset(query.offset))
        total = await _count(self._db, trades, conditions) if with_total else None
        return Page(items=items, limit=query.limit, offset=query.offset, total=total)

    async def count(self) -> int:
        """How many trades the table holds."""
        return await _count(self._db, trades, [])

    async def _fetch(self, statement: Select[Any]) -> list[Trade]:
        async with self._db.read() as connection:
            rows = (await connection.execute(statement)).all()
        return self._reader.records(rows)

    # ------------------------------------------------------------------ export (persistence.tools.export)

    def iter_batches(self, **filters: Any) -> AsyncGenerator[Any, None]:
        """Stream the matching trades as pyarrow ``RecordBatch``\\ es (needs ``persistence-sidecar[analysis]``)."""
        return history_export.iter_batches(self._db, BY_ENTITY["trade"].export_name, **filters)

    async def export(self, path: str | os.PathLike[str], format: str | None = None, **filters: Any) -> ExportResult:
        """Write the matching trades to ``path`` as Parquet, CSV or JSONL, atomically."""
        return await history_export.export(self._db, BY_ENTITY["trade"].export_name, path, format, **filters)


class SignalRepository:
    """Signals: batched upserts, execution updates, and reads."""

    def __init__(self, database: Database, audit: AuditLog | None = None) -> None:
        self._db = database
        self._audit = audit if audit is not None else AuditLog(database)
        # A replay of the unexecuted version never undoes a recorded execution.
        self._versions = _versioned(database, Signal)
        self._reader = RowReader(_columns(signals), Signal, sqlite=database.is_sqlite)
        self._select = select(*self._reader.columns)

    async def upsert(self, connection: AsyncConnection, batch: Sequence[Signal]) -> list[Version]:
        """Insert or update ``batch``, in order, inside the caller's transaction; the versions written (and audited)."""
        versions, _, _ = await _write_audited(self._audit, self._versions, connection, batch)
        return versions

    async def apply_executions(
        self, connection: AsyncConnection, batch: Sequence[SignalExecution]
    ) -> list[SignalExecution]:
        """Apply execution updates in order (each audited); return those whose signal is not in the table."""
        return await self.upsert_and_execute(connection, (), batch)

    async def upsert_and_execute(
        self, connection: AsyncConnection, batch: Sequence[Signal], executions: Sequence[SignalExecution]
    ) -> list[SignalExecution]:
        """:meth:`upsert` ``batch``, then apply ``executions``, in one pass over the stored rows; the unknown ones.

        One pass reads (and on PostgreSQL locks) every signal it touches at once, in key order, so two writers of
        overlapping signals queue instead of deadlocking.
        """
        changes = [(change.signal_id, partial(_executed, change)) for change in executions]
        _, missing, _ = await _write_audited(self._audit, self._versions, connection, batch, changes)
        return [executions[index] for index in missing]

    async def save_signal(self, signal: Signal | Mapping[str, Any]) -> None:
        """Insert or update one signal in its own transaction."""
        record = Signal.parse(signal)
        async with self._db.write() as connection:
            await self.upsert(connection, [record])

    async def update_signal_execution(
        self, signal_id: str, executed: bool, execution_status: str | None = None
    ) -> bool:
        """Record that a signal was (or was not) executed; ``False`` when no such signal exists."""
        change = SignalExecution.parse(
            {"signal_id": signal_id, "executed": executed, "execution_status": execution_status}
        )
        async with self._db.write() as connection:
            return not await self.apply_executions(connection, [change])

    async def get_signal_by_id(self, signal_id: str) -> Signal | None:
        """The signal with this ``signal_id``, or ``None``."""
        rows = await self._fetch(self._select.where(signals.c.signal_id == signal_id))
        return rows[0] if rows else None

    async def get_recent_signals(self, limit: int = 100) -> list[Signal]:
        """The ``limit`` most recently generated signals, newest first."""
        check_page(limit, 0)
        order = order_by(signals, "generated_at", "desc")
        return await self._fetch(self._select.order_by(*order).limit(limit))

    async def get_signals_by_status(self, executed: bool, limit: int = MAX_PAGE_SIZE) -> list[Signal]:
        """Signals that were (or were not) executed, newest first."""
        check_page(limit, 0)
        order = order_by(signals, "generated_at", "desc")
        return await self._fetch(self._select.where(signals.c.executed == executed).order_by(*order).limit(limit))

    async def query(
        self, query: SignalQuery | None = None, /, *, with_total: bool = False, **filters: Any
    ) -> Page[Signal]:
        """Signals matching a :class:`~persistence.tables.queries.SignalQuery` (or its fields given as keywords), one
        page.

        ``with_total`` also counts every matching signal over all pages.
        """
        query = query if query is not None else SignalQuery(**filters)
        conditions = query.conditions()
        statement = self._select.where(*conditions).order_by(*query.order_by()).limit(query.limit)
        items = await self._fetch(statement.offset(query.offset))
        total = await _count(self._db, signals, conditions) if with_total else None
        return Page(items=items, limit=query.limit, offset=query.offset, total=total)

    async def _fetch(self, statement: Select[Any]) -> list[Signal]:
        async with self._db.read() as connection:
            rows = (await connection.execute(statement)).all()
        return self._reader.records(rows)

    # ------------------------------------------------------------------ export (persistence.tools.export)

    def iter_batches(self, **filters: Any) -> AsyncGenerator[Any, None]:
        """Stream the matching signals as pyarrow ``RecordBatch``\\ es (needs ``persistence-sidecar[analysis]``)."""
        return history_export.iter_batches(self._db, BY_ENTITY["signal"].export_name, **filters)

    async def export(self, path: str | os.PathLike[str], format: str | None = None, **filters: Any) -> ExportResult:
        """Write the matching signals to ``path`` as Parquet, CSV or JSONL, atomically."""
        return await history_export.export(self._db, BY_ENTITY["signal"].export_name, path, format, **filters)


class _AppendOnlyRepository(Generic[RecordT]):
    """Immutable events keyed by a generated ``id``: an insert that ignores a replay of the same id."""

    record_type: type[RecordT]

    def __init__(self, database: Database, audit: AuditLog | None = None) -> None:
        self._db = database
        self._audit = audit if audit is not None else AuditLog(database)
        kind = BY_ENTITY[self.record_type.entity]
        self.table = TABLE_OF[kind.entity]
        self.time_column = kind.time_column
        self.export_entity = kind.export_name
        self._versions = _versioned(database, self.record_type)
        columns = [self.table.c[name] for name in self.record_type.model_fields]
        self._reader = RowReader(columns, self.record_type, sqlite=database.is_sqlite)
        self._select = select(*self._reader.columns)

    async def insert(self, connection: AsyncConnection, batch: Sequence[RecordT]) -> list[Version]:
        """Insert ``batch`` inside the caller's transaction (known ids are skipped); the versions written (audited)."""
        versions, _, _ = await _write_audited(self._audit, self._versions, connection, batch)
        return versions

    async def _save(self, record: RecordT) -> None:
        async with self._db.write() as connection:
            await self.insert(connection, [record])

    async def _between(
        self, start_date: datetime | None, end_date: datetime | None, session: str | None, limit: int
    ) -> list[RecordT]:
        check_page(limit, 0)
        column = self.table.c[self.time_column]
        conditions = date_range(column, start_date, end_date)
        if session is not None:
            conditions.append(self.table.c.session == session.upper())
        statement = self._select.where(*conditions).order_by(column.desc(), self.table.c.id).limit(limit)
        async with self._db.read() as connection:
            rows = (await connection.execute(statement)).all()
        return self._reader.records(rows)

    # ------------------------------------------------------------------ export (persistence.tools.export)

    def iter_batches(self, **filters: Any) -> AsyncGenerator[Any, None]:
        """Stream the matching records as pyarrow ``RecordBatch``\\ es (needs ``persistence-sidecar[analysis]``)."""
        return history_export.iter_batches(self._db, self.export_entity, **filters)

    async def export(self, path: str | os.PathLike[str], format: str | None = None, **filters: Any) -> ExportResult:
        """Write the matching records to ``path`` as Parquet, CSV or JSONL, atomically."""
        return await history_export.export(self._db, self.export_entity, path, format, **filters)


class PerformanceSnapshotRepository(_AppendOnlyRepository[PerformanceSnapshot]):
    """Performance snapshots."""

    record_type = PerformanceSnapshot

    async def save_snapshot(self, snapshot: PerformanceSnapshot | Mapping[str, Any]) -> None:
        """Insert one snapshot in its own transaction."""
        await self._save(PerformanceSnapshot.parse(snapshot))

    async def get_snapshots(
        self,
        start_date: datetime | None = None,
        end_date: datetime | None = None,
        session: str | None = None,
        limit: int = 100,
    ) -> list[PerformanceSnapshot]:
        """Snapshots in a time range (inclusive), newest first."""
        return await self._between(start_date, end_date, session, limit)


class ParameterHistoryRepository(_AppendOnlyRepository[ParameterChange]):
    """The history of parameter changes."""

    record_type = ParameterChange

    async def save_change(self, change: ParameterChange | Mapping[str, Any]) -> None:
        """Insert one parameter change in its own transaction."""
        await self._save(ParameterChange.parse(change))

    async def get_changes(
        self,
        start_date: datetime | None = None,
        end_date: datetime | None = None,
        session: str | None = None,
        limit: int = 100,
    ) -> list[ParameterChange]:
        """Parameter changes in a time range (inclusive), newest first."""
        return await self._between(start_date, end_date, session, limit)


_SAME_DEAD_LETTER = (
    select(dead_letters.c.id)
    .where(
        dead_letters.c.entity == bindparam("entity"),
        dead_letters.c.natural_key == bindparam("natural_key"),
        dead_letters.c.payload == bindparam("payload"),
    )
    .limit(1)
)
"""A dead letter of the same record with the same content (found through the ``(entity, natural_key)`` index)."""
_SAME_DEAD_LETTER_SQLITE = "SELECT 1 FROM dead_letters WHERE entity = ? AND natural_key = ? AND payload = ? LIMIT 1"


class DeadLetterRepository:
    """Records that can never be written, kept with their error for a human to look at."""

    def __init__(self, database: Database) -> None:
        self._db = database
        self._driver_batch = (
            DriverBatch(dead_letters.insert(), dead_letters, database.engine.dialect) if database.is_sqlite else None
        )

    async def insert(self, connection: AsyncConnection, entries: Sequence[tuple[Record, BaseException | str]]) -> None:
        """Put each (record, error) into ``dead_letters`` inside the caller's transaction, once: a record already
        there with the same content (a replay of a record dead-lettered before a stop or a crash could settle it)
        is not added again."""
        rows = []
        for row in self._rows(entries):
            found = await connection.execute(_SAME_DEAD_LETTER, row)
            if found.first() is None:
                rows.append(row)
        if rows:
            await connection.execute(dead_letters.insert(), rows)

    def insert_on(self, session: DriverSession, entries: Sequence[tuple[Record, BaseException | str]]) -> None:
        """:meth:`insert`, on SQLite's driver thread."""
        if not entries or self._driver_batch is None:
            return
        rows = [
            row
            for row in self._rows(entries)
            if not session.execute(_SAME_DEAD_LETTER_SQLITE, (row["entity"], row["natural_key"], row["payload"]))
        ]
        if rows:
            session.executemany(self._driver_batch.sql, self._driver_batch.encode(rows))

    @staticmethod
    def _rows(entries: Sequence[tuple[Record, BaseException | str]]) -> list[dict[str, Any]]:
        now = utc_now()
        return [
            {
                "entity": record.entity,
                "natural_key": record.key[:64],
                "payload": json.dumps(record.to_json(), separators=(",", ":")),
                "error": str(error)[:4000],
                "error_class": (type(error).__name__ if isinstance(error, BaseException) else "Error")[:128],
                "created_at": now,
            }
            for record, error in entries
        ]

    async def add(self, record: Record, error: BaseException | str) -> None:
        """Dead-letter one record in its own transaction."""
        async with self._db.write() as connection:
            await self.insert(connection, [(record, error)])

    async def list(self, limit: int = 100, entity: str | None = None) -> list[DeadLetterRow]:
        """The most recent dead letters, newest first."""
        check_page(limit, 0)
        statement = select(dead_letters).order_by(dead_letters.c.id.desc()).limit(limit)
        if entity is not None:
            statement = statement.where(dead_letters.c.entity == entity)
        async with self._db.read() as connection:
            result = await connection.execute(statement)
            return [
                DeadLetterRow(
                    entity=row["entity"],
                    natural_key=row["natural_key"],
                    payload=json.loads(row["payload"]),
                    error=row["error"],
                    error_class=row["error_class"],
                    created_at=row["created_at"],
                )
                for row in result.mappings()
            ]

    async def count(self) -> int:
        """How many dead letters there are."""
        return await _count(self._db, dead_letters, [])


def batch_parts(records: Sequence[Record]) -> Parts:
    """A batch's records grouped as :meth:`Repositories.write_batch` takes them: trades, signals, execution updates,
    snapshots, parameter changes, each group in batch order."""
    groups: dict[type[Record], list[Record]] = {
        Trade: [],
        Signal: [],
        SignalExecution: [],
        PerformanceSnapshot: [],
        ParameterChange: [],
    }
    for record in records:
        group = groups.get(type(record))
        if group is None:  # a subclass of a record type (a host's own): its base's group
            group = next(group for kind, group in groups.items() if isinstance(record, kind))
        group.append(record)
    return tuple(groups.values())


class Repositories:
    """Every repository over one database."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.audit = AuditLog(database)
        self.trades = TradeRepository(database, self.audit)
        self.signals = SignalRepository(database, self.audit)
        self.snapshots = PerformanceSnapshotRepository(database, self.audit)
        self.parameters = ParameterHistoryRepository(database, self.audit)
        self.dead_letters = DeadLetterRepository(database)
        self._ahead = AheadTransactions(database)

    async def write_batch(
        self,
        trades: Sequence[Trade],
        signals: Sequence[Signal],
        executions: Sequence[SignalExecution],
        snapshots: Sequence[PerformanceSnapshot],
        changes: Sequence[ParameterChange],
        *,
        unknown_signal: str,
    ) -> BatchWritten:
        """Write a writer's batch in one transaction, every version audited: the trades, the signals and then the
        execution updates, the snapshots, the parameter changes; an execution whose signal does not exist goes to
        ``dead_letters`` with the reason ``unknown_signal``, in the same transaction.

        On SQLite the whole transaction is one call on the driver's thread (the event loop waits once).
        """
        if self.database.is_sqlite:
            return await self.database.write_on_driver(
                partial(self._write_batch_on, trades, signals, executions, snapshots, changes, unknown_signal)
            )
        parts: Parts = (trades, signals, executions, snapshots, changes)
        try:
            held = await self._ahead.take(parts)
            if held is None:
                async with self.database.write() as connection:
                    return await self._write_parts(connection, parts, None, unknown_signal)
            held.continued()
            try:
                written = await self._write_parts(held.connection, parts, held.claims, unknown_signal)
                await held.commit()
            except BaseException:
                await held.discard()
                raise
            return written
        except BaseException:
            # The batch after this one was begun on the promise that this one commits: give it up (a retry of this
            # one must never share the server with it, nor a stop wait for it).
            self._ahead.abandon()
            raise

    async def _write_parts(
        self, connection: AsyncConnection, parts: Parts, claims: list[Claimed | None] | None, unknown_signal: str
    ) -> BatchWritten:
        """:meth:`write_batch` on PostgreSQL inside ``connection``'s transaction: the chain lock, every table's new rows
        claimed (``claims``: done already, in a transaction begun ahead), every table's rows finished, then every
        version's entry at once."""
        executions = parts[2]
        await self.audit.lock(connection)
        if claims is None:
            claims = await self._claim_parts(connection, parts)
        versions: list[Version] = []
        unknown: list[SignalExecution] = []
        for (table, _, updates), claimed in zip(self._batch_parts(*parts), claims, strict=True):
            if claimed is None:
                continue
            written, missing = await table.finish(connection, claimed)
            versions += written
            if updates:
                unknown = [executions[position] for position in missing]
        self._ahead.written(parts)  # the rows are written: the batch after this one may begin
        head = await self.audit.append(connection, versions)
        if unknown:
            await self.dead_letters.insert(connection, [(change, unknown_signal) for change in unknown])
        return BatchWritten(unknown, head)

    def _write_batch_on(
        self,
        trades: Sequence[Trade],
        signals: Sequence[Signal],
        executions: Sequence[SignalExecution],
        snapshots: Sequence[PerformanceSnapshot],
        changes: Sequence[ParameterChange],
        unknown_signal: str,
        session: DriverSession,
    ) -> BatchWritten:
        appender = self.audit.appender_on(session)
        unknown: list[SignalExecution] = []
        for table, records, updates in self._batch_parts(trades, signals, executions, snapshots, changes):
            _, missing, _ = _write_audited_on(self.audit, table, session, records, updates, appender)
            if updates:
                unknown = [executions[index] for index in missing]
        if unknown:
            self.dead_letters.insert_on(session, [(change, unknown_signal) for change in unknown])
        return BatchWritten(unknown, appender.appended)

    def begin_ahead(self, records: Sequence[Record], committing: Sequence[Record]) -> asyncio.Task[Any] | None:
        """Begin the transaction of ``records`` (the batch after ``committing``) ahead, on PostgreSQL: its new rows
        are claimed in a transaction of their own once the rows of ``committing`` are written, and the
        :meth:`write_batch` of exactly these records continues it (:mod:`persistence.tables.ahead`).

        ``None`` (nothing begun) on SQLite, with a pool of fewer than two connections, while a fault of the fault kit
        is installed, and when a key of ``records`` is in ``committing``: the two transactions must never wait for
        each other.
        """
        if not self._ahead.allowed or not records:
            return None
        busy = {(record.entity, record.key) for record in committing}
        if any((record.entity, record.key) in busy for record in records):
            return None

        return self._ahead.start(batch_parts(records), batch_parts(committing), self._claim_parts)

    async def _claim_parts(self, connection: AsyncConnection, parts: Parts) -> list[Claimed | None]:
        """Each table's first half of a batch's write (:meth:`VersionedTable.claim
        <persistence.tables.versioned.VersionedTable.claim>`), in the order a batch writes them; ``None`` for a table
        with nothing in the batch. In the batch's own transaction, or in one begun ahead."""
        return [
            await table.claim(connection, table.rows(group), updates) if group or updates else None
            for table, group, updates in self._batch_parts(*parts)
        ]

    async def warm_connections(self) -> None:
        """PostgreSQL, at start: open the connections the writer takes (two when transactions are begun ahead, see
        :meth:`begin_ahead`) and send a batch's statements once on each, in a transaction rolled back.

        Otherwise the first batches after a start open the second connection and prepare their statements (nine, two
        of them after a catalog lookup for ``COPY``: 5-10 ms of the first burst, measured). Nothing here is an error:
        a server that refuses now is the writer's to meet. Nor does it wait on a lock another session holds (a table
        being indexed, the chain lock of a process with the same instance id) for longer than :data:`WARM_LOCK_WAIT`:
        a start must not take a query timeout for what only saves milliseconds.
        """
        if self.database.dialect_name != "postgresql":
            return
        with contextlib.suppress(Exception):
            async with contextlib.AsyncExitStack() as stack:
                for _ in range(2 if self._ahead.enabled else 1):
                    connection = await stack.enter_async_context(self.database.engine.connect())
                    try:
                        await connection.exec_driver_sql(BEGIN_SQL)
                        await connection.exec_driver_sql(f"SET LOCAL lock_timeout = '{WARM_LOCK_WAIT * 1000:.0f}ms'")
                        for table in self._tables():
                            await table.warm(connection)
                        await self.audit.warm(connection)
                    finally:
                        await connection.rollback()

    async def discard_ahead(self) -> None:
        """Roll back a transaction begun ahead, or being begun (:meth:`begin_ahead`)."""
        await self._ahead.discard()

    def _tables(self) -> tuple[VersionedTable[Any], ...]:
        """The record tables, in the order a batch writes them."""
        return (self.trades._versions, self.signals._versions, self.snapshots._versions, self.parameters._versions)

    def _batch_parts(
        self,
        trades: Sequence[Trade],
        signals: Sequence[Signal],
        executions: Sequence[SignalExecution],
        snapshots: Sequence[PerformanceSnapshot],
        changes: Sequence[ParameterChange],
    ) -> list[tuple[VersionedTable[Any], Sequence[Record], list[tuple[str, Change]]]]:
        """Each table's records and changes, in the order a batch writes them."""
        executed: list[tuple[str, Change]] = [(change.signal_id, partial(_executed, change)) for change in executions]
        return list(zip(self._tables(), (trades, signals, snapshots, changes), ([], executed, [], []), strict=True))

    async def table_counts(self) -> dict[str, int]:
        """Row counts of the six tables."""
        counts: dict[str, int] = {}
        for table in TABLES:
            counts[table.name] = await _count(self.database, table, [])
        return counts


async def _count(database: Database, table: Table, conditions: Sequence[ColumnElement[bool]]) -> int:
    async with database.read() as connection:
        result = await connection.execute(select(func.count()).select_from(table).where(*conditions))
        return int(result.scalar_one())
