"""History for analysis: the four record tables and the audit trail as pyarrow batches, and written to Parquet, CSV
or JSONL.

:func:`iter_batches` streams one table in chunks of ``chunk_rows`` (never the whole table in memory) as pyarrow
``RecordBatch``es with a fixed schema: decimals as ``decimal128(18, 8)``, timestamps as ``timestamp[us, UTC]``. On
SQLite the rows are read as stored (scaled integers, UTC text) through the engine's driver connection, one cursor over
one read snapshot, and converted a column at a time by pyarrow, which is exact: a stored decimal is its unscaled
value, so an int64 array reinterpreted as ``decimal128(18, 8)`` is the value digit for digit. On PostgreSQL a
server-side cursor streams the rows and pyarrow converts the ``Decimal``\\ s. Conversion runs in a worker thread.

:func:`export` writes the batches through :mod:`persistence.tools.export_files` (pyarrow's own writers for Parquet and
CSV, JSON lines by hand) into a hidden temporary file renamed over ``path`` only when complete, so a killed export never
leaves a partial file at ``path`` (the next export to that path removes the leftover). pyarrow is the
``persistence-sidecar[analysis]`` extra; it is imported only when
used, and its absence is reported as :class:`AnalysisExtraMissingError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from sqlalchemy import Boolean, Column, ColumnElement, Table, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from persistence.db.columns import ExactNumeric, UTCDateTime, to_sqlite_datetime
from persistence.db.engine import Database, driver_of
from persistence.db.schema import TABLE_OF, audit_log
from persistence.errors import ANALYSIS_EXTRA, AnalysisExtraMissingError, InvalidQueryError
from persistence.records.models import DECIMAL_PRECISION, DECIMAL_SCALE, SESSIONS, to_utc
from persistence.records.parser import rules_of
from persistence.records.registry import RECORD_KINDS, RecordKind
from persistence.tools.export_files import (
    FORMATS,
    PARQUET_ROW_GROUP_ROWS,
    ExportFile,
    ExportFormat,
    publish,
    remove_stale_partials,
    require_pyarrow,
    resolve_format,
    temporary_path,
    write_failure,
)

T = TypeVar("T")

__all__ = [
    "ANALYSIS_EXTRA",
    "DEFAULT_CHUNK_ROWS",
    "EXPORTABLES",
    "FORMATS",
    "PARQUET_ROW_GROUP_ROWS",
    "AnalysisExtraMissingError",
    "ExportFormat",
    "ExportResult",
    "Exportable",
    "arrow_schema",
    "count_rows",
    "export",
    "exportable",
    "iter_batches",
    "require_pyarrow",
    "resolve_format",
]

DEFAULT_CHUNK_ROWS = 8_192
"""Rows per batch: large enough for pyarrow to work in bulk; the rows of a chunk as Python objects take ~20 MiB."""
ProgressCallback = Callable[[int], None]
SCAN_CACHE_KIB = -8192
"""SQLite page cache while an export scans a table: 8 MiB (negative: KiB, as ``PRAGMA cache_size`` takes it)."""


# ---------------------------------------------------------------------------------------------- what is exported


FilterKind = Literal["from", "to", "equals", "session", "flag"]


@dataclass(frozen=True, slots=True)
class Exportable:
    """One exportable table: its columns (``fields``, in table order), stream order and filters."""

    name: str
    table: Table
    fields: tuple[str, ...]
    order_by: tuple[str, ...]
    filters: Mapping[str, tuple[str, FilterKind]]

    @property
    def columns(self) -> list[Column[Any]]:
        """The exported columns, in table order."""
        return [column for column in self.table.c if column.name in self.fields]


def _time_filters(column: str) -> dict[str, tuple[str, FilterKind]]:
    return {"start_date": (column, "from"), "end_date": (column, "to"), "instance_id": ("instance_id", "equals")}


def _record_exportable(kind: RecordKind) -> Exportable:
    """A record table's export: the record's fields (an integer surrogate ``id`` is not one) and the ``instance_id``
    of the orchestrator that wrote the row; filtered on its time and on its registered fields, each as its type
    says (a flag, a session, or text)."""
    rules = {rule.name: rule for rule in rules_of(kind.model)}
    filters: dict[str, tuple[str, FilterKind]] = _time_filters(kind.time_column)
    for name in kind.filters:
        rule = rules[name]
        filters[name] = (name, "flag" if rule.kind == "flag" else "session" if rule.choices == SESSIONS else "equals")
    return Exportable(
        kind.export_name,
        TABLE_OF[kind.entity],
        (*kind.model.model_fields, "instance_id"),
        kind.sort_columns,
        filters,
    )


EXPORTABLES: dict[str, Exportable] = {
    **{kind.export_name: _record_exportable(kind) for kind in RECORD_KINDS},
    "audit": Exportable(
        "audit",
        audit_log,
        tuple(column.name for column in audit_log.c),
        ("id",),
        # "record" (not "entity", which names the table to export): the kind of record of the entries.
        {**_time_filters("recorded_at"), "record": ("entity", "equals")},
    ),
}
"""What ``export`` knows, by the name the command line uses."""


def exportable(entity: str) -> Exportable:
    """The exportable table called ``entity`` (``trades``, ``signals``, ``snapshots``, ``parameters``, ``audit``)."""
    try:
        return EXPORTABLES[entity]
    except KeyError:
        raise InvalidQueryError("entity", f"must be one of {', '.join(EXPORTABLES)}") from None


def arrow_schema(spec: Exportable) -> Any:
    """The pyarrow schema of an exported table: exact decimals, UTC timestamps."""
    pa = require_pyarrow()
    return pa.schema(
        [pa.field(column.name, _arrow_type(pa, column), nullable=column.nullable) for column in spec.columns]
    )


def _arrow_type(pa: Any, column: Column[Any]) -> Any:
    if isinstance(column.type, ExactNumeric):
        return pa.decimal128(DECIMAL_PRECISION, DECIMAL_SCALE)
    if isinstance(column.type, UTCDateTime):
        return pa.timestamp("us", tz="UTC")
    if isinstance(column.type, Boolean):
        return pa.bool_()
    if column.type.python_type is int:
        return pa.int64()
    return pa.string()


@dataclass(frozen=True, slots=True)
class _Condition:
    column: str
    operator: str
    value: Any


def _conditions(spec: Exportable, filters: Mapping[str, Any]) -> list[_Condition]:
    unknown = sorted(set(filters) - set(spec.filters))
    if unknown:
        raise InvalidQueryError(unknown[0], f"is not a filter of {spec.name}; use {', '.join(spec.filters)}")
    conditions: list[_Condition] = []
    for name, value in filters.items():
        if value is None:
            continue
        column, kind = spec.filters[name]
        if kind in ("from", "to"):
            if not isinstance(value, datetime):
                raise InvalidQueryError(name, "must be a datetime")
            conditions.append(_Condition(column, ">=" if kind == "from" else "<=", to_utc(value)))
        elif kind == "session":
            session = str(value).upper()
            if session not in SESSIONS:
                raise InvalidQueryError(name, f"must be one of {', '.join(SESSIONS)}")
            conditions.append(_Condition(column, "=", session))
        elif kind == "flag":
            conditions.append(_Condition(column, "=", bool(value)))
        else:
            text = str(value)
            if "\x00" in text:  # PostgreSQL refuses NUL in text, even as a parameter
                raise InvalidQueryError(name, "must not contain NUL characters")
            conditions.append(_Condition(column, "=", text))
    start, end = filters.get("start_date"), filters.get("end_date")
    if isinstance(start, datetime) and isinstance(end, datetime) and to_utc(start) > to_utc(end):
        raise InvalidQueryError("start_date", "is after end_date")
    return conditions


def _sqlite_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return to_sqlite_datetime(value)
    if isinstance(value, bool):
        return int(value)
    return value


def _sqlite_where(conditions: Sequence[_Condition]) -> tuple[str, list[Any]]:
    if not conditions:
        return "", []
    clauses = " AND ".join(f'"{condition.column}" {condition.operator} ?' for condition in conditions)
    return f" WHERE {clauses}", [_sqlite_value(condition.value) for condition in conditions]


def _core_where(table: Table, conditions: Sequence[_Condition]) -> list[ColumnElement[bool]]:
    clauses: list[ColumnElement[bool]] = []
    for condition in conditions:
        column = table.c[condition.column]
        if condition.operator == ">=":
            clauses.append(column >= condition.value)
        elif condition.operator == "<=":
            clauses.append(column <= condition.value)
        else:
            clauses.append(column == condition.value)
    return clauses


# ---------------------------------------------------------------------------------------------- reading


class _Converter:
    """Turns a chunk of row tuples into one RecordBatch, a column at a time (run in a worker thread)."""

    def __init__(self, spec: Exportable, *, stored: bool) -> None:
        pa = require_pyarrow()
        self._pa = pa
        self.schema = arrow_schema(spec)
        self._convert = [self._column_converter(column, stored=stored) for column in spec.columns]

    def _column_converter(self, column: Column[Any], *, stored: bool) -> Callable[[Sequence[Any]], Any]:
        pa = self._pa
        target = _arrow_type(pa, column)
        if stored and isinstance(column.type, ExactNumeric):
            # The stored integer is the unscaled decimal: the same 16 bytes read as decimal128(18, 8).
            unscaled = pa.decimal128(DECIMAL_PRECISION + 1, 0)
            return lambda values: pa.array(values, pa.int64()).cast(unscaled).view(target)
        if stored and isinstance(column.type, UTCDateTime):
            naive = pa.timestamp("us")
            return lambda values: pa.array(values, pa.string()).cast(naive).cast(target)
        if stored and isinstance(column.type, Boolean):
            return lambda values: pa.array(values, pa.int64()).cast(target)
        return lambda values: pa.array(values, target)

    def __call__(self, rows: Sequence[Sequence[Any]]) -> Any:
        columns = list(zip(*rows, strict=True)) if rows else [() for _ in self._convert]
        arrays = [convert(values) for convert, values in zip(self._convert, columns, strict=True)]
        return self._pa.RecordBatch.from_arrays(arrays, schema=self.schema)


async def count_rows(database: Database, entity: str, **filters: Any) -> int:
    """How many rows an export of ``entity`` with ``filters`` would write."""
    spec = exportable(entity)
    conditions = _core_where(spec.table, _conditions(spec, filters))
    async with database.read() as connection:
        result = await connection.execute(select(func.count()).select_from(spec.table).where(*conditions))
        return int(result.scalar_one())


async def iter_batches(
    database: Database,
    entity: str,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    **filters: Any,
) -> AsyncGenerator[Any, None]:
    """Stream ``entity``'s rows matching ``filters`` as pyarrow ``RecordBatch``\\ es of at most ``chunk_rows`` rows.

    Rows come in the order they were first recorded (trades and signals) or by time (snapshots, parameter changes),
    all from one read snapshot. Filters are those of the history queries, e.g. ``symbol``, ``session``,
    ``start_date`` / ``end_date`` (inclusive, on the table's time column).
    """
    spec = exportable(entity)
    if chunk_rows < 1:
        raise InvalidQueryError("chunk_rows", "must be at least 1")
    conditions = _conditions(spec, filters)
    convert = _Converter(spec, stored=database.is_sqlite)
    async with database.read() as connection:
        chunks = _sqlite_chunks if database.is_sqlite else _streamed_chunks
        # Closed here, while the connection is open: an export stopped half way (a full disk) must not leave the
        # reader to be finalised later on a closed connection.
        async with contextlib.aclosing(chunks(connection, spec, conditions, chunk_rows)) as stream:
            async for rows in stream:
                yield await asyncio.to_thread(convert, rows)


async def _sqlite_chunks(
    connection: AsyncConnection, spec: Exportable, conditions: Sequence[_Condition], chunk_rows: int
) -> AsyncGenerator[Sequence[Sequence[Any]], None]:
    # One cursor on the driver: a single statement reads from one snapshot, and each fetch is one hop to the driver's
    # thread returning rows as stored, with none of SQLAlchemy's per-value processing.
    driver = await driver_of(connection)
    names = ", ".join(f'"{column.name}"' for column in spec.columns)
    where, parameters = _sqlite_where(conditions)
    order = ", ".join(f'"{name}"' for name in spec.order_by)
    sql = f'SELECT {names} FROM "{spec.table.name}"{where} ORDER BY {order}'  # noqa: S608 - names from the schema
    # A scan reads every page once: a small page cache for it keeps memory flat (the pool's connections otherwise
    # keep PERSISTENCE_SQLITE_CACHE_MIB each), and the previous size is put back for the queries that follow.
    (cache_size,) = (await driver.execute_fetchall("PRAGMA cache_size"))[0]
    await driver.execute(f"PRAGMA cache_size={SCAN_CACHE_KIB}")
    try:
        cursor = await driver.execute(sql, parameters)
        try:
            while rows := await cursor.fetchmany(chunk_rows):
                yield rows
        finally:
            await cursor.close()
    finally:
        await driver.execute(f"PRAGMA cache_size={int(cache_size)}")


async def _streamed_chunks(
    connection: AsyncConnection, spec: Exportable, conditions: Sequence[_Condition], chunk_rows: int
) -> AsyncGenerator[Sequence[Sequence[Any]], None]:
    statement = (
        select(*spec.columns)
        .where(*_core_where(spec.table, conditions))
        .order_by(*(spec.table.c[name] for name in spec.order_by))
        .execution_options(yield_per=chunk_rows)
    )
    result = await connection.stream(statement)
    try:
        async for rows in result.partitions(chunk_rows):
            yield rows
    finally:
        await result.close()


# ---------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True, slots=True)
class ExportResult:
    """What an export wrote: where, in which format, how many rows and bytes, and how long it took."""

    entity: str
    path: Path
    format: ExportFormat
    rows: int
    bytes: int
    seconds: float

    def summary(self) -> str:
        """One line for people: rows, file, bytes, seconds."""
        return (
            f"exported {self.rows:,} {self.entity} to {self.path} ({self.format}, {self.bytes:,} bytes)"
            f" in {self.seconds:.1f} s"
        )


async def export(
    database: Database,
    entity: str,
    path: str | os.PathLike[str],
    format: str | None = None,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: ProgressCallback | None = None,
    **filters: Any,
) -> ExportResult:
    """Write ``entity``'s rows matching ``filters`` to ``path`` as Parquet, CSV or JSONL, atomically.

    ``format`` defaults to what the file name says (Parquet otherwise). ``progress`` is called with the number of
    rows written so far after each batch. The file appears at ``path`` complete or not at all.
    """
    require_pyarrow()
    started = time.perf_counter()
    destination = Path(path)
    fmt = resolve_format(destination, format)
    spec = exportable(entity)
    _conditions(spec, filters)  # bad filters fail before any file is created
    partial = temporary_path(destination)
    # One worker thread for the file, so writes happen in order and an abort never races a write.
    files = ThreadPoolExecutor(max_workers=1, thread_name_prefix="persistence-export")
    loop = asyncio.get_running_loop()

    async def on_file(step: Callable[..., T], *args: Any) -> T:
        """One step on the file, in its thread; a file system's refusal names ``path`` and the cause."""
        try:
            return await loop.run_in_executor(files, step, *args)
        except OSError as exc:
            raise write_failure(destination, exc) from None

    try:
        await on_file(remove_stale_partials, destination)
        sink = await on_file(ExportFile, fmt, partial, arrow_schema(spec))
    except BaseException:
        files.shutdown(wait=False)
        raise
    rows = 0
    try:
        batches = iter_batches(database, entity, chunk_rows=chunk_rows, **filters)
        async with contextlib.aclosing(batches):
            async for batch in batches:
                await on_file(sink.write, batch)
                rows += batch.num_rows
                if progress is not None:
                    progress(rows)
        size = await on_file(sink.finish)
        await on_file(publish, partial, destination)
    except BaseException:
        await asyncio.shield(loop.run_in_executor(files, sink.abort))
        raise
    finally:
        files.shutdown(wait=False)
    return ExportResult(entity, destination, fmt, rows, size, time.perf_counter() - started)
